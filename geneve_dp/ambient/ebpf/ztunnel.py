"""The ztunnel pod's side of the eBPF redirect mode (reference §8); run in its netns.

`ztunnel up --redirect-mode ebpf` turns rp_filter off (`all`, `default`, eth0), adds
ip rule 20000 (fwmark 0x400/0xfff -> table 100) and `local 0.0.0.0/0 dev lo table
100`, and attaches ``ztunnel_tproxy`` to eth0's ingress: it gives each TCP packet the
node redirected to the socket that must take it (bpf_sk_assign) and marks it 0x400.
Where the kernel lacks bpf_sk_assign (before 5.7), ``ztunnel_mark`` goes there
instead with Istio's fallback: rule 20003, and in mangle PREROUTING (flushed first,
as Istio does; `down` puts back what it held) TPROXY by the program's marks 5678/8765
and `! -d ZTUNNEL_IP -j MARK 0x4d3` for packets of existing connections.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ...errors import UserError
from ...netconf import iptables, links
from .. import constants as k
from .. import profile, reconcile, watch
from ..state import StateFile, state_dir
from . import MODE, facts, libbpf, objects, tc
from . import is_ebpf as is_ebpf  # callers ask the role module

ROLE = "ztunnel"
Tproxy = Literal["sk-assign", "iptables"]
TPROXY_CHOICES = ("auto", "sk-assign", "iptables")
Say = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    host_ip: str
    ztunnel_ip: str
    eth: str
    tproxy: Tproxy

    def to_dict(self) -> dict[str, Any]:
        return {
            "redirect_mode": MODE,
            "host_ip": self.host_ip,
            "ztunnel_ip": self.ztunnel_ip,
            "eth": self.eth,
            "tproxy": self.tproxy,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(d["host_ip"], d["ztunnel_ip"], d["eth"], d["tproxy"])

    @property
    def program(self) -> str:
        return facts.ZTUNNEL_TPROXY if self.tproxy == "sk-assign" else facts.ZTUNNEL_MARK


def resolve(host_ip: str | None, tproxy: str = "auto") -> Config:
    from .. import ztunnel as base

    if tproxy not in TPROXY_CHOICES:
        raise UserError(f"{tproxy!r}: one of {', '.join(TPROXY_CHOICES)}", "--ebpf-tproxy")
    b = base.resolve(host_ip)
    objects.object_path(objects.ZTUNNEL_OBJECT)
    try:
        has_assign = libbpf.helper_supported(libbpf.BPF_FUNC_SK_ASSIGN)
    except libbpf.BpfError as exc:
        raise UserError(str(exc), "--redirect-mode") from exc
    if tproxy == "sk-assign" and not has_assign:
        raise UserError(
            "this kernel has no bpf_sk_assign for tc programs (Linux 5.7+); use "
            "--ebpf-tproxy iptables or auto",
            "--ebpf-tproxy",
        )
    sk = tproxy == "sk-assign" or (tproxy == "auto" and has_assign)
    chosen: Tproxy = "sk-assign" if sk else "iptables"
    return Config(str(b.host_ip), str(b.ztunnel_ip), b.eth, chosen)


def attachment(cfg: Config) -> tc.Attachment:
    return tc.Attachment(cfg.eth, "ingress", cfg.program)


def rules(cfg: Config) -> list[links.Rule]:
    out = [
        links.Rule(
            k.TPROXY_MARK_PRIORITY,
            fwmark=k.TPROXY_MARK,
            fwmask=k.TPROXY_MASK,
            table=k.ROUTE_TABLE_INBOUND,
        )
    ]
    if cfg.tproxy == "iptables":
        out.append(
            links.Rule(
                k.ORG_SRC_PRIORITY,
                fwmark=k.ORG_SRC_RET_MARK,
                fwmask=k.ORG_SRC_RET_MASK,
                table=k.ROUTE_TABLE_INBOUND,
            )
        )
    return out


def routes() -> list[links.Route]:
    return [links.Route(k.ROUTE_TABLE_INBOUND, "0.0.0.0/0", "lo", type="local")]


def sysctls(cfg: Config) -> list[tuple[str, str]]:
    return [(links.conf_key(d, "rp_filter"), "0") for d in ("all", "default", cfg.eth)]


def fallback_ruleset(cfg: Config) -> iptables.Ruleset:
    """mangle PREROUTING where bpf_sk_assign is missing (reference §8), Istio's order."""

    def tproxy(port: int) -> str:
        return (
            f"-j TPROXY --tproxy-mark {k.TPROXY_MARK:#05x}/{k.TPROXY_MASK:#05x} "
            f"--on-port {port} --on-ip 127.0.0.1"
        )

    inbound, outbound = facts.EBPF_INBOUND_MARK, facts.EBPF_OUTBOUND_MARK
    pre = "PREROUTING"
    specs = [
        f"-p tcp -m mark --mark {inbound} -m tcp --dport {k.ZTUNNEL_INBOUND_PORT} "
        + tproxy(k.ZTUNNEL_INBOUND_PORT),
        f"-p tcp -m mark --mark {inbound} " + tproxy(k.ZTUNNEL_INBOUND_PLAINTEXT_PORT),
        f"-p tcp -m mark --mark {outbound} " + tproxy(k.ZTUNNEL_OUTBOUND_PORT),
        f"-p tcp -i {cfg.eth} ! -d {cfg.ztunnel_ip} -j MARK --set-mark "
        f"{k.ORG_SRC_RET_MARK:#05x}/{k.ORG_SRC_RET_MASK:#05x}",
    ]
    return iptables.Ruleset(
        rules=tuple(iptables.Rule("mangle", pre, s) for s in specs),
        flush_builtin=(("mangle", pre),),
    )


