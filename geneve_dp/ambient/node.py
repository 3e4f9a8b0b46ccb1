"""The node side of Istio ambient's iptables + GENEVE redirection (reference §3, §5.2, §5.5).

`node up` runs in the node's network namespace and installs, in this order: rp_filter
off for all and default (Istio's step 8d), the `istioin`/`istioout` endpoints towards
the ztunnel pod (early, so that everything that names them finds them), the
`ztunnel-pods-ips` ipset, the `ztunnel-*` iptables chains (one atomic
iptables-restore), the devices' sysctls, routes of tables 100-102 and ip rules 100-103.
Every change is recorded in the state file *before* it is made; `node down` removes
what the record lists, plus anything of ours it finds by name (after a crash).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..auth.settings import AuthSettings
from ..errors import UserError
from ..netconf import ipset, iptables, links
from . import checks, endpoints, pods, profile, reconcile, rules, state, watch
from . import constants as k
from .ebpf import node as _ebpf
from .state import StateFile, state_dir

STATE_NAME = state.NODE_STATE_NAME
ROLE = "node"


# The node profile's settings are exactly what its iptables rules are rendered from.
NodeConfig = rules.NodeRulesConfig


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
        raise UserError(
            "is required; accepted: the host-side veth of the ztunnel pod", "--ztunnel-veth"
        )
    dev = links.link(ztunnel_veth)
    if dev is None:
        raise UserError(
            f"{ztunnel_veth!r} is not a device here; accepted: a veth `ip link` lists",
            "--ztunnel-veth",
        )
    if dev.kind != "veth":
        raise UserError(
            f"{ztunnel_veth} is a {dev.kind or 'non-virtual'} device; accepted: a veth (the "
            "ztunnel pod hangs off one, as with a veth-based CNI)",
            "--ztunnel-veth",
        )
    route = checks.route_or_fail(zt, "--ztunnel-ip")
    if route.oif != ztunnel_veth:
        raise UserError(
            f"{ztunnel_veth} is not where the route to {zt} leaves ({route.oif}); accepted: "
            f"{route.oif}",
            "--ztunnel-veth",
        )
    if host_ip is not None:
        host = checks.ipv4(host_ip, "--host-ip")
    elif route.src is not None:
        host = route.src  # what the kernel will put as the outer source towards ztunnel
    else:
        raise UserError(
            f"is missing and no local address routes to {zt}; accepted: this node's address",
            "--host-ip",
        )
    if not checks.is_local_address(host):
        raise UserError(
            f"{host} is not an address of this namespace; accepted: one `ip addr` lists",
            "--host-ip",
        )
    return NodeConfig(zt, ztunnel_veth, host, port, dns_capture, version)


def node_endpoints(cfg: NodeConfig) -> list[endpoints.Endpoint]:
    zt = str(cfg.ztunnel_ip)
    return [
        endpoints.Endpoint(
            k.INBOUND_TUN, k.INBOUND_TUN_VNI, zt, cfg.port, f"{k.INBOUND_TUN_IP}/{k.TUN_PREFIX}"
        ),
        # Only packets with mark 0x100 are routed into istioout (rule 101), and the
        # kernel's geneve routes the outer packet with the inner's mark: so do we.
        endpoints.Endpoint(
            k.OUTBOUND_TUN,
            k.OUTBOUND_TUN_VNI,
            zt,
            cfg.port,
            f"{k.OUTBOUND_TUN_IP}/{k.TUN_PREFIX}",
            mark=k.OUTBOUND_MARK,
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
    out = profile.global_rp_filter_off()
    for dev in (cfg.ztunnel_veth, k.INBOUND_TUN, k.OUTBOUND_TUN):
        out += [(links.conf_key(dev, "rp_filter"), "0"), (links.conf_key(dev, "accept_local"), "1")]
    return out


state_path = state.node_state_path
_state = state.load_node_state


def load_config(st: StateFile) -> NodeConfig | None:
    """The iptables mode's settings (None: not set up, or set up in eBPF mode)."""
    return None if _ebpf.is_ebpf(st) else state.node_config(st)


