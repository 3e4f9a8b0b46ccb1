"""The benchmark suite end to end, as CI runs it: every scenario, one packet size,
short steps. Checks that every scenario produced figures and that results.json matches
its schema; never a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ovs, schema
from bench.scenarios import SCENARIO_IDS

pytestmark = pytest.mark.root


def leftover_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("gdpb-")}


def test_quick_suite_every_scenario_has_figures(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    why = ovs.missing()
    if why is not None:  # the run would leave its scenario out
        pytest.fail(f"Open vSwitch is needed (.ci/setup installs it): {why}")
    before = leftover_namespaces()
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--sizes", "64",
            "--udp-seconds", "0.5", "--tcp-seconds", "1", "--rr-seconds", "0.5",
            "--interactive-seconds", "0.5",
            "--out", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert schema.validate(results) == []
    assert [s["id"] for s in results["scenarios"]] == SCENARIO_IDS
    for s in results["scenarios"]:
        assert s["error"] is None, (s["id"], s["error"])
        assert [u["frame"] for u in s["udp"]] == [64]
        for step in [*s["udp"], *s["tcp"], s["rr"]]:
            assert step["error"] is None, (s["id"], step)
        assert s["udp"][0]["delivered_pps"] > 0
        assert [t["streams"] for t in s["tcp"]] == [1, 4]
        assert all(t["gbps"] > 0 for t in s["tcp"])
        assert s["rr"]["responses"] > 0 and s["rr"]["p99_us"] >= s["rr"]["p50_us"] > 0
        assert isinstance(s["udp"][0]["kernel_drops"], dict)
        # Interactive traffic: each paced rate and the ping answered, in order; the idle
        # CPU is the dataplane's (none for kernel paths).
        inter = s["interactive"]
        assert inter["error"] is None, (s["id"], inter)
        assert [x["rate"] for x in inter["rr"]] == [50, 1000]
        for m in [*inter["rr"], inter["ping"]]:
            assert m["p999_us"] >= m["p99_us"] >= m["p50_us"] > 0, (s["id"], m)
        assert inter["rr"][0]["responses"] <= inter["rr"][1]["responses"]
        assert (inter["idle_cpu"]["core_pct"] is None) == s["kernel_path"], inter["idle_cpu"]
        if s["kernel_path"]:
            assert s["cpu"]["dataplane_s"] is None
            assert s["dataplane_counters"] is None
        else:
            assert s["cpu"]["dataplane_s"] > 0
            # geneve-dp's own counters from both endpoints; the TAP wire keeps none.
            want = {"a", "b"} if s["id"].startswith("geneve-dp") else None
            counters = s["dataplane_counters"]
            assert (set(counters) if counters is not None else None) == want, counters
    assert results["generator"]["error"] is None
    # Istio's two redirect modes through the ztunnel stand-in, and the floor.
    red = results["redirect"]
    assert red["error"] is None, red["error"]
    assert [m["mode"] for m in red["modes"]] == ["uncaptured", "iptables", "ebpf"]
    for m in red["modes"]:
        assert m["connections_per_s"] > 0 and m["transactions_per_s"] > 0, m
    assert "| captured: eBPF" in proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One progress line per step, the table on stdout, the files beside the JSON.
    assert proc.stderr.count("udp   64 B frame") == len(SCENARIO_IDS)
    assert "| kernel VXLAN |" in proc.stdout
    assert "Interactive traffic" in proc.stdout
    for name in ("results.md", "pps_vs_size.png", "latency_cdf.png"):
        assert (tmp_path / name).stat().st_size > 0
    # Everything the suite created is gone again.
    assert leftover_namespaces() <= before
