"""The node side of Istio ambient's eBPF redirect mode (reference §8).

`node up --redirect-mode ebpf` loads ambient_node.bpf.o, writes the ztunnel's veth
and MAC (and the DNS-capture flag) into ``ztunnel_info`` and the node's address into
``host_ip_info``, turns the reverse-path filter off (`all`, `default`, the ztunnel's
host veth) and attaches ``ztunnel_host_ingress`` to the ztunnel veth's ingress. `pod
add` writes ``app_info[pod IP] = (host veth, pod MAC)`` and attaches ``app_inbound``
(egress) then ``app_outbound`` (ingress) to the pod's host veth; `pod del` takes them
off. No tunnel, ipset, iptables rule, route or ip rule is made.

Nothing is pinned: ``ztunnel_host_ingress`` uses every map, so the maps live while it
is attached. Their kernel IDs (and the programs') are in the state file; a command
that finds them gone (someone removed every filter) loads the object again and
puts back everything the record lists, as the watcher does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...errors import UserError
from ...netconf import links
from .. import profile, reconcile, watch
from ..state import StateFile, state_dir
from . import MODE, facts, libbpf, neigh, objects, tc
from . import is_ebpf as is_ebpf  # callers ask the role module

ROLE = "node"
POD_PROGRAMS: tuple[tuple[str, tc.Hook], ...] = (
    # Egress first: once the pod's frames go to ztunnel, ztunnel's replies must find
    # the pod (app_info) and pass its egress (BYPASS).
    (facts.APP_INBOUND, "egress"),
    (facts.APP_OUTBOUND, "ingress"),
)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    ztunnel_ip: str
    ztunnel_veth: str
    ztunnel_mac: str
    host_ip: str
    dns_capture: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "redirect_mode": MODE,
            "ztunnel_ip": self.ztunnel_ip,
            "ztunnel_veth": self.ztunnel_veth,
            "ztunnel_mac": self.ztunnel_mac,
            "host_ip": self.host_ip,
            "dns_capture": self.dns_capture,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(
            d["ztunnel_ip"], d["ztunnel_veth"], d["ztunnel_mac"], d["host_ip"], d["dns_capture"]
        )


def check_mac(text: str, field: str) -> str:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise UserError(f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)", field)
    try:
        return objects.mac_text(objects.mac_bytes(text))
    except ValueError as exc:
        raise UserError(f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)", field) from exc


def resolve(
    ztunnel_ip: str | None,
    ztunnel_veth: str | None,
    host_ip: str | None,
    dns_capture: bool = False,
    ztunnel_mac: str | None = None,
    version: str = "1.20",
) -> Config:
    """Check the inputs against this namespace and the BPF build, changing nothing."""
    from .. import node as base

    if version != "1.20":
        raise UserError(
            f"the eBPF redirect mode works in Istio 1.20 only ({version} shipped a stub "
            "loader); use --istio-version 1.20 or --redirect-mode iptables",
            "--istio-version",
        )
    b = base.resolve(ztunnel_ip, ztunnel_veth, host_ip, dns_capture=dns_capture)
    zt, veth = str(b.ztunnel_ip), b.ztunnel_veth
    if ztunnel_mac:
        mac = check_mac(ztunnel_mac, "--ztunnel-mac")
    else:
        found = neigh.resolve(zt, veth)
        if found is None:
            raise UserError(f"{zt} does not answer ARP on {veth}; give its MAC", "--ztunnel-mac")
        mac = found
    objects.object_path(objects.NODE_OBJECT)  # built and current, before any change
    return Config(zt, veth, mac, str(b.host_ip), dns_capture)


def sysctls(cfg: Config) -> list[tuple[str, str]]:
    """Frames from ztunnel carry the pods' (and spoofed) sources on the ztunnel veth."""
    return [(links.conf_key(d, "rp_filter"), "0") for d in ("all", "default", cfg.ztunnel_veth)]


def _ifindex(dev: str) -> int:
    idx = tc.ifindex(dev)
    if idx is None:
        raise UserError(f"device {dev} does not exist", "--ztunnel-veth")
    return idx


def ztunnel_attachment(cfg: Config) -> tc.Attachment:
    return tc.Attachment(cfg.ztunnel_veth, "ingress", facts.ZTUNNEL_HOST_INGRESS)


