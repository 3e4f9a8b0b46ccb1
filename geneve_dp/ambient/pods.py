"""Pod enrolment on the node (reference §5.3, §5.4): ipset entry + table-100 route.

Enrolling puts the pod IP in `ztunnel-pods-ips` (comment = pod UID), so the pod's
outbound TCP gets mark 0x100, adds `IP/32 via 192.168.126.2 dev istioin src HOST_IP`
to table 100, so traffic to the pod goes through `istioin` to ztunnel, and turns off
the reverse-path filter of the pod's host-side device. Each pod has its own record
(state.PodRecord), so `node down` and the watcher can find what was done.

The work of one pod does not depend on the number of pods: the ipset entry and the
route are added (an existing one is reported by the kernel, not looked for in a
listing), the device comes from one route lookup, and one small file is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..netconf import ipset, links
from . import checks, profile, state
from . import constants as k
from .ebpf import node as _ebpf
from .rules import NodeRulesConfig
from .state import StateFile


@dataclass(frozen=True)
class PodResult:
    ip: str
    changed: bool
    message: str


def pod_route(ip: str, host_ip: str) -> links.Route:
    return links.Route(
        k.ROUTE_TABLE_INBOUND, f"{ip}/32", k.INBOUND_TUN, gateway=k.ZT_INBOUND_TUN_IP, src=host_ip
    )


def pod_device(ip: str) -> str | None:
    """The pod's host-side device: where the main table sends the pod's IP (Istio's
    getDeviceWithDestinationOf). Rule 100 sends mark 0x200 to the main table, so a
    lookup with that mark is a main-table lookup, unaffected by the pod's own
    table-100 route through istioin."""
    r = links.route_get(checks.ipv4(ip, "IP"), mark=k.SKIP_MARK)
    # Only a device the pod hangs off directly: not a gateway's (the node's uplink).
    if r is None or r.gateway is not None or r.oif in (k.INBOUND_TUN, k.OUTBOUND_TUN, "lo"):
        return None
    return r.oif


def _node() -> tuple[StateFile, NodeRulesConfig | None]:
    """The node's record and, in iptables mode, its settings (None in eBPF mode)."""
    st = state.load_node_state()
    if not st.data.get("config"):
        raise UserError("the node is not set up here: run `geneve-dp node up` first", "pod")
    if _ebpf.is_ebpf(st):
        return st, None
    return st, state.node_config(st)


def add(ip_text: str, uid: str) -> PodResult:
    return add_many([(ip_text, uid)])[0]


def add_many(pods: Iterable[tuple[str, str]]) -> list[PodResult]:
    """Enrol each (IP, UID), in order; all inputs are checked before any is enrolled."""
    wanted = []
    for ip_text, uid in pods:
        ip = str(checks.ipv4(ip_text, "IP"))
        if not uid:
            raise UserError("is required (the pod's UID, kept as the ipset comment)", "--uid")
        wanted.append((ip, uid))
    st, cfg = _node()
    directory = st.path.parent
    out = []
    if cfg is None:  # eBPF mode keeps its pods in the node's record
        for ip, uid in wanted:
            with state.locked(directory):
                out.append(PodResult(ip, *_ebpf.pod_add(state.load_node_state(), ip, uid)))
        return out
    with links.session(), ipset.session():
        for ip, uid in wanted:
            # Under the state lock, one pod at a time: the watcher must see the record
            # and the kernel agree, and must not wait long for its turn.
            with state.locked(directory):
                out.append(_add(directory, cfg, ip, uid))
    return out


