"""A running endpoint daemon leaves no garbage in reference cycles.

Such garbage is freed only by the cycle collector's full pass, which CPython runs
rarely; a daemon that makes some every few seconds grows until then (the watchers'
slow RSS slope, tests/test_watch_memory.py). The daemon here runs with
gc.DEBUG_SAVEALL, so every object a collection finds unreachable is kept and counted:
after a warm-up, over two of its injection probes (each opened a packet socket through
a fresh ctypes.CDLL: 13 objects in a cycle), ping traffic through the tunnel, /metrics
scrapes and `show --all`, it must find none. Counted, not timed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from geneve_dp.dataplane.inject import PROBE_INTERVAL
from tests.netns import Netns
from tests.ops_helpers import A_UL, B_IN, B_UL, gdp, ping, start, stop

pytestmark = pytest.mark.root

# Runs `geneve-dp up ...` in this process; SIGUSR2 writes what the cycle collector
# found since the previous SIGUSR2 (the first one marks the start) as a JSON line.
WRAPPER = r"""
import collections, gc, json, runpy, signal, sys, weakref
gc.set_debug(gc.DEBUG_SAVEALL)
report, seen = open(sys.argv[1], "a"), [0]
def count(*_):
    gc.collect()
    new = [o for o in gc.garbage[seen[0]:] if not isinstance(o, weakref.ProxyTypes)]
    seen[0] = len(gc.garbage)
    kinds = collections.Counter(type(o).__qualname__ for o in new).most_common(8)
    report.write(json.dumps({"objects": len(new), "kinds": kinds}) + "\n")
    report.flush()
signal.signal(signal.SIGUSR2, count)
sys.argv = ["geneve_dp", *sys.argv[2:]]
runpy.run_module("geneve_dp", run_name="__main__")
"""
METRICS_PORT = 19471


def _counted(proc: subprocess.Popen[str], report: Path, n: int) -> dict[str, object]:
    proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = report.read_text().splitlines() if report.exists() else []
        if len(lines) >= n:
            return dict(json.loads(lines[n - 1]))
        time.sleep(0.05)
    pytest.fail("the daemon did not report its garbage")


def test_running_daemon_leaves_no_cycles(pair: tuple[Netns, Netns], tmp_path: Path) -> None:
    a, b = pair
    report = tmp_path / "garbage.jsonl"
    common = ["gt0", "--vni", "77", "--mode", "tap"]
    argv = a.argv(
        "python3", "-c", WRAPPER, str(report), "up", *common, "--remote", B_UL,
        "--address", "172.16.8.1/24", "--metrics-addr", f"{A_UL}:{METRICS_PORT}",
    )  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert proc.stdout is not None and "ready" in proc.stdout.readline()
        pb = start(b, *common, "--remote", A_UL, "--address", f"{B_IN}/24")
        try:
            ping(a, B_IN, 5, 0.1)  # warm-up: first packets, first lookups, first probe
            time.sleep(1)
            _counted(proc, report, 1)
            t0 = time.monotonic()
            ping(a, B_IN, 20, 0.1)
            for _ in range(3):
                metrics = f"http://{A_UL}:{METRICS_PORT}/metrics"
                a.run(
                    "python3",
                    "-c",
                    f"import urllib.request; urllib.request.urlopen({metrics!r}).read()",
                )
                assert gdp("show", "--all").returncode == 0
            # Two probes at least (one every PROBE_INTERVAL) between the counts.
            time.sleep(max(0.0, 2 * PROBE_INTERVAL + 1 - (time.monotonic() - t0)))
            found = _counted(proc, report, 2)
        finally:
            stop(pb)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert found["objects"] == 0, f"objects in cycles: {found}"
