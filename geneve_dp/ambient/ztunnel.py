"""The ztunnel pod's side (reference §4): run inside the ztunnel's network namespace.

`ztunnel up` installs `pistioin`/`pistioout` (VNI 1000/1001, remote = the host IP the
node sends from), ip rules 20000 and 20003, table 100 `local 0.0.0.0/0 dev lo` plus the
vestigial tables 101/102 routes, the four mangle PREROUTING rules (TPROXY to
15008/15001/15006, mark 0x4d3 for original-source returns) and rp_filter off. Istio
flushes mangle PREROUTING and nat OUTPUT there; we record what they held so `down`
can put it back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import wire
from ..auth.settings import AuthSettings
from ..errors import UserError
from ..netconf import iptables, links
from . import checks, endpoints, profile, reconcile, rules, state, watch
from . import constants as k
from .ebpf import ztunnel as _ebpf
from .state import StateFile, state_dir, state_root

STATE_NAME = "ztunnel.json"
ROLE = "ztunnel"


@dataclass(frozen=True)
class ZtunnelConfig:
    host_ip: ipaddress.IPv4Address  # the node's address as seen from here (GetHostIPByRoute)
    ztunnel_ip: ipaddress.IPv4Address
    eth: str
    port: int = 6081


def resolve(
    host_ip: str | None, port: int | None = None, say: Callable[[str], None] | None = None
) -> ZtunnelConfig:
    """Check the inputs against this namespace. The GENEVE port is the one `node up`
    chose for this ztunnel (Istio passes one port to both sides): ``port`` None takes
    it from the node's record, and a ``port`` that differs from it is refused."""
    host = checks.ipv4(host_ip, "--host-ip")
    if port is not None:
        checks.port(port)
    if state.node_state_path().exists():
        # The clean slate flushes tables 100-102, which are the node's here.
        raise UserError(
            "this namespace is the node's (`node up` ran here); run it in the ztunnel pod's",
            "ztunnel up",
        )
    route = checks.route_or_fail(host, "--host-ip")
    if route.src is None:
        raise UserError(
            f"{host} is not reachable from a local address; accepted: the node's address on "
            "the ztunnel pod's link",
            "--host-ip",
        )
    if route.gateway is not None:
        raise UserError(
            f"{host} is behind gateway {route.gateway}; give the node's address on the "
            "ztunnel pod's link",
            "--host-ip",
        )
    chosen = node_port(route.src, host)
    if chosen is None:
        if port is None:
            port = wire.GENEVE_PORT
            if say is not None:
                say(f"no node record names ztunnel {route.src}: GENEVE port {port}")
    elif port is None:
        port = chosen[0]
        if say is not None:
            say(f"GENEVE port {port}, as `node up` chose ({chosen[1]})")
    elif port != chosen[0]:
        raise UserError(
            f"{port} differs from the port `node up` chose for this ztunnel, {chosen[0]} "
            f"({chosen[1]}); leave --port out to take it",
            "--port",
        )
    return ZtunnelConfig(host, route.src, route.oif, port)


def node_records(
    ztunnel_ip: ipaddress.IPv4Address, host_ip: ipaddress.IPv4Address
) -> list[StateFile]:
    """Node records (of any namespace under the state root) set up for this ztunnel IP
    from this host IP."""
    out = []
    for path in sorted(state_root().glob(f"*/{state.NODE_STATE_NAME}")):
        st = StateFile.load(path)
        cfg = state.node_config(st)
        if cfg is not None and (cfg.ztunnel_ip, cfg.host_ip) == (ztunnel_ip, host_ip):
            out.append(st)
    return out


def node_record(
    ztunnel_ip: ipaddress.IPv4Address, host_ip: ipaddress.IPv4Address
) -> StateFile | None:
    recs = node_records(ztunnel_ip, host_ip)
    return recs[0] if len(recs) == 1 else None


def node_port(
    ztunnel_ip: ipaddress.IPv4Address, host_ip: ipaddress.IPv4Address
) -> tuple[int, Path] | None:
    """The port `node up` chose for this ztunnel (see ``node_records``), and the
    record's path; None without a record."""
    found: dict[int, Path] = {}
    for st in node_records(ztunnel_ip, host_ip):
        cfg = state.node_config(st)
        assert cfg is not None
        found.setdefault(cfg.port, st.path)
    if len(found) > 1:
        records = ", ".join(f"{p} in {path}" for p, path in found.items())
        raise UserError(
            f"node records for ztunnel {ztunnel_ip} disagree on the port ({records}); give --port",
            "--port",
        )
    return next(iter(found.items()), None)


def ztunnel_endpoints(cfg: ZtunnelConfig) -> list[endpoints.Endpoint]:
    host = str(cfg.host_ip)
    return [
        endpoints.Endpoint(
            k.ZT_INBOUND_TUN,
            k.INBOUND_TUN_VNI,
            host,
            cfg.port,
            f"{k.ZT_INBOUND_TUN_IP}/{k.TUN_PREFIX}",
        ),
        endpoints.Endpoint(
            k.ZT_OUTBOUND_TUN,
            k.OUTBOUND_TUN_VNI,
            host,
            cfg.port,
            f"{k.ZT_OUTBOUND_TUN_IP}/{k.TUN_PREFIX}",
        ),
    ]


