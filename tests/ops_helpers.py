"""Shared by the operability tests (metrics, stats --watch, capture, logs, deploy):
two namespaces joined by a veth, `geneve-dp up` endpoints in them, crafted packets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.endpoint_helpers import geneve, option, send_udp
from tests.netns import Netns, veth

GDP = [sys.executable, "-m", "geneve_dp"]
A_UL, B_UL = "10.98.0.1", "10.98.0.2"
A_IN, B_IN = "172.16.8.1", "172.16.8.2"


def make_pair(netns_factory: Callable[[str], Netns]) -> tuple[Netns, Netns]:
    a, b = netns_factory("a"), netns_factory("b")
    for ns in (a, b):
        # No IPv6 on the tunnel devices: their router solicitations and MLD reports
        # would be extra frames in captures and rates that count packets exactly.
        ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    veth(a, "ul0", b, "ul0")
    a.run("ip", "addr", "add", f"{A_UL}/24", "dev", "ul0")
    b.run("ip", "addr", "add", f"{B_UL}/24", "dev", "ul0")
    return a, b


def use_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private run directory, so `show --all` sees only this test's daemons."""
    path = tmp_path / "run"
    monkeypatch.setenv("GENEVE_DP_RUN_DIR", str(path))
    monkeypatch.delenv("GENEVE_DP_LOG_FORMAT", raising=False)
    return path


def gdp(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GDP, *args], capture_output=True, text=True, timeout=timeout)


def start(ns: Netns, *args: str) -> subprocess.Popen[str]:
    """`geneve-dp up` in the foreground in ``ns``; returns once it printed "ready"."""
    proc = subprocess.Popen(
        [*GDP, "up", "--netns", ns.name, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        pytest.fail(f"up did not get ready: {line!r} {err}")
    return proc


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM; the exit code and what it wrote on stderr."""
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=15)
    return proc.returncode, err


@contextmanager
def tunnel_pair(
    a: Netns, b: Netns, *extra_a: str, mode: str = "tap", vni: int = 77
) -> Iterator[tuple[subprocess.Popen[str], subprocess.Popen[str]]]:
    """gt0 in a (A_IN) and b (B_IN) over the veth; both stopped at the end."""
    common = ["gt0", "--vni", str(vni), "--mode", mode]
    pa = start(a, *common, "--remote", B_UL, "--address", f"{A_IN}/24", *extra_a)
    try:
        pb = start(b, *common, "--remote", A_UL, "--address", f"{B_IN}/24")
    except BaseException:
        stop(pa)
        raise
    try:
        yield pa, pb
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                stop(p)


def ping(ns: Netns, dst: str, count: int, interval: float = 0.1) -> None:
    proc = ns.run("ping", "-c", str(count), "-i", str(interval), "-W", "2", dst, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def send_bad(ns: Netns, src: str, dst: str, n: int, vni: int = 77, why: str = "critical") -> None:
    """``n`` GENEVE packets the receiver must drop: a critical option it does not know
    (counted on the tunnel), or ``why="vni"``: a VNI nobody has (counted on the socket)."""
    if why == "critical":
        pkt = geneve(vni, 0x6558, b"\0" * 60, options=option(0x0102, 0x80), critical=True)
    else:
        pkt = geneve(vni + 1000, 0x6558, b"\0" * 60)
    send_udp(ns, [(src, dst, 6081, 0, pkt)] * n)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
