"""The Istio ambient iptables rules (reference §3.3 node side, §4 ztunnel side), as data.

Pure: given addresses and names, return a ``Ruleset``; ``netconf.iptables`` renders it as
iptables-restore input. Rule order inside each chain is Istio's, and it matters: MARK
does not stop chain traversal, RETURN does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..netconf.iptables import Chain, Rule, Ruleset
from . import constants as k


def _m(value: int) -> str:
    """A mark as Istio writes it: three hex digits at least (0x040, 0x4d3)."""
    return f"0x{value:03x}"


def _mm(value: int, mask: int | None = None) -> str:
    return f"{_m(value)}/{_m(value if mask is None else mask)}"


@dataclass(frozen=True)
class NodeRulesConfig:
    ztunnel_ip: ipaddress.IPv4Address
    ztunnel_veth: str
    host_ip: ipaddress.IPv4Address
    port: int = 6081
    dns_capture: bool = False
    version: k.IstioVersion = k.DEFAULT_ISTIO_VERSION


def node_chains(version: k.IstioVersion) -> tuple[Chain, ...]:
    """Our chains and their parents, in Istio's creation order (§3.3)."""
    chains = [
        Chain("nat", k.CHAIN_PREROUTING, "PREROUTING"),
        Chain("nat", k.CHAIN_POSTROUTING, "POSTROUTING"),
        Chain("mangle", k.CHAIN_PREROUTING, "PREROUTING"),
        Chain("mangle", k.CHAIN_POSTROUTING, "POSTROUTING"),
        Chain("mangle", k.CHAIN_OUTPUT, "OUTPUT"),
        Chain("mangle", k.CHAIN_INPUT, "INPUT"),
        Chain("mangle", k.CHAIN_FORWARD, "FORWARD"),
    ]
    if version != "1.18":  # the filter-table chain arrived in 1.19
        chains.append(Chain("filter", k.CHAIN_FORWARD, "FORWARD"))
    return tuple(chains)


def all_node_chain_names() -> list[tuple[str, str]]:
    """Every (table, chain) any version creates, for teardown after a crash."""
    return [(c.table, c.name) for c in node_chains("1.20")]


