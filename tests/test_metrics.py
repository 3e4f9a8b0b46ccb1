"""Prometheus metrics: the exposition of a real `geneve-dp up --metrics-addr`, scraped
over HTTP and read back with prometheus_client's own parser; addresses refused cleanly."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from geneve_dp.dataplane.dataplane import default_workers
from geneve_dp.errors import UserError
from geneve_dp.metrics import DataplaneCollector, parse_addr
from tests.netns import Netns
from tests.ops_helpers import (
    A_UL,
    B_IN,
    B_UL,
    gdp,
    make_pair,
    ping,
    send_bad,
    tunnel_pair,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and each family's type."""
    out: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, types


def value(s: Samples, name: str, **labels: str) -> float:
    return s[(name, tuple(sorted(labels.items())))]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("9464", ("127.0.0.1", 9464)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:9464", ("::1", 9464)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_addr_accepts(text: str, want: tuple[str, int]) -> None:
    assert parse_addr(text) == want


@pytest.mark.parametrize("text", ["", "0", "65536", "host:9464", "::1:9464", "1.2.3.4:x", ":80"])
def test_parse_addr_refuses_with_the_field(text: str) -> None:
    with pytest.raises(UserError) as err:
        parse_addr(text)
    assert str(err.value).startswith("--metrics-addr: ")


def _status(rx: int) -> dict[str, Any]:
    counters = {
        "rx_packets": rx,
        "rx_bytes": rx * 100,
        "tx_packets": 3,
        "tx_bytes": 300,
        "control": 0,
        "tx_injected": 7,
        "drops": {"critical_option": 2},
        "options_seen": {"0x0102:0x01": 5},
        "options_other": 1,
    }
    sock = {
        "family": 4,
        "port": 6081,
        "rx_packets": rx,
        "rx_packets_per_worker": [rx - 1, 1],
        "drops": {"unknown_vni": 4},
    }
    tun = {
        "name": "gt0",
        "vni": 77,
        "remote": "10.0.0.2",
        "local": "10.0.0.1",
        "port": 6081,
        "mode": "tap",
        "mtu": 1450,
        "offloads": {"tso": True, "tx_inject": True},
        "inject_probes": {"left": 7, "late": 2, "stopped": 0, "unseen": 1},
        "counters": counters,
        "socket": sock,
    }
    off = {"offloads": {"tso": True, "tx_inject": False}, "inject_probes": None}
    return {
        "engine": "c",
        "workers": 2,
        "tunnels": [tun, {**tun, "name": "gt1", "vni": 78, **off}],
    }


def test_collector_reads_at_scrape_time_and_follows_conventions() -> None:
    status = {"rx": 1}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DataplaneCollector(lambda: _status(status["rx"])))
    first, types = samples(generate_latest(registry).decode())
    status["rx"] = 41
    second, _ = samples(generate_latest(registry).decode())
    assert value(first, "geneve_dp_rx_packets_total", device="gt0", vni="77") == 1
    assert value(second, "geneve_dp_rx_packets_total", device="gt0", vni="77") == 41
    assert value(second, "geneve_dp_rx_bytes_total", device="gt1", vni="78") == 4100
    assert value(second, "geneve_dp_drops_total", device="gt0", vni="77", reason="critical_option")
    assert value(second, "geneve_dp_drops_total", device="gt0", vni="77", reason="tx_error") == 0
    opt = {"device": "gt0", "vni": "77", "class": "0x0102", "type": "0x01"}
    assert value(second, "geneve_dp_options_total", **opt) == 5
    assert value(second, "geneve_dp_options_other_total", device="gt0", vni="77") == 1
    # Two tunnels on one port share one socket: its counters appear once, not twice.
    assert (
        value(
            second, "geneve_dp_socket_drops_total", family="ipv4", port="6081", reason="unknown_vni"
        )
        == 4
    )
    assert value(second, "geneve_dp_workers") == 2
    assert value(second, "geneve_dp_tx_injected_total", device="gt0", vni="77") == 7
    worker = {"family": "ipv4", "port": "6081"}
    assert value(second, "geneve_dp_socket_worker_rx_packets_total", worker="0", **worker) == 40
    assert value(second, "geneve_dp_socket_worker_rx_packets_total", worker="1", **worker) == 1
    assert value(second, "geneve_dp_offload_enabled", device="gt1", vni="78") == 1
    # Whether each tunnel injects, and its probes by outcome (none for one that never
    # injects).
    assert value(second, "geneve_dp_tx_inject", device="gt0", vni="77") == 1
    assert value(second, "geneve_dp_tx_inject", device="gt1", vni="78") == 0
    probe = {"device": "gt0", "vni": "77"}
    assert value(second, "geneve_dp_inject_probes_total", **probe, outcome="late") == 2
    assert not [k for k in second if k[0] == "geneve_dp_inject_probes_total" and
                ("device", "gt1") in k[1]]  # fmt: skip
    assert types["geneve_dp_tx_inject"] == "gauge"
    build = [k for k in second if k[0] == "geneve_dp_build_info"]
    assert len(build) == 1 and ("engine", "c") in build[0][1]
    # Counters are counters (exposed with _total), gauges gauges.
    assert types["geneve_dp_rx_packets"] == "counter"
    assert types["geneve_dp_socket_drops"] == "counter"
    assert types["geneve_dp_workers"] == "gauge"
    assert all(name.startswith("geneve_dp_") for name in types)


