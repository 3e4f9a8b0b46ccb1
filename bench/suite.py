"""The benchmark suite: every scenario, the same steps, one run, ratios to kernel VXLAN.

Steps per scenario: UDP packets per second delivered (and loss) at each packet size,
TCP throughput with iperf3 (1 and 4 streams), request/response round-trip latency, and
the CPU time the forwarding took. One progress line per step goes to stderr; the
results go to a directory as results.json, results.md and two PNG plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import copy_floor, pktgen, redirect, report, schema
from .netenv import (
    BlackholeNetns,
    busy_seconds,
    cpu_seconds,
    drop_counters,
    process_tree,
    remove_stale,
    rss_kib,
    sh,
    softirq_seconds,
    steal_seconds,
)
from .pktgen import Json
from .scenarios import SCENARIO_IDS, Scenario, all_scenarios
from .scenarios import Path as NetPath

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_FRAMES = [64, 128, 256, 512, 1024, 1280, 1518]
QUICK_FRAMES = [64, 1518]
IPERF_PORT = 5201
# Interactive traffic: paced request/response rates (one request at a time, the path
# idle in between) and the ping interval.
INTERACTIVE_RATES = (50, 1000)
PING_INTERVAL_MS = 20
# Partial drop rate search: loss allowed, number of bisection probes.
PDR_LOSS = 0.001
PDR_PROBES = 7


# Not a path like the scenarios: Istio's two redirect designs through the ztunnel
# stand-in (bench/redirect.py), selected by this name in --scenarios.
REDIRECT_ID = "redirect"


class BenchError(Exception):
    """Bad suite options (the CLI turns this into a one-line error, exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer sizes and shorter steps: the whole suite in about 3 minutes (full: about "
        "11 minutes)",
    )
    p.add_argument(
        "--scenarios",
        metavar="LIST",
        help=f"comma-separated subset of: {', '.join(SCENARIO_IDS)}, {REDIRECT_ID} (default: all)",
    )
    p.add_argument(
        "--sizes",
        metavar="LIST",
        help=(
            "comma-separated packet sizes: whole Ethernet frames 64..1518 (with FCS), or "
            "UDP payloads 18..1472 written as e.g. 100p (default: "
            f"{','.join(map(str, FULL_FRAMES))}; --quick: {','.join(map(str, QUICK_FRAMES))})"
        ),
    )
    p.add_argument("--udp-seconds", type=float, metavar="S", help="per packet size (3; quick 1)")
    # iperf3 takes whole seconds only (and reads 0 as "forever").
    p.add_argument(
        "--tcp-seconds", type=int, metavar="S", help="per iperf3 run, whole seconds (5; quick 2)"
    )
    p.add_argument("--rr-seconds", type=float, metavar="S", help="request/response (3; quick 0.5)")
    p.add_argument(
        "--interactive-seconds",
        type=float,
        metavar="S",
        help="each paced request/response rate, the 20 ms ping and the idle CPU (3; quick 1)",
    )
    p.add_argument("--flows", type=int, default=4, help="UDP flows (source ports), 1..4096 (4)")
    p.add_argument("--burst", type=int, default=32, help="packets per sendmmsg, 1..1024 (32)")
    p.add_argument("--rate", type=float, default=0, help="offered UDP packets/s, 0 = unlimited (0)")
    p.add_argument(
        "--streams",
        default="1,4",
        metavar="LIST",
        help="iperf3 parallel stream counts (1,4)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="results directory (default: bench/results/<UTC time>)",
    )
    p.add_argument(
        "--generator",
        choices=("socket", "raw"),
        default="socket",
        help=(
            "UDP packets through a UDP socket (socket, default), or whole frames written "
            "to the tunnel device with AF_PACKET and PACKET_QDISC_BYPASS (raw)"
        ),
    )
    p.add_argument(
        "--pdr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "search the highest offered rate of the smallest size that loses at most "
            "0.1%% (on by default, off with --quick)"
        ),
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def parse_sizes(text: str) -> list[int]:
    """Sizes as frame sizes; ``NNNp`` means a UDP payload of NNN bytes."""
    frames = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            if item.endswith("p"):
                payload = int(item[:-1])
                if not pktgen.MIN_PAYLOAD <= payload <= pktgen.MAX_PAYLOAD:
                    raise BenchError(
                        f"--sizes: payload {payload} is outside "
                        f"{pktgen.MIN_PAYLOAD}..{pktgen.MAX_PAYLOAD}"
                    )
                frames.append(pktgen.frame_for_payload(payload))
            else:
                frame = int(item)
                if not pktgen.MIN_FRAME <= frame <= pktgen.MAX_FRAME:
                    raise BenchError(
                        f"--sizes: frame size {frame} is outside "
                        f"{pktgen.MIN_FRAME}..{pktgen.MAX_FRAME} (or give a payload as NNNp)"
                    )
                frames.append(frame)
        except ValueError:
            raise BenchError(
                f"--sizes: {item!r} is not a number (frame) or NNNp (payload)"
            ) from None
    if not frames:
        raise BenchError("--sizes: give at least one size")
    return frames


def parse_scenarios(text: str | None, log: Callable[[str], None] | None = None) -> list[Scenario]:
    """The scenarios asked for; by default every one this machine can run (the others
    are named through ``log``), and one asked for by name that cannot run is an error."""
    every = all_scenarios()
    if not text:
        runnable = []
        for s in every:
            why = s.missing()
            if why is None:
                runnable.append(s)
            elif log is not None:
                log(f"{s.id}: left out, {why}")
        return runnable
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in (*SCENARIO_IDS, REDIRECT_ID)]
    if unknown or not wanted:
        raise BenchError(
            f"--scenarios: unknown {', '.join(unknown) or '(empty)'}; "
            f"choose from {', '.join(SCENARIO_IDS)}, {REDIRECT_ID}"
        )
    chosen = [s for s in every if s.id in wanted]
    for s in chosen:
        why = s.missing()
        if why is not None:
            raise BenchError(f"--scenarios: {s.id} cannot run here: {why}")
    return chosen