def state_path() -> Any:
    from .. import ztunnel as base

    return base.state_path()


def _load(cfg: Config) -> tuple[int, int]:
    """Load the one program this kernel takes; its fd and the stats map's (ours)."""
    other = facts.ZTUNNEL_MARK if cfg.program == facts.ZTUNNEL_TPROXY else facts.ZTUNNEL_TPROXY
    obj = objects.load(objects.ZTUNNEL_OBJECT, skip=[other])
    try:
        return os.dup(obj.program_fd(cfg.program)), os.dup(obj.map_fd(facts.MAP_ZTUNNEL_STATS))
    finally:
        obj.close()


def _attach(st: StateFile, cfg: Config, prog_fd: int, stats_fd: int) -> None:
    a = attachment(cfg)
    if not tc.has_clsact(a.dev):
        st.record("qdiscs", a.dev)
        tc.add_clsact(a.dev)
    st.data["prog_id"] = libbpf.prog_id(prog_fd)
    st.data["stats_map_id"] = libbpf.map_id(stats_fd)
    st.save()
    tc.attach(a, prog_fd)


def up(cfg: Config, log: Say | None = None) -> None:
    from .. import ztunnel as base

    say = log or (lambda _msg: None)
    if base._state().exists:
        base.down()
    watch.stop(state_dir(), ROLE)
    st = profile.begin(base.state_path(), cfg.to_dict())
    with profile.rolled_back_on_error(down, ROLE):
        say(f"BPF: {objects.ZTUNNEL_OBJECT} ({cfg.program})")
        prog_fd, stats_fd = _load(cfg)
        try:
            say(f"sysctls: rp_filter=0 (all, default, {cfg.eth})")
            profile.set_sysctls(st, sysctls(cfg))
            rule_text = "20000" + (", 20003" if cfg.tproxy == "iptables" else "")
            say(f"ip rules {rule_text}; table 100 local default")
            profile.add_rules(st, rules(cfg))
            profile.add_routes(st, routes())
            if cfg.tproxy == "iptables":
                say("iptables: mangle PREROUTING TPROXY by marks 5678/8765, mark 0x4d3")
                _apply_fallback(st, cfg)
            say(f"tc: {cfg.program} on {cfg.eth} ingress (clsact)")
            _attach(st, cfg, prog_fd, stats_fd)
        finally:
            os.close(prog_fd)
            os.close(stats_fd)
        profile.finish(st)
    say(f"reconcile watcher: `geneve-dp ztunnel watch`, log {watch.logfile(st.path.parent, ROLE)}")
    watch.start(st.path.parent, ROLE)


