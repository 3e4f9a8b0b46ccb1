"""Facts the eBPF redirect mode's C programs and its Python loader share, one place each.

Standard library only: csrc/bpf/build_bpf.py loads this file by path and renders it
(with the listener ports and the TPROXY mark of ambient/constants.py) into the header
the BPF programs are compiled with, so the C and the Python side cannot disagree.
Values are the ones of the reference (istio-ambient-redirect.md §1, §8).
"""

from __future__ import annotations

from typing import Final

# skb->cb[4] as the node programs leave it for the next hop (§8): frames sent to the
# ztunnel pod carry OUTBOUND or INBOUND; frames ztunnel sends straight to a pod carry
# BYPASS, so the pod's egress program lets them through.
CB_OUTBOUND: Final = 4321
CB_INBOUND: Final = 1234
CB_BYPASS: Final = 0xC001F00D

# Marks of the fallback where bpf_sk_assign is missing: the ztunnel-side program marks
# new connections and iptables TPROXY (matching these exact values) takes them on.
EBPF_INBOUND_MARK: Final = 5678
EBPF_OUTBOUND_MARK: Final = 8765

ZTUNNEL_FLAG_DNS_CAPTURE: Final = 0x1  # ztunnel_info.flags bit 0
APP_INFO_MAX: Final = 8192  # ambient pods one node can hold

# Program names (ELF symbols) and where each is attached.
APP_OUTBOUND: Final = "app_outbound"  # ingress of an ambient pod's host veth
APP_INBOUND: Final = "app_inbound"  # egress of the same veth
ZTUNNEL_HOST_INGRESS: Final = "ztunnel_host_ingress"  # ingress of the ztunnel's host veth
ZTUNNEL_TPROXY: Final = "ztunnel_tproxy"  # ingress of the ztunnel pod's eth0 (sk_assign)
ZTUNNEL_MARK: Final = "ztunnel_mark"  # same place, the iptables TPROXY fallback

# Map names (at most 15 characters: the kernel keeps 16 bytes with the NUL).
MAP_APP_INFO: Final = "app_info"
MAP_ZTUNNEL_INFO: Final = "ztunnel_info"
MAP_HOST_IP: Final = "host_ip_info"
MAP_NODE_STATS: Final = "node_stats"
MAP_ZTUNNEL_STATS: Final = "ztunnel_stats"
NODE_MAPS: Final = (MAP_APP_INFO, MAP_ZTUNNEL_INFO, MAP_HOST_IP, MAP_NODE_STATS)

# Per-CPU counters, by index: every verdict of every program has a name.
NODE_COUNTERS: Final = (
    "out_redirect",  # app_outbound: to the ztunnel pod (OUTBOUND)
    "out_pass_not_ipv4",
    "out_pass_host_ip",  # to the node's own address (kubelet, node services)
    "out_pass_other_proto",  # neither TCP nor UDP (ICMP, ...)
    "out_pass_dns",  # UDP to port 53 without DNS capture
    "out_drop_no_ztunnel",  # no ztunnel_info: Istio drops rather than bypass
    "in_redirect",  # app_inbound: to the ztunnel pod (INBOUND)
    "in_pass_from_ztunnel",  # BYPASS: ztunnel_host_ingress sent it
    "in_pass_not_ipv4",
    "in_pass_host_ip",  # from the node's own address (probes)
    "in_pass_other_proto",
    "in_pass_dns",  # UDP from port 53
    "in_drop_no_ztunnel",
    "zt_bypass",  # ztunnel_host_ingress: straight to an ambient pod's veth
    "zt_pass",  # to anything else: normal routing
    "zt_pass_not_current",  # on a veth that is not the current ztunnel's
    "malformed",  # says IPv4 but the headers are cut short: left to the kernel
)
ZTUNNEL_COUNTERS: Final = (
    "tp_established",  # an existing connection's socket took it (bpf_sk_assign)
    "tp_listener_outbound",  # the 15001 listener (a new outbound connection)
    "tp_listener_inbound",  # 15008 (HBONE port)
    "tp_listener_plaintext",  # 15006 (any other inbound port)
    "tp_drop_no_listener",  # redirected TCP with no socket to take it (as TPROXY drops)
    "tp_drop_assign_failed",
    "tp_pass_not_redirected",  # not sent by the node programs: normal
    "tp_pass_not_tcp",  # redirected UDP: the ztunnel namespace routes it on
    "mk_established",  # fallback: unmarked, the 0x4d3 rule delivers it locally
    "mk_outbound",  # fallback: marked EBPF_OUTBOUND_MARK for TPROXY to 15001
    "mk_inbound",  # fallback: marked EBPF_INBOUND_MARK for TPROXY to 15008/15006
    "malformed",
)
