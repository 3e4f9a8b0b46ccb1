"""The C receive coalescing (csrc/gro.c) on synthetic segments, without devices: what
merges, what does not, and that a super-frame cut by the C segmenter (csrc/seg.c)
coalesces back to itself byte for byte."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.packets import (
    ACK,
    FIN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    PSH,
    RST,
    SYN,
    TUN,
    URG,
    VNET_NEEDS_CSUM,
    Flow,
    c_gro,
    c_seg,
    eth,
    l4_valid,
    parse_vnet,
    tcp,
    tso_frame,
    udp,
)

V4 = Flow()
V6 = Flow("fd00::1", "fd00::2")
MSS = 1000


def segments(
    flow: Flow, n: int, mss: int = MSS, seq: int = 1000, last: int | None = None, **kw: object
) -> list[bytes]:
    out = []
    for i in range(n):
        size = mss if i < n - 1 or last is None else last
        payload = bytes((seq + i * mss + k) & 0xFF for k in range(size))
        out.append(eth(tcp(flow, seq + i * mss, payload, ip_id=7 + i, **kw)))  # type: ignore[arg-type]
    return out


def test_segments_of_one_flow_coalesce() -> None:
    for flow, gso in ((V4, GSO_TCPV4), (V6, GSO_TCPV6)):
        segs = segments(flow, 5, last=300)
        (out,) = c_gro(segs)
        flags, gso_type, hdr_len, gso_size, csum_start, csum_off = parse_vnet(out)
        assert (flags, gso_type, gso_size, csum_off) == (VNET_NEEDS_CSUM, gso, MSS, 16)
        hdrs = 14 + (20 if flow.ipver == 4 else 40) + 20
        assert hdr_len == hdrs and csum_start == hdrs - 20
        frame = out[12:]
        assert frame[hdrs:] == b"".join(s[hdrs:] for s in segs)
        assert len(frame) == hdrs + 4 * MSS + 300
        # The IP length is the whole frame's; IPv4 keeps the first ID, checksum valid.
        ip = frame[14:]
        if flow.ipver == 4:
            assert int.from_bytes(ip[2:4], "big") == len(frame) - 14
            assert int.from_bytes(ip[4:6], "big") == 7
            assert sum(int.from_bytes(ip[i : i + 2], "big") for i in range(0, 20, 2)) % 0xFFFF == 0
        else:
            assert int.from_bytes(ip[4:6], "big") == len(frame) - 14 - 40


def test_a_lone_segment_is_written_as_received() -> None:
    (seg,) = segments(V4, 1)
    (out,) = c_gro([seg])
    assert out == bytes(12) + seg


def test_out_of_order_segments_do_not_merge() -> None:
    a, b, c = segments(V4, 3)
    outs = c_gro([a, c, b])
    assert len(outs) == 3
    assert [o[12:] for o in outs] == [a, c, b]


def test_segments_after_a_short_one_do_not_merge() -> None:
    a = segments(V4, 1, last=500, seq=0)[0]
    b = eth(tcp(V4, 500, bytes(MSS)))
    outs = c_gro([a, b])
    assert [o[12:] for o in outs] == [a, b]


def test_other_flags_are_not_coalesced() -> None:
    for flags in (ACK | FIN, ACK | SYN, ACK | RST, ACK | URG, ACK | 0x80, PSH):
        a, b, _ = segments(V4, 3)
        odd = eth(tcp(V4, 2000, bytes(range(256)) * 4, flags=flags, ip_id=9))
        outs = c_gro([a, b, odd])
        assert len(outs) == 2, hex(flags)
        assert outs[1] == bytes(12) + odd  # untouched, behind a zero virtio header


def test_psh_ends_a_super_frame() -> None:
    a, _, c = segments(V4, 3)
    b_psh = segments(V4, 3, flags=ACK | PSH)[1]
    outs = c_gro([a, b_psh, c])
    assert len(outs) == 2
    frame = outs[0][12:]
    assert frame[14 + 20 + 13] == ACK | PSH
    assert outs[1] == bytes(12) + c


def test_different_ip_headers_or_outer_ports_do_not_merge() -> None:
    a = segments(V4, 1)[0]
    b = segments(V4, 2, tos=4)[1]  # another TOS
    assert len(c_gro([a, b])) == 2
    b = segments(V4, 2, ttl=63)[1]  # another TTL
    assert len(c_gro([a, b])) == 2
    a, b = segments(V4, 2)
    assert len(c_gro([a, b], osports=[1000, 1000])) == 1
    assert len(c_gro([a, b], osports=[1000, 1001])) == 2  # another outer packet flow


def test_a_bad_checksum_is_left_to_the_kernel() -> None:
    a, b = segments(V4, 2)
    bad = segments(V4, 3, csum="bad")[2]
    outs = c_gro([a, b, bad])
    assert len(outs) == 2
    assert outs[1] == bytes(12) + bad


def test_another_flow_flushes() -> None:
    other = Flow(sport=40001)
    a1, a2 = segments(V4, 2)
    b1 = segments(other, 1)[0]
    outs = c_gro([a1, a2, b1])
    assert len(outs) == 2 and outs[1] == bytes(12) + b1


def test_held_payloads_survive_buffer_reuse() -> None:
    segs = segments(V4, 9, last=10)
    want = c_gro(segs, hold_every=100)  # never reused while pending
    for hold_every in (0, 1, 2, 4):
        assert c_gro(segs, hold_every=hold_every) == want


def test_udp_runs_coalesce_only_with_consecutive_ids() -> None:
    run = [eth(udp(V4, bytes([i]) * 600, ip_id=50 + i)) for i in range(4)]
    (out,) = c_gro(run, uso=True)
    _, gso_type, hdr_len, gso_size, csum_start, csum_off = parse_vnet(out)
    assert (gso_type, gso_size, hdr_len, csum_start, csum_off) == (GSO_UDP_L4, 600, 42, 34, 6)
    frame = out[12:]
    # Cut at the segment size, the run comes back datagram by datagram.
    assert [frame[42 + 600 * i : 42 + 600 * (i + 1)] for i in range(4)] == [r[42:] for r in run]
    # Without the device's UDP_L4 support nothing is merged.
    assert [o[12:] for o in c_gro(run, uso=False)] == run
    # An ID out of sequence starts another run.
    gap = [*run[:2], eth(udp(V4, bytes([2]) * 600, ip_id=60))]
    assert len(c_gro(gap, uso=True)) == 2
    # A bad checksum, or a UDP length that disagrees with IP's, is left alone.
    bad = eth(udp(V4, bytes([2]) * 600, ip_id=52, csum="bad"))
    assert c_gro([*run[:2], bad], uso=True)[1] == bytes(12) + bad


def test_tun_frames_coalesce_too() -> None:
    segs = [tcp(V4, 1000 + i * MSS, bytes([i]) * MSS, ip_id=i) for i in range(3)]
    (out,) = c_gro(segs, mode=TUN)
    assert parse_vnet(out)[1] == GSO_TCPV4
    assert out[12 + 40 :] == b"".join(s[40:] for s in segs)


@settings(max_examples=int(os.environ.get("GDP_HYPOTHESIS_EXAMPLES", "150")), deadline=None)
@given(
    v6=st.booleans(),
    mss=st.integers(min_value=64, max_value=1460),
    nseg=st.integers(min_value=2, max_value=40),
    tail=st.integers(min_value=1, max_value=1460),
    seq=st.integers(min_value=0, max_value=2**32 - 1),
    psh=st.booleans(),
    ip_id=st.integers(min_value=0, max_value=0xFFFF),
    opts=st.sampled_from([b"", bytes([1, 1, 8, 10]) + bytes(8)]),
)
def test_segment_then_coalesce_is_identity(
    v6: bool, mss: int, nseg: int, tail: int, seq: int, psh: bool, ip_id: int, opts: bytes
) -> None:
    flow = V6 if v6 else V4
    size = mss * (nseg - 1) + min(tail, mss)
    if size + 14 + 40 + 32 > 65000:
        return
    payload = bytes((seq + k) & 0xFF for k in range(size))
    frame, vh = tso_frame(
        flow, seq, payload, mss, flags=ACK | (PSH if psh else 0), ip_id=ip_id, options=opts
    )
    segs = c_seg(frame, vh)
    assert segs is not None and len(segs) == nseg
    ip_off = 14
    assert all(l4_valid(s, ip_off) for s in segs)
    (out,) = c_gro(segs)
    assert out[12:] == frame
    assert parse_vnet(out)[1:4] == parse_vnet(vh)[1:4]
