"""Pod enrolment on the node (reference §5.3, §5.4): ipset entry + table-100 route.

Enrolling puts the pod IP in `ztunnel-pods-ips` (comment = pod UID), so the pod's
outbound TCP gets mark 0x100, and adds `IP/32 via 192.168.126.2 dev istioin src HOST_IP`
to table 100, so traffic to the pod goes through `istioin` to ztunnel. Both are
recorded in the node's state file so `node down` can take them away too.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

from ..errors import UserError
from ..netconf import ipset, links
from . import checks, node, profile
from . import constants as k
from .ebpf import node as _ebpf
from .state import StateFile, locked


@dataclass(frozen=True)
class PodResult:
    ip: str
    changed: bool
    message: str


def pod_route(ip: str, host_ip: str) -> links.Route:
    return links.Route(
        k.ROUTE_TABLE_INBOUND, f"{ip}/32", k.INBOUND_TUN, gateway=k.ZT_INBOUND_TUN_IP, src=host_ip
    )


def _node_state() -> StateFile:
    st = node._state()
    if not st.data.get("config"):
        raise UserError("the node is not set up here: run `geneve-dp node up` first", "pod")
    return st


def add(ip_text: str, uid: str) -> PodResult:
    ip = str(checks.ipv4(ip_text, "IP"))
    if not uid:
        raise UserError("is empty; accepted: the pod's UID (kept as the ipset comment)", "--uid")
    # Under the state lock: the watcher must see the record and the kernel agree.
    with locked(node.state_path().parent):
        return _add(ip, uid)


def _add(ip: str, uid: str) -> PodResult:
    st = _node_state()
    if _ebpf.is_ebpf(st):
        return PodResult(ip, *_ebpf.pod_add(st, ip, uid))
    cfg = node.load_config(st)
    assert cfg is not None
    pods = st.data.setdefault("pods", {})
    route = pod_route(ip, str(cfg.host_ip))
    entries = ipset.entries(k.IPSET_NAME)
    # In the set when either the IP or the UID is there (as Istio's IsPodInIpset).
    in_set = ip in entries or (uid in entries.values())
    if in_set and ip in pods and links.route_exists(route):
        return PodResult(ip, False, f"pod {ip} (uid {uid}) is already enrolled")

    info = pods.setdefault(ip, {"uid": uid, "route": asdict(route), "sysctls": {}})
    info["uid"] = uid
    st.save()
    try:
        if ip not in entries:
            ipset.add(k.IPSET_NAME, ip, uid)
        if not links.route_exists(route):
            links.add_route(route)
        # The pod's host-side veth must not reverse-path filter: replies from ztunnel
        # come back with the pod's peer addresses on another interface.
        r = links.route_get(checks.ipv4(ip, "IP"))
        if r is not None and r.oif not in (k.INBOUND_TUN, k.OUTBOUND_TUN):
            key = links.conf_key(r.oif, "rp_filter")
            old = links.sysctl_get(key)
            if old is not None:
                info["sysctls"].setdefault(key, old)
                st.save()
                links.sysctl_set(key, "0")
    except Exception as exc:
        with contextlib.suppress(Exception):
            _remove(st, ip)
        raise UserError(f"enrolling {ip} failed and was rolled back: {exc}", "pod add") from exc
    return PodResult(ip, True, f"pod {ip} (uid {uid}) enrolled")


def _remove(st: StateFile, ip: str) -> bool:
    if _ebpf.is_ebpf(st):
        return _ebpf.pod_remove(st, ip)
    pods = st.data.get("pods", {})
    info = pods.get(ip)
    cfg = node.load_config(st)
    changed = ipset.delete(k.IPSET_NAME, ip)
    route = (
        profile.route_from_dict(info["route"])
        if info and info.get("route")
        else pod_route(ip, str(cfg.host_ip) if cfg else "")
    )
    changed = links.del_route(route) or changed
    if info:
        profile.restore_sysctls(info.get("sysctls", {}))
        del pods[ip]
        st.save()
        changed = True
    return changed


def delete(ip_text: str) -> PodResult:
    ip = str(checks.ipv4(ip_text, "IP"))
    with locked(node.state_path().parent):
        removed = _remove(_node_state(), ip)
    if not removed:
        return PodResult(ip, False, f"pod {ip} is not enrolled; nothing to do")
    return PodResult(ip, True, f"pod {ip} removed from the mesh")


def listing() -> dict[str, str]:
    """Enrolled pod IP -> UID, from the ipset or app_info map (the kernel's view)."""
    st = node._state()
    if _ebpf.is_ebpf(st):
        return _ebpf.listing(st)
    return ipset.entries(k.IPSET_NAME)
