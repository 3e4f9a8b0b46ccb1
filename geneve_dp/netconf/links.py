"""Links, routes, rules and sysctls of the current network namespace, through pyroute2.

Synchronous and short-lived: each helper opens its own netlink socket, so callers
never share one across threads and never run this on an event loop (ARCHITECTURE
rule 5). "Current namespace" is the calling process's; run under ``ip netns exec`` to
act on another one.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import rtdump

AF_INET = 2
SCOPE_LINK = 253
SCOPE_HOST = 254
RTNH_F_ONLINK = 4
FR_ACT_TO_TBL = 1
FR_ACT_GOTO = 2


# Netlink dumps made by this process, by kind ("routes", "rules", "links"): the work that grows
# with the size of a table, counted so that tests and benches can check who dumps what.
DUMPS: dict[str, int] = {"routes": 0, "rules": 0, "links": 0}


_session = threading.local()  # .ipr: this thread's shared IPRoute inside session()


@contextlib.contextmanager
def iproute() -> Iterator[Any]:
    shared = getattr(_session, "ipr", None)
    if shared is not None:
        yield shared
        return
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Inside, this thread's calls here share one netlink socket (for a batch of many
    small changes: opening one costs more than most requests)."""
    if getattr(_session, "ipr", None) is not None:
        yield
        return
    _session.ipr = IPRoute()
    try:
        yield
    finally:
        ipr, _session.ipr = _session.ipr, None
        ipr.close()


def _dump_routes(ipr: Any, table: int | None = None) -> list[Any]:
    DUMPS["routes"] += 1
    if table is None:
        return list(ipr.get_routes(family=AF_INET))
    return list(ipr.get_routes(family=AF_INET, table=table))


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None
    up: bool


def link(name: str) -> LinkInfo | None:
    with iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        msg = ipr.get_links(idx[0])[0]
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return LinkInfo(idx[0], name, kind, bool(msg["flags"] & 1))


def link_names() -> list[str]:
    """Device names of this namespace. Read through libc's if_nameindex, not pyroute2:
    the watchers ask every second, and a pyroute2 0.9.7 link dump keeps ~2.6 KiB per
    call for good (measured); this is a read, so rule 5 (changes through pyroute2)
    is not at stake."""
    DUMPS["links"] += 1
    return sorted(name for _index, name in socket.if_nameindex())


def link_exists(name: str) -> bool:
    """Whether this namespace has a device ``name``: one lookup by name (an ioctl), the
    same however many devices there are (a node with a thousand pods has 2,000)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def delete_link(name: str) -> bool:
    """Set down then delete ``name``; False when it did not exist."""
    with iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return False
        with contextlib.suppress(NetlinkError):
            ipr.link("set", index=idx[0], state="down")
        try:
            ipr.link("del", index=idx[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
    return True


@dataclass(frozen=True)
class RouteTo:
    oif: str
    src: ipaddress.IPv4Address | None
    gateway: ipaddress.IPv4Address | None


def route_get(dst: ipaddress.IPv4Address, mark: int | None = None) -> RouteTo | None:
    """What the kernel would do for a packet from this host to ``dst`` carrying ``mark``
    (None: unreachable). One lookup, however many routes there are."""
    kw: dict[str, Any] = {"dst": str(dst)}
    if mark is not None:
        kw["mark"] = mark
    with iproute() as ipr:
        try:
            msg = ipr.route("get", **kw)[0]
        except NetlinkError:
            return None
    if msg["type"] != 1:  # RTN_UNICAST; unreachable/prohibit/blackhole are no route
        return None
    oif = msg.get_attr("RTA_OIF")
    try:
        name = socket.if_indextoname(oif)
    except OSError:
        name = str(oif)
    src = msg.get_attr("RTA_PREFSRC")
    gw = msg.get_attr("RTA_GATEWAY")
    return RouteTo(
        str(name),
        ipaddress.IPv4Address(src) if src else None,
        ipaddress.IPv4Address(gw) if gw else None,
    )


@dataclass(frozen=True)
class Route:
    """One IPv4 route, described the way we create and delete it."""

    table: int
    dst: str  # "a.b.c.d/len"; "0.0.0.0/0" for default
    dev: str
    gateway: str | None = None
    src: str | None = None
    scope: int = 0
    onlink: bool = False
    type: str = "unicast"

    def describe(self) -> str:
        parts = [self.type] if self.type != "unicast" else []
        parts.append("default" if self.dst == "0.0.0.0/0" else self.dst)
        if self.gateway:
            parts += ["via", self.gateway]
        parts += ["dev", self.dev, "table", str(self.table)]
        if self.src:
            parts += ["src", self.src]
        if self.scope == SCOPE_LINK:
            parts += ["scope", "link"]
        if self.onlink:
            parts.append("onlink")
        return " ".join(parts)


def _route_kwargs(ipr: Any, r: Route) -> dict[str, Any]:
    idx = ipr.link_lookup(ifname=r.dev)
    if not idx:
        raise LookupError(f"device {r.dev} does not exist")
    kw: dict[str, Any] = {"dst": r.dst, "table": r.table, "oif": idx[0], "family": AF_INET}
    if r.gateway:
        kw["gateway"] = r.gateway
    if r.src:
        kw["prefsrc"] = r.src
    if r.type == "local":
        kw["type"] = "local"
        kw["scope"] = SCOPE_HOST
    elif r.scope:
        kw["scope"] = r.scope
    if r.onlink:
        kw["flags"] = RTNH_F_ONLINK
    return kw


def add_route(r: Route) -> bool:
    """Add ``r``; False when an equal route (same table, dst, type) was already there."""
    with iproute() as ipr:
        try:
            ipr.route("add", **_route_kwargs(ipr, r))
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise
    return True


def del_route(r: Route) -> bool:
    """Delete ``r`` if present (matched on table, dst, type, device and gateway)."""
    with iproute() as ipr:
        try:
            kw = _route_kwargs(ipr, r)
        except LookupError:
            return False  # the device is gone, so the kernel already dropped the route
        kw.pop("prefsrc", None)
        kw.pop("flags", None)
        try:
            ipr.route("del", **kw)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise
    return True


# What identifies a route for "is it there": table, destination, device index, gateway.
RouteKey = rtdump.Key


def route_key(r: Route) -> RouteKey | None:
    """``r``'s key; None when its device does not exist (then neither can the route)."""
    # The device's index by ioctl, not a pyroute2 link dump (see link_names).
    try:
        idx = socket.if_nametoindex(r.dev)
    except OSError:
        return None
    net = ipaddress.IPv4Network(r.dst)
    return (r.table, f"{net.network_address}/{net.prefixlen}", idx, r.gateway)


