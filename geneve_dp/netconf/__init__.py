"""The only code that changes the kernel's network configuration (links, routes, rules,
sysctls, ipsets, iptables)."""
