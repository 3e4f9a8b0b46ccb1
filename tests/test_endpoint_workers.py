"""Multi-queue workers: every device gets a queue per worker and every port a
SO_REUSEPORT receive socket per worker; flows are spread over the workers and each
flow's packets stay in order."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.endpoint_helpers import endpoint, ether, geneve, ipv4_udp, underlay, wait_for
from tests.netns import Netns

pytestmark = pytest.mark.root

GDP = [sys.executable, "-m", "geneve_dp"]


def _tun_queues(pid: int, name: str) -> int:
    """How many of the process's fds are queues of tun device ``name``."""
    n = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            if f"iff:\t{name}\n" in info.read_text():
                n += 1
        except OSError:
            continue
    return n


def _udp_sockets(ns: Netns, port: int) -> int:
    out = ns.run("ss", "-Huan", "sport", "=", f":{port}").stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_queues_and_sockets_per_worker(netns_factory: Callable[[str], Netns], workers: int) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    spec = {"name": "gt0", "vni": 7, "remote": "10.0.0.2", "addresses": ["192.168.7.1/24"]}
    with endpoint(a, f"c+offload+w{workers}", [spec]) as ep:
        assert ep.error is None, ep.error
        assert len(ep.tunnel("gt0")["socket"]["rx_packets_per_worker"]) == workers
        assert _tun_queues(ep.proc.pid, "gt0") == workers
        assert _udp_sockets(a, 6081) == workers
    # All gone with the dataplane.
    assert "gt0" not in a.run("ip", "-o", "link").stdout
    assert _udp_sockets(a, 6081) == 0


def test_flows_spread_over_workers_in_order(netns_factory: Callable[[str], Netns]) -> None:
    from bench import pktgen

    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    sa = {"name": "gt0", "vni": 7, "remote": "10.0.0.2", "addresses": ["192.168.7.1/24"]}
    sb = {"name": "gt0", "vni": 7, "remote": "10.0.0.1", "addresses": ["192.168.7.2/24"]}
    with endpoint(a, "c+offload+w2", [sa]) as ea, endpoint(b, "c+offload+w2", [sb]) as eb:
        assert ea.error is None and eb.error is None
        a.run("ping", "-c", "1", "-W", "2", "192.168.7.2")
        # 16 flows: their outer source ports follow the inner flows, drawn from the
        # sender's block of consecutive ports, and the receiver chooses a socket by
        # source port modulo 2 (all on one: odds 2 in 65536).
        r = pktgen.udp_stream(
            a.name, b.name, "192.168.7.2", payload=64, flows=16, rate=20000, count=32000
        )
        assert r["sink"]["valid_packets"] == 32000, r
        assert r["sink"]["reordered"] == 0 and r["sink"]["duplicates"] == 0, r
        per_worker = eb.tunnel("gt0")["socket"]["rx_packets_per_worker"]
        assert len(per_worker) == 2 and min(per_worker) > 0, per_worker
        # Summed tunnel counters see every packet once.
        assert eb.tunnel("gt0")["counters"]["rx_packets"] >= 32000


