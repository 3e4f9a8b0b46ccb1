"""Receive checks with GENEVE packets crafted from raw bytes.

A plain UDP socket in the peer namespace sends each packet to the endpoint; a packet
socket on the tunnel device tells whether the inner frame was delivered, and the
status tells which counter moved. Every case is followed by a valid "sentinel"
packet, so the sniffer knows when the case's packet has been handled.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.endpoint_helpers import (
    Endpoint,
    Sniffer,
    ether,
    geneve,
    ip_checksum,
    ipv4_udp,
    option,
    send_udp,
    underlay,
    wait_for,
)
from tests.netns import Netns

pytestmark = pytest.mark.root

ENGINES = ["c", "python"]
REMOTE, OTHER, LOCAL = "10.0.0.2", "10.0.0.3", "10.0.0.1"
VNI = 100
PEER_MAC = bytes.fromhex("020000000099")
_marks = itertools.count()


@dataclass
class Env:
    mode: str
    a: Netns
    b: Netns
    ep: Endpoint
    mac: bytes


@pytest.fixture(
    scope="module",
    params=[(e, m) for e in ENGINES for m in ("tap", "tun")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    engine, mode = request.param
    a, b = Netns("rxa"), Netns("rxb")
    try:
        underlay(a, b)
        b.run("ip", "addr", "add", f"{OTHER}/24", "dev", "ub")
        spec = {
            "name": "gt0",
            "vni": VNI,
            "remote": REMOTE,
            "mode": mode,
            "addresses": ["192.168.100.1/24"],
        }
        ep = Endpoint(a, engine, [spec])
        try:
            assert ep.error is None, ep.error
            mac = b""
            if mode == "tap":
                mac = bytes.fromhex(
                    a.run("cat", "/sys/class/net/gt0/address").stdout.strip().replace(":", "")
                )
            yield Env(mode, a, b, ep, mac)
        finally:
            ep.close()
    finally:
        a.delete()
        b.delete()


def inner(env: Env, marker: bytes, tos: int = 0, src_mac: bytes = PEER_MAC) -> bytes:
    pkt = ipv4_udp("192.168.100.2", "192.168.100.1", marker, tos=tos)
    if env.mode == "tun":
        return pkt
    return ether(env.mac, src_mac, 0x0800, pkt)


def proto(env: Env) -> int:
    return 0x6558 if env.mode == "tap" else 0x0800


def run_case(
    env: Env, payload_for: Any, src: str = REMOTE, tos: int = 0
) -> tuple[list[bytes], dict[str, Any]]:
    """Send the case packet then a sentinel; return delivered frames and counter deltas."""
    marker = f"GDPMARK{next(_marks):06d}".encode()
    sentinel = f"GDPSENT{next(_marks):06d}".encode()
    before = env.ep.tunnel("gt0")
    sniffer = Sniffer(env.a, "gt0", 5.0, marker, sentinel)
    ok = geneve(VNI, proto(env), inner(env, sentinel))
    send_udp(env.b, [(src, LOCAL, 6081, tos, payload_for(marker)), (REMOTE, LOCAL, 6081, 0, ok)])
    frames = sniffer.frames()
    assert wait_for(
        lambda: env.ep.tunnel("gt0")["counters"]["rx_packets"] > before["counters"]["rx_packets"]
    )
    after = env.ep.tunnel("gt0")
    return frames, diff(before, after)


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in ("counters", "socket"):
        for key, value in after[part].items():
            if key == "drops":
                for reason, n in value.items():
                    d = n - before[part]["drops"][reason]
                    if d:
                        out[f"{part}.drops.{reason}"] = d
            elif isinstance(value, int) and key not in ("family", "port", "tx_packets", "tx_bytes"):
                # (transmit counters move with the host's replies: ARP, ICMP unreachable)
                d = value - before[part][key]
                if d:
                    out[f"{part}.{key}"] = d
    return out


# name -> (builder(env, marker) -> UDP payload, source, outer tos, expected counter deltas
# besides the sentinel's rx)
def _cases() -> dict[str, tuple[Any, str, int, dict[str, int]]]:
    g = geneve
    opt = option(0x0102, 0x01, b"\x11\x22\x33\x44")
    crit = option(0x0102, 0x81, b"\x11\x22\x33\x44")
    return {
        "unknown_vni": (
            lambda e, m: g(VNI + 1, proto(e), inner(e, m)),
            REMOTE,
            0,
            {"socket.drops.unknown_vni": 1},
        ),
        "wrong_remote": (
            lambda e, m: g(VNI, proto(e), inner(e, m)),
            OTHER,
            0,
            {"socket.drops.wrong_remote": 1},
        ),
        "bad_version": (
            lambda e, m: g(VNI, proto(e), inner(e, m), version=1),
            REMOTE,
            0,
            {"socket.drops.bad_version": 1},
        ),
        "truncated": (
            lambda e, m: g(VNI, proto(e), b"")[:5] + m[:0],
            REMOTE,
            0,
            {"socket.drops.truncated": 1},
        ),
        "options_truncated": (
            lambda e, m: g(VNI, proto(e), inner(e, m), opt_len=63),
            REMOTE,
            0,
            {"socket.drops.options_truncated": 1},
        ),
        "option_overruns": (
            lambda e, m: g(
                VNI, proto(e), inner(e, m), options=bytes.fromhex("01020102"), opt_len=1
            ),
            REMOTE,
            0,
            {"socket.drops.option_overruns": 1},
        ),
        "critical_option": (
            lambda e, m: g(VNI, proto(e), inner(e, m), options=crit, critical=True),
            REMOTE,
            0,
            {"counters.drops.critical_option": 1},
        ),
        "c_bit_without_critical": (
            lambda e, m: g(VNI, proto(e), inner(e, m), options=opt, critical=True),
            REMOTE,
            0,
            {"counters.drops.c_bit_mismatch": 1},
        ),
        "critical_without_c_bit": (
            lambda e, m: g(VNI, proto(e), inner(e, m), options=crit),
            REMOTE,
            0,
            {"counters.drops.c_bit_mismatch": 1},
        ),
        "oam": (
            lambda e, m: g(VNI, proto(e), inner(e, m), oam=True),
            REMOTE,
            0,
            {"counters.control": 1},
        ),
        "ecn_ce_on_not_ect": (
            lambda e, m: g(VNI, proto(e), inner(e, m)),
            REMOTE,
            3,
            {"counters.drops.ecn_not_ect": 1},
        ),
        "wrong_protocol": (
            lambda e, m: g(VNI, 0x0800 if e.mode == "tap" else 0x6558, inner(e, m)),
            REMOTE,
            0,
            {"counters.drops.wrong_protocol": 1},
        ),
        "inner_truncated": (
            lambda e, m: g(VNI, proto(e), inner(e, m)[:10]),
            REMOTE,
            0,
            {"counters.drops.inner_truncated": 1},
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_dropped_and_counted(env: Env, case: str) -> None:
    build, src, tos, expected = CASES[case]
    frames, delta = run_case(env, lambda m: build(env, m), src=src, tos=tos)
    assert frames == [], f"{case}: delivered {frames}"
    sentinel = {
        "counters.rx_packets": 1,
        "counters.rx_bytes": delta.get("counters.rx_bytes"),
        "socket.rx_packets": 2,
    }
    assert delta == {**sentinel, **expected}, delta


def only(mode: str) -> pytest.MarkDecorator:
    """Run a test on the ``env`` fixture of one mode only (both engines)."""
    params = [(e, mode) for e in ENGINES]
    return pytest.mark.parametrize(
        "env", params, indirect=True, ids=[f"{e}-{mode}" for e in ENGINES]
    )


@only("tun")
def test_wrong_inner_version_in_tun(env: Env) -> None:
    frames, delta = run_case(env, lambda m: geneve(VNI, 0x86DD, inner(env, m)))
    assert frames == [] and delta.get("counters.drops.wrong_protocol") == 1, delta


@only("tap")
def test_own_mac_dropped(env: Env) -> None:
    frames, delta = run_case(env, lambda m: geneve(VNI, 0x6558, inner(env, m, src_mac=env.mac)))
    assert frames == [] and delta.get("counters.drops.own_mac") == 1, delta


def test_non_critical_option_delivered_and_counted(env: Env) -> None:
    opts = option(0x0102, 0x01, b"\x11\x22\x33\x44") + option(0xFFF0, 0x7F)
    frames, delta = run_case(env, lambda m: geneve(VNI, proto(env), inner(env, m), options=opts))
    assert len(frames) == 1, delta
    assert delta["counters.rx_packets"] == 2
    seen = env.ep.tunnel("gt0")["counters"]["options_seen"]
    assert seen.get("0x0102:0x01", 0) >= 1 and seen.get("0xfff0:0x7f", 0) >= 1, seen


def test_outer_ce_marks_ect_inner(env: Env) -> None:
    frames, delta = run_case(env, lambda m: geneve(VNI, proto(env), inner(env, m, tos=0x02)), tos=3)
    assert len(frames) == 1, delta
    ip = frames[0][14:] if env.mode == "tap" else frames[0]
    assert ip[1] & 3 == 3, f"inner ECN {ip[1] & 3}"
    assert ip_checksum(ip[:20]) == 0, "IPv4 header checksum not fixed"


def test_control_message_reaches_hook(env: Env) -> None:
    frames, _ = run_case(env, lambda m: geneve(VNI, proto(env), inner(env, m), oam=True))
    assert frames == []
    msgs = env.ep.status()["control_messages"]
    assert msgs and msgs[-1][0] == "gt0"
    pkt = bytes.fromhex(msgs[-1][1])
    assert pkt[1] & 0x80 and b"GDPMARK" in pkt
