"""IPv4 route and rule dumps read straight off an rtnetlink socket: the few fields a
route key needs (table, destination, output device, gateway) and those of a policy
rule (priority, action, table, fwmark/mask, goto), parsed with struct; and the tc
filters on one hook of a device (kind, and a bpf filter's name), which the eBPF mode's
watcher checks on every routing pass (pyroute2's request left ~140 objects a pass in
reference cycles, garbage only the collector's rare full pass frees).

The watcher compares tables 100-102 with what must be there every time rtnetlink
announces a change; with a thousand pods in table 100 a pyroute2 dump decodes every
attribute of every route into objects (about 250 ms of CPU per table, measured), and
its request builder keeps a little memory for good on every rule dump (tracemalloc:
about 85 bytes a pass, the watcher's slow RSS slope under route churn). This reads
only the attributes it needs. Changes still go through pyroute2 (links.py); this
module only reads.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterator

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12  # the kernel filters the dump by table itself
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWRULE, RTM_GETRULE = 32, 34
RTM_NEWTFILTER, RTM_GETTFILTER = 44, 46
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
# linux/fib_rules.h
FRA_GOTO, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 4, 6, 10, 15, 16
RT_TABLE_UNSPEC = 0
# linux/rtnetlink.h (TCA_*) and linux/pkt_cls.h (TCA_BPF_*)
TCA_KIND, TCA_OPTIONS, TCA_BPF_NAME = 1, 2, 7
# linux/netlink.h: flag bits of an attribute's type
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 1 << 15, 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTATTR = struct.Struct("=HH")  # len, type
TCMSG = struct.Struct("=BxxxiIII")  # family, (pad), ifindex, handle, parent, info


class Refused(OSError):
    """The kernel answered a dump request with an error (its errno)."""


# (table, "dst/len", output ifindex or None, gateway or None): links.RouteKey
Key = tuple[int, str, int | None, str | None]
# (priority, action, table, fwmark, fwmask, goto), None where the kernel sent none
RuleFields = tuple[int, int, int, int | None, int | None, int | None]


def align(n: int) -> int:
    """A netlink message or attribute length rounded up to its 4-byte boundary."""
    return (n + 3) & ~3


def request(kind: int, table: int | None = None, seq: int = 1) -> bytes:
    """An IPv4 dump request of ``kind`` (RTM_GETROUTE, RTM_GETRULE), of one table
    (None: all)."""
    attrs = b""
    rtm_table = RT_TABLE_UNSPEC
    if table is not None:
        rtm_table = table if table < 256 else RT_TABLE_UNSPEC
        attrs = RTATTR.pack(8, RTA_TABLE) + struct.pack("=I", table)
    body = RTMSG.pack(socket.AF_INET, 0, 0, 0, rtm_table, 0, 0, 0, 0) + attrs
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), kind, flags, seq, 0) + body


def tc_filter_request(ifindex: int, parent: int, seq: int = 1) -> bytes:
    """A dump request for the tc filters on one hook (``parent``) of device ``ifindex``."""
    body = TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), RTM_GETTFILTER, flags, seq, 0) + body


def attrs(msg: bytes, off: int = RTMSG.size) -> Iterator[tuple[int, bytes]]:
    """(type without its flag bits, data) of each attribute of ``msg`` from ``off``
    (by default after the 12-byte header of a route or rule); stops at the first one
    whose length does not fit."""
    while off + RTATTR.size <= len(msg):
        alen, atype = RTATTR.unpack_from(msg, off)
        if alen < RTATTR.size or off + alen > len(msg):
            return
        yield atype & NLA_TYPE_MASK, msg[off + RTATTR.size : off + alen]
        off += align(alen)


def _u32(data: bytes) -> int | None:
    return struct.unpack("=I", data)[0] if len(data) == 4 else None


def parse_route(msg: bytes) -> Key | None:
    """The key of one RTM_NEWROUTE payload (rtmsg and attributes); None if not IPv4."""
    if len(msg) < RTMSG.size:
        return None
    family, dst_len, _s, _tos, table, _p, _sc, _t, _f = RTMSG.unpack_from(msg)
    if family != socket.AF_INET:
        return None
    dst, oif, gateway = "0.0.0.0", None, None
    for atype, data in attrs(msg):
        if atype == RTA_DST and len(data) == 4:
            dst = str(ipaddress.IPv4Address(data))
        elif atype == RTA_OIF:
            oif = _u32(data)
        elif atype == RTA_GATEWAY and len(data) == 4:
            gateway = str(ipaddress.IPv4Address(data))
        elif atype == RTA_TABLE and (value := _u32(data)) is not None:
            table = value
    return (table, f"{dst}/{dst_len}", oif, gateway)


def parse_rule(msg: bytes) -> RuleFields | None:
    """The fields of one RTM_NEWRULE payload (fib_rule_hdr and attributes); None if not
    IPv4. The table is FRA_TABLE when sent, else the header's."""
    if len(msg) < RTMSG.size:
        return None
    family, _d, _s, _tos, table, _r1, _r2, action, _f = RTMSG.unpack_from(msg)
    if family != socket.AF_INET:
        return None
    priority, fwmark, fwmask, goto = 0, None, None, None
    for atype, data in attrs(msg):
        if atype == FRA_PRIORITY:
            priority = _u32(data) or 0
        elif atype == FRA_TABLE:
            table = _u32(data) or table
        elif atype == FRA_FWMARK:
            fwmark = _u32(data)
        elif atype == FRA_FWMASK:
            fwmask = _u32(data)
        elif atype == FRA_GOTO:
            goto = _u32(data)
    return (priority, action, table, fwmark, fwmask, goto)


