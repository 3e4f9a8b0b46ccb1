"""The suite's option checks, results schema, Markdown table and plots, on synthetic
results (no root, no traffic), and `geneve-dp bench` wiring."""

from __future__ import annotations

import copy
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from bench import copy_floor, report, schema, suite
from bench.scenarios import SCENARIO_IDS
from geneve_dp import cli


def udp(frame: int, kpps: float, error: str | None = None) -> dict[str, Any]:
    if error:
        return {"frame": frame, "payload": frame - 46, "error": error}
    cpu = {"dataplane_s": None, "softirq_s": 0.5, "wall_s": 1.0}
    return {
        "frame": frame,
        "payload": frame - 46,
        "sent": 1000,
        "sent_pps": kpps * 1e3,
        "received": 990,
        "delivered_pps": kpps * 1e3,
        "delivered_gbps": 0.1,
        "lost": 10,
        "loss": 0.01,
        "reordered": 0,
        "duplicates": 0,
        "send_errors": 0,
        "one_way_latency_us": {"p50": 10.0, "p99": 20.0, "p999": 30.0, "max": 40.0},
        "cpu": cpu,
        "error": None,
    }


def tcp(streams: int, gbps: float) -> dict[str, Any]:
    cpu = {"dataplane_s": None, "softirq_s": 0.5, "busy_s": 1.5, "steal_s": 0.1, "wall_s": 2.0}
    return {
        "streams": streams,
        "seconds": 2,
        "gbps": gbps,
        "sender_gbps": gbps,
        "retransmits": 0,
        "cpu": cpu,
        "error": None,
    }


def scenario(sid: str, label: str, kpps: float, gbps: float, p50: float) -> dict[str, Any]:
    cpu = {"dataplane_s": None, "softirq_s": 1.0, "wall_s": 9.0, "note": "n/a"}
    return {
        "id": sid,
        "label": label,
        "description": label,
        "kernel_path": True,
        "error": None,
        "setup_s": 0.5,
        "elapsed_s": 9.0,
        "udp": [udp(64, kpps), udp(1518, kpps / 2)],
        "tcp": [tcp(n, gbps * n) for n in (1, 4)],
        "rr": {
            "payload": 64,
            "requests": 100,
            "responses": 100,
            "timeouts": 0,
            "transactions_per_s": 1e4,
            "p50_us": p50,
            "p90_us": p50 * 1.5,
            "p99_us": p50 * 2,
            "p999_us": p50 * 3,
            "mean_us": p50,
            "max_us": p50 * 4,
            "cdf_us": [p50 * (1 + i / 100) for i in range(201)],
            "cpu": cpu,
            "error": None,
        },
        "pdr": {
            "frame": 64,
            "payload": 18,
            "loss_threshold": 0.001,
            "pps": kpps * 500,
            "probes": [{"rate": kpps * 500, "delivered_pps": kpps * 500, "loss": 0, "ok": True}],
            "error": None,
        },
        "cpu": cpu,
    }


def vxlan_tcp() -> list[dict[str, Any]]:
    """Kernel VXLAN TCP steps with round figures, so the bound is exact by hand:
    1 stream: 8 Gbit/s over 5 s = 5 GB for 3.5 - 0.5 = 3 CPU s, 0.6 s/GB;
    4 streams: 20 Gbit/s over 4 s = 10 GB for 12.5 - 0.5 = 12 CPU s, 1.2 s/GB."""
    one, four = tcp(1, 8.0), tcp(4, 20.0)
    one["cpu"].update(busy_s=3.5, steal_s=0.5, wall_s=5.0)
    four["cpu"].update(busy_s=12.5, steal_s=0.5, wall_s=4.0)
    return [one, four]


def floor_entry(bounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "block_bytes": 65536,
        "working_set_bytes": 64 << 20,
        "hot_s_per_gb": 0.1,
        "cold_s_per_gb": 0.25,
        "copies": 4,
        "cores": 2,
        "bounds": bounds,
        "error": None,
    }