def settings(args: argparse.Namespace) -> Json:
    quick = bool(args.quick)

    def positive(name: str, value: float | None, default: float) -> float:
        v = default if value is None else value
        low = 1 if name == "tcp-seconds" else 0.1
        if not low <= v <= 60:
            raise BenchError(f"--{name}: {v} is outside {low:g}..60 seconds")
        return float(v)

    if not 1 <= args.flows <= 4096:
        raise BenchError(f"--flows: {args.flows} is outside 1..4096")
    if not 1 <= args.burst <= 1024:
        raise BenchError(f"--burst: {args.burst} is outside 1..1024")
    if args.rate < 0:
        raise BenchError("--rate: must be 0 (unlimited) or a positive packets/s")
    try:
        streams = [int(s) for s in args.streams.split(",")]
    except ValueError:
        raise BenchError(f"--streams: {args.streams!r} is not a list of numbers") from None
    if not streams or any(not 1 <= s <= 16 for s in streams):
        raise BenchError("--streams: each count must be 1..16")
    frames = parse_sizes(args.sizes) if args.sizes else (QUICK_FRAMES if quick else FULL_FRAMES)
    return {
        "quick": quick,
        "frames": frames,
        "payloads": [pktgen.payload_for_frame(f) for f in frames],
        "udp_seconds": positive("udp-seconds", args.udp_seconds, 1 if quick else 3),
        "tcp_seconds": int(positive("tcp-seconds", args.tcp_seconds, 2 if quick else 5)),
        "rr_seconds": positive("rr-seconds", args.rr_seconds, 0.5 if quick else 3),
        "rr_payload": 64,
        "interactive_seconds": positive(
            "interactive-seconds", args.interactive_seconds, 1 if quick else 3
        ),
        "interactive_rates": list(INTERACTIVE_RATES),
        "ping_interval_ms": PING_INTERVAL_MS,
        "flows": args.flows,
        "burst": args.burst,
        "rate": args.rate,
        "tcp_streams": streams,
        "generator": args.generator,
        "pdr": (not quick) if args.pdr is None else bool(args.pdr),
        "pdr_loss": PDR_LOSS,
        "pdr_probes": PDR_PROBES,
        "redirect": not args.scenarios
        or REDIRECT_ID in [s.strip() for s in args.scenarios.split(",")],
    }


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def machine() -> Json:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    iperf = shutil.which("iperf3")
    iperf_version = ""
    if iperf:
        out = subprocess.run([iperf, "--version"], capture_output=True, text=True).stdout
        iperf_version = out.splitlines()[0] if out else ""
    return {
        # Other work on the machine skews every figure; the load says how much there was.
        "loadavg": loadavg(),
        "cores": os.cpu_count() or 0,
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": iperf_version,
    }