def test_every_engine_counter_is_a_metric() -> None:
    """What `stats` reads from either engine is exported: each scalar counter by its
    own family; drops, options and the socket's by theirs."""
    from geneve_dp.dataplane.reasons import TUNNEL_COUNTERS
    from geneve_dp.metrics import _TUNNEL_COUNTERS

    exported = {key for _name, key, _doc in _TUNNEL_COUNTERS}
    assert set(TUNNEL_COUNTERS) <= exported
    status = _status(1)
    for t in status["tunnels"]:
        t["counters"] = {**t["counters"], **dict.fromkeys(TUNNEL_COUNTERS, 3)}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DataplaneCollector(lambda: status))
    s, _ = samples(generate_latest(registry).decode())
    for _name, key, _doc in _TUNNEL_COUNTERS:
        assert value(s, f"geneve_dp_{_name}_total", device="gt0", vni="77") == 3, key


SCRAPE = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
)


def scrape(ns: Netns, url: str) -> str:
    return ns.run(sys.executable, "-c", SCRAPE, url).stdout


def test_up_serves_metrics_of_real_traffic(
    netns_factory: Callable[[str], Netns], run_dir: Path
) -> None:
    a, b = make_pair(netns_factory)
    with tunnel_pair(a, b, "--metrics-addr", "127.0.0.1:9464"):
        url = "http://127.0.0.1:9464/metrics"
        ping(a, B_IN, 5)
        send_bad(b, B_UL, A_UL, 3, why="critical")
        send_bad(b, B_UL, A_UL, 2, why="vni")
        time.sleep(0.3)
        s, types = samples(scrape(a, url))
        dev = {"device": "gt0", "vni": "77"}
        assert value(s, "geneve_dp_tx_packets_total", **dev) >= 5
        assert value(s, "geneve_dp_rx_packets_total", **dev) >= 5
        assert value(s, "geneve_dp_tx_bytes_total", **dev) >= 5 * 98
        assert value(s, "geneve_dp_drops_total", reason="critical_option", **dev) == 3
        sock = {"family": "ipv4", "port": "6081"}
        assert value(s, "geneve_dp_socket_drops_total", reason="unknown_vni", **sock) == 2
        assert value(s, "geneve_dp_workers") == default_workers()
        assert value(s, "geneve_dp_tunnels") == 1
        info = [k for k in s if k[0] == "geneve_dp_tunnel_info"]
        assert len(info) == 1 and ("remote", B_UL) in info[0][1] and ("mtu", "1450") in info[0][1]
        assert "process_cpu_seconds" in types  # the client library's process metrics
        # The same numbers as `stats --json`: both read the daemon's status.
        stats = gdp("stats", "gt0", "--json", "--netns", a.name)
        assert json.loads(stats.stdout)["gt0"]["drops"]["critical_option"] == 3
        # Each scrape reads the counters anew.
        ping(a, B_IN, 2)
        again, _ = samples(scrape(a, url))
        assert (
            value(again, "geneve_dp_tx_packets_total", **dev)
            >= value(s, "geneve_dp_tx_packets_total", **dev) + 2
        )


def test_metrics_port_in_use_is_one_line_and_creates_nothing(
    netns_factory: Callable[[str], Netns], run_dir: Path
) -> None:
    a, b = make_pair(netns_factory)
    with tunnel_pair(a, b, "--metrics-addr", "9464"):
        before = a.run("ip", "-o", "link").stdout
        proc = gdp(
            "up",
            "--netns",
            a.name,
            "gt5",
            "--vni",
            "5",
            "--remote",
            B_UL,
            "--port",
            "7000",
            "--metrics-addr",
            "127.0.0.1:9464",
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--metrics-addr" in lines[0] and "in use" in lines[0], lines
        assert a.run("ip", "-o", "link").stdout == before
    bad = gdp(
        "up",
        "--netns",
        a.name,
        "gt6",
        "--vni",
        "5",
        "--remote",
        B_UL,
        "--metrics-addr",
        "localhost:9464",
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--metrics-addr" in bad.stderr


def test_http_responses_and_client_bound() -> None:
    from geneve_dp.metrics import MAX_CLIENTS, client_bound, respond

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DataplaneCollector(lambda: {"tunnels": [], "workers": 1}))
    ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", registry)
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"geneve_dp_tunnels 0.0" in body
    only_head = respond(b"HEAD /metrics HTTP/1.0\r\n\r\n", registry)
    assert only_head.endswith(b"\r\n\r\n") and b"200 OK" in only_head
    assert respond(b"POST /metrics HTTP/1.1\r\n\r\n", registry).startswith(b"HTTP/1.1 405")
    assert respond(b"GET /other HTTP/1.1\r\n\r\n", registry).startswith(b"HTTP/1.1 404")
    assert respond(b"\x00\xff garbage\r\n\r\n", registry).startswith(b"HTTP/1.1 400")
    assert client_bound(1024) == MAX_CLIENTS and client_bound(256) == 32
    assert client_bound(16) == 4
