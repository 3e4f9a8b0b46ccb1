"""The C generator, sink and request/response probe, on loopback in a fresh namespace.

Counts must be exact and loss/reordering detection right; speed is never asserted.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from bench import pktgen
from tests.netns import Netns, veth

pytestmark = pytest.mark.root

LO = "127.0.0.1"


@pytest.fixture
def ns(netns_factory: Callable[[str], Netns]) -> Netns:
    return netns_factory("pktgen")


def packet(flow: int, seq: int, size: int = 32, ts: int | None = None) -> bytes:
    stamp = time.monotonic_ns() if ts is None else ts
    head = pktgen.HEADER.pack(pktgen.MAGIC, flow, seq, stamp)
    return head + bytes(size - len(head))


@pytest.fixture
def sink_sender(ns: Netns) -> Iterator[Callable[[list[bytes]], pktgen.Json]]:
    """Send crafted datagrams from Python (inside the namespace) to a C sink there."""

    def send(datagrams: list[bytes]) -> pktgen.Json:
        with pktgen.Server("sink", ns.name, bind=LO, port=9100, idle=0.3, timeout=10) as sink:
            code = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "for h in sys.stdin.read().split():\n"
                f"    s.sendto(bytes.fromhex(h), ('{LO}', 9100))\n"
            )
            subprocess.run(
                ns.argv("python3", "-c", code),
                input="\n".join(d.hex() for d in datagrams),
                text=True,
                check=True,
                timeout=30,
            )
            return sink.result(timeout=15)

    yield send


def test_binary_builds_with_warnings_as_errors(tmp_path: object) -> None:
    # The driver's own build uses -Wall -Wextra; a clean compile with -Werror keeps it so.
    proc = subprocess.run(
        ["gcc", *pktgen.CFLAGS, "-Werror", "-fsyntax-only", str(pktgen.SOURCE)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert pktgen.binary().exists()


def test_generator_count_reaches_sink_exactly(ns: Netns) -> None:
    # Paced well below what loopback takes, so every packet must arrive.
    r = pktgen.udp_stream(
        ns.name, ns.name, LO, port=9101, payload=100, flows=3, rate=20000, count=3000, burst=8
    )
    assert r["send"]["sent_packets"] == 3000
    assert r["sink"]["received_packets"] == 3000
    assert r["sink"]["received_bytes"] == 3000 * 100
    assert r["send"]["sent_bytes"] == 3000 * 100
    assert r["sink"]["flows_seen"] == 3
    assert r["sink"]["lost"] == 0 and r["lost"] == 0
    assert r["sink"]["reordered"] == 0 and r["sink"]["duplicates"] == 0
    assert r["sink"]["bad_packets"] == 0
    lat = r["sink"]["latency_ns"]
    assert lat["count"] == 3000
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"]


@pytest.mark.parametrize("payload", [pktgen.MIN_PAYLOAD, pktgen.MAX_PAYLOAD])
def test_generator_sizes(ns: Netns, payload: int) -> None:
    r = pktgen.udp_stream(ns.name, ns.name, LO, port=9102, payload=payload, rate=10000, count=200)
    assert r["sink"]["received_packets"] == 200
    assert r["sink"]["received_bytes"] == 200 * payload


def test_generator_duration_bounds_the_run(ns: Netns) -> None:
    t0 = time.monotonic()
    r = pktgen.udp_stream(ns.name, ns.name, LO, port=9103, rate=5000, duration=0.5)
    assert time.monotonic() - t0 < 10
    assert 0.45 <= r["send"]["elapsed_s"] < 2
    assert r["send"]["sent_packets"] > 0
    assert r["sink"]["valid_packets"] == r["send"]["sent_packets"]


def test_flows_use_distinct_source_ports(ns: Netns) -> None:
    r = pktgen.udp_stream(ns.name, ns.name, LO, port=9104, flows=5, rate=10000, count=500, burst=4)
    assert r["sink"]["flows_seen"] == 5
    assert r["sink"]["valid_packets"] == 500


def test_sink_detects_loss_reordering_and_duplicates(
    sink_sender: Callable[[list[bytes]], pktgen.Json],
) -> None:
    datagrams = [packet(0, s) for s in (0, 1, 2, 4, 3, 5, 7)]  # 3 late, 6 missing
    datagrams += [packet(1, s) for s in (0, 0, 1, 2)]  # 0 twice
    datagrams += [packet(2, s) for s in (2, 3)]  # 0 and 1 missing at the start
    datagrams += [b"\x00" * 40, b"short"]  # wrong magic, too short
    r = sink_sender(datagrams)
    assert r["received_packets"] == len(datagrams)
    assert r["bad_packets"] == 2
    assert r["valid_packets"] == len(datagrams) - 2
    assert r["flows_seen"] == 3
    assert r["reordered"] == 1
    assert r["duplicates"] == 1
    assert r["lost"] == 1 + 2
    assert r["latency_ns"]["count"] == len(datagrams) - 2


def test_sink_latency_from_payload_timestamp(
    sink_sender: Callable[[list[bytes]], pktgen.Json],
) -> None:
    # Stamped 50 ms in the past: the one-way latency it reports must include that.
    old = time.monotonic_ns() - 50_000_000
    r = sink_sender([packet(0, s, ts=old) for s in range(10)])
    lat = r["latency_ns"]
    assert lat["count"] == 10
    assert lat["min"] >= 50_000_000
    assert lat["max"] < 50_000_000 + 10_000_000_000


def test_request_response_percentiles(ns: Netns) -> None:
    r = pktgen.request_response(ns.name, ns.name, LO, port=9105, count=200, wait_ms=1000)
    assert r["requests"] == 200
    assert r["responses"] == 200
    assert r["timeouts"] == 0
    assert r["server"]["echoed"] == 200
    lat = r["latency_ns"]
    assert lat["count"] == 200
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    cdf = r["cdf_ns"]
    assert len(cdf) == 201
    assert cdf == sorted(cdf)
    assert cdf[0] == lat["min"] and cdf[-1] == lat["max"]


def test_request_response_counts_timeouts(ns: Netns) -> None:
    # No server: every request times out, none becomes a sample.
    r = pktgen.run("rr", ns.name, dst=LO, port=9106, count=3, wait_ms=50)
    assert r["responses"] == 0
    assert r["requests"] == 3 and r["timeouts"] == 3
    assert r["latency_ns"]["count"] == 0


def test_bad_options_exit_2() -> None:
    for argv in (
        ["send", "--dst", LO],  # no --port
        ["send", "--dst", "nowhere", "--port", "1"],
        ["send", "--dst", LO, "--port", "1", "--size", "8"],
        ["fly", "--dst", LO, "--port", "1"],
    ):
        proc = subprocess.run([str(pktgen.binary()), *argv], capture_output=True, text=True)
        assert proc.returncode == 2, argv
        assert proc.stderr.startswith("gdp-pktgen: ")


@pytest.mark.parametrize("frame, payload", [(64, 18), (1518, 1472)])
def test_frame_size_means_whole_ethernet_frame(ns: Netns, frame: int, payload: int) -> None:
    assert pktgen.payload_for_frame(frame) == payload
    with pktgen.Server("sink", ns.name, bind=LO, port=9107, idle=0.3, timeout=10) as sink:
        sent = pktgen.run("send", ns.name, dst=LO, port=9107, frame_size=frame, count=10)
        received = sink.result(timeout=15)
    assert sent["payload_size"] == payload
    assert received["received_bytes"] == 10 * payload


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns]) -> tuple[Netns, Netns]:
    a, b = netns_factory("rawa"), netns_factory("rawb")
    veth(a, "rawa0", b, "rawb0")
    a.run("ip", "addr", "add", "10.205.0.1/24", "dev", "rawa0")
    b.run("ip", "addr", "add", "10.205.0.2/24", "dev", "rawb0")
    return a, b


@pytest.mark.parametrize("to_mac", [True, False])
def test_raw_frames_reach_a_udp_sink_exactly(pair: tuple[Netns, Netns], to_mac: bool) -> None:
    a, b = pair
    mac = b.run("ip", "-br", "link", "show", "dev", "rawb0").stdout.split()[2]
    raw = pktgen.RawFrames("rawa0", "10.205.0.1", mac if to_mac else None)  # None: broadcast
    r = pktgen.udp_stream(
        a.name, b.name, "10.205.0.2", port=9108, payload=18, flows=3, count=2000, rate=20000,
        raw=raw,
    )  # fmt: skip
    assert r["send"]["raw"] is True
    assert r["send"]["frame_bytes"] == 14 + 20 + 8 + 18  # the 64-byte frame, FCS aside
    assert r["send"]["sent_packets"] == 2000
    assert r["sink"]["valid_packets"] == 2000
    assert r["sink"]["received_bytes"] == 2000 * 18
    assert r["sink"]["flows_seen"] == 3
    assert r["sink"]["lost"] == 0 and r["sink"]["reordered"] == 0


def test_raw_send_needs_an_ipv4_source(pair: tuple[Netns, Netns]) -> None:
    a, _ = pair
    for extra in ([], ["--src", "fe80::1"], ["--src", "10.205.0.1", "--dst-mac", "zz"]):
        proc = subprocess.run(
            a.argv(str(pktgen.binary()), "send", "--ifname", "rawa0", "--dst", "10.205.0.2",
                   "--port", "9", "--count", "1", *extra),
            capture_output=True,
            text=True,
        )  # fmt: skip
        assert proc.returncode == 2, (extra, proc.stderr)
