"""The Python packet core (geneve_dp/dataplane/packet.py) against the C receive path,
datagram by datagram, without root: hypothesis builds GENEVE datagrams (good ones and
ones broken in each way the checks look at), the C engine takes each through rx_one
with its devices and control queue as socket pairs, and what it wrote and counted must
be what ``decap`` says: Deliver (the same frame on the same tunnel's device), Drop
(the same reason, on the socket or the tunnel) or Control (the same packet, queued)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from geneve_dp.dataplane.packet import Control, Deliver, Drop, RxTunnel, decap, too_big_icmp
from geneve_dp.dataplane.packet import parse_inner as py_parse_inner
from geneve_dp.dataplane.reasons import DROP_REASONS
from geneve_dp.fastpath import ffi, lib
from tests.endpoint_helpers import geneve, option
from tests.packets import Flow, eth, tcp, udp

REMOTE = ipaddress.ip_address("10.0.0.2").packed
OTHER = ipaddress.ip_address("10.0.0.77").packed
MACS = (bytes.fromhex("02000000aa01"), bytes.fromhex("02000000aa02"))
# Two tunnels on one port: TAP VNI 100 and TUN VNI 200, both from REMOTE, over an
# IPv4 underlay of MTU 1500 (1,464 bytes of inner frame).
TUNNELS = (
    RxTunnel(100, REMOTE, "tap", MACS[0], 1464),
    RxTunnel(200, REMOTE, "tun", MACS[1], 1464),
)


@dataclass
class CEngine:
    engine: Any
    tunnels: Any
    stats: Any
    devs: list[socket.socket]
    control: socket.socket
    keep: list[Any]

    def run(self, pkt: bytes, src: bytes, tos: int, whole: bool) -> tuple[str, int | None, Any]:
        """What the C receive path did with one datagram."""
        before = self._counts()
        buf = ffi.new("uint8_t[]", pkt)
        lib.gdp_test_rx_one(self.engine, buf, len(pkt), src, tos, int(whole))
        after = self._counts()
        moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        written = [self._read(d) for d in self.devs]
        queued = self._read(self.control)
        return _verdict(moved, written, queued)

    def _counts(self) -> dict[tuple[str, int | None], int]:
        out: dict[tuple[str, int | None], int] = {}
        for k, name in enumerate(DROP_REASONS):
            out[(name, None)] = int(self.stats.drops[k])
            for i in range(len(TUNNELS)):
                out[(name, i)] = int(self.tunnels[i].counters.drops[k])
        for i in range(len(TUNNELS)):
            c = ffi.addressof(self.tunnels[i].counters)
            out[("rx_packets", i)] = int(lib.gdp_counter_get(c, 0))
            out[("control", i)] = int(lib.gdp_counter_get(c, 4))
        return out

    @staticmethod
    def _read(s: socket.socket) -> bytes | None:
        try:
            return s.recv(70000)
        except BlockingIOError:
            return None


def _verdict(
    moved: dict[tuple[str, int | None], int], written: list[bytes | None], queued: bytes | None
) -> tuple[str, int | None, Any]:
    assert all(v == 1 for v in moved.values()), moved  # one datagram, one count
    frames = [(i, w) for i, w in enumerate(written) if w is not None]
    if frames:
        assert len(frames) == 1 and moved == {("rx_packets", frames[0][0]): 1}, (moved, frames)
        return "deliver", frames[0][0], frames[0][1]
    if queued is not None:
        (key,) = moved
        assert key[0] == "control"
        return "control", key[1], queued
    (key,) = moved
    return "drop", key[1], key[0]


@pytest.fixture(scope="module")
def c_engine() -> Iterator[CEngine]:
    keep: list[Any] = []
    devs, peers = [], []
    for _ in TUNNELS:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.setblocking(False)
        devs.append(a)
        peers.append(b)
    ctl_read, ctl_write = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ctl_read.setblocking(False)
    ctl_write.setblocking(False)
    tunnels = ffi.new("struct gdp_tunnel[]", len(TUNNELS))
    for i, spec in enumerate(TUNNELS):
        t = tunnels[i]
        t.dev_fd = peers[i].fileno()
        t.mode = lib.GDP_MODE_TAP if spec.mode == "tap" else lib.GDP_MODE_TUN
        t.family = 4
        t.vni = spec.vni
        t.port = 6081
        ffi.memmove(t.remote, spec.remote, 4)
        ffi.memmove(t.local, ipaddress.ip_address("10.0.0.1").packed, 4)
        ffi.memmove(t.mac, spec.mac, 6)
        t.ttl = 64
        t.underlay_mtu = 1500
        assert lib.gdp_tunnel_prepare(tunnels + i) == 0
    cfg = ffi.new("struct gdp_engine_config *")
    cfg.family, cfg.udp_fd, cfg.raw_fd, cfg.stop_fd = 4, -1, -1, -1
    cfg.control_fd = ctl_write.fileno()
    cfg.sport_min, cfg.sport_max = 1024, 65535
    mem = ffi.new("uint8_t[]", lib.gdp_engine_size())
    engine = ffi.cast("struct gdp_engine *", mem)
    bufs = ffi.new("uint8_t[]", lib.gdp_engine_buffers_size())
    stats = ffi.new("struct gdp_sock_stats *")
    assert lib.gdp_engine_init(engine, cfg, tunnels, len(TUNNELS), bufs, len(bufs), stats) == 0
    keep += [mem, bufs, cfg, peers, ctl_write]
    yield CEngine(engine, tunnels, stats, devs, ctl_read, keep)
    for s in [*devs, *peers, ctl_read, ctl_write]:
        s.close()


def _py(pkt: bytes, src: bytes, tos: int, whole: bool) -> tuple[str, int | None, Any]:
    v = decap(pkt, src, tos, TUNNELS, whole)
    if isinstance(v, Deliver):
        return "deliver", v.tunnel, v.frame
    if isinstance(v, Control):
        return "control", v.tunnel, (0 | v.tunnel).to_bytes(4, "big") + v.packet
    assert isinstance(v, Drop)
    return "drop", v.tunnel, v.reason


INNER = Flow("192.168.100.9", "192.168.100.1", 40000, 9999)
INNER6 = Flow("fd00::9", "fd00::1", 40000, 9999)


@st.composite
def datagrams(draw: st.DrawFn) -> tuple[bytes, bytes, int, bool]:
    flow = draw(st.sampled_from([INNER, INNER6]))
    payload = draw(st.binary(max_size=64))
    ecn = draw(st.integers(0, 3))
    inner = draw(
        st.sampled_from(
            [
                udp(flow, payload, tos=ecn),
                tcp(flow, 1, payload, tos=ecn),
                udp(flow, payload, tos=ecn)[:30],  # cut short
                b"\x12" + bytes(30),  # not IP
            ]
        )
    )
    vni = draw(st.sampled_from([100, 100, 200, 200, 300]))
    tap = draw(st.booleans())
    src_mac = draw(st.sampled_from([bytes.fromhex("020000000009"), MACS[0]]))
    frame = eth(inner, dst=MACS[0], src=src_mac) if tap and inner[0] >> 4 in (4, 6) else inner
    if tap and frame is inner:
        frame = MACS[0] + src_mac + b"\x08\x00" + inner
    proto = draw(st.sampled_from([0x6558, 0x6558, 0x0800, 0x86DD, 0x0806]))
    opts = draw(
        st.sampled_from(
            [
                b"",
                b"",
                option(0x0102, 0x01, b"abcd"),
                option(0x0102, 0x81, b""),
                bytes([1, 2, 3, 0x1F]),
            ]
        )
    )
    pkt = geneve(
        vni,
        proto,
        frame,
        opts,
        oam=draw(st.sampled_from([False] * 5 + [True])),
        critical=draw(st.sampled_from([False] * 5 + [True])),
        version=draw(st.sampled_from([0] * 9 + [1])),
    )
    cut = draw(st.sampled_from([None] * 9 + [4, 9]))
    if cut is not None:
        pkt = pkt[:cut]
    src = draw(st.sampled_from([REMOTE] * 5 + [OTHER]))
    tos = draw(st.integers(0, 255))
    return pkt, src, tos, draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(datagrams())
def test_decap_matches_the_c_receive_path(
    c_engine: CEngine, case: tuple[bytes, bytes, int, bool]
) -> None:
    pkt, src, tos, whole = case
    want = _py(pkt, src, tos, whole)
    event(f"{want[0]} {want[2] if want[0] == 'drop' else want[1]}")
    assert c_engine.run(pkt, src, tos, whole) == want


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([0, 1]))
def test_inner_parsing_matches_c(frame: bytes, mode: int) -> None:
    out = ffi.new("uint32_t[9]")
    rc = lib.gdp_test_parse_inner(frame, len(frame), mode, out)
    inn = py_parse_inner(frame, "tap" if mode == 0 else "tun")
    assert (rc < 0) == (inn is None)
    if inn is not None:
        ports = inn.ports or (0, 0)
        want = [inn.ipver, inn.ip_off, inn.ip_len, inn.ecn, int(inn.df), inn.proto,
                int(inn.ports is not None), *ports]  # fmt: skip
        if inn.ipver == 0:
            want = [0] * 9
        assert list(out) == want


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=1600), st.booleans(), st.booleans(),
       st.integers(1200, 1500))  # fmt: skip
def test_too_big_icmp_matches_c(payload: bytes, v6: bool, df: bool, max_inner: int) -> None:
    flow = INNER6 if v6 else INNER
    frame = eth(tcp(flow, 1, payload, df=df))
    out = ffi.new("uint8_t[]", lib.GDP_TEST_ICMP_BUF)
    n = lib.gdp_test_icmp_too_big(frame, len(frame), 0, max_inner - 14, out)
    inn = py_parse_inner(frame, "tap")
    assert inn is not None
    py = too_big_icmp(frame, inn, "tap", max_inner)
    assert (bytes(ffi.buffer(out, n)) if n else None) == py