class Progress:
    def __init__(self, stream: Any = None) -> None:
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {msg}", file=self.stream, flush=True)


class CpuMeter:
    """CPU time spent during one step: the dataplane processes' own (user + system,
    all threads, children included) and system-wide softirq, busy and steal time."""

    def __init__(self, path: NetPath) -> None:
        self.pids = [p for pid in path.dataplane_pids for p in process_tree(pid)]
        self.proc0 = cpu_seconds(self.pids)
        self.soft0 = softirq_seconds()
        self.busy0 = busy_seconds()
        self.steal0 = steal_seconds()
        self.wall0 = time.monotonic()

    def read(self) -> Json:
        return {
            "dataplane_s": round(cpu_seconds(self.pids) - self.proc0, 3) if self.pids else None,
            "softirq_s": round(softirq_seconds() - self.soft0, 3),
            "busy_s": round(busy_seconds() - self.busy0, 3),
            # Inside busy_s: what the hypervisor gave to others while we wanted the CPU.
            "steal_s": round(steal_seconds() - self.steal0, 3),
            "wall_s": round(time.monotonic() - self.wall0, 3),
            "rss_kib": rss_kib(self.pids, "VmRSS") if self.pids else None,
            "peak_rss_kib": rss_kib(self.pids, "VmHWM") if self.pids else None,
        }


def _raw(path: NetPath, cfg: Json) -> pktgen.RawFrames | None:
    if cfg["generator"] != "raw":
        return None
    return pktgen.RawFrames(path.src_dev, path.src_ip, path.dst_mac())


def _drops(path: NetPath) -> dict[str, int]:
    a = {f"a.{k}": v for k, v in drop_counters(path.src_ns).items()}
    b = {f"b.{k}": v for k, v in drop_counters(path.dst_ns).items()}
    return {**a, **b}


def _udp_step(path: NetPath, cfg: Json, frame: int) -> Json:
    payload = pktgen.payload_for_frame(frame)
    raw = _raw(path, cfg)
    drops0 = _drops(path)
    meter = CpuMeter(path)
    r = pktgen.udp_stream(
        path.src_ns,
        path.dst_ns,
        path.dst_ip,
        payload=payload,
        flows=cfg["flows"],
        rate=cfg["rate"],
        duration=cfg["udp_seconds"],
        burst=cfg["burst"],
        raw=raw,
    )
    cpu = meter.read()
    drops1 = _drops(path)
    sent, sink = r["send"], r["sink"]
    lat = sink["latency_ns"]
    return {
        "frame": frame,
        "payload": payload,
        "sent": sent["sent_packets"],
        "sent_pps": round(sent["pps"], 1),
        "received": sink["valid_packets"],
        # Delivered rate over the sender's active time: what got through per second
        # of offered load (the sink's own span would flatter a path that trickles out
        # a backlog after the sender stopped).
        "delivered_pps": round(sink["valid_packets"] / sent["elapsed_s"], 1)
        if sent["elapsed_s"] > 0
        else 0.0,
        "delivered_gbps": round(sink["received_bytes"] * 8 / sent["elapsed_s"] / 1e9, 4)
        if sent["elapsed_s"] > 0
        else 0.0,
        "lost": r["lost"],
        "loss": round(r["loss"], 6),
        "reordered": sink["reordered"],
        "duplicates": sink["duplicates"],
        "send_errors": sent["errors"],
        # Where the lost packets went, by the kernel's counters in both namespaces
        # (only the ones that moved): a.* is the sender's side, b.* the receiver's.
        "kernel_drops": {
            k: v - drops0.get(k, 0) for k, v in drops1.items() if v != drops0.get(k, 0)
        },
        "one_way_latency_us": {
            k: round(lat[k] / 1000, 1) for k in ("p50", "p99", "p999", "max") if k in lat
        },
        "cpu": cpu,
        "error": None,
    }