def pod_attachments(veth: str) -> list[tc.Attachment]:
    return [tc.Attachment(veth, hook, prog) for prog, hook in POD_PROGRAMS]


def _attach(st: StateFile, a: tc.Attachment, prog_fd: int) -> None:
    """clsact (recorded as ours if we add it) and the filter."""
    if not tc.has_clsact(a.dev):
        st.record("qdiscs", a.dev)
        tc.add_clsact(a.dev)
    tc.attach(a, prog_fd)


def _detach(st: StateFile, attachments: list[tc.Attachment]) -> list[str]:
    """Take the filters off; a clsact we added goes too once none of ours is left."""
    done = [a.describe() for a in attachments if tc.detach(a)]
    ours = st.data.get("qdiscs", [])
    for dev in dict.fromkeys(a.dev for a in attachments):
        if dev in ours and not any(
            n.startswith(tc.NAME_PREFIX) for h in tc.PARENT for n in tc.filters(dev, h)
        ):
            if tc.del_clsact(dev):
                done.append(f"clsact qdisc on {dev}")
            ours.remove(dev)
            st.save()
    return done


# --- loading ---------------------------------------------------------------------------


def _load_fresh(st: StateFile) -> objects.Maps:
    """Load the object with new maps, fill them from the record and attach everything."""
    cfg = Config.from_dict(st.data["config"])
    obj = objects.load(objects.NODE_OBJECT)
    try:
        maps = objects.Maps.of(obj, facts.NODE_MAPS)
        st.data["maps"] = maps.ids()
        progs = (facts.ZTUNNEL_HOST_INGRESS, facts.APP_INBOUND, facts.APP_OUTBOUND)
        st.data["progs"] = {p: libbpf.prog_id(obj.program_fd(p)) for p in progs}
        st.save()
        maps.set_host_ip(cfg.host_ip)
        maps.set_ztunnel(
            objects.ZtunnelEntry(_ifindex(cfg.ztunnel_veth), cfg.ztunnel_mac, cfg.dns_capture)
        )
        for ip, info in st.data.get("pods", {}).items():
            maps.set_pod(ip, objects.PodEntry(int(info["ifindex"]), info["mac"]))
        _attach(st, ztunnel_attachment(cfg), obj.program_fd(facts.ZTUNNEL_HOST_INGRESS))
        for info in st.data.get("pods", {}).values():
            for a in pod_attachments(info["veth"]):
                if tc.ifindex(a.dev) is not None:
                    _attach(st, a, obj.program_fd(a.program))
    finally:
        obj.close()
    return maps


def node_maps(st: StateFile) -> tuple[objects.Maps, bool]:
    """The node's maps as recorded, or (when they are gone) loaded again; and whether
    they had to be."""
    maps = objects.Maps.by_ids(st.data.get("maps", {}), facts.NODE_MAPS)
    if maps is not None:
        return maps, False
    return _load_fresh(st), True


def _program_fds(
    st: StateFile,
    maps: objects.Maps,
    names: tuple[str, ...] = (facts.APP_INBOUND, facts.APP_OUTBOUND),
) -> dict[str, int]:
    """fds of programs ``names``: the loaded ones, else a load on the same maps (so
    their entries and counters carry on); the caller closes them."""
    fds: dict[str, int] = {}
    progs = st.data.setdefault("progs", {})
    for name in names:
        fd = libbpf.prog_fd_by_id(int(progs.get(name, 0)), name) if progs.get(name) else None
        if fd is None:
            break
        fds[name] = fd
    else:
        return fds
    for fd in fds.values():
        os.close(fd)
    skip = [p for p in _NODE_PROGRAMS if p not in names]
    obj = objects.load(objects.NODE_OBJECT, reuse=maps.fds, skip=skip)
    try:
        fds = {name: os.dup(obj.program_fd(name)) for name in names}
    finally:
        obj.close()
    progs.update({name: libbpf.prog_id(fd) for name, fd in fds.items()})
    st.save()
    return fds


# --- up / down -------------------------------------------------------------------------