@pytest.fixture
def results() -> dict[str, Any]:
    broken = scenario("geneve-dp-python-tap", "geneve-dp Python engine, TAP", 1, 1, 1)
    broken.update(error="setup failed: engine missing", udp=[], tcp=[], rr=None, pdr=None, cpu=None)
    return {
        "schema": schema.SCHEMA_ID,
        "started": "2026-11-24T00:00:00+00:00",
        "elapsed_s": 50.0,
        "machine": {"cores": 2, "kernel": "6.1", "cpu_model": "x", "memory_gb": 4.0},
        "parameters": {
            "quick": True,
            "frames": [64, 1518],
            "payloads": [18, 1472],
            "udp_seconds": 1,
            "tcp_seconds": 2,
            "rr_seconds": 1,
            "rr_payload": 64,
            "flows": 4,
            "burst": 32,
            "rate": 0,
            "tcp_streams": [1, 4],
        },
        "generator": {"seconds": 1, "steps": [{"frame": 64, "pps": 800e3}], "error": None},
        "copy_floor": floor_entry(copy_floor.tcp_bound(vxlan_tcp(), 0.1, 2)),
        "baseline": "vxlan",
        "scenarios": [
            scenario("veth", "bare veth", 250, 10, 20),
            scenario("vxlan", "kernel VXLAN", 125, 8, 40),
            broken,
        ],
    }


def test_results_match_schema(results: dict[str, Any]) -> None:
    assert schema.validate(results) == []


def test_schema_agrees_with_jsonschema(results: dict[str, Any]) -> None:
    # Our validator covers a subset of JSON Schema; the reference implementation, where
    # installed, must agree that the schema is well-formed and the sample valid.
    import jsonschema  # type: ignore[import-untyped]

    jsonschema.Draft202012Validator.check_schema(schema.SCHEMA)
    jsonschema.validate(results, schema.SCHEMA)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda r: r.pop("machine"), "missing 'machine'"),
        (lambda r: r["scenarios"][0]["udp"][0].update(loss=1.5), "maximum"),
        (lambda r: r["scenarios"][0]["tcp"][0].update(gbps="fast"), "expected number"),
        (lambda r: r["scenarios"][1].update(rr=[]), "oneOf"),
        (lambda r: r.update(schema="other/1"), "expected"),
        (lambda r: r["machine"].update(cores=True), "expected integer"),
        (lambda r: r["copy_floor"]["bounds"][0].pop("max_gbps"), "missing 'max_gbps'"),
        (lambda r: r["copy_floor"].update(hot_s_per_gb=-1), "minimum"),
    ],
)
def test_schema_rejects(results: dict[str, Any], mutate: Any, needle: str) -> None:
    bad = copy.deepcopy(results)
    mutate(bad)
    problems = schema.validate(bad)
    assert problems and any(needle in p for p in problems), problems


def test_markdown_has_ratios_to_vxlan_and_errors(results: dict[str, Any]) -> None:
    md = report.markdown(results)
    rows: dict[str, str] = {}
    for line in md.splitlines():
        if line.startswith("| "):  # the summary table comes first; keep its rows
            rows.setdefault(line.split("|")[1].strip(), line)
    assert "(x2.00)" in rows["bare veth"]  # 250 kpps vs 125
    assert "(x1.00)" in rows["kernel VXLAN"]
    assert "(x0.50)" in rows["bare veth"]  # rr p50 20 us vs 40 us
    assert "| 125 (x2.00) |" in rows["bare veth"]  # paced: 125 kpps vs 62.5
    assert "paced, loss <= 0.1%" in md
    assert "error" in rows["geneve-dp Python engine, TAP"]
    assert "setup failed: engine missing" in md
    assert "1518 B" in md  # the per-size table
    assert "3.2x the highest rate" in md  # generator 800 kpps vs 250


