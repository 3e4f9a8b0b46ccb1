"""Istio ambient (1.18-1.20) iptables + GENEVE redirection on geneve-dp endpoints.

node.py (istio-cni's node side), ztunnel.py (the ztunnel pod's namespace), pods.py
(enrolment), rules.py (the iptables rules as data), proxy.py (a transparent stand-in
for ztunnel), demo.py + topology.py (the scenario in network namespaces).
"""