def up(cfg: Config, log: Say | None = None, start_watch: bool = True) -> Config:
    from .. import node as base
    from .. import pods

    say = log or (lambda _msg: None)
    st = base._state()
    enrolled: dict[str, Any] = dict(st.data.get("pods", {}))
    if st.exists:
        base.down()  # whatever mode the earlier setup was in
    watch.stop(state_dir(), ROLE)
    st = profile.begin(base.state_path(), cfg.to_dict())
    with profile.rolled_back_on_error(down, ROLE):
        say(f"BPF: {objects.NODE_OBJECT} (app_outbound, app_inbound, ztunnel_host_ingress)")
        maps = _load_fresh(st)
        maps.close()
        say(
            f"maps: ztunnel_info = {cfg.ztunnel_veth} / {cfg.ztunnel_mac}"
            f"{' (DNS capture)' if cfg.dns_capture else ''}, host_ip_info = {cfg.host_ip}"
        )
        say(f"sysctls: rp_filter=0 (all, default, {cfg.ztunnel_veth})")
        profile.set_sysctls(st, sysctls(cfg))
        say(f"tc: {facts.ZTUNNEL_HOST_INGRESS} on {cfg.ztunnel_veth} ingress (clsact)")
        profile.finish(st)
    for ip, info in enrolled.items():
        say(f"re-enrolling pod {ip}")
        pods.add(ip, info.get("uid", ""))
    if start_watch:
        say(f"reconcile watcher: `geneve-dp node watch`, log {watch.logfile(st.path.parent, ROLE)}")
        watch.start(st.path.parent, ROLE)
    return cfg


def down() -> list[str]:
    """Everything the record lists, and our filters found by name; nothing pinned."""
    from .. import node as base

    watch.stop(state_dir(), ROLE)
    st = base._state()
    done: list[str] = []
    attachments = [
        a for info in st.data.get("pods", {}).values() for a in pod_attachments(info["veth"])
    ]
    cfg = st.data.get("config") or {}
    if cfg.get("ztunnel_veth"):
        attachments.append(ztunnel_attachment(Config.from_dict(cfg)))
    done += _detach(st, attachments)
    done += remove_by_name()
    profile.restore_sysctls(st.data.get("sysctls", {}))
    st.remove()
    return done


def remove_by_name() -> list[str]:
    """Our filters on any device here (after a crash that lost the record)."""
    return tc.remove_ours(_NODE_PROGRAMS)


_NODE_PROGRAMS = (facts.APP_OUTBOUND, facts.APP_INBOUND, facts.ZTUNNEL_HOST_INGRESS)


# --- pods ------------------------------------------------------------------------------


def pod_add(st: StateFile, ip: str, uid: str) -> tuple[bool, str]:
    """Enrol ``ip``: app_info entry, then app_inbound and app_outbound on its veth."""
    route = links.route_get(ipaddress.IPv4Address(ip))
    if route is None:
        raise UserError(f"{ip} is unreachable from the node", "IP")
    veth = route.oif
    dev = links.link(veth)
    cfg = Config.from_dict(st.data["config"])
    if veth == cfg.ztunnel_veth or ip == cfg.ztunnel_ip:
        raise UserError(f"{ip} is the ztunnel pod (via {veth}), which is never enrolled", "IP")
    if dev is None or dev.kind != "veth":
        raise UserError(f"the route to {ip} leaves via {veth}, which is not a pod's veth", "IP")
    mac = neigh.resolve(ip, veth)
    if mac is None:
        raise UserError(f"{ip} does not answer ARP on {veth}", "IP")
    info = {"uid": uid, "veth": veth, "ifindex": dev.index, "mac": mac}
    pods: dict[str, Any] = st.data.setdefault("pods", {})
    want = objects.PodEntry(dev.index, mac)
    maps, _ = node_maps(st)
    try:
        if (
            pods.get(ip) == info
            and maps.pod(ip) == want
            and all(tc.attached(a) for a in pod_attachments(veth))
        ):
            return False, f"pod {ip} (uid {uid}) is already enrolled"
        pods[ip] = info
        st.save()
        try:
            maps.set_pod(ip, want)
            fds = _program_fds(st, maps)
            try:
                for a in pod_attachments(veth):
                    _attach(st, a, fds[a.program])
            finally:
                for fd in fds.values():
                    os.close(fd)
        except Exception as exc:
            with contextlib.suppress(Exception):
                pod_remove(st, ip)
            if isinstance(exc, UserError):
                raise
            raise UserError(f"enrolling {ip} failed and was rolled back: {exc}", "pod add") from exc
    finally:
        maps.close()
    return True, f"pod {ip} (uid {uid}) enrolled: {veth} {mac}, programs attached"


