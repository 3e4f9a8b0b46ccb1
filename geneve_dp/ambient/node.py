"""The node side of Istio ambient's iptables + GENEVE redirection (reference §3, §5.2, §5.5).

`node up` runs in the node's network namespace and installs, in this order: the
`istioin`/`istioout` endpoints towards the ztunnel pod (first, so that everything that
names them finds them), the `ztunnel-pods-ips` ipset, the `ztunnel-*` iptables chains
(one atomic iptables-restore), sysctls, routes of tables 100-102 and ip rules 100-103.
Every change is recorded in the state file *before* it is made; `node down` removes
what the record lists, plus anything of ours it finds by name (after a crash).
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..netconf import ipset, iptables, links
from . import checks, endpoints, rules
from . import constants as k
from .state import StateFile, state_dir

STATE_NAME = "node.json"


@dataclass(frozen=True)
class NodeConfig:
    ztunnel_ip: ipaddress.IPv4Address
    ztunnel_veth: str
    host_ip: ipaddress.IPv4Address
    port: int = 6081
    dns_capture: bool = False
    version: k.IstioVersion = k.DEFAULT_ISTIO_VERSION

    def rules_config(self) -> rules.NodeRulesConfig:
        return rules.NodeRulesConfig(
            self.ztunnel_ip,
            self.ztunnel_veth,
            self.host_ip,
            self.port,
            self.dns_capture,
            self.version,
        )


def resolve(
    ztunnel_ip: str | None,
    ztunnel_veth: str | None,
    host_ip: str | None,
    port: int = 6081,
    dns_capture: bool = False,
    version: k.IstioVersion = k.DEFAULT_ISTIO_VERSION,
) -> NodeConfig:
    """Check the inputs against this namespace, before anything is changed."""
    zt = checks.ipv4(ztunnel_ip, "--ztunnel-ip")
    checks.port(port)
    if not ztunnel_veth:
        raise UserError("is required (the host-side veth of the ztunnel pod)", "--ztunnel-veth")
    dev = links.link(ztunnel_veth)
    if dev is None:
        raise UserError(f"no device named {ztunnel_veth!r} in this namespace", "--ztunnel-veth")
    if dev.kind != "veth":
        raise UserError(
            f"{ztunnel_veth} is a {dev.kind or 'non-virtual'} device, not a veth "
            "(the ztunnel pod must hang off a veth, as with a veth-based CNI)",
            "--ztunnel-veth",
        )
    route = checks.route_or_fail(zt, "--ztunnel-ip")
    if route.oif != ztunnel_veth:
        raise UserError(
            f"the route to {zt} leaves via {route.oif}, not {ztunnel_veth}", "--ztunnel-veth"
        )
    if host_ip is not None:
        host = checks.ipv4(host_ip, "--host-ip")
    elif route.src is not None:
        host = route.src  # what the kernel will put as the outer source towards ztunnel
    else:
        raise UserError(f"no local address routes to {zt}; give one", "--host-ip")
    if not checks.is_local_address(host):
        raise UserError(f"{host} is not an address of this namespace", "--host-ip")
    return NodeConfig(zt, ztunnel_veth, host, port, dns_capture, version)


def node_endpoints(cfg: NodeConfig) -> list[endpoints.Endpoint]:
    zt = str(cfg.ztunnel_ip)
    return [
        endpoints.Endpoint(
            k.INBOUND_TUN, k.INBOUND_TUN_VNI, zt, cfg.port, f"{k.INBOUND_TUN_IP}/{k.TUN_PREFIX}"
        ),
        endpoints.Endpoint(
            k.OUTBOUND_TUN,
            k.OUTBOUND_TUN_VNI,
            zt,
            cfg.port,
            f"{k.OUTBOUND_TUN_IP}/{k.TUN_PREFIX}",
        ),
    ]


def node_routes(cfg: NodeConfig) -> list[links.Route]:
    """Tables 100-102 as Istio fills them at node setup (§3.2), in its order."""
    zt, veth = f"{cfg.ztunnel_ip}/32", cfg.ztunnel_veth
    link = links.SCOPE_LINK
    return [
        links.Route(k.ROUTE_TABLE_OUTBOUND, zt, veth, scope=link),
        links.Route(
            k.ROUTE_TABLE_OUTBOUND, "0.0.0.0/0", k.OUTBOUND_TUN, gateway=k.ZT_OUTBOUND_TUN_IP
        ),
        links.Route(k.ROUTE_TABLE_PROXY, zt, veth, scope=link),
        links.Route(
            k.ROUTE_TABLE_PROXY, "0.0.0.0/0", veth, gateway=str(cfg.ztunnel_ip), onlink=True
        ),
        links.Route(k.ROUTE_TABLE_INBOUND, zt, veth, scope=link),
    ]


def node_rules() -> list[links.Rule]:
    """ip rules 100-103 (§3.2): skip -> main, outbound -> 101, proxy-return -> 102, else 100."""
    return [
        links.Rule(100, fwmark=k.SKIP_MARK, fwmask=k.SKIP_MARK, goto=k.MAIN_RULE_PRIORITY),
        links.Rule(
            101, fwmark=k.OUTBOUND_MARK, fwmask=k.OUTBOUND_MARK, table=k.ROUTE_TABLE_OUTBOUND
        ),
        links.Rule(
            102, fwmark=k.PROXY_RET_MARK, fwmask=k.PROXY_RET_MARK, table=k.ROUTE_TABLE_PROXY
        ),
        links.Rule(103, table=k.ROUTE_TABLE_INBOUND),
    ]


def node_sysctls(cfg: NodeConfig) -> list[tuple[str, str]]:
    """§5.2 step 8d and 8f: no reverse-path filter, and accept local sources on the paths."""
    out = [
        (links.conf_key("all", "rp_filter"), "0"),
        (links.conf_key("default", "rp_filter"), "0"),
    ]
    for dev in (cfg.ztunnel_veth, k.INBOUND_TUN, k.OUTBOUND_TUN):
        out += [(links.conf_key(dev, "rp_filter"), "0"), (links.conf_key(dev, "accept_local"), "1")]
    return out


def route_to_dict(r: links.Route) -> dict[str, Any]:
    return {
        "table": r.table,
        "dst": r.dst,
        "dev": r.dev,
        "gateway": r.gateway,
        "src": r.src,
        "scope": r.scope,
        "onlink": r.onlink,
        "type": r.type,
    }


def route_from_dict(d: dict[str, Any]) -> links.Route:
    return links.Route(**d)


def rule_to_dict(r: links.Rule) -> dict[str, Any]:
    return {
        "priority": r.priority,
        "table": r.table,
        "fwmark": r.fwmark,
        "fwmask": r.fwmask,
        "goto": r.goto,
    }


def _state() -> StateFile:
    return StateFile.load(state_dir() / STATE_NAME)


def load_config(st: StateFile) -> NodeConfig | None:
    c = st.data.get("config")
    if not c:
        return None
    return NodeConfig(
        ipaddress.IPv4Address(c["ztunnel_ip"]),
        c["ztunnel_veth"],
        ipaddress.IPv4Address(c["host_ip"]),
        int(c["port"]),
        bool(c["dns_capture"]),
        c["version"],
    )


def up(cfg: NodeConfig, log: Any = None) -> None:
    """Install the node side. Idempotent: an earlier setup (or a crashed one) is removed
    first and its enrolled pods are put back afterwards."""
    from . import pods  # pods needs node's state helpers; import here to avoid a cycle

    say = log or (lambda _msg: None)
    st = _state()
    enrolled: dict[str, Any] = dict(st.data.get("pods", {}))
    if st.exists:
        # A previous (or crashed) setup with a record: take it away first. Without a
        # record nothing is removed by name here, so things that were there before us
        # (an ipset of the same name, say) are kept; the steps below are idempotent.
        down()

    st = StateFile(state_dir() / STATE_NAME)
    st.data = {
        "config": {
            "ztunnel_ip": str(cfg.ztunnel_ip),
            "ztunnel_veth": cfg.ztunnel_veth,
            "host_ip": str(cfg.host_ip),
            "port": cfg.port,
            "dns_capture": cfg.dns_capture,
            "version": cfg.version,
        },
        "complete": False,
    }
    st.save()
    try:
        # Tables that exist now; `down` deletes the ones our rules made appear.
        st.data["tables_before"] = sorted(iptables.save())
        st.save()
        say(
            f"endpoints {k.INBOUND_TUN} (VNI {k.INBOUND_TUN_VNI}), {k.OUTBOUND_TUN} "
            f"(VNI {k.OUTBOUND_TUN_VNI}) -> {cfg.ztunnel_ip}:{cfg.port}"
        )
        eps = node_endpoints(cfg)
        st.data["endpoints"] = {"devices": [e.name for e in eps], "pidfile": None}
        st.save()
        for e in eps:  # stale devices of a crashed run would make the daemon refuse
            links.delete_link(e.name)
        pidfile = endpoints.start(eps, st.path.parent, "node")
        st.data["endpoints"]["pidfile"] = str(pidfile)
        st.save()

        say(f"ipset {k.IPSET_NAME}")
        st.data["ipset_created"] = None
        st.save()
        st.data["ipset_created"] = ipset.create(k.IPSET_NAME)
        st.save()

        say("iptables: ztunnel-* chains in mangle, nat, filter")
        ruleset = rules.node_ruleset(cfg.rules_config())
        st.data["chains"] = [[c.table, c.name] for c in ruleset.chains]
        st.save()
        iptables.restore(iptables.render_apply(ruleset, iptables.save()))

        say("sysctls: rp_filter=0, accept_local=1")
        sysctls: dict[str, str] = st.data.setdefault("sysctls", {})
        for key, value in node_sysctls(cfg):
            old = links.sysctl_get(key)
            if old is None:
                continue
            sysctls.setdefault(key, old)
            st.save()
            links.sysctl_set(key, value)

        say("routes: tables 100, 101, 102; ip rules 100-103")
        for r in node_routes(cfg):
            st.record("routes", route_to_dict(r))
            links.add_route(r)
        for rule in node_rules():
            st.record("rules", rule_to_dict(rule))
            links.add_rule(rule)
        st.data["complete"] = True
        st.save()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            down()
        if isinstance(exc, UserError):
            raise
        if isinstance(exc, Exception):
            raise UserError(f"node setup failed and was rolled back: {exc}", "node up") from exc
        raise
    for ip, info in enrolled.items():
        say(f"re-enrolling pod {ip}")
        pods.add(ip, info.get("uid", ""))


def down() -> list[str]:
    """Remove the node side: what the state file lists, and our objects found by name.

    Returns what was removed, for people.
    """
    done: list[str] = []
    st = _state()
    data = st.data

    # iptables first: the rules reference the ipset, which cannot go while in use.
    current = iptables.save() if _iptables_ok() else {}
    names = rules.all_node_chain_names()
    text = iptables.render_remove(names, current)
    if text:
        iptables.restore(text)
        done.append("iptables ztunnel-* chains")

    if current and "tables_before" in data:
        created = set(current) - set(data["tables_before"])
        done += [f"empty iptables table {t}" for t in iptables.drop_empty_tables(created)]

    for rd in reversed(data.get("routes", [])):
        if links.del_route(route_from_dict(rd)):
            done.append(f"route {route_from_dict(rd).describe()}")
    for info in data.get("pods", {}).values():
        rd = info.get("route")
        if rd and links.del_route(route_from_dict(rd)):
            done.append(f"route {route_from_dict(rd).describe()}")
    if not data.get("config"):
        # No record (lost with /run, or never written): do as Istio's cleanupNode and
        # flush our three tables, which nothing else is meant to use.
        for table in k.NODE_TABLES:
            if links.flush_table(table):
                done.append(f"routes of table {table}")
    for rule in node_rules():  # by selector: ours whether or not recorded
        if links.del_rule(rule):
            done.append(f"ip rule {rule.describe()}")

    ep = data.get("endpoints") or {}
    pidfile = ep.get("pidfile")
    devices = ep.get("devices") or [k.INBOUND_TUN, k.OUTBOUND_TUN]
    present = [d for d in (k.INBOUND_TUN, k.OUTBOUND_TUN) if links.link(d) is not None]
    endpoints.stop(
        st.path.parent / "node-endpoints.pid" if pidfile is None else Path(pidfile),
        list(dict.fromkeys([*devices, k.INBOUND_TUN, k.OUTBOUND_TUN])),
    )
    done += [f"device {d}" for d in present]

    # The ipset: keep one that existed before we came (minus our entries), otherwise
    # it is ours.
    set_ours = data.get("ipset_created", "never reached")
    if set_ours is None:  # crashed between recording and creating: ours only if empty
        set_ours = not ipset.entries(k.IPSET_NAME)
    if not data.get("config") or set_ours is True:  # no record at all: ours by name
        if ipset.destroy(k.IPSET_NAME):
            done.append(f"ipset {k.IPSET_NAME}")
    elif set_ours is False:
        for ip in data.get("pods", {}):
            ipset.delete(k.IPSET_NAME, ip)

    for key, old in reversed(list(data.get("sysctls", {}).items())):
        with contextlib.suppress(OSError):
            links.sysctl_set(key, old)
    for info in data.get("pods", {}).values():
        for key, old in info.get("sysctls", {}).items():
            with contextlib.suppress(OSError):
                links.sysctl_set(key, old)
    st.remove()
    return done


def _iptables_ok() -> bool:
    try:
        iptables.require_binaries()
    except UserError:
        return False
    return True
