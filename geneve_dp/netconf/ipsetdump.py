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
import socket
import struct
from dataclasses import dataclass, field

from .rtdump import (
    NLA_F_NET_BYTEORDER,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_HDR,
    RTATTR,
    Refused,
    align,
    attrs,
    replies,
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

LIST_MSG_TYPE = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (network order)


def _attr(atype: int, data: bytes) -> bytes:
    pad = b"\0" * (align(len(data)) - len(data))
    return RTATTR.pack(RTATTR.size + len(data), atype) + data + pad  # nlattr: as rtattr


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


def _entry(data: bytes) -> tuple[str, str] | None:
    """(IPv4, comment) of one entry's IPSET_ATTR_DATA; None if it holds no IPv4."""
    ip, comment = None, ""
    for atype, value in attrs(data, 0):
        if atype == IPSET_ATTR_IP:
            for atype2, addr in attrs(value, 0):
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
                for atype2, v in attrs(value, 0):
                    if atype2 == IPSET_ATTR_ELEMENTS and len(v) == 4:
                        self.elements = struct.unpack(">I", v)[0]
            elif atype == IPSET_ATTR_ADT:
                for atype2, v in attrs(value, 0):
                    if atype2 == IPSET_ATTR_DATA and (entry := _entry(v)) is not None:
                        self.entries[entry[0]] = entry[1]


def listing(name: str, header_only: bool = False) -> Listing | None:
    """Set ``name`` as the kernel lists it; None when there is no such set. Other
    refusals raise rtdump.Refused (an OSError) with the kernel's errno."""
    out = Listing()
    try:
        for mtype, payload in replies(
            NETLINK_NETFILTER, lambda seq: request(name, header_only, seq)
        ):
            if mtype == LIST_MSG_TYPE:
                out.add_message(payload)
    except Refused as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return out
