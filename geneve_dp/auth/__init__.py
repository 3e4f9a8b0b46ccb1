"""Authenticated tunnels: the GENEVE integrity option, key files and the reference
MAC and anti-replay window (csrc/auth.c is the C twin; README "Authenticated
tunnels" says what it protects against and what not)."""