def test_failures_lists_every_error(results: dict[str, Any]) -> None:
    s = results["scenarios"][0]
    assert report.failures(s) == []
    s["udp"][1] = udp(1518, 0, error="boom")
    s["rr"]["error"] = "no responses"
    assert report.failures(s) == ["udp 1518 B: boom", "rr: no responses"]


def test_plots_written(results: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    notes = report.plots(results, tmp_path)
    assert len(notes) == 2
    for name in ("pps_vs_size.png", "latency_cdf.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_results_round_trip_through_json(results: dict[str, Any]) -> None:
    assert schema.validate(json.loads(json.dumps(results))) == []


@pytest.mark.parametrize(
    "text, frames",
    [("64", [64]), ("64,1518", [64, 1518]), ("18p,1472p", [64, 1518]), (" 100p ", [146])],
)
def test_parse_sizes(text: str, frames: list[int]) -> None:
    assert suite.parse_sizes(text) == frames


@pytest.mark.parametrize("text", ["63", "1519", "17p", "1473p", "big", ""])
def test_parse_sizes_rejects(text: str) -> None:
    with pytest.raises(suite.BenchError, match="--sizes"):
        suite.parse_sizes(text)


def test_parse_scenarios() -> None:
    assert [s.id for s in suite.parse_scenarios("vxlan,veth")] == ["veth", "vxlan"]
    with pytest.raises(suite.BenchError, match="--scenarios: unknown nope"):
        suite.parse_scenarios("veth,nope")


def test_quick_settings_are_bounded() -> None:
    args = suite.build_parser().parse_args(["--quick"])
    cfg = suite.settings(args)
    per_scenario = (
        len(cfg["frames"]) * cfg["udp_seconds"]
        + len(cfg["tcp_streams"]) * cfg["tcp_seconds"]
        + cfg["rr_seconds"]
        # interactive: each paced rate, the ping, the quiet second and the idle span
        + (len(cfg["interactive_rates"]) + 2) * cfg["interactive_seconds"]
        + 1
    )
    # Every scenario's measuring time plus setup must fit 3 minutes with room to spare.
    assert per_scenario * len(SCENARIO_IDS) <= 140


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--sizes", "10"], "--sizes: frame size 10 is outside 64..1518"),
        (["bench", "--flows", "0"], "--flows: 0 is outside 1..4096"),
        (["bench", "--udp-seconds", "100"], "--udp-seconds"),
        (["bench", "--tcp-seconds", "0"], "--tcp-seconds: 0 is outside 1..60 seconds"),
        (["bench", "--scenarios", "x"], "--scenarios: unknown x"),
    ],
)
def test_cli_errors_are_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bench_codec_passes_every_argument_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str] | None] = []
    fake = types.ModuleType("bench.codec")

    def main(argv: list[str] | None) -> int:
        seen.append(argv)
        return 0

    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.codec", fake)
    assert cli.main(["bench", "codec", "--help", "-n", "5", "x"]) == 0
    assert seen == [["--help", "-n", "5", "x"]]


def test_tcp_bound_exact() -> None:
    # Floor = kernel VXLAN's s/GB + 4 x 0.1; 2 cores / floor x 8 bits.
    one, four = copy_floor.tcp_bound(vxlan_tcp(), copy_s_per_gb=0.1, cores=2)
    assert one == {
        "streams": 1,
        "vxlan_gbps": 8.0,
        "vxlan_s_per_gb": 0.6,
        "floor_s_per_gb": 1.0,
        "max_gbps": 16.0,  # 2 / 1.0 x 8
        "max_ratio": 2.0,
        "error": None,
    }
    assert four["vxlan_s_per_gb"] == 1.2
    assert four["floor_s_per_gb"] == 1.6
    assert four["max_gbps"] == 10.0  # 2 / 1.6 x 8
    assert four["max_ratio"] == 0.5
    two_copies = copy_floor.tcp_bound(vxlan_tcp(), 0.1, cores=2, copies=2)[0]
    assert two_copies["floor_s_per_gb"] == 0.8 and two_copies["max_gbps"] == 20.0