def test_port_held_by_a_reuseport_socket_is_refused(netns_factory: Callable[[str], Netns]) -> None:
    """SO_REUSEPORT on our sockets must not let us join someone else's sockets."""
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    hold = (
        "import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1);"
        "s.bind(('0.0.0.0',6081));print('x',flush=True);time.sleep(30)"
    )
    blocker = a.popen(["python3", "-c", hold], stdout=subprocess.PIPE)
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == "x"
        spec = {"name": "gt1", "vni": 1, "remote": "10.0.0.2"}
        with endpoint(a, "c+offload+w2", [spec]) as ep:
            assert ep.error is not None and ep.error["field"] == "port", ep.error
        assert "gt1" not in a.run("ip", "-o", "link").stdout
    finally:
        blocker.kill()
        blocker.wait(5)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--workers", "0"], "--workers"),
        (["--workers", "65"], "--workers"),
        (["--workers", "two"], "--workers"),
        (["--nice", "-21"], "--nice"),
        (["--nice", "x"], "--nice"),
    ],
)
def test_workers_flag_is_checked(args: list[str], field: str) -> None:
    proc = subprocess.run(
        [*GDP, "up", "gt9", "--vni", "1", "--remote", "10.0.0.2", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc
    assert field in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(("line", "key"), [('workers = "two"', "workers"), ("nice = 20", "nice")])
def test_workers_config_keys_are_checked(tmp_path: Path, line: str, key: str) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'{line}\n[[tunnel]]\nname = "gt9"\nvni = 1\nremote = "10.0.0.2"\n')
    proc = subprocess.run(
        [*GDP, "up", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and key in proc.stderr, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_workers_run_at_the_configured_priority(netns_factory: Callable[[str], Netns]) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    spec = {"name": "gt0", "vni": 7, "remote": "10.0.0.2"}
    with endpoint(a, "c+offload+w2", [spec]) as ep:
        assert ep.error is None, ep.error
        nices = []
        for task in Path(f"/proc/{ep.proc.pid}/task").iterdir():
            name = (task / "comm").read_text().strip()
            nices.append((name, os.getpriority(os.PRIO_PROCESS, int(task.name))))
        workers = sorted(n for n, v in nices if n.startswith("gdp-") and v == -10)
        assert workers == ["gdp-rx0-v4-6081", "gdp-rx1-v4-6081", "gdp-tx0-v4-6081",
                           "gdp-tx1-v4-6081"], nices  # fmt: skip
        others = [v for n, v in nices if not n.startswith("gdp-")]
        assert others and set(others) == {0}, nices


SEND_FROM_PORTS = r"""
import socket, sys
frame = bytes.fromhex(sys.argv[1])
for arg in sys.argv[2:]:
    port, count = (int(x) for x in arg.split(":"))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.0.0.2", port))
    for _ in range(count):
        s.sendto(frame, ("10.0.0.1", 6081))
    s.close()
"""


@pytest.mark.parametrize("workers", [2, 3])
def test_receive_worker_is_the_source_port_modulo_the_workers(
    netns_factory: Callable[[str], Netns], workers: int
) -> None:
    """Any peer's flows land on worker (outer source port % workers): ports that differ
    in their low bits never share a worker, whatever the kernel's 4-tuple hash says.
    Each port sends its own number of datagrams, so every worker's share names the
    ports it got."""
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    spec = {"name": "gt0", "vni": 7, "remote": "10.0.0.2", "addresses": ["192.168.7.1/24"]}
    inner = ipv4_udp("192.168.7.2", "192.168.7.1", b"x" * 32)
    frame = geneve(7, 0x6558, ether(b"\xff" * 6, bytes.fromhex("020000000077"), 0x0800, inner))
    with endpoint(a, f"c+offload+w{workers}", [spec]) as ep:
        assert ep.error is None, ep.error

        def per_worker() -> list[int]:
            return list(ep.tunnel("gt0")["socket"]["rx_packets_per_worker"])

        for base in (40000, 50001, 60002):
            sends = {base + k: 1 + k for k in range(workers)}  # port: datagrams
            expect = [0] * workers
            for port, count in sends.items():
                expect[port % workers] += count
            before = per_worker()
            b.run(
                sys.executable,
                "-c",
                SEND_FROM_PORTS,
                frame.hex(),
                *(f"{p}:{n}" for p, n in sends.items()),
            )
            total = sum(before) + sum(expect)
            assert wait_for(lambda total=total: sum(per_worker()) >= total)
            gained = [x - y for x, y in zip(per_worker(), before, strict=True)]
            assert gained == expect, (base, gained, expect)


def test_transmit_sockets_take_consecutive_source_ports(
    netns_factory: Callable[[str], Netns],
) -> None:
    """A tunnel's transmit sockets hold one block of consecutive ports, so its flows
    cover every residue a receiving peer spreads by."""
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    spec = {"name": "gt0", "vni": 7, "remote": "10.0.0.2", "addresses": ["192.168.7.1/24"]}
    with endpoint(a, "c+offload", [spec]) as ep:
        assert ep.error is None, ep.error
        out = a.run("ss", "-Huan", "dst", "10.0.0.2:6081").stdout
        ports = sorted(int(ln.split()[3].rsplit(":", 1)[1]) for ln in out.splitlines() if ln)
        assert len(ports) == 8, out
        assert ports == list(range(ports[0], ports[0] + 8)), ports