def intent(st: StateFile) -> reconcile.Intent:
    """What the record says must exist while the node is up (for the watcher)."""
    if _ebpf.is_ebpf(st):
        return _ebpf.intent(st)
    cfg = load_config(st)
    assert cfg is not None
    recs = state.load_pods_cached(st.path.parent)
    pod_routes, pod_sysctls, ipset_entries = _pod_intent(recs)
    return reconcile.Intent(
        role=ROLE,
        endpoints=tuple(profile.with_auth(st, node_endpoints(cfg))),
        pidfile=profile.endpoint_pidfile(st, ROLE),
        rules=tuple(node_rules()),
        routes=tuple(node_routes(cfg)),
        sysctls=tuple(node_sysctls(cfg)),
        ipset_entries=ipset_entries,
        chains=tuple(reconcile.ChainIntent.from_dict(d) for d in st.data.get("iptables", [])),
        pod_routes=pod_routes,
        pod_sysctls=pod_sysctls,
    )


PodIntent = tuple[tuple[links.Route, ...], tuple[tuple[str, str], ...], dict[str, str]]
_pod_intent_of: tuple[dict[str, state.PodRecord], PodIntent] | None = None


def _pod_intent(recs: dict[str, state.PodRecord]) -> PodIntent:
    """The pods' routes, sysctls and ipset entries, built again only when the records
    are new ones (state.load_pods_cached hands back the same dict until a pod changes):
    the watcher asks every second, a thousand pods or not."""
    global _pod_intent_of
    if _pod_intent_of is not None and _pod_intent_of[0] is recs:
        return _pod_intent_of[1]
    parts: PodIntent = (
        tuple(profile.route_from_dict(r.route) for r in recs.values() if r.route),
        tuple((key, "0") for r in recs.values() for key in r.sysctls),
        {ip: r.uid for ip, r in recs.items()},
    )
    _pod_intent_of = (recs, parts)
    return parts


def up(
    cfg: NodeConfig,
    log: Any = None,
    choose_port: bool = False,
    start_watch: bool = True,
    auth: AuthSettings | None = None,
) -> NodeConfig:
    """Install the node side. Idempotent: an earlier setup (or a crashed one) is removed
    first and its enrolled pods are put back afterwards.

    With ``choose_port`` (no --port given) the GENEVE port is picked as Istio 1.19+
    does, once the earlier setup is gone so that its own endpoints do not count;
    Istio 1.18 always used 6081. Without ``start_watch`` the caller runs the reconcile
    watcher itself (`node up --foreground`). Returns the configuration applied.
    """
    say = log or (lambda _msg: None)
    st = _state()
    enrolled = state.load_pods(st.path.parent)
    if st.exists:
        # A previous (or crashed) setup with a record: take it away first. Without a
        # record nothing is removed by name here, so things that were there before us
        # (an ipset of the same name, say) are kept; the steps below are idempotent.
        down()
    watch.stop(state_dir(), ROLE)  # one left running without a record
    if choose_port and cfg.version != "1.18":
        vnis = (k.INBOUND_TUN_VNI, k.OUTBOUND_TUN_VNI)
        cfg = replace(cfg, port=endpoints.choose_port(str(cfg.ztunnel_ip), vnis, say))

    st = profile.begin(
        state_path(),
        {
            "ztunnel_ip": str(cfg.ztunnel_ip),
            "ztunnel_veth": cfg.ztunnel_veth,
            "host_ip": str(cfg.host_ip),
            "port": cfg.port,
            "dns_capture": cfg.dns_capture,
            "version": cfg.version,
        },
    )
    with profile.rolled_back_on_error(down, ROLE):
        profile.select_iptables(st, cfg.version, say)
        # Tables that exist now; `down` deletes the ones our rules made appear.
        st.data["tables_before"] = sorted(iptables.save())
        st.save()
        profile.record_auth(st, auth)
        say("sysctls: rp_filter=0 for all and default")
        profile.set_sysctls(st, profile.global_rp_filter_off())
        say(
            f"endpoints {k.INBOUND_TUN} (VNI {k.INBOUND_TUN_VNI}), {k.OUTBOUND_TUN} "
            f"(VNI {k.OUTBOUND_TUN_VNI}) -> {cfg.ztunnel_ip}:{cfg.port}"
        )
        profile.start_endpoints(st, node_endpoints(cfg), ROLE)

        say(f"ipset {k.IPSET_NAME}")
        st.data["ipset_created"] = None
        st.save()
        st.data["ipset_created"] = ipset.create(k.IPSET_NAME)
        st.save()

        say("iptables: ztunnel-* chains in mangle, nat, filter")
        ruleset = rules.node_ruleset(cfg)
        st.data["chains"] = [[c.table, c.name] for c in ruleset.chains]
        st.save()
        iptables.restore(iptables.render_apply(ruleset, iptables.save()))
        # As the kernel prints them, for the watcher to compare against.
        expected = reconcile.expected_chains(ruleset, iptables.save())
        st.data["iptables"] = [c.to_dict() for c in expected]
        st.save()

        say("sysctls: rp_filter=0, accept_local=1 on the devices")
        profile.set_sysctls(st, node_sysctls(cfg))

        say("routes: tables 100, 101, 102; ip rules 100-103")
        profile.add_routes(st, node_routes(cfg))
        profile.add_rules(st, node_rules())
        profile.finish(st)
    if enrolled:
        say(f"re-enrolling {len(enrolled)} pods")
        pods.add_many((ip, rec.uid) for ip, rec in enrolled.items())
    if start_watch:
        log_path = watch.logfile(st.path.parent, ROLE)
        say(f"reconcile watcher: `geneve-dp node watch`, log {log_path}")
        watch.start(st.path.parent, ROLE)
    return cfg