def route_keys(table: int | None = None) -> set[RouteKey]:
    """Keys of the IPv4 routes of ``table`` (None: every table), in one dump; the
    kernel leaves the other tables out (strict checking), so the main table's many pod
    routes are not read to check table 100 (rtdump.py reads the dump)."""
    DUMPS["routes"] += 1
    return set(rtdump.route_keys(table))


def route_exists(r: Route) -> bool:
    """Whether ``r`` is there (one dump of its table: for a few routes; many routes are
    checked against one ``route_keys``)."""
    key = route_key(r)
    return key is not None and key in route_keys(r.table)


def flush_table(table: int) -> int:
    """Delete every IPv4 route in ``table``; the number deleted."""
    n = 0
    with iproute() as ipr:
        for msg in _dump_routes(ipr, table):
            if msg.get_attr("RTA_TABLE") != table:
                continue
            kw: dict[str, Any] = {
                "table": table,
                "dst": f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}",
                "type": msg["type"],
                "scope": msg["scope"],
                "family": AF_INET,
            }
            if msg.get_attr("RTA_OIF") is not None:
                kw["oif"] = msg.get_attr("RTA_OIF")
            with contextlib.suppress(NetlinkError):
                ipr.route("del", **kw)
                n += 1
    return n


@dataclass(frozen=True)
class Rule:
    """An IPv4 policy rule: ``priority [fwmark M/MASK] (lookup TABLE | goto TARGET)``."""

    priority: int
    table: int | None = None
    fwmark: int | None = None
    fwmask: int | None = None
    goto: int | None = None

    def describe(self) -> str:
        parts = [f"{self.priority}:"]
        if self.fwmark is not None:
            parts.append(f"fwmark {self.fwmark:#x}/{self.fwmask or 0xFFFFFFFF:#x}")
        parts.append(f"goto {self.goto}" if self.goto is not None else f"lookup {self.table}")
        return " ".join(parts)


def _rule_kwargs(r: Rule) -> dict[str, Any]:
    kw: dict[str, Any] = {"priority": r.priority, "family": AF_INET}
    if r.fwmark is not None:
        kw["fwmark"] = r.fwmark
        kw["fwmask"] = r.fwmask if r.fwmask is not None else 0xFFFFFFFF
    if r.goto is not None:
        kw["action"] = "FR_ACT_GOTO"
        kw["goto"] = r.goto
    else:
        kw["table"] = r.table
    return kw