def test_tcp_bound_skips_failed_and_unmeasured_steps() -> None:
    failed = {"streams": 4, "seconds": 2, "error": "iperf3: boom"}
    old = tcp(1, 8.0)
    del old["cpu"]["steal_s"]  # a result from before steal was recorded
    bounds = copy_floor.tcp_bound([failed, old, {**tcp(1, 8.0), "cpu": None}], 0.1, 2)
    assert [b["error"] for b in bounds] == [
        "kernel VXLAN step failed",
        "no CPU figures (busy_s, steal_s, wall_s)",
        "no CPU figures (busy_s, steal_s, wall_s)",
    ]
    assert all(b["max_gbps"] is None and b["max_ratio"] is None for b in bounds)
    assert [b["streams"] for b in bounds] == [4, 1, 1]


def test_markdown_shows_copy_floor(results: dict[str, Any]) -> None:
    md = report.markdown(results)
    line = next(x for x in md.splitlines() if x.startswith("TCP bound from copies"))
    assert "copying 64 KiB blocks costs 0.1 s/GB in cache" in line
    assert "(0.25 s/GB from a 64 MiB working set)" in line
    assert "4 more times than kernel VXLAN" in line and "2 cores carry at most" in line
    assert "16 Gbit/s with 1 stream (x2.00 kernel VXLAN; 0.6 + 0.4 = 1 s/GB)" in line
    assert "10 Gbit/s with 4 streams (x0.50 kernel VXLAN; 1.2 + 0.4 = 1.6 s/GB)" in line


def test_markdown_copy_floor_without_vxlan_or_measurement(results: dict[str, Any]) -> None:
    results["copy_floor"]["bounds"] = []
    assert "2 cores carry at most: n/a (no kernel VXLAN TCP figures" in report.markdown(results)
    results["copy_floor"].update(hot_s_per_gb=None, cold_s_per_gb=None, error="MemoryError: x")
    md = report.markdown(results)
    assert "TCP bound from copies" not in md and "- copy cost: MemoryError: x" in md
    assert schema.validate(results) == []


def test_schema_takes_results_without_copy_floor_or_steal(results: dict[str, Any]) -> None:
    del results["copy_floor"]
    for s in results["scenarios"]:
        for step in s["tcp"]:
            del step["cpu"]["steal_s"]
    assert schema.validate(results) == []
    assert "TCP bound from copies" not in report.markdown(results)


def test_suite_adds_bounds_from_the_vxlan_scenario(
    results: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        copy_floor,
        "measure_copy_cost",
        lambda: (
            {k: floor_entry([])[k] for k in ("block_bytes", "working_set_bytes")}
            | {"hot_s_per_gb": 0.1, "cold_s_per_gb": 0.25}
        ),
    )
    log: list[str] = []
    floor = suite.copy_cost(2, log.append)
    results["scenarios"][1]["tcp"] = vxlan_tcp()
    suite._add_bounds(floor, results["scenarios"], log.append)
    assert floor == floor_entry(copy_floor.tcp_bound(vxlan_tcp(), 0.1, 2))
    assert any("16.00 Gbit/s on 2 cores (x2.00 kernel VXLAN)" in x for x in log)
    no_vxlan = suite.copy_cost(2, log.append)
    suite._add_bounds(no_vxlan, results["scenarios"][:1], log.append)
    assert no_vxlan["bounds"] == []


