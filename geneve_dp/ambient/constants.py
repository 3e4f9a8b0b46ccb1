"""Istio ambient (1.18-1.20, iptables + GENEVE mode) constants, one definition each.

Values are the facts listed in the reference (istio-ambient-redirect.md §1). Marks are
kept as integers; the iptables renderer formats them.
"""

from __future__ import annotations

from typing import Final, Literal

IstioVersion = Literal["1.18", "1.19", "1.20"]
ISTIO_VERSIONS: Final[tuple[IstioVersion, ...]] = ("1.18", "1.19", "1.20")
DEFAULT_ISTIO_VERSION: Final[IstioVersion] = "1.20"

# Marks (value, mask). "V/M" matches when mark & M == V.
OUTBOUND_MARK: Final = 0x100
SKIP_MARK: Final = 0x200
CONN_SKIP_MARK: Final = 0x220
PROXY_MARK: Final = 0x210
PROXY_RET_MARK: Final = 0x040
TPROXY_MARK: Final = 0x400
TPROXY_MASK: Final = 0xFFF
ORG_SRC_RET_MARK: Final = 0x4D3
ORG_SRC_RET_MASK: Final = 0xFFF

# ip rule priorities
TPROXY_MARK_PRIORITY: Final = 20000
ORG_SRC_PRIORITY: Final = 20003
# Every ztunnel-namespace rule priority any Istio version used (20001/20002 were the
# Envoy-based ztunnel's); `ztunnel up` clears them all first, as Istio does.
ZTUNNEL_RULE_PRIORITIES: Final = range(TPROXY_MARK_PRIORITY, ORG_SRC_PRIORITY + 1)
NODE_RULE_PRIORITIES: Final = (100, 101, 102, 103)
MAIN_RULE_PRIORITY: Final = 32766  # rule 100 jumps ("goto") to the main table's rule

# Route tables
ROUTE_TABLE_INBOUND: Final = 100
ROUTE_TABLE_OUTBOUND: Final = 101
ROUTE_TABLE_PROXY: Final = 102
NODE_TABLES: Final = (ROUTE_TABLE_INBOUND, ROUTE_TABLE_OUTBOUND, ROUTE_TABLE_PROXY)

# Tunnels
INBOUND_TUN: Final = "istioin"
OUTBOUND_TUN: Final = "istioout"
ZT_INBOUND_TUN: Final = "p" + INBOUND_TUN  # "p" marks the ztunnel-side end
ZT_OUTBOUND_TUN: Final = "p" + OUTBOUND_TUN
ZT_TUN_PREFIX: Final = "pistio"  # what a stale ztunnel-side tunnel device is known by
INBOUND_TUN_VNI: Final = 1000
OUTBOUND_TUN_VNI: Final = 1001
INBOUND_TUN_IP: Final = "192.168.126.1"
ZT_INBOUND_TUN_IP: Final = "192.168.126.2"
OUTBOUND_TUN_IP: Final = "192.168.127.1"
ZT_OUTBOUND_TUN_IP: Final = "192.168.127.2"
TUN_PREFIX: Final = 30

# iptables chains and the built-in chains they hang off, per table, in the order
# Istio creates them (reference §3.3).
CHAIN_PREROUTING: Final = "ztunnel-PREROUTING"
CHAIN_POSTROUTING: Final = "ztunnel-POSTROUTING"
CHAIN_INPUT: Final = "ztunnel-INPUT"
CHAIN_OUTPUT: Final = "ztunnel-OUTPUT"
CHAIN_FORWARD: Final = "ztunnel-FORWARD"
CHAIN_PREFIX: Final = "ztunnel-"

IPSET_NAME: Final = "ztunnel-pods-ips"

# ztunnel listener ports
DNS_CAPTURE_PORT: Final = 15053
ZTUNNEL_INBOUND_PORT: Final = 15008  # HBONE
ZTUNNEL_OUTBOUND_PORT: Final = 15001
ZTUNNEL_INBOUND_PLAINTEXT_PORT: Final = 15006
PROXY_PORTS: Final = (ZTUNNEL_OUTBOUND_PORT, ZTUNNEL_INBOUND_PLAINTEXT_PORT, ZTUNNEL_INBOUND_PORT)

# Where `node up` / `ztunnel up` record what they applied, per network namespace.
STATE_ROOT: Final = "/run/geneve-dp/ambient"