def ztunnel_rules() -> list[links.Rule]:
    return [
        links.Rule(
            k.TPROXY_MARK_PRIORITY,
            fwmark=k.TPROXY_MARK,
            fwmask=k.TPROXY_MASK,
            table=k.ROUTE_TABLE_INBOUND,
        ),
        links.Rule(
            k.ORG_SRC_PRIORITY,
            fwmark=k.ORG_SRC_RET_MARK,
            fwmask=k.ORG_SRC_RET_MASK,
            table=k.ROUTE_TABLE_INBOUND,
        ),
    ]


def ztunnel_routes(cfg: ZtunnelConfig) -> list[links.Route]:
    host = f"{cfg.host_ip}/32"
    return [
        links.Route(k.ROUTE_TABLE_INBOUND, "0.0.0.0/0", "lo", type="local"),
        # Tables 101/102 are not consulted by any rule since 1.18; Istio still fills them.
        links.Route(
            k.ROUTE_TABLE_OUTBOUND, "0.0.0.0/0", k.ZT_OUTBOUND_TUN, gateway=k.OUTBOUND_TUN_IP
        ),
        links.Route(k.ROUTE_TABLE_PROXY, "0.0.0.0/0", k.ZT_INBOUND_TUN, gateway=k.INBOUND_TUN_IP),
        links.Route(k.ROUTE_TABLE_OUTBOUND, host, cfg.eth, scope=links.SCOPE_LINK),
        links.Route(k.ROUTE_TABLE_PROXY, host, cfg.eth, scope=links.SCOPE_LINK),
    ]


def ztunnel_sysctls(cfg: ZtunnelConfig) -> list[tuple[str, str]]:
    devs = (k.ZT_OUTBOUND_TUN, k.ZT_INBOUND_TUN, cfg.eth)
    return [*profile.global_rp_filter_off(), *((links.conf_key(d, "rp_filter"), "0") for d in devs)]


def state_path() -> Path:
    return state_dir() / STATE_NAME


def _state() -> StateFile:
    return StateFile.load(state_path())


def load_config(st: StateFile) -> ZtunnelConfig | None:
    c = st.data.get("config")
    if not c or _ebpf.is_ebpf(st):
        return None
    return ZtunnelConfig(
        ipaddress.IPv4Address(c["host_ip"]),
        ipaddress.IPv4Address(c["ztunnel_ip"]),
        c["eth"],
        int(c["port"]),
    )


def intent(st: StateFile) -> reconcile.Intent:
    """What the record says must exist while the ztunnel side is up (for the watcher)."""
    if _ebpf.is_ebpf(st):
        return _ebpf.intent(st)
    cfg = load_config(st)
    assert cfg is not None
    return reconcile.Intent(
        role=ROLE,
        endpoints=tuple(profile.with_auth(st, ztunnel_endpoints(cfg))),
        pidfile=profile.endpoint_pidfile(st, ROLE),
        rules=tuple(ztunnel_rules()),
        routes=tuple(ztunnel_routes(cfg)),
        sysctls=tuple(ztunnel_sysctls(cfg)),
        chains=tuple(reconcile.ChainIntent.from_dict(d) for d in st.data.get("iptables", [])),
    )