def _pdr_step(path: NetPath, cfg: Json, unpaced: Json) -> Json:
    """The highest offered rate losing at most PDR_LOSS, by bisection below the
    generator's unpaced rate on this path.

    Needed beside the unpaced figure because on 2 cores an unpaced generator takes a
    whole core from a userspace dataplane; paced, it leaves the dataplane its CPU, and
    the figure becomes what the path carries without loss. A kernel path does its work
    inside the generator's own send calls, so it paces the generator by itself: when the
    unpaced run already lost no more than the threshold, its delivered rate is the
    answer (asking for more could only measure the generator).
    """
    frame, payload = unpaced["frame"], unpaced["payload"]
    out: Json = {
        "frame": frame,
        "payload": payload,
        "loss_threshold": cfg["pdr_loss"],
        "pps": unpaced["delivered_pps"],
        "probes": [],
        "error": None,
    }
    if unpaced["loss"] <= cfg["pdr_loss"]:
        out["note"] = "the unpaced run was already within the loss threshold"
        return out
    seconds = min(1.0, cfg["udp_seconds"])
    raw = _raw(path, cfg)
    lo, hi = 0.0, float(unpaced["sent_pps"])
    probes = out["probes"]
    for _ in range(cfg["pdr_probes"]):
        rate = (lo + hi) / 2
        r = pktgen.udp_stream(
            path.src_ns,
            path.dst_ns,
            path.dst_ip,
            payload=payload,
            flows=cfg["flows"],
            rate=rate,
            duration=seconds,
            burst=cfg["burst"],
            raw=raw,
        )
        elapsed = r["send"]["elapsed_s"]
        delivered = r["sink"]["valid_packets"] / elapsed if elapsed > 0 else 0.0
        # The generator falling short of the asked rate counts as a miss too: then the
        # rate was not offered, so it cannot be claimed.
        offered_ok = r["send"]["pps"] >= 0.97 * rate
        ok = offered_ok and r["loss"] <= cfg["pdr_loss"]
        probes.append(
            {
                "rate": round(rate, 1),
                "sent_pps": round(r["send"]["pps"], 1),
                "delivered_pps": round(delivered, 1),
                "loss": round(r["loss"], 6),
                "ok": ok,
            }
        )
        lo, hi = (rate, hi) if ok else (lo, rate)
    out["pps"] = round(lo, 1)
    return out