def list_rules() -> list[Rule]:
    """Every IPv4 policy rule, in one dump (rtdump.py reads it)."""
    DUMPS["rules"] += 1
    return [
        Rule(
            priority=priority,
            table=table if action == FR_ACT_TO_TBL else None,
            fwmark=fwmark,
            fwmask=fwmask,
            goto=goto if action == FR_ACT_GOTO else None,
        )
        for priority, action, table, fwmark, fwmask, goto in rtdump.rules()
    ]


def add_rule(r: Rule) -> bool:
    """Add ``r`` unless an identical rule exists; True when added."""
    if r in list_rules():
        return False
    with iproute() as ipr:
        ipr.rule("add", **_rule_kwargs(r))
    return True


def del_rule(r: Rule) -> bool:
    """Delete every copy of ``r``; True when at least one was there."""
    n = list_rules().count(r)
    with iproute() as ipr:
        for _ in range(n):
            with contextlib.suppress(NetlinkError):
                ipr.rule("del", **_rule_kwargs(r))
    return n > 0


def del_rules_at(priority: int) -> int:
    """Delete every IPv4 rule of ``priority``, whatever its selector; how many went."""
    n = 0
    with iproute() as ipr:
        while n < 1000:  # bounded: each round deletes one rule or ends
            try:
                ipr.rule("del", priority=priority, family=AF_INET)
            except NetlinkError:
                break
            n += 1
    return n


# --- sysctls ---------------------------------------------------------------------------


def _sysctl_path(key: str) -> str:
    # A plain string, not a Path: pathlib interns every part of a path it parses, and
    # a part interned afresh on each of the watcher's passes takes a new slot of
    # CPython's interned-string table until the table grows (by about 1 MiB).
    return "/proc/sys/" + key.replace(".", "/")


def conf_key(dev: str, name: str) -> str:
    """``net.ipv4.conf.DEV.NAME`` (dots in device names are not used here)."""
    return f"net.ipv4.conf.{dev}.{name}"


def sysctl_get(key: str) -> str | None:
    try:
        with open(_sysctl_path(key)) as f:
            return f.read().strip()
    except OSError:
        return None


def sysctl_set(key: str, value: str) -> str | None:
    """Write ``value``; return the previous value (None if the key does not exist)."""
    old = sysctl_get(key)
    if old is None:
        return None
    if old != value:
        with open(_sysctl_path(key), "w") as f:
            f.write(value + "\n")
    return old


# --- change notifications --------------------------------------------------------------

# rtnetlink multicast groups (linux/rtnetlink.h)
RTMGRP_LINK = 0x1
RTMGRP_TC = 0x8  # qdiscs and filters (the eBPF mode's attachments)
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
RTMGRP_IPV4_NETCONF = 1 << (24 - 1)  # RTNLGRP_IPV4_NETCONF: rp_filter, forwarding changes


# A burst (hundreds of pods at once) queues thousands of messages: room for them, and
# an overflow past it is a wake-up like any other (the pass reads the kernel's state).
CHANGES_RCVBUF = 4 << 20
NETLINK_ROUTE = 0
SO_RCVBUFFORCE = 33


class Changes:
    """A wake-up for reconcile loops: readable when a link, address, route, rule or
    an interface's rp_filter/forwarding setting of this namespace changed. A plain
    rtnetlink socket: the messages are read and thrown away, never parsed (whoever
    wakes reads the kernel's state itself), so a burst costs no memory, and a burst
    that overflows the socket (ENOBUFS) is counted in ``overflows`` and is a wake-up
    too: nothing is lost that the next pass does not read again."""

    def __init__(self) -> None:
        self.overflows = 0
        # The messages land here and are dropped: a drain allocates nothing.
        self._scratch = bytearray(1 << 16)
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            NETLINK_ROUTE,
        )  # fmt: skip
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CHANGES_RCVBUF)
            except OSError:  # not root: the limit rmem_max allows
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHANGES_RCVBUF)
            groups = (
                RTMGRP_LINK
                | RTMGRP_TC
                | RTMGRP_IPV4_IFADDR
                | RTMGRP_IPV4_ROUTE
                | RTMGRP_IPV4_RULE
                | RTMGRP_IPV4_NETCONF
            )
            self._sock.bind((0, groups))
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def wait(self, timeout: float) -> bool:
        """True if something changed within ``timeout`` seconds (and consume it)."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        while True:
            try:
                self._sock.recv_into(self._scratch)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1  # messages were lost: the pass reads everything

    def close(self) -> None:
        self._sock.close()
