"""The C TSO segmentation (csrc/seg.c) on synthetic super-frames, without devices: each
segment is a valid TCP packet of its own (checked with an independent checksum), the
payload comes out whole and in order, and malformed virtio headers are refused."""

from __future__ import annotations

from geneve_dp.fastpath import ffi, lib
from tests.packets import (
    ACK,
    CWR,
    FIN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    PSH,
    TAP,
    TUN,
    VNET_NEEDS_CSUM,
    Flow,
    c_seg,
    eth,
    l4_valid,
    tcp,
    tso_frame,
    udp,
    vnet,
)

V4 = Flow()
V6 = Flow("fd00::1", "fd00::2", 1234, 80)


def test_segments_are_packets_of_their_own() -> None:
    for flow in (V4, V6):
        payload = bytes(i & 0xFF for i in range(4500))
        frame, vh = tso_frame(flow, 0xFFFFF000, payload, 1448, flags=ACK | PSH | FIN, ip_id=0xFFFE)
        segs = c_seg(frame, vh)
        assert segs is not None and len(segs) == 4
        ip_off = 14
        hdrs = ip_off + (20 if flow.ipver == 4 else 40) + 20
        assert [len(s) - hdrs for s in segs] == [1448, 1448, 1448, 156]
        assert b"".join(s[hdrs:] for s in segs) == payload
        for i, s in enumerate(segs):
            assert l4_valid(s, ip_off), i
            ip = s[ip_off:]
            tcp = s[hdrs - 20 :]
            if flow.ipver == 4:
                assert int.from_bytes(ip[2:4], "big") == len(s) - ip_off
                assert int.from_bytes(ip[4:6], "big") == (0xFFFE + i) & 0xFFFF  # IDs follow on
                words = sum(int.from_bytes(ip[k : k + 2], "big") for k in range(0, 20, 2))
                assert words % 0xFFFF == 0  # header checksum valid
            else:
                assert int.from_bytes(ip[4:6], "big") == len(s) - ip_off - 40
            assert int.from_bytes(tcp[4:8], "big") == (0xFFFFF000 + 1448 * i) & 0xFFFFFFFF
            last = i == 3
            assert tcp[13] == (ACK | PSH | FIN if last else ACK)


def test_cwr_only_on_the_first_segment() -> None:
    frame, vh = tso_frame(V4, 1, bytes(3000), 1000, flags=ACK | CWR)
    segs = c_seg(frame, vh)
    assert segs is not None
    assert [s[14 + 20 + 13] for s in segs] == [ACK | CWR, ACK, ACK]


def test_tun_frames_are_cut_alike() -> None:
    frame, vh = tso_frame(V4, 1, bytes(range(256)) * 10, 1000, mode=TUN)
    segs = c_seg(frame, vh, mode=TUN)
    assert segs is not None and len(segs) == 3
    assert all(l4_valid(s, 0) for s in segs)


def test_malformed_headers_are_refused() -> None:
    frame, vh = tso_frame(V4, 1, bytes(3000), 1000)
    l4 = 14 + 20
    bad = [
        vnet(VNET_NEEDS_CSUM, GSO_TCPV4, 54, 0, l4, 16),  # no segment size
        vnet(VNET_NEEDS_CSUM, GSO_TCPV6, 54, 1000, l4, 16),  # says IPv6, is IPv4
        vnet(VNET_NEEDS_CSUM, GSO_UDP_L4, 54, 1000, l4, 6),  # UDP GSO is not cut here
        vnet(VNET_NEEDS_CSUM, GSO_TCPV4, 54, 1000, len(frame) - 10, 16),  # TCP past the end
        vnet(VNET_NEEDS_CSUM, GSO_TCPV4, 54, 1000, 14 + 12, 16),  # TCP inside the IP header
    ]
    for v in bad:
        assert c_seg(frame, v) is None, v.hex()
    # A TCP data offset that reaches past the frame.
    short, vh = tso_frame(V4, 1, b"", 1000)
    cut = bytearray(short)
    cut[l4 + 12] = 0xF0
    assert c_seg(bytes(cut), vh) is None
    # Not TCP at all.
    udp_frame = bytearray(frame)
    udp_frame[14 + 9] = 17
    assert c_seg(bytes(udp_frame), vh) is None


# ---- super-packets on receive (csrc/seg.c super_plan) -------------------------------

MAX_INNER, DEV_MTU = 1464, 1450  # an IPv4 underlay of MTU 1500 without options


def super_plan(
    frame: bytes, mode: int, gso_size: int = 0, uso: bool = True
) -> tuple[int, ...] | None:
    """(udp, headers, segment size, segments) when the receive path would write the
    frame as one GSO super-frame, else None. gso_size: what UDP_GRO reported."""
    out = ffi.new("uint32_t[4]")
    vh = ffi.new("uint8_t[12]")
    buf = ffi.new("uint8_t[]", frame)
    rc = lib.gdp_test_super_plan(
        buf, len(frame), mode, int(uso), MAX_INNER, DEV_MTU, gso_size, out, vh
    )
    return tuple(out) if rc else None


def test_one_datagram_never_becomes_more_datagrams_than_arrived() -> None:
    """Issue 19: a UDP length of 18 while IP carries 1,280 bytes, the checksum the
    pseudo-header sum for 18, must not become 128 datagrams. A UDP super-packet is cut
    only at the segment size the kernel reported for the datagram, so never into more
    datagrams than it received."""
    crafted = udp(V4, bytes(1272), csum="partial", length=18)
    assert len(crafted) - 20 == 1280
    for mode, frame in ((TAP, eth(crafted)), (TUN, crafted)):
        assert super_plan(frame, mode) is None  # one datagram, no segment size
        # A kernel UDP GRO batch of outer datagrams reports the outer size: not 10.
        assert super_plan(frame, mode, gso_size=700) is None
    # Even bigger than an underlay packet could carry, as a TCP super-packet must be.
    huge = udp(V4, bytes(3000), csum="partial", length=18)
    assert super_plan(eth(huge), TAP) is None
    # A run as a peer's inject device sends it: the kernel reports its datagram size.
    run = udp(V4, bytes(40 * 100), csum="partial", length=108)
    for mode, frame in ((TAP, eth(run)), (TUN, run)):
        assert super_plan(frame, mode, gso_size=100) == (1, len(frame) - len(run) + 28, 100, 40)
        assert super_plan(frame, mode, gso_size=0) is None
    small_run = udp(V4, bytes(3 * 64), csum="partial", length=72)
    assert super_plan(eth(small_run), TAP, gso_size=64) == (1, 42, 64, 3)
    # TCP keeps its rule: bigger than one underlay packet, partial checksum.
    big = tcp(V4, 1, bytes(3000), csum="partial")
    assert super_plan(eth(big), TAP) == (0, 14 + 40, DEV_MTU - 40, 3)
    small = tcp(V4, 1, bytes(1000), csum="partial")
    assert super_plan(eth(small), TAP) is None
