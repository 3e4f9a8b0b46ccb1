"""Istio ambient (1.18-1.20) iptables + GENEVE redirection on geneve-dp endpoints.

node.py (istio-cni's node side), ztunnel.py (the ztunnel pod's namespace), pods.py
(enrolment), rules.py (the iptables rules as data), profile.py (the record-then-change
steps both sides share), endpoints.py (the tunnel endpoints and the GENEVE port
choice), watch.py + reconcile.py (the watcher that puts back what was removed while
a side is up), procs.py (finding our helper processes), proxy.py (a transparent
stand-in for ztunnel), demo.py + topology.py (the scenario in network namespaces).
"""