def up(cfg: ZtunnelConfig, log: Any = None, auth: AuthSettings | None = None) -> None:
    say = log or (lambda _msg: None)
    if _state().exists:  # a previous (or crashed) setup with a record
        down()
    watch.stop(state_dir(), ROLE)  # one left running without a record
    st = profile.begin(
        state_path(),
        {
            "host_ip": str(cfg.host_ip),
            "ztunnel_ip": str(cfg.ztunnel_ip),
            "eth": cfg.eth,
            "port": cfg.port,
        },
    )
    with profile.rolled_back_on_error(down, ROLE):
        profile.record_auth(st, auth)
        # The node's backend where its record is known (Istio runs both sides' rules
        # with one command), else detected here.
        node_rec = node_record(cfg.ztunnel_ip, cfg.host_ip)
        if node_rec is not None and profile.use_recorded_iptables(node_rec):
            st.data["iptables_backend"] = node_rec.data["iptables_backend"]
            st.save()
            say(f"iptables backend: {iptables.selected()} (as the node's, {node_rec.path})")
        else:
            profile.select_iptables(st, k.DEFAULT_ISTIO_VERSION, say)
        cleaned = clean_slate()
        say("clean slate: " + (", ".join(cleaned) if cleaned else "nothing to remove"))
        say("sysctls: rp_filter=0 for all and default")
        profile.set_sysctls(st, profile.global_rp_filter_off())
        say(f"endpoints {k.ZT_INBOUND_TUN}, {k.ZT_OUTBOUND_TUN} -> {cfg.host_ip}:{cfg.port}")
        profile.start_endpoints(st, ztunnel_endpoints(cfg), ROLE)

        say("sysctls: rp_filter=0")
        profile.set_sysctls(st, ztunnel_sysctls(cfg))

        say("ip rules 20000, 20003; table 100 local default; tables 101, 102")
        profile.add_rules(st, ztunnel_rules())
        profile.add_routes(st, ztunnel_routes(cfg))

        say("iptables: mangle PREROUTING TPROXY to 15008/15001/15006, mark 0x4d3")
        current = iptables.save()
        ruleset = rules.ztunnel_ruleset(cfg.ztunnel_ip, cfg.eth)
        # What the flush will take away, so that `down` can restore it.
        flushed = [
            [table, chain, spec]
            for table, chain in ruleset.flush_builtin
            for c, spec in current.get(table, iptables.SavedTable()).rules
            if c == chain
        ]
        st.data["flushed"] = flushed
        st.data["tables_before"] = sorted(current)
        st.save()
        iptables.restore(iptables.render_apply(ruleset, current))
        # As the kernel prints them, for the watcher to compare against.
        expected = reconcile.expected_chains(ruleset, iptables.save())
        st.data["iptables"] = [c.to_dict() for c in expected]
        profile.finish(st)
    say(f"reconcile watcher: `geneve-dp ztunnel watch`, log {watch.logfile(st.path.parent, ROLE)}")
    watch.start(st.path.parent, ROLE)


def _remove_rules(data: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    done: list[str] = []
    if not profile.iptables_ok():
        return done
    # Our four rules, found by comparison (iptables -C), whatever their eth/IP were.
    zt_ip = cfg.get("ztunnel_ip")
    eth = cfg.get("eth")
    present: list[iptables.Rule] = []
    if zt_ip and eth:
        ruleset = rules.ztunnel_ruleset(ipaddress.IPv4Address(zt_ip), eth)
        present = [r for r in ruleset.rules if iptables.rule_exists(r)]
    else:
        present = _tproxy_rules_by_text()
    # What the flush took is given back only in the backend where it was taken.
    restore = [iptables.Rule(t, c, s) for t, c, s in data.get("flushed", [])] if present else []
    text = iptables.render_remove([], {}, delete_rules=present, restore_rules=restore)
    if text:
        iptables.restore(text)
        done.append(f"{len(present)} mangle PREROUTING rules ({iptables.selected()})")
    done += profile.drop_created_tables(data)
    return done


def down() -> list[str]:
    if _ebpf.is_ebpf(_state()):
        return _ebpf.down()
    done: list[str] = []
    # The watcher first, so that it does not put back what we are taking away.
    watch.stop(state_dir(), ROLE)
    st = _state()
    data = st.data
    cfg = data.get("config") or {}
    for backend in profile.iptables_backends(st):
        iptables.select(backend)
        done += _remove_rules(data, cfg)

    done += profile.delete_routes(data.get("routes", []))
    if not cfg:
        # No record: Istio's clean slate for this namespace flushes tables 100-102.
        done += profile.flush_tables(k.NODE_TABLES)
        done += _ebpf.remove_by_name()  # and the eBPF mode's filter
    done += profile.delete_rules(ztunnel_rules())
    done += profile.stop_endpoints(st, ROLE, [k.ZT_INBOUND_TUN, k.ZT_OUTBOUND_TUN])
    profile.restore_sysctls(data.get("sysctls", {}))
    st.remove()
    return done


def clean_slate() -> list[str]:
    """Istio's first step in this namespace (§4 step 1): tables 100-102 flushed, rules
    20000-20003 deleted, and stale `pistio*` devices deleted, whoever left them; what
    went, for people. The namespace is the ztunnel pod's, so nothing here is anyone
    else's, and none of it comes back on `down`."""
    done = [f"routes of table {t}" for t in k.NODE_TABLES if links.flush_table(t)]
    done += [f"ip rule {p}" for p in k.ZTUNNEL_RULE_PRIORITIES if links.del_rules_at(p)]
    for name in links.link_names():
        if name.startswith(k.ZT_TUN_PREFIX) and links.delete_link(name):
            done.append(f"device {name}")
    return done


def _tproxy_rules_by_text() -> list[iptables.Rule]:
    """Without a record: the mangle PREROUTING rules that only we write (crash case)."""
    saved = iptables.save().get("mangle")
    if saved is None:
        return []
    out = []
    for chain, spec in saved.rules:
        if chain != "PREROUTING":
            continue
        ours_tproxy = "-j TPROXY" in spec and "--tproxy-mark 0x400/0xfff" in spec
        ours_mark = "--set-xmark 0x4d3/0xfff" in spec
        if ours_tproxy or ours_mark:
            out.append(iptables.Rule("mangle", chain, spec))
    return out
