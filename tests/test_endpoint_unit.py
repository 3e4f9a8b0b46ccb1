"""Engine helpers without devices: C checksum and flow hash against the Python
engine's, and the drop-reason table against the C numbering."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from geneve_dp.dataplane import DROP_REASONS, SOCKET_DROP_REASONS, TUNNEL_DROP_REASONS
from geneve_dp.dataplane.packet import inet_csum, parse_inner
from geneve_dp.fastpath import ffi, lib
from tests.endpoint_helpers import ether, ipv4_udp


@given(st.binary(max_size=3000))
def test_c_checksum_matches_python(data: bytes) -> None:
    assert lib.gdp_inet_csum(data, len(data)) == inet_csum(data)


def test_drop_reasons_match_c() -> None:
    assert len(DROP_REASONS) == lib.GDP_DROP_COUNT == len(set(DROP_REASONS))
    assert set(SOCKET_DROP_REASONS) | set(TUNNEL_DROP_REASONS) == set(DROP_REASONS)
    assert not set(SOCKET_DROP_REASONS) & set(TUNNEL_DROP_REASONS)
    # No tunnel can be named for these; these are found only once one is.
    assert {"truncated", "unknown_vni", "wrong_remote"} <= set(SOCKET_DROP_REASONS)
    assert {"own_mac", "dev_write", "tx_error"} <= set(TUNNEL_DROP_REASONS)


def _hash(frame: bytes, mode: int = 0, seed: int = 7) -> int:
    return int(lib.gdp_flow_hash(ffi.from_buffer(frame), len(frame), mode, seed))


def test_flow_hash_is_per_flow() -> None:
    mac = bytes(6)

    def frame(sport: int, payload: bytes = b"x") -> bytes:
        pkt = bytearray(ipv4_udp("10.1.0.1", "10.1.0.2", payload))
        pkt[20:22] = sport.to_bytes(2, "big")
        return ether(mac, mac, 0x0800, bytes(pkt))

    # Same flow, different payloads: one hash. Different source ports: spread.
    assert _hash(frame(1000, b"a")) == _hash(frame(1000, b"bbbb"))
    hashes = {_hash(frame(p)) for p in range(1000, 1064)}
    assert len(hashes) == 64
    assert len({h >> 28 for h in hashes}) >= 8  # the high bits pick the port
    # The seed changes the mapping.
    assert _hash(frame(1000), seed=1) != _hash(frame(1000), seed=2)


def test_parse_inner_modes() -> None:
    pkt = ipv4_udp("10.1.0.1", "10.1.0.2", b"hello", tos=2, df=True)
    tun = parse_inner(pkt, "tun")
    assert tun is not None and tun.ipver == 4 and tun.df and tun.ecn == 2
    assert tun.ports == (40000, 9999)
    assert parse_inner(pkt[:10], "tun") is None  # truncated IP in TUN mode
    assert parse_inner(b"\x10" + pkt[1:], "tun") is None  # version 1
    tap = parse_inner(ether(bytes(6), bytes(6), 0x0806, b"arp"), "tap")
    assert tap is not None and tap.ipver == 0  # non-IP frames are carried as they are
    assert parse_inner(b"short", "tap") is None