def pod_remove(st: StateFile, ip: str) -> bool:
    pods: dict[str, Any] = st.data.get("pods", {})
    info = pods.get(ip)
    changed = False
    if info:
        changed = bool(_detach(st, pod_attachments(info["veth"]))) or changed
    with objects.opened(st.data.get("maps", {}), facts.NODE_MAPS) as maps:
        if maps is not None:
            changed = maps.del_pod(ip) or changed
    if info:
        del pods[ip]
        st.save()
        changed = True
    return changed


def listing(st: StateFile) -> dict[str, str]:
    """Enrolled pod IP -> UID, from app_info (the kernel's view) and the record."""
    pods: dict[str, Any] = st.data.get("pods", {})
    with objects.opened(st.data.get("maps", {}), facts.NODE_MAPS) as maps:
        if maps is None:
            return {}
        return {ip: str(pods.get(ip, {}).get("uid", "")) for ip in maps.pods()}


# --- the watcher -----------------------------------------------------------------------


def intent(st: StateFile) -> reconcile.Intent:
    cfg = Config.from_dict(st.data["config"])
    return reconcile.Intent(
        role=ROLE,
        sysctls=tuple(sysctls(cfg)),
        extra=(lambda say, routing: repair(st, say, routing),),
    )


def repair(st: StateFile, say: Say, routing: bool = True) -> list[str]:
    """Put back map entries every pass; filters and qdiscs too when ``routing`` (a
    netlink change was announced, or the slow periodic pass)."""
    done: list[str] = []

    def fixed(msg: str) -> None:
        done.append(msg)
        say(msg)

    cfg = Config.from_dict(st.data["config"])
    if tc.ifindex(cfg.ztunnel_veth) is None:
        return done  # the ztunnel pod is gone: nothing to attach to until `node up` again
    maps, reloaded = node_maps(st)
    try:
        if reloaded:
            n = len(st.data.get("pods", {}))
            fixed(f"BPF maps were gone (every filter removed); loaded again, {n} pods put back")
            return done
        zt = objects.ZtunnelEntry(_ifindex(cfg.ztunnel_veth), cfg.ztunnel_mac, cfg.dns_capture)
        was = maps.ztunnel()
        if was != zt:
            maps.set_ztunnel(zt)
            fixed(f"map ztunnel_info was {was}; written again")
        if maps.host_ip() != cfg.host_ip:
            maps.set_host_ip(cfg.host_ip)
            fixed(f"map host_ip_info lost {cfg.host_ip}; written again")
        pods: dict[str, Any] = st.data.get("pods", {})
        for ip, info in pods.items():
            want = objects.PodEntry(int(info["ifindex"]), info["mac"])
            if maps.pod(ip) != want:
                maps.set_pod(ip, want)
                fixed(f"map app_info: pod {ip} was missing; added")
        if not routing:
            return done
        missing = [ztunnel_attachment(cfg)] + [
            a for info in pods.values() for a in pod_attachments(info["veth"])
        ]
        missing = [a for a in missing if tc.ifindex(a.dev) is not None and not tc.attached(a)]
        if not missing:
            return done
        # The programs still loaded, or loaded again on the same maps (whose entries
        # and counters carry on).
        fds = _program_fds(st, maps, tuple(dict.fromkeys(a.program for a in missing)))
        try:
            for a in missing:
                _attach(st, a, fds[a.program])
                fixed(f"tc filter {a.describe()} was removed; attached again")
        finally:
            for fd in fds.values():
                os.close(fd)
    finally:
        maps.close()
    return done


# --- observing -------------------------------------------------------------------------


def counters(st: StateFile) -> dict[str, int] | None:
    map_id = int(st.data.get("maps", {}).get(facts.MAP_NODE_STATS, 0))
    if not map_id:
        return None
    return objects.counters_by_id(map_id, facts.MAP_NODE_STATS, facts.NODE_COUNTERS)