def _iperf_step(path: NetPath, cfg: Json, streams: int) -> Json:
    seconds = cfg["tcp_seconds"]
    server = subprocess.Popen(
        ["ip", "netns", "exec", path.dst_ns, "iperf3", "-s", "-1", "-B", path.dst_ip,
         "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # Wait until it listens; a client started earlier just fails to connect.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            out = sh(
                "ip", "netns", "exec", path.dst_ns, "ss", "-Hltn", f"sport = :{IPERF_PORT}",
                check=False,
            ).stdout  # fmt: skip
            if out.strip():
                break
            if server.poll() is not None:
                raise RuntimeError(f"iperf3 server exited: {server.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.05)
        meter = CpuMeter(path)
        client = subprocess.run(
            ["ip", "netns", "exec", path.src_ns, "iperf3", "-c", path.dst_ip,
             "-p", str(IPERF_PORT), "-t", str(seconds), "-P", str(streams), "--json",
             "--connect-timeout", "3000"],
            capture_output=True,
            text=True,
            timeout=seconds + 20,
        )  # fmt: skip
        cpu = meter.read()
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    try:
        data = json.loads(client.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 gave no JSON: {client.stderr.strip()[-300:]!r}") from None
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    return {
        "streams": streams,
        "seconds": seconds,
        "gbps": round(end["sum_received"]["bits_per_second"] / 1e9, 4),
        "sender_gbps": round(end["sum_sent"]["bits_per_second"] / 1e9, 4),
        "bytes": int(end["sum_received"]["bytes"]),
        "retransmits": int(end["sum_sent"].get("retransmits", 0)),
        "cpu": cpu,
        "error": None,
    }


def _rr_step(path: NetPath, cfg: Json) -> Json:
    meter = CpuMeter(path)
    r = pktgen.request_response(
        path.src_ns,
        path.dst_ns,
        path.dst_ip,
        payload=cfg["rr_payload"],
        duration=cfg["rr_seconds"],
    )
    cpu = meter.read()
    lat = r["latency_ns"]
    if not r["responses"]:
        raise RuntimeError(f"no responses to {r['requests']} requests")
    return {
        "payload": cfg["rr_payload"],
        "requests": r["requests"],
        "responses": r["responses"],
        "timeouts": r["timeouts"],
        "transactions_per_s": round(r["responses"] / r["elapsed_s"], 1),
        "p50_us": round(lat["p50"] / 1000, 2),
        "p90_us": round(lat["p90"] / 1000, 2),
        "p99_us": round(lat["p99"] / 1000, 2),
        "p999_us": round(lat["p999"] / 1000, 2),
        "mean_us": round(lat["mean"] / 1000, 2),
        "max_us": round(lat["max"] / 1000, 2),
        "cdf_us": [round(v / 1000, 2) for v in r["cdf_ns"]],
        "cpu": cpu,
        "error": None,
    }


def _percentiles_us(samples_us: list[float]) -> Json:
    """p50/p99/p99.9/max of round-trip samples (nearest rank), in µs."""
    xs = sorted(samples_us)

    def rank(q: float) -> float:
        return round(xs[min(len(xs) - 1, max(0, int(q * len(xs) + 0.5) - 1))], 1)

    return {"p50_us": rank(0.5), "p99_us": rank(0.99), "p999_us": rank(0.999),
            "max_us": round(xs[-1], 1)}  # fmt: skip


def _ping(path: NetPath, seconds: float) -> Json:
    """ICMP echo every PING_INTERVAL_MS (answered by the peer's kernel, no process
    woken there), round trips from ping's own per-reply times."""
    count = max(2, int(seconds * 1000 / PING_INTERVAL_MS))
    r = sh(
        "ip", "netns", "exec", path.src_ns, "ping", "-n", "-i", f"{PING_INTERVAL_MS / 1000:g}",
        "-c", str(count), "-W", "1", "-s", "56", path.dst_ip,
        check=False, timeout=seconds * 3 + 20,
    )  # fmt: skip
    times = [float(m) * 1000 for m in re.findall(r"time=([0-9.]+) ms", r.stdout)]
    if not times:
        raise RuntimeError(f"no ping replies: {(r.stderr or r.stdout).strip()[-200:]!r}")
    return {"interval_ms": PING_INTERVAL_MS, "sent": count, "received": len(times),
            **_percentiles_us(times), "error": None}  # fmt: skip


def _interactive_step(path: NetPath, cfg: Json) -> Json:
    """Interactive traffic, the path idle between packets: paced request/response at
    each rate and a ping every PING_INTERVAL_MS (round-trip percentiles), then the CPU
    the dataplane takes with no traffic at all."""
    seconds = cfg["interactive_seconds"]
    out: Json = {"seconds": seconds, "rr": [], "ping": None, "idle_cpu": None, "error": None}
    for rate in cfg["interactive_rates"]:
        r = pktgen.request_response(
            path.src_ns, path.dst_ns, path.dst_ip, payload=cfg["rr_payload"],
            duration=seconds, rate=rate,
        )  # fmt: skip
        if not r["responses"]:
            raise RuntimeError(f"no responses to {r['requests']} requests at {rate}/s")
        lat = r["latency_ns"]
        out["rr"].append(
            {
                "rate": rate,
                "requests": r["requests"],
                "responses": r["responses"],
                "timeouts": r["timeouts"],
                "p50_us": round(lat["p50"] / 1000, 1),
                "p99_us": round(lat["p99"] / 1000, 1),
                "p999_us": round(lat["p999"] / 1000, 1),
                "max_us": round(lat["max"] / 1000, 1),
                "error": None,
            }
        )
    out["ping"] = _ping(path, seconds)
    # Idle: after the last packet, nothing at all for a while (a busy-poll window
    # after traffic ends within it), then the CPU of the same span without traffic.
    time.sleep(min(1.0, seconds))
    meter = CpuMeter(path)
    time.sleep(seconds)
    cpu = meter.read()
    dp = cpu["dataplane_s"]
    out["idle_cpu"] = {
        "wall_s": cpu["wall_s"],
        "dataplane_s": dp,
        "core_pct": round(100 * dp / cpu["wall_s"], 3) if dp is not None else None,
    }
    return out


def generator_ceiling(cfg: Json, log: Progress) -> Json:
    """Packets per second the generator alone sustains at each size (see
    BlackholeNetns): if every path delivers well below this, the generator was not
    what limited it."""
    seconds = min(1.0, cfg["udp_seconds"])
    out: Json = {"seconds": seconds, "steps": [], "error": None}
    try:
        with BlackholeNetns() as ns:
            for frame in cfg["frames"]:
                r = pktgen.run(
                    "send",
                    ns.name,
                    dst=ns.dst_ip,
                    port=9,
                    size=pktgen.payload_for_frame(frame),
                    flows=cfg["flows"],
                    burst=cfg["burst"],
                    duration=seconds,
                    sport=20000,
                    ifname=ns.ifname if cfg["generator"] == "raw" else None,
                    src=ns.src_ip if cfg["generator"] == "raw" else None,
                    dst_mac=ns.dst_mac if cfg["generator"] == "raw" else None,
                )
                if not r["sent_packets"]:
                    raise RuntimeError(f"the generator sent nothing ({r['errors']} errors)")
                out["steps"].append({"frame": frame, "pps": round(r["pps"], 1)})
                log(f"generator alone, {frame:>4} B frame: {r['pps'] / 1e3:8.1f} kpps")
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"generator ceiling: ERROR {out['error']}")
    return out


def copy_cost(cores: int, log: Callable[[str], None]) -> Json:
    """The CPU cost of copying 64 KiB blocks, once per run (see bench/copy_floor.py);
    the bounds are added once the kernel VXLAN scenario has run."""
    out: Json = {
        "block_bytes": None,
        "working_set_bytes": None,
        "hot_s_per_gb": None,
        "cold_s_per_gb": None,
        "copies": copy_floor.COPIES,
        "cores": cores,
        "bounds": [],
        "error": None,
    }
    try:
        out.update(copy_floor.measure_copy_cost())
        log(
            f"copy cost, {out['block_bytes'] // 1024} KiB blocks: {out['hot_s_per_gb']:.4f} "
            f"s/GB in cache, {out['cold_s_per_gb']:.4f} s/GB from "
            f"{out['working_set_bytes'] >> 20} MiB"
        )
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"copy cost: ERROR {out['error']}")
    return out


def _add_bounds(floor: Json, scenarios: list[Json], log: Callable[[str], None]) -> None:
    cores = floor["cores"]
    vxlan = next((s for s in scenarios if s["id"] == "vxlan"), None)
    if vxlan is None or floor.get("hot_s_per_gb") is None:
        return
    # The in-cache cost: the cheapest copy there is, so the bound is never too low.
    floor["bounds"] = copy_floor.tcp_bound(vxlan["tcp"], floor["hot_s_per_gb"], cores)
    for b in floor["bounds"]:
        if b["error"] is None:
            log(
                f"TCP bound from copies, {b['streams']} stream(s): at most "
                f"{b['max_gbps']:.2f} Gbit/s on {cores} cores (x{b['max_ratio']:.2f} "
                "kernel VXLAN)"
            )


def _sum_cpu(steps: list[Json]) -> Json:
    cpus = [step["cpu"] for step in steps if step and step.get("cpu")]
    dataplane = [c["dataplane_s"] for c in cpus if c["dataplane_s"] is not None]
    peaks = [c["peak_rss_kib"] for c in cpus if c.get("peak_rss_kib") is not None]
    return {
        "dataplane_s": round(sum(dataplane), 3) if dataplane else None,
        "softirq_s": round(sum(c["softirq_s"] for c in cpus), 3),
        "busy_s": round(sum(c.get("busy_s", 0.0) for c in cpus), 3),
        "steal_s": round(sum(c.get("steal_s", 0.0) for c in cpus), 3),
        "wall_s": round(sum(c["wall_s"] for c in cpus), 3),
        "peak_rss_kib": max(peaks) if peaks else None,
    }


def _check_path(path: NetPath) -> None:
    """A few round trips before measuring: proves the path forwards, and lets ARP
    (TAP, VXLAN) resolve so the first measured packets are not queued behind it."""
    r = pktgen.request_response(
        path.src_ns, path.dst_ns, path.dst_ip, count=5, wait_ms=1000, duration=10
    )
    if not r["responses"]:
        raise RuntimeError(
            f"no connectivity: 0 of {r['requests']} probes to {path.dst_ip} answered"
        )


def _guard(
    scenario: Scenario, what: str, fn: Callable[[], Json], fallback: Json, log: Progress
) -> Json:
    """Run one step; an exception becomes an error entry, never a fake number."""
    try:
        return fn()
    except Exception as exc:
        dead = scenario.alive()
        msg = f"{type(exc).__name__}: {exc}" + (f" ({dead})" if dead else "")
        log(f"{scenario.id:<22} {what}: ERROR {msg}")
        return {**fallback, "error": msg}


def run_scenario(scenario: Scenario, cfg: Json, log: Progress, index: str) -> Json:
    entry: Json = {
        "id": scenario.id,
        "label": scenario.label,
        "description": scenario.description,
        "kernel_path": scenario.kernel_path,
        "error": None,
        "udp": [],
        "tcp": [],
        "rr": None,
        "pdr": None,
        "interactive": None,
        "cpu": None,
    }
    t0 = time.monotonic()
    log(f"{index} {scenario.id:<22} setting up: {scenario.description}")
    try:
        path = scenario.start()
    except Exception as exc:
        entry["error"] = f"setup failed: {type(exc).__name__}: {exc}"
        log(f"{index} {scenario.id:<22} ERROR {entry['error']}")
        return entry
    try:
        _check_path(path)
        entry["setup_s"] = round(time.monotonic() - t0, 2)
        for frame in cfg["frames"]:
            step = _guard(
                scenario,
                f"udp {frame} B",
                lambda frame=frame: _udp_step(path, cfg, frame),  # type: ignore[misc]
                {"frame": frame, "payload": pktgen.payload_for_frame(frame)},
                log,
            )
            entry["udp"].append(step)
            if step["error"] is None:
                log(
                    f"{index} {scenario.id:<22} udp {frame:>4} B frame: "
                    f"{step['delivered_pps'] / 1e3:8.1f} kpps delivered of "
                    f"{step['sent_pps'] / 1e3:8.1f} kpps sent, loss {step['loss']:.1%}"
                )
        small = entry["udp"][0] if entry["udp"] else None
        if cfg["pdr"] and small and small["error"] is None:
            pdr = _guard(
                scenario,
                "pdr",
                lambda: _pdr_step(path, cfg, small),
                {"frame": small["frame"], "payload": small["payload"]},
                log,
            )
            entry["pdr"] = pdr
            if pdr["error"] is None:
                log(
                    f"{index} {scenario.id:<22} udp {small['frame']:>4} B frame, paced: "
                    f"{pdr['pps'] / 1e3:8.1f} kpps with loss <= {cfg['pdr_loss']:.1%}"
                )
        for streams in cfg["tcp_streams"]:
            step = _guard(
                scenario,
                f"tcp x{streams}",
                lambda streams=streams: _iperf_step(path, cfg, streams),  # type: ignore[misc]
                {"streams": streams, "seconds": cfg["tcp_seconds"]},
                log,
            )
            entry["tcp"].append(step)
            if step["error"] is None:
                log(
                    f"{index} {scenario.id:<22} tcp {streams} stream(s): "
                    f"{step['gbps']:.3f} Gbit/s, {step['retransmits']} retransmits"
                )
        rr = _guard(
            scenario, "rr", lambda: _rr_step(path, cfg), {"payload": cfg["rr_payload"]}, log
        )
        entry["rr"] = rr
        if rr["error"] is None:
            log(
                f"{index} {scenario.id:<22} rr: p50 {rr['p50_us']:.1f} us, p99 "
                f"{rr['p99_us']:.1f} us, p99.9 {rr['p999_us']:.1f} us, "
                f"{rr['transactions_per_s']:.0f} transactions/s"
            )
        inter = _guard(
            scenario,
            "interactive",
            lambda: _interactive_step(path, cfg),
            {"seconds": cfg["interactive_seconds"], "rr": [], "ping": None, "idle_cpu": None},
            log,
        )
        entry["interactive"] = inter
        if inter["error"] is None:
            cells = [
                f"{x['rate']}/s {x['p50_us']:.0f}/{x['p99_us']:.0f}/{x['p999_us']:.0f}"
                for x in inter["rr"]
            ]
            ping, idle = inter["ping"], inter["idle_cpu"]
            cells.append(f"ping {ping['p50_us']:.0f}/{ping['p99_us']:.0f}/{ping['p999_us']:.0f}")
            if idle["core_pct"] is not None:
                cells.append(f"idle {idle['core_pct']:.2f}% of a core")
            log(f"{index} {scenario.id:<22} interactive p50/p99/p99.9 us: " + ", ".join(cells))
        # The scenario's CPU is the sum over the steps every scenario runs alike (UDP
        # sizes, TCP, request/response), so the totals compare; the paced-rate search
        # runs longer on some paths than others and is left out.
        entry["cpu"] = _sum_cpu([*entry["udp"], *entry["tcp"], entry["rr"]])
        # Where geneve-dp lost packets, by its own counters (drops by reason); a
        # failure to read them is noted, not a failed scenario.
        try:
            entry["dataplane_counters"] = scenario.counters()
        except Exception as exc:
            entry["dataplane_counters"] = {"error": f"{type(exc).__name__}: {exc}"}
        entry["cpu"]["note"] = (
            "kernel path: no dataplane process; softirq_s and busy_s (all non-idle time) "
            "are system-wide"
            if scenario.kernel_path
            else "dataplane_s: utime+stime of the dataplane processes; softirq_s and busy_s "
            "(all non-idle time) are system-wide"
        )
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
        dead = scenario.alive()
        if dead:
            entry["error"] += f" ({dead})"
        log(f"{index} {scenario.id:<22} ERROR {entry['error']}")
    finally:
        scenario.stop()
    entry["elapsed_s"] = round(time.monotonic() - t0, 2)
    return entry


def run(args: argparse.Namespace, log: Progress | None = None) -> int:
    """The suite from parsed arguments; returns the exit code (1 if a scenario failed)."""
    # Options first, so a typo is reported the same way with or without root.
    cfg = settings(args)
    log = log or Progress()
    scenarios = parse_scenarios(args.scenarios, log)
    if os.geteuid() != 0:
        raise BenchError("needs root (it creates network namespaces, veths and tunnels)")
    if shutil.which("iperf3") is None:
        raise BenchError("iperf3 is not installed (apt-get install iperf3)")
    for name in remove_stale():
        log(f"removed namespace {name} left by an earlier run")
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, through every finally that
    # stops daemons and deletes namespaces, instead of killing us mid-setup.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args, cfg, scenarios, log)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace, cfg: Json, scenarios: list[Scenario], log: Progress) -> int:
    out_dir: Path = args.out or RESULTS_DIR / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    pktgen.binary()
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    log(
        f"geneve-dp bench{' --quick' if cfg['quick'] else ''}: {len(scenarios)} scenarios, "
        f"frames {cfg['frames']}, results in {out_dir}"
    )
    results: Json = {
        "schema": schema.SCHEMA_ID,
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "parameters": cfg,
        "baseline": "vxlan",
        "scenarios": [],
    }
    results["generator"] = generator_ceiling(cfg, log)
    results["copy_floor"] = copy_cost(results["machine"]["cores"], log)
    for i, scenario in enumerate(scenarios, 1):
        results["scenarios"].append(run_scenario(scenario, cfg, log, f"{i}/{len(scenarios)}"))
    _add_bounds(results["copy_floor"], results["scenarios"], log)
    if cfg["redirect"]:
        results["redirect"] = redirect.measure(cfg, log)
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["machine"]["loadavg_end"] = loadavg()
    problems = schema.validate(results)
    if problems:
        # A bug in this suite, not in the path under test: say so loudly, keep the file.
        log("results do not match the schema: " + "; ".join(problems[:5]))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = report.markdown(results)
    (out_dir / "results.md").write_text(markdown)
    if not args.no_plots:
        for note in report.plots(results, out_dir):
            log(note)
    log(f"done in {results['elapsed_s']:.0f} s: {out_dir / 'results.json'}")
    print(markdown)
    failed = [s["id"] for s in results["scenarios"] if report.failures(s)]
    if (results.get("redirect") or {}).get("error"):
        failed.append(REDIRECT_ID)
    return 1 if failed or problems else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