def _remove_chains(data: dict[str, Any]) -> list[str]:
    done = []
    current = iptables.save() if profile.iptables_ok() else {}
    text = iptables.render_remove(rules.all_node_chain_names(), current)
    if text:
        iptables.restore(text)
        done.append(f"iptables ztunnel-* chains ({iptables.selected()})")
    if current:
        done += profile.drop_created_tables(data, current)
    return done


def down() -> list[str]:
    """Remove the node side: what the state file lists, and our objects found by name.

    Returns what was removed, for people.
    """
    if _ebpf.is_ebpf(_state()):
        return _ebpf.down()
    done: list[str] = []
    # The watcher first, so that it does not put back what we are taking away.
    watch.stop(state_dir(), ROLE)
    st = _state()
    data = st.data
    recs = state.load_pods(st.path.parent)

    # iptables first: the rules reference the ipset, which cannot go while in use.
    for backend in profile.iptables_backends(st):
        iptables.select(backend)
        done += _remove_chains(data)

    done += profile.delete_routes(data.get("routes", []))
    done += pods.remove_all(st.path.parent)  # routes and sysctls, before the node's
    if not data.get("config"):
        # No record (lost with /run, or never written): do as Istio's cleanupNode and
        # flush our three tables, which nothing else is meant to use.
        done += profile.flush_tables(k.NODE_TABLES)
        done += _ebpf.remove_by_name()  # and the eBPF mode's filters
    done += profile.delete_rules(node_rules())
    done += profile.stop_endpoints(st, ROLE, [k.INBOUND_TUN, k.OUTBOUND_TUN])

    # The ipset: keep one that existed before we came (minus our entries), otherwise
    # it is ours.
    set_ours = data.get("ipset_created", "never reached")
    if set_ours is None:  # crashed between recording and creating: ours only if empty
        set_ours = not ipset.entries(k.IPSET_NAME)
    if not data.get("config") or set_ours is True:  # no record at all: ours by name
        if ipset.destroy(k.IPSET_NAME):
            done.append(f"ipset {k.IPSET_NAME}")
    elif set_ours is False:
        for ip in recs:
            ipset.delete(k.IPSET_NAME, ip)

    profile.restore_sysctls(data.get("sysctls", {}))
    st.remove()
    return done
