"""ipset listings read straight off an nfnetlink socket: a set's element count (its
header) and its IPv4 entries with their comments, parsed with struct.

The watchers look at the ambient set on every pass. Each pyroute2 IPSet request runs an
asyncio loop whose tasks, frames and exceptions end in reference cycles (130-165
objects a pass, counted with gc.DEBUG_SAVEALL), which only CPython's rare full
collection frees: the node watcher's RSS crept up by ~20 KiB a minute under route
churn. This reads without leaving garbage. Changes still go through pyroute2
(ipset.py); this module only reads.

The numbers are those of linux/netfilter/ipset/ip_set.h and linux/netfilter/nfnetlink.h
(tests/test_ipsetdump.py compiles them against the installed headers).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from .rtdump import (
    NLA_F_NESTED,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    RTATTR,
    align,
    messages,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
NFNETLINK_V0 = 0
IPSET_PROTOCOL = 7
IPSET_CMD_LIST = 7
# Command-level attributes
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_FLAGS = 1, 2, 6
IPSET_ATTR_DATA, IPSET_ATTR_ADT = 7, 8
# Inside IPSET_ATTR_DATA: of an entry, and of the set's header
IPSET_ATTR_IP, IPSET_ATTR_COMMENT, IPSET_ATTR_ELEMENTS = 1, 26, 24
IPSET_ATTR_IPADDR_IPV4 = 1  # inside IPSET_ATTR_IP
IPSET_FLAG_LIST_HEADER = 1 << 2
IPSET_MAXNAMELEN = 32
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

LIST_MSG_TYPE = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (network order)
NLATTR = RTATTR  # struct nlattr: len, type, as rtattr


def _attr(atype: int, data: bytes) -> bytes:
    pad = b"\0" * (align(len(data)) - len(data))
    return NLATTR.pack(NLATTR.size + len(data), atype) + data + pad


def request(name: str, header_only: bool, seq: int = 1) -> bytes:
    """A LIST dump request for set ``name``: its header only, or its entries too."""
    raw = name.encode()
    if not raw or len(raw) >= IPSET_MAXNAMELEN or b"\0" in raw:
        raise ValueError(f"ipset name {name!r}: 1-{IPSET_MAXNAMELEN - 1} bytes, no NUL")
    attrs = _attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
    attrs += _attr(IPSET_ATTR_SETNAME, raw + b"\0")
    if header_only:
        flags = struct.pack(">I", IPSET_FLAG_LIST_HEADER)
        attrs += _attr(IPSET_ATTR_FLAGS | NLA_F_NET_BYTEORDER, flags)
    body = NFGENMSG.pack(socket.AF_INET, NFNETLINK_V0, 0) + attrs
    nl_flags = NLM_F_REQUEST | NLM_F_DUMP
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), LIST_MSG_TYPE, nl_flags, seq, 0) + body


def attrs(buf: bytes, off: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type without its flag bits, data) of each attribute of ``buf`` from ``off``;
    stops at the first one whose length does not fit."""
    while off + NLATTR.size <= len(buf):
        alen, atype = NLATTR.unpack_from(buf, off)
        if alen < NLATTR.size or off + alen > len(buf):
            return
        yield atype & NLA_TYPE_MASK, buf[off + NLATTR.size : off + alen]
        off += align(alen)


def _entry(data: bytes) -> tuple[str, str] | None:
    """(IPv4, comment) of one entry's IPSET_ATTR_DATA; None if it holds no IPv4."""
    ip, comment = None, ""
    for atype, value in attrs(data):
        if atype == IPSET_ATTR_IP:
            for atype2, addr in attrs(value):
                if atype2 == IPSET_ATTR_IPADDR_IPV4 and len(addr) == 4:
                    ip = str(ipaddress.IPv4Address(addr))
        elif atype == IPSET_ATTR_COMMENT:
            comment = value.split(b"\0", 1)[0].decode(errors="replace")
    return None if ip is None else (ip, comment)


@dataclass
class Listing:
    """What a LIST dump said of one set."""

    elements: int | None = None  # from the header; None when none was sent
    entries: dict[str, str] = field(default_factory=dict)  # IPv4 -> comment

    def add_message(self, payload: bytes) -> None:
        """Take in one LIST reply (nfgenmsg and attributes); malformed parts are
        skipped, never raised."""
        for atype, value in attrs(payload, NFGENMSG.size):
            if atype == IPSET_ATTR_DATA:
                for atype2, v in attrs(value):
                    if atype2 == IPSET_ATTR_ELEMENTS and len(v) == 4:
                        self.elements = struct.unpack(">I", v)[0]
            elif atype == IPSET_ATTR_ADT:
                for atype2, v in attrs(value):
                    if atype2 == IPSET_ATTR_DATA and (entry := _entry(v)) is not None:
                        self.entries[entry[0]] = entry[1]


def listing(name: str, header_only: bool = False) -> Listing | None:
    """Set ``name`` as the kernel lists it; None when there is no such set. Other
    refusals raise OSError with the kernel's errno."""
    out = Listing()
    sock_type = socket.SOCK_RAW | socket.SOCK_CLOEXEC
    with socket.socket(socket.AF_NETLINK, sock_type, NETLINK_NETFILTER) as s:
        s.bind((0, 0))
        seq = int.from_bytes(os.urandom(4), "little") | 1
        s.send(request(name, header_only, seq))
        scratch = bytearray(1 << 16)  # one buffer for every read (see rtdump.dump)
        while True:
            n = s.recv_into(scratch)
            if n == 0:
                return out
            for mtype, payload in messages(bytes(memoryview(scratch)[:n])):
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if err == errno.ENOENT:
                        return None
                    if err:
                        raise OSError(err, os.strerror(err))
                    return out
                if mtype == LIST_MSG_TYPE:
                    out.add_message(payload)
