"""clsact qdiscs and direct-action BPF filters through pyroute2 (ARCHITECTURE rule 5),
the filters read by rtdump.

Attached as Istio attaches its programs (reference §8): the clsact qdisc, then one
``bpf`` filter, handle 1, prio 1, protocol ETH_P_ALL, direct-action, on the ingress or
egress hook. Our filters are named ``geneve-dp:<program>``, so they are found by name
after a crash and never confused with someone else's.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass
from typing import Literal

from pyroute2.netlink.exceptions import NetlinkError

from ...netconf import links, rtdump

Hook = Literal["ingress", "egress"]
PARENT: dict[Hook, int] = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
HANDLE = 1
PRIO = 1
ETH_P_ALL = 0x0003
NAME_PREFIX = "geneve-dp:"


def filter_name(program: str) -> str:
    return NAME_PREFIX + program


@dataclass(frozen=True)
class Attachment:
    """One program on one hook of one device."""

    dev: str
    hook: Hook
    program: str

    def describe(self) -> str:
        return f"{self.program} on {self.dev} {self.hook}"


def ifindex(dev: str) -> int | None:
    try:
        return socket.if_nametoindex(dev)
    except OSError:
        return None


def has_clsact(dev: str) -> bool:
    idx = ifindex(dev)
    if idx is None:
        return False
    with links.iproute() as ipr:
        for msg in ipr.get_qdiscs(index=idx):
            if msg.get_attr("TCA_KIND") == "clsact":
                return True
    return False


def _clsact(idx: int, command: str, already: tuple[int, ...]) -> bool:
    """``tc qdisc <command> clsact`` on device ``idx``; False when netlink answers one
    of the ``already`` codes (the qdisc was already in the state asked for)."""
    with links.iproute() as ipr:
        try:
            ipr.tc(command, "clsact", index=idx)
        except NetlinkError as exc:
            if exc.code in already:
                return False
            raise
    return True


def add_clsact(dev: str) -> bool:
    """Add the clsact qdisc; False when one was there already."""
    idx = ifindex(dev)
    if idx is None:
        raise LookupError(f"device {dev} does not exist")
    return _clsact(idx, "add", (errno.EEXIST,))


def del_clsact(dev: str) -> bool:
    """Delete the clsact qdisc (and every filter on it); False when there was none."""
    idx = ifindex(dev)
    return idx is not None and _clsact(idx, "del", (errno.ENOENT, errno.EINVAL, errno.ENODEV))


def filters(dev: str, hook: Hook) -> list[str]:
    """Names of the bpf filters on ``dev``'s ``hook`` (empty without clsact)."""
    idx = ifindex(dev)
    if idx is None:
        return []
    # Read off a plain rtnetlink socket: the watcher asks on every routing pass.
    return [name for kind, name in rtdump.tc_filters(idx, PARENT[hook]) if name]


def attached(a: Attachment) -> bool:
    return filter_name(a.program) in filters(a.dev, a.hook)


def _our_slot(a: Attachment) -> dict[str, int]:
    """Where our filter sits on ``a``'s hook (handle 1, prio 1, every protocol)."""
    return {"handle": HANDLE, "prio": PRIO, "protocol": ETH_P_ALL, "parent": PARENT[a.hook]}


def attach(a: Attachment, prog_fd: int) -> None:
    """Put ``prog_fd`` on the hook (replacing what holds handle 1, prio 1 there)."""
    idx = ifindex(a.dev)
    if idx is None:
        raise LookupError(f"device {a.dev} does not exist")
    with links.iproute() as ipr:
        ipr.tc(
            "replace-filter",
            "bpf",
            index=idx,
            fd=prog_fd,
            name=filter_name(a.program),
            direct_action=True,
            **_our_slot(a),
        )


def detach(a: Attachment) -> bool:
    """Remove our filter from the hook; False when it was not there."""
    idx = ifindex(a.dev)
    if idx is None or not attached(a):
        return False
    with links.iproute() as ipr, contextlib.suppress(NetlinkError):
        ipr.tc("del-filter", "bpf", index=idx, **_our_slot(a))
    return not attached(a)


def remove_ours(programs: tuple[str, ...]) -> list[str]:
    """Without a record (a crash lost it): our filters of ``programs`` on any device
    here, and each clsact qdisc left with no filter at all (nothing is lost by
    deleting an empty one, and it was most likely ours)."""
    done = []
    for a in ours_anywhere():
        if a.program in programs and detach(a):
            done.append(a.describe())
            if not any(filters(a.dev, hook) for hook in PARENT) and del_clsact(a.dev):
                done.append(f"clsact qdisc on {a.dev}")
    return done


def ours_anywhere() -> list[Attachment]:
    """Our filters on any device of this namespace (teardown without a record)."""
    out = []
    for _idx, dev in socket.if_nameindex():
        if not has_clsact(dev):
            continue
        for hook in PARENT:
            for name in filters(dev, hook):
                if name.startswith(NAME_PREFIX):
                    out.append(Attachment(dev, hook, name.removeprefix(NAME_PREFIX)))
    return out
