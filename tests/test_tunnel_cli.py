"""`geneve-dp up/show/stats` for real: devices in namespaces, the control socket,
teardown on SIGTERM, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from geneve_dp.control import query_all
from tests.netns import Netns, veth
from tests.ops_helpers import gdp, start

GDP = [sys.executable, "-m", "geneve_dp"]


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns]) -> Iterator[tuple[Netns, Netns]]:
    a, b = netns_factory("a"), netns_factory("b")
    veth(a, "ul0", b, "ul0")
    a.run("ip", "addr", "add", "10.99.0.1/24", "dev", "ul0")
    b.run("ip", "addr", "add", "10.99.0.2/24", "dev", "ul0")
    yield a, b


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=15)


def links(ns: Netns) -> str:
    return ns.run("ip", "-o", "link", "show").stdout


def test_up_ping_show_stats_and_sigterm(pair: tuple[Netns, Netns], run_dir: Path) -> None:
    a, b = pair
    pa = start(a, "gt0", "--vni", "77", "--remote", "10.99.0.2", "--address", "172.16.7.1/24")
    pb = start(b, "gt0", "--vni", "77", "--remote", "10.99.0.1", "--address", "172.16.7.2/24")
    try:
        assert "172.16.7.1/24" in a.run("ip", "-o", "addr", "show", "dev", "gt0").stdout
        ping = a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "172.16.7.2", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        # Like `ip link`: this namespace's tunnels by default (none here), --netns, --all.
        assert json.loads(gdp("show", "--json").stdout) == []
        only_a = json.loads(gdp("show", "--json", "--netns", a.name).stdout)
        assert [r["pid"] for r in only_a] == [pa.pid]
        show = gdp("show", "--json", "--all")
        assert show.returncode == 0, show.stderr
        rows = json.loads(show.stdout)
        assert sorted((r["name"], r["vni"], r["pid"]) for r in rows) == sorted(
            [("gt0", 77, pa.pid), ("gt0", 77, pb.pid)]
        )
        assert {str(r["remote"]) for r in rows} == {"10.99.0.1", "10.99.0.2"}
        assert all(r["mode"] == "tap" and r["port"] == 6081 and r["mtu"] == 1450 for r in rows)

        stats = gdp("stats", "gt0", "--json", "--netns", a.name)
        assert stats.returncode == 0, stats.stderr
        counters = json.loads(stats.stdout)["gt0"]
        assert counters["tx_packets"] >= 3 and counters["rx_packets"] >= 3
        one = gdp("show", "--json", "--pid", str(pb.pid))
        assert [r["remote"] for r in json.loads(one.stdout)] == ["10.99.0.1"]
        assert gdp("stats", "--pid", "1").returncode == 2  # pid 1 runs no dataplane
        human = gdp("stats", "--all")
        assert "gt0: rx" in human.stdout and "drops:" in human.stdout

        for sock in run_dir.glob("gdp-*.sock"):
            assert sock.stat().st_mode & 0o777 == 0o600
    finally:
        assert stop(pa) == 0
        assert stop(pb) == 0
    assert "gt0" not in links(a) and "gt0" not in links(b)
    assert list(run_dir.glob("gdp-*.sock")) == []


def test_second_up_with_same_name_fails_cleanly(pair: tuple[Netns, Netns], run_dir: Path) -> None:
    a, _b = pair
    first = start(a, "gt1", "--vni", "5", "--remote", "10.99.0.2")
    try:
        again = gdp("up", "--netns", a.name, "gt1", "--vni", "6", "--remote", "10.99.0.2")
        assert again.returncode == 2
        assert "gt1" in again.stderr and "already exists" in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the running one is untouched
    finally:
        assert stop(first) == 0


def test_port_in_use_leaves_nothing(pair: tuple[Netns, Netns], run_dir: Path) -> None:
    a, _b = pair
    blocker = a.popen(
        [
            sys.executable,
            "-c",
            "import socket,time; s=socket.socket(socket.AF_INET, "
            "socket.SOCK_DGRAM); s.bind(('0.0.0.0', 6081)); print('bound', flush=True); "
            "time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == "bound"
        before = links(a)
        proc = gdp("up", "--netns", a.name, "gt2", "--vni", "5", "--remote", "10.99.0.2")
        assert proc.returncode == 2, proc.stderr
        assert "port" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "another program" in proc.stderr and "ss -ulpn" in proc.stderr
        assert links(a) == before  # the device was rolled back
    finally:
        blocker.kill()
        blocker.wait()


def test_detach_and_pidfile(pair: tuple[Netns, Netns], run_dir: Path, tmp_path: Path) -> None:
    a, _b = pair
    pidfile = tmp_path / "gdp.pid"
    config = tmp_path / "t.toml"
    config.write_text(
        '[[tunnel]]\nname = "gin"\nvni = 1000\nremote = "10.99.0.2"\n'
        'addresses = ["192.168.126.1/30"]\n'
        '[[tunnel]]\nname = "gout"\nvni = 1001\nremote = "10.99.0.2"\nmode = "tun"\n'
    )
    proc = gdp(
        "up", "--netns", a.name, "--config", str(config), "--detach", "--pidfile", str(pidfile)
    )
    assert proc.returncode == 0, proc.stderr
    assert "ready" in proc.stdout
    pid = int(pidfile.read_text())
    try:
        assert "gin" in links(a) and "gout" in links(a)
        assert "192.168.126.1/30" in a.run("ip", "-o", "addr", "show", "dev", "gin").stdout
        # The daemon puts back an address someone removed (reconcile).
        a.run("ip", "addr", "del", "192.168.126.1/30", "dev", "gin")
        deadline = time.monotonic() + 10
        while "192.168.126.1/30" not in a.run("ip", "-o", "addr", "show", "dev", "gin").stdout:
            assert time.monotonic() < deadline, "address was not reconciled"
            time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not pidfile.exists()
    assert "gin" not in links(a) and "gout" not in links(a)
    # A clean stop removes its log too (just after the pidfile).
    log = run_dir / f"gdp-{pid}.log"
    deadline = time.monotonic() + 10
    while log.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not log.exists()


@pytest.mark.root  # without root, up stops at the privilege check first
def test_bad_netns_and_missing_flags(run_dir: Path) -> None:
    proc = gdp("up", "--netns", "gdp-no-such-ns", "gt3", "--vni", "1", "--remote", "10.0.0.1")
    assert proc.returncode == 2 and "--netns" in proc.stderr
    proc = gdp("up", "gt3", "--vni", "1")
    assert proc.returncode == 2 and "--remote" in proc.stderr
    proc = gdp("show", "nosuchdev")
    assert proc.returncode == 2 and "nosuchdev" in proc.stderr
    proc = gdp("show", "--netns", "gdp-no-such-ns")
    assert proc.returncode == 2 and "--netns" in proc.stderr


@pytest.mark.parametrize("flag", ["--offload", "--no-offload"])
def test_offload_flag_reaches_the_dataplane(
    pair: tuple[Netns, Netns], run_dir: Path, flag: str
) -> None:
    a, b = pair
    pa = start(a, "gt4", "--vni", "9", "--remote", "10.99.0.2", flag, "--address", "172.16.9.1/24")
    pb = start(b, "gt4", "--vni", "9", "--remote", "10.99.0.1", flag, "--address", "172.16.9.2/24")
    try:
        replies = {r["pid"]: r for r in query_all()}
        assert replies[pa.pid]["offload"] is (flag == "--offload")
        ping = a.run("ping", "-c", "2", "-i", "0.2", "-W", "2", "172.16.9.2", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        assert stop(pa) == 0
        assert stop(pb) == 0