def test_suite_copy_cost_failure_is_an_error_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> dict[str, Any]:
        raise MemoryError("no room")

    monkeypatch.setattr(copy_floor, "measure_copy_cost", boom)
    floor = suite.copy_cost(2, lambda msg: None)
    assert floor["error"] == "MemoryError: no room" and floor["hot_s_per_gb"] is None
    suite._add_bounds(floor, [{"id": "vxlan", "tcp": vxlan_tcp()}], lambda msg: None)
    assert floor["bounds"] == []
    assert schema.validate(floor, schema.COPY_FLOOR) == []


def test_sum_cpu_adds_steal() -> None:
    total = suite._sum_cpu(vxlan_tcp())
    assert total["steal_s"] == 1.0 and total["busy_s"] == 16.0


def test_measure_copy_cost_is_positive() -> None:
    # Short and small: only that it measures something sane, never how fast.
    cost = copy_floor.measure_copy_cost(block=65536, working_set=4 << 20, target_s=0.02)
    assert cost["block_bytes"] == 65536 and cost["working_set_bytes"] == 4 << 20
    for key in ("hot_s_per_gb", "cold_s_per_gb"):
        assert cost[key] > 0 and math.isfinite(cost[key])


def test_markdown_compares_authenticated_paths_with_their_twin(
    results: dict[str, Any],
) -> None:
    plain = scenario("geneve-dp-c-tap", "geneve-dp C engine, TAP", 100, 4, 30)
    authed = scenario("geneve-dp-c-tap-auth", "geneve-dp C engine, TAP, authenticated", 80, 3, 35)
    results["scenarios"] += [plain, authed]
    assert schema.validate(results) == []
    md = report.markdown(results)
    line = next(ln for ln in md.splitlines() if ln.startswith("- geneve-dp C engine, TAP, auth"))
    assert "vs geneve-dp C engine, TAP:" in line
    assert "64 B zero-loss x0.80" in line and "64 B delivered x0.80" in line
    assert "TCP 1 x0.75" in line
    assert "Authentication cost" in md


def redirect_result(error: str | None = None) -> dict[str, Any]:
    def mode(name: str, cps: float, p50: float) -> dict[str, Any]:
        return {
            "mode": name,
            "connections_per_s": cps,
            "connect_p50_us": p50,
            "connect_p99_us": p50 * 3,
            "connect_errors": 0,
            "busy_us_per_connection": 1e6 / cps,
            "transactions_per_s": 10000.0,
            "rr_p50_us": 50.0,
            "rr_p99_us": 90.0,
            "busy_us_per_transaction": 100.0,
            "error": None,
        }

    modes = [mode("uncaptured", 800, 400), mode("iptables", 200, 2000), mode("ebpf", 500, 1000)]
    return {"seconds": 1.0, "rounds": 3, "payload": 64, "modes": modes, "error": error}


def test_markdown_shows_redirect_modes_with_ratios_to_iptables(
    results: dict[str, Any],
) -> None:
    results["redirect"] = redirect_result()
    assert schema.validate(results) == []
    md = report.markdown(results)
    assert "Istio redirect modes through the ztunnel stand-in" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| captured: eBPF"))
    assert "500 (x2.50)" in row and "1000 (x0.50)" in row
    ipt = next(ln for ln in md.splitlines() if ln.startswith("| captured: iptables"))
    assert "(x" not in ipt
    results["redirect"] = {**redirect_result("RuntimeError: boom"), "modes": []}
    assert schema.validate(results) == []
    assert "redirect modes: RuntimeError: boom" in report.markdown(results)
    results["redirect"]["modes"] = [{"mode": "sideways", "error": None}]
    assert any("sideways" in p for p in schema.validate(results))


def test_redirect_is_a_scenario_name_and_on_by_default() -> None:
    assert suite.parse_scenarios("redirect") == []
    args = suite.build_parser().parse_args(["--scenarios", "veth,redirect"])
    assert suite.settings(args)["redirect"] is True
    assert suite.settings(suite.build_parser().parse_args([]))["redirect"] is True
    args = suite.build_parser().parse_args(["--scenarios", "veth"])
    assert suite.settings(args)["redirect"] is False