def node_ruleset(cfg: NodeRulesConfig) -> Ruleset:
    zt, veth, host = cfg.ztunnel_ip, cfg.ztunnel_veth, cfg.host_ip
    skip, conn_skip, proxy = _mm(k.SKIP_MARK), _mm(k.CONN_SKIP_MARK), _mm(k.PROXY_MARK)
    ret, out = _mm(k.PROXY_RET_MARK), _mm(k.OUTBOUND_MARK)
    pre, mangle = k.CHAIN_PREROUTING, "mangle"

    rules: list[Rule] = []

    def add(table: str, chain: str, spec: str) -> None:
        rules.append(Rule(table, chain, spec))

    # mangle ztunnel-PREROUTING, P1..P15
    add(mangle, pre, f"-i {k.INBOUND_TUN} -j MARK --set-mark {skip}")
    add(mangle, pre, f"-i {k.INBOUND_TUN} -j RETURN")
    add(mangle, pre, f"-i {k.OUTBOUND_TUN} -j MARK --set-mark {skip}")
    add(mangle, pre, f"-i {k.OUTBOUND_TUN} -j RETURN")
    # The outer GENEVE packets must stay unmarked: a kernel tunnel copies the mark inwards.
    add(mangle, pre, f"-p udp -m udp --dport {cfg.port} -j RETURN")
    add(mangle, pre, f"-m connmark --mark {conn_skip} -j MARK --set-mark {skip}")
    add(mangle, pre, f"-m mark --mark {skip} -j RETURN")
    add(mangle, pre, f"! -i {veth} -m connmark --mark {proxy} -j MARK --set-mark {ret}")
    add(mangle, pre, f"-m mark --mark {ret} -j RETURN")
    add(mangle, pre, f"-i {veth} ! -s {zt} -j MARK --set-mark {proxy}")
    add(mangle, pre, f"-m mark --mark {skip} -j RETURN")
    add(mangle, pre, f"-i {veth} -j MARK --set-mark {conn_skip}")
    add(mangle, pre, f"-p udp -j MARK --set-mark {conn_skip}")
    add(mangle, pre, f"-m mark --mark {skip} -j RETURN")
    add(mangle, pre, f"-p tcp -m set --match-set {k.IPSET_NAME} src -j MARK --set-mark {out}")

    # mangle ztunnel-FORWARD and ztunnel-INPUT: remember skip/proxy marks on the connection
    for chain in (k.CHAIN_FORWARD, k.CHAIN_INPUT):
        for mark in (k.CONN_SKIP_MARK, k.PROXY_MARK):
            add(
                mangle,
                chain,
                f"-m mark --mark {_mm(mark)} -j CONNMARK --save-mark "
                f"--nfmask {_m(mark)} --ctmask {_m(mark)}",
            )

    # mangle ztunnel-OUTPUT: host-originated probes to pods are never captured
    if cfg.version == "1.20":
        add(
            mangle,
            k.CHAIN_OUTPUT,
            f"-m owner --socket-exists -p tcp -m set --match-set {k.IPSET_NAME} dst "
            f"-s {host} -j MARK --set-mark {_m(k.CONN_SKIP_MARK)}",
        )
    else:
        add(mangle, k.CHAIN_OUTPUT, f"-s {host} -j MARK --set-mark {_m(k.CONN_SKIP_MARK)}")

    # nat: captured traffic skips kube-proxy's DNAT and masquerade
    add("nat", pre, f"-m mark --mark {out} -j ACCEPT")
    if cfg.dns_capture:
        add(
            "nat",
            pre,
            f"-p udp -m set --match-set {k.IPSET_NAME} src -m udp --dport 53 "
            f"-j DNAT --to-destination {zt}:{k.DNS_CAPTURE_PORT}",
        )
    add("nat", k.CHAIN_POSTROUTING, f"-m mark --mark {out} -j ACCEPT")
    if cfg.version != "1.18":
        add("filter", k.CHAIN_FORWARD, f"-m mark --mark {out} -j ACCEPT")

    return Ruleset(chains=node_chains(cfg.version), rules=tuple(rules))


def ztunnel_ruleset(ztunnel_ip: ipaddress.IPv4Address, ztunnel_eth: str) -> Ruleset:
    """Z1..Z4 appended to the ztunnel namespace's mangle PREROUTING (§4 step 7)."""
    tp = f"--tproxy-mark {_mm(k.TPROXY_MARK, k.TPROXY_MASK)}"

    def tproxy(port: int) -> str:
        return f"-j TPROXY {tp} --on-port {port} --on-ip 127.0.0.1"

    pre = "PREROUTING"
    rules = (
        Rule(
            "mangle",
            pre,
            f"-p tcp -i {k.ZT_INBOUND_TUN} -m tcp --dport {k.ZTUNNEL_INBOUND_PORT} "
            + tproxy(k.ZTUNNEL_INBOUND_PORT),
        ),
        Rule("mangle", pre, f"-p tcp -i {k.ZT_OUTBOUND_TUN} " + tproxy(k.ZTUNNEL_OUTBOUND_PORT)),
        Rule(
            "mangle",
            pre,
            f"-p tcp -i {k.ZT_INBOUND_TUN} " + tproxy(k.ZTUNNEL_INBOUND_PLAINTEXT_PORT),
        ),
        Rule(
            "mangle",
            pre,
            f"-p tcp -i {ztunnel_eth} ! -d {ztunnel_ip} "
            f"-j MARK --set-mark {_mm(k.ORG_SRC_RET_MARK, k.ORG_SRC_RET_MASK)}",
        ),
    )
    return Ruleset(rules=rules, flush_builtin=(("mangle", "PREROUTING"), ("nat", "OUTPUT")))
