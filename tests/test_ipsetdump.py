"""ipsetdump.py: its numbers against the kernel's headers, its request and its parsing
as pure functions (hand-built replies, and hypothesis over mangled ones: nothing
raises), and its reading of real sets against the ipset program's `save` (another
implementation of the same protocol) in a namespace of the test's own."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geneve_dp.netconf import ipsetdump as d
from geneve_dp.netconf import rtdump
from geneve_dp.netconf.rtdump import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_HDR
from tests.netns import Netns

# Every number ipsetdump.py takes from a kernel header, printed by the C compiler.
HEADER_NAMES = [
    "NETLINK_NETFILTER", "NFNL_SUBSYS_IPSET", "NFNETLINK_V0", "IPSET_PROTOCOL",
    "IPSET_CMD_LIST", "IPSET_ATTR_PROTOCOL", "IPSET_ATTR_SETNAME", "IPSET_ATTR_FLAGS",
    "IPSET_ATTR_DATA", "IPSET_ATTR_ADT", "IPSET_ATTR_IP", "IPSET_ATTR_COMMENT",
    "IPSET_ATTR_ELEMENTS", "IPSET_ATTR_IPADDR_IPV4", "IPSET_FLAG_LIST_HEADER",
    "IPSET_MAXNAMELEN",
]  # fmt: skip
# And the attribute flag bits, from rtdump.py, which parses every netlink attribute here.
NETLINK_NAMES = ["NLA_F_NESTED", "NLA_F_NET_BYTEORDER"]


def test_numbers_are_the_kernel_headers(tmp_path: Path) -> None:
    src = tmp_path / "n.c"
    src.write_text(
        "#include <stdio.h>\n#include <linux/netlink.h>\n"
        "#include <linux/netfilter/nfnetlink.h>\n#include <linux/netfilter/ipset/ip_set.h>\n"
        "int main(void) {\n"
        + "".join(f'  printf("{n} %ld\\n", (long)({n}));\n' for n in HEADER_NAMES + NETLINK_NAMES)
        + "  return 0;\n}\n"
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "n"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "n")], capture_output=True, text=True, check=True)
    kernel = {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}
    ours = {n: getattr(d, n) for n in HEADER_NAMES} | {n: getattr(rtdump, n) for n in NETLINK_NAMES}
    assert kernel == ours


def _nested(atype: int, *children: bytes) -> bytes:
    return d._attr(atype | rtdump.NLA_F_NESTED, b"".join(children))


def _entry(ip: bytes, comment: bytes | None) -> bytes:
    parts = [
        _nested(d.IPSET_ATTR_IP, d._attr(d.IPSET_ATTR_IPADDR_IPV4 | rtdump.NLA_F_NET_BYTEORDER, ip))
    ]
    if comment is not None:
        parts.append(d._attr(d.IPSET_ATTR_COMMENT, comment + b"\0"))
    return _nested(d.IPSET_ATTR_DATA, *parts)


def _reply(*attrs: bytes) -> bytes:
    """The payload of one LIST reply: nfgenmsg and attributes."""
    return d.NFGENMSG.pack(socket.AF_INET, 0, 0) + b"".join(attrs)


HEADER = _reply(
    d._attr(d.IPSET_ATTR_PROTOCOL, b"\x07"),
    d._attr(d.IPSET_ATTR_SETNAME, b"ztunnel-pods-ips\0"),
    _nested(
        d.IPSET_ATTR_DATA,
        d._attr(d.IPSET_ATTR_ELEMENTS | rtdump.NLA_F_NET_BYTEORDER, struct.pack(">I", 3)),
    ),
)
ENTRIES = _reply(
    _nested(
        d.IPSET_ATTR_ADT,
        _entry(bytes([10, 244, 1, 5]), b"uid-a"),
        _entry(bytes([10, 244, 1, 6]), None),
        _entry(bytes(16), b"an IPv6 address: not ours"),  # wrong length: skipped
        _nested(d.IPSET_ATTR_DATA, d._attr(d.IPSET_ATTR_COMMENT, b"no address\0")),
        _entry(bytes([10, 244, 1, 7]), b"uid-c"),
    )
)


def test_request_asks_for_one_set() -> None:
    req = d.request("ztunnel-pods-ips", header_only=True, seq=7)
    length, mtype, flags, seq, _pid = NLMSG_HDR.unpack_from(req)
    assert (length, mtype, flags, seq) == (len(req), 6 << 8 | 7, NLM_F_REQUEST | NLM_F_DUMP, 7)
    got = dict(d.attrs(req, NLMSG_HDR.size + d.NFGENMSG.size))
    assert got == {
        d.IPSET_ATTR_PROTOCOL: b"\x07",
        d.IPSET_ATTR_SETNAME: b"ztunnel-pods-ips\0",
        d.IPSET_ATTR_FLAGS: struct.pack(">I", d.IPSET_FLAG_LIST_HEADER),
    }
    full = dict(d.attrs(d.request("s", header_only=False), NLMSG_HDR.size + d.NFGENMSG.size))
    assert d.IPSET_ATTR_FLAGS not in full


@pytest.mark.parametrize("name", ["", "x" * 32, "a\0b"])
def test_request_refuses_names_the_kernel_would(name: str) -> None:
    with pytest.raises(ValueError, match="ipset name"):
        d.request(name, header_only=False)


def test_listing_parses_header_and_entries() -> None:
    out = d.Listing()
    out.add_message(HEADER)
    out.add_message(ENTRIES)
    assert out.elements == 3
    assert out.entries == {"10.244.1.5": "uid-a", "10.244.1.6": "", "10.244.1.7": "uid-c"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_without_raising(data: bytes) -> None:
    d.Listing().add_message(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(ENTRIES)), st.integers(0, len(ENTRIES) - 1), st.integers(0, 255))
def test_cut_or_flipped_replies_parse_without_raising(cut: int, at: int, byte: int) -> None:
    flipped = bytearray(ENTRIES)
    flipped[at] = byte
    out = d.Listing()
    out.add_message(ENTRIES[:cut])
    out.add_message(bytes(flipped))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.entries.items())


def _by_ipset_save(ns: Netns, name: str) -> dict[str, str]:
    """IP -> comment, from `ipset save NAME` lines like: add NAME 10.0.0.1 comment "uid"."""
    out = {}
    for line in ns.run("ipset", "save", name).stdout.splitlines():
        parts = line.split(" ", 3)
        if parts[0] == "add":
            rest = parts[3] if len(parts) > 3 else ""
            out[parts[2]] = rest.removeprefix('comment "').removesuffix('"') if rest else ""
    return out


@pytest.mark.root
def test_reads_what_ipset_saves(netns_factory: Callable[[str], Netns]) -> None:
    ns = netns_factory("ipsd")
    ns.run("ipset", "create", "gdp-big", "hash:ip", "family", "inet", "comment")
    ns.run("ipset", "create", "gdp-empty", "hash:ip", "family", "inet", "comment")
    # Enough entries, with long comments, for the dump to take several messages.
    lines = [
        f'add gdp-big 10.{i // 250}.{i % 250}.1 comment "uid-{i}-{"x" * 180}"' for i in range(1200)
    ]
    lines += ["add gdp-big 10.99.0.1"]  # one without a comment
    text = "\n".join(lines) + "\n"
    subprocess.run(ns.argv("ipset", "restore"), input=text, text=True, check=True, timeout=30)
    script = (
        "import json; from geneve_dp.netconf import ipsetdump as d\n"
        "big, head = d.listing('gdp-big'), d.listing('gdp-big', header_only=True)\n"
        "empty, missing = d.listing('gdp-empty'), d.listing('gdp-missing', header_only=True)\n"
        "print(json.dumps([big.entries, big.elements, head.elements, len(head.entries),\n"
        "                  empty.elements, empty.entries, missing is None]))\n"
    )
    entries, elements, head_elements, head_entries, empty_n, empty, missing = json.loads(
        ns.run("python3", "-c", script).stdout
    )
    assert entries == _by_ipset_save(ns, "gdp-big") and len(entries) == 1201
    assert (elements, head_elements, head_entries) == (1201, 1201, 0)
    assert (empty_n, empty, missing) == (0, {}, True)