def parse_tc_filter(msg: bytes) -> tuple[str, str | None] | None:
    """(kind, a bpf filter's name or None) of one RTM_NEWTFILTER payload; None if it
    names no kind (the kernel also reports each chain's and priority's head)."""
    kind, name = None, None
    for atype, data in attrs(msg, TCMSG.size):
        if atype == TCA_KIND:
            kind = data.split(b"\0", 1)[0].decode(errors="replace")
        elif atype == TCA_OPTIONS:
            for otype, value in attrs(data, 0):
                if otype == TCA_BPF_NAME:
                    name = value.split(b"\0", 1)[0].decode(errors="replace")
    if kind is None:
        return None
    return kind, name if kind == "bpf" else None


def messages(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in ``buf``."""
    off = 0
    while off + NLMSG_HDR.size <= len(buf):
        mlen, mtype, _flags, _seq, _pid = NLMSG_HDR.unpack_from(buf, off)
        if mlen < NLMSG_HDR.size or off + mlen > len(buf):
            return
        yield mtype, buf[off + NLMSG_HDR.size : off + mlen]
        off += align(mlen)


def dump(kind: int, table: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of every message of one IPv4 dump of ``kind``, the kernel
    filtering by ``table`` (strict checking)."""
    return replies(NETLINK_ROUTE, lambda seq: request(kind, table, seq))


def replies(protocol: int, make_request: Callable[[int], bytes]) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of every reply to the dump request ``make_request(seq)`` builds,
    sent on a netlink socket of ``protocol`` (rtnetlink: with strict checking); Refused
    with the kernel's errno if it refuses."""
    sock_type = socket.SOCK_RAW | socket.SOCK_CLOEXEC
    with socket.socket(socket.AF_NETLINK, sock_type, protocol) as s:
        if protocol == NETLINK_ROUTE:
            s.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        s.bind((0, 0))
        seq = int.from_bytes(os.urandom(4), "little") | 1
        s.send(make_request(seq))
        # Each read into one buffer, copied out at its length: a recv of 64 KiB would
        # allocate that much for every read and shrink it, in a watcher's every pass.
        scratch = bytearray(1 << 16)
        while True:
            n = s.recv_into(scratch)
            for mtype, payload in messages(bytes(memoryview(scratch)[:n])):
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if err:
                        raise Refused(err, os.strerror(err))
                    return
                yield mtype, payload


def route_keys(table: int | None) -> list[Key]:
    """Every IPv4 route of ``table`` (None: all tables), as keys, in one dump."""
    keys = (parse_route(p) for t, p in dump(RTM_GETROUTE, table) if t == RTM_NEWROUTE)
    return [k for k in keys if k is not None and (table is None or k[0] == table)]


def rules() -> list[RuleFields]:
    """Every IPv4 policy rule, in one dump."""
    fields = (parse_rule(p) for t, p in dump(RTM_GETRULE) if t == RTM_NEWRULE)
    return [f for f in fields if f is not None]


def tc_filters(ifindex: int, parent: int) -> list[tuple[str, str | None]]:
    """(kind, bpf name or None) of every filter on hook ``parent`` of device
    ``ifindex``; empty when the kernel has no such hook (no clsact qdisc)."""
    try:
        found = [
            parse_tc_filter(p)
            for t, p in replies(NETLINK_ROUTE, lambda s: tc_filter_request(ifindex, parent, s))
            if t == RTM_NEWTFILTER
        ]
    except Refused:
        return []
    return [f for f in found if f is not None]