def _apply_fallback(st: StateFile, cfg: Config) -> None:
    current = iptables.save()
    ruleset = fallback_ruleset(cfg)
    st.data["flushed"] = [
        [table, chain, spec]
        for table, chain in ruleset.flush_builtin
        for c, spec in current.get(table, iptables.SavedTable()).rules
        if c == chain
    ]
    st.data["tables_before"] = sorted(current)
    st.save()
    iptables.restore(iptables.render_apply(ruleset, current))
    expected = reconcile.expected_chains(ruleset, iptables.save())
    st.data["iptables"] = [c.to_dict() for c in expected]
    st.save()


def down() -> list[str]:
    from .. import ztunnel as base

    watch.stop(state_dir(), ROLE)
    st = base._state()
    data = st.data
    done: list[str] = []
    cfg = Config.from_dict(data["config"]) if data.get("config") else None
    done += remove_by_name()
    for dev in data.get("qdiscs", []):
        if tc.del_clsact(dev):
            done.append(f"clsact qdisc on {dev}")
    if cfg is not None and cfg.tproxy == "iptables" and profile.iptables_ok():
        ruleset = fallback_ruleset(cfg)
        present = [r for r in ruleset.rules if iptables.rule_exists(r)]
        restore = [iptables.Rule(t, c, s) for t, c, s in data.get("flushed", [])]
        text = iptables.render_remove([], {}, delete_rules=present, restore_rules=restore)
        if text:
            iptables.restore(text)
            done.append(f"{len(present)} mangle PREROUTING rules")
        done += profile.drop_created_tables(data)
    done += profile.delete_routes(data.get("routes", []))
    if cfg is not None:
        done += profile.delete_rules(rules(cfg))
    profile.restore_sysctls(data.get("sysctls", {}))
    st.remove()
    return done


def remove_by_name() -> list[str]:
    """Our filter on any device here (after a crash that lost the record)."""
    return tc.remove_ours((facts.ZTUNNEL_TPROXY, facts.ZTUNNEL_MARK))


def intent(st: StateFile) -> reconcile.Intent:
    cfg = Config.from_dict(st.data["config"])
    return reconcile.Intent(
        role=ROLE,
        rules=tuple(rules(cfg)),
        routes=tuple(routes()),
        sysctls=tuple(sysctls(cfg)),
        chains=tuple(reconcile.ChainIntent.from_dict(d) for d in st.data.get("iptables", [])),
        extra=(lambda say, routing: repair(st, say, routing),),
    )


def repair(st: StateFile, say: Say, routing: bool = True) -> list[str]:
    """Attach the program again if its filter (or the clsact qdisc) was removed."""
    cfg = Config.from_dict(st.data["config"])
    a = attachment(cfg)
    if not routing or tc.ifindex(a.dev) is None or tc.attached(a):
        return []
    pid = int(st.data.get("prog_id", 0))
    prog_fd = libbpf.prog_fd_by_id(pid, cfg.program) if pid else None
    stats_id = int(st.data.get("stats_map_id", 0))
    stats_fd = libbpf.map_fd_by_id(stats_id, facts.MAP_ZTUNNEL_STATS) if stats_id else None
    how = "attached again"
    if prog_fd is None or stats_fd is None:
        for fd in (prog_fd, stats_fd):
            if fd is not None:
                os.close(fd)
        prog_fd, stats_fd = _load(cfg)
        how = "loaded and attached again"
    try:
        _attach(st, cfg, prog_fd, stats_fd)
    finally:
        os.close(prog_fd)
        os.close(stats_fd)
    msg = f"tc filter {a.describe()} was removed; {how}"
    say(msg)
    return [msg]


def counters(st: StateFile) -> dict[str, int] | None:
    map_id = int(st.data.get("stats_map_id", 0))
    if not map_id:
        return None
    return objects.counters_by_id(map_id, facts.MAP_ZTUNNEL_STATS, facts.ZTUNNEL_COUNTERS)