def _add(directory: Path, cfg: NodeRulesConfig, ip: str, uid: str) -> PodResult:
    route = pod_route(ip, str(cfg.host_ip))
    rec = state.load_pod(directory, ip)
    known = rec is not None and rec.uid == uid and rec.route == asdict(route)
    if rec is None:
        rec = state.PodRecord(ip, uid, asdict(route), {})
    rec.uid, rec.route = uid, asdict(route)
    state.save_pod(directory, rec)  # the intent, before the change
    try:
        changed = ipset.add(k.IPSET_NAME, ip, uid)
        changed = links.add_route(route) or changed
        changed = _rp_filter_off(directory, rec) or changed
    except Exception as exc:
        with contextlib.suppress(Exception):
            _remove(directory, ip)
        raise UserError(f"enrolling {ip} failed and was rolled back: {exc}", "pod add") from exc
    if known and not changed:
        return PodResult(ip, False, f"pod {ip} (uid {uid}) is already enrolled")
    return PodResult(ip, True, f"pod {ip} (uid {uid}) enrolled")


def pod_sysctls(dev: str) -> list[str]:
    """rp_filter keys `pod add` sets to 0 (Istio's disableRPFiltersForLink): the pod's
    device, recorded and restored by `pod del`; `all` and `default` belong to the
    node's record (`node up` already set them)."""
    return [links.conf_key(dev, "rp_filter")]


def _rp_filter_off(directory: Path, rec: state.PodRecord) -> bool:
    """The pod's device must not reverse-path filter: the route back to the pod's
    address leads into istioin, not to the device its packets arrive on."""
    changed = False
    dev = pod_device(rec.ip)
    keys = pod_sysctls(dev) if dev else []
    for key in keys:
        old = links.sysctl_get(key)
        if old is None:
            continue
        if key not in rec.sysctls:
            rec.sysctls[key] = old
            state.save_pod(directory, rec)
        changed = links.sysctl_set(key, "0") != "0" or changed
    for key in (links.conf_key("all", "rp_filter"), links.conf_key("default", "rp_filter")):
        changed = links.sysctl_set(key, "0") not in (None, "0") or changed
    return changed


def _remove(directory: Path, ip: str, host_ip: str = "") -> bool:
    rec = state.load_pod(directory, ip)
    changed = ipset.delete(k.IPSET_NAME, ip)
    route = profile.route_from_dict(rec.route) if rec and rec.route else pod_route(ip, host_ip)
    changed = links.del_route(route) or changed
    if rec is not None:
        profile.restore_sysctls(rec.sysctls)
        state.remove_pod(directory, ip)
        changed = True
    return changed


def delete(ip_text: str) -> PodResult:
    return delete_many([ip_text])[0]


def delete_many(ips: Iterable[str]) -> list[PodResult]:
    wanted = [str(checks.ipv4(ip_text, "IP")) for ip_text in ips]
    st, cfg = _node()
    directory = st.path.parent
    out = []
    with contextlib.ExitStack() as sessions:
        if cfg is not None:  # (the eBPF mode's requests are its own)
            sessions.enter_context(links.session())
            sessions.enter_context(ipset.session())
        for ip in wanted:
            with state.locked(directory):
                if cfg is None:
                    removed = _ebpf.pod_remove(state.load_node_state(), ip)
                else:
                    removed = _remove(directory, ip, str(cfg.host_ip))
            if removed:
                out.append(PodResult(ip, True, f"pod {ip} removed from the mesh"))
            else:
                out.append(PodResult(ip, False, f"pod {ip} is not enrolled; nothing to do"))
    return out


def remove_all(directory: Path) -> list[str]:
    """`node down`: every recorded pod's route and sysctls (the ipset goes whole)."""
    done = []
    for ip, rec in state.load_pods(directory).items():
        if rec.route and links.del_route(profile.route_from_dict(rec.route)):
            done.append(f"route {profile.route_from_dict(rec.route).describe()}")
        profile.restore_sysctls(rec.sysctls)
        state.remove_pod(directory, ip)
    state.remove_pods_dir(directory)
    return done


def listing() -> dict[str, str]:
    """Enrolled pod IP -> UID, from the ipset or app_info map (the kernel's view)."""
    st = state.load_node_state()
    if _ebpf.is_ebpf(st):
        return _ebpf.listing(st)
    return ipset.entries(k.IPSET_NAME)
