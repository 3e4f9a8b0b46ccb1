"""The C engine's inner parsing (csrc/inner.c) and checksums (csrc/csum.h) against an
independent Python implementation, on synthetic frames, without devices."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from geneve_dp.fastpath import ffi, lib
from tests.packets import TAP, TUN, Flow, checksum, eth, ones_sum, pseudo, tcp, udp

V4 = Flow()
V6 = Flow("fd00::1", "fd00::2", 53, 5353)


def parse(frame: bytes, mode: int = TAP) -> tuple[int, dict[str, int]]:
    out = ffi.new("uint32_t[9]")
    rc = lib.gdp_test_parse_inner(frame, len(frame), mode, out)
    keys = ("ipver", "ip_off", "ip_len", "ecn", "df", "proto", "ports", "sport", "dport")
    return rc, dict(zip(keys, out, strict=True))


def test_parse_ipv4_and_ipv6_in_both_modes() -> None:
    pkt4 = udp(V4, b"x" * 10, tos=2, df=True)
    rc, f = parse(eth(pkt4))
    assert rc == 0
    assert f == {
        "ipver": 4,
        "ip_off": 14,
        "ip_len": len(pkt4),
        "ecn": 2,
        "df": 1,
        "proto": 17,
        "ports": 1,
        "sport": 40000,
        "dport": 5201,
    }
    pkt6 = tcp(V6, 1, b"y", tos=3)
    rc, f = parse(pkt6, TUN)
    assert rc == 0
    assert (f["ipver"], f["ip_off"], f["ecn"], f["proto"], f["sport"], f["dport"]) == (
        6,
        0,
        3,
        6,
        53,
        5353,
    )


def test_vlan_fragments_and_options() -> None:
    pkt = udp(V4, b"z" * 8)
    pkt_vlan = eth(pkt)[:12] + b"\x81\x00\x00\x05\x08\x00" + pkt
    rc, f = parse(pkt_vlan)
    assert rc == 0 and f["ip_off"] == 18 and f["ports"] == 1
    # A later fragment has no ports to hash on.
    frag = bytearray(pkt)
    frag[6:8] = (0x0010).to_bytes(2, "big")
    rc, f = parse(eth(bytes(frag)))
    assert rc == 0 and f["ipver"] == 4 and f["ports"] == 0
    # IPv4 options: the ports are found after them.
    opt = bytearray(pkt[:20])
    opt[0] = 0x46
    with_opts = bytes(opt) + b"\x01\x01\x01\x01" + pkt[20:]
    rc, f = parse(eth(with_opts))
    assert rc == 0 and f["sport"] == 40000


def test_frames_that_are_not_of_their_mode() -> None:
    assert parse(b"\x45" * 13)[0] == -1  # TAP: shorter than Ethernet
    assert parse(b"\x60" * 10, TUN)[0] == -1  # TUN: IPv6 without a whole header
    assert parse(b"\x12" * 40, TUN)[0] == -1  # TUN: not IP
    assert parse(b"", TUN)[0] == -1
    rc, f = parse(eth(udp(V4, b""))[:20])  # TAP: claims IPv4, too short: opaque
    assert rc == 0 and f["ipver"] == 0
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert parse(arp) == (0, dict.fromkeys(parse(arp)[1], 0))


@given(st.binary(max_size=1600), st.sampled_from([V4, V6]), st.sampled_from([6, 17]))
def test_l4_checksum_matches_an_independent_one(payload: bytes, flow: Flow, proto: int) -> None:
    pkt = tcp(flow, 5, payload) if proto == 6 else udp(flow, payload)
    iplen = 20 if flow.ipver == 4 else 40
    ip, msg = pkt[:iplen], pkt[iplen:]
    src, dst = flow.addrs()
    # A valid message checks out over itself, its checksum field included.
    assert lib.gdp_test_l4_csum(ip, flow.ipver, proto, msg, len(msg)) == 0
    off = 16 if proto == 6 else 6
    blank = msg[:off] + b"\0\0" + msg[off + 2 :]
    want = checksum(pseudo(src, dst, proto, len(msg)) + blank)
    assert lib.gdp_test_l4_csum(ip, flow.ipver, proto, blank, len(blank)) == want
    assert want == int.from_bytes(msg[off : off + 2], "big") or (proto == 17 and want == 0)
    # The partial field (CHECKSUM_PARTIAL) is the pseudo-header sum.
    assert lib.gdp_test_partial_field(ip, flow.ipver, proto, len(msg)) == ones_sum(
        pseudo(src, dst, proto, len(msg))
    )


@given(
    st.binary(min_size=20, max_size=60).filter(lambda b: len(b) % 2 == 0),
    st.integers(min_value=0, max_value=9),
    st.integers(min_value=0, max_value=0xFFFF),
)
def test_incremental_update_equals_a_full_recompute(data: bytes, word: int, new: int) -> None:
    """RFC 1624: patching the checksum after one 16-bit word changed."""
    old = int.from_bytes(data[2 * word : 2 * word + 2], "big")
    changed = data[: 2 * word] + new.to_bytes(2, "big") + data[2 * word + 2 :]
    got = lib.gdp_test_csum_update16(checksum(data), old, new)
    # One's complement has two zeros: compare the sums they stand for.
    assert ones_sum(struct.pack("!H", got)) % 0xFFFF == checksum(changed) % 0xFFFF


@given(st.binary(max_size=3000))
def test_inet_checksum_matches_an_independent_one(data: bytes) -> None:
    assert lib.gdp_inet_csum(data, len(data)) == checksum(data)


def test_icmp_too_big_quotes_and_checksums() -> None:
    pkt = tcp(V4, 1, bytes(1400), df=True)
    out = ffi.new("uint8_t[]", lib.GDP_TEST_ICMP_BUF)
    n = lib.gdp_test_icmp_too_big(eth(pkt), len(pkt) + 14, TAP, 1400, out)
    icmp = bytes(ffi.buffer(out, n))
    assert icmp[:6] == eth(pkt)[6:12] and icmp[6:12] == eth(pkt)[:6]  # back to the sender
    ip = icmp[14:]
    assert ip[9] == 1 and ip[12:16] == pkt[16:20] and ip[16:20] == pkt[12:16]
    assert checksum(ip[:20]) == 0 and checksum(ip[20:]) == 0
    assert ip[20:22] == b"\x03\x04" and int.from_bytes(ip[26:28], "big") == 1400
    assert ip[28:] == pkt[:548]
    # No DF: no error; IPv6 below its minimum MTU: none either.
    nodf = tcp(V4, 1, bytes(1400), df=False)
    assert lib.gdp_test_icmp_too_big(nodf, len(nodf), TUN, 1400, out) == 0
    pkt6 = tcp(V6, 1, bytes(1400))
    assert lib.gdp_test_icmp_too_big(pkt6, len(pkt6), TUN, 1200, out) == 0
    n = lib.gdp_test_icmp_too_big(pkt6, len(pkt6), TUN, 1300, out)
    ip6 = bytes(ffi.buffer(out, n))
    assert ip6[6] == 58 and ip6[40] == 2 and int.from_bytes(ip6[44:48], "big") == 1300
    assert checksum(pseudo(ip6[8:24], ip6[24:40], 58, n - 40) + ip6[40:]) == 0
