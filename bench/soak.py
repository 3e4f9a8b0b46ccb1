"""Soak: a long run at a fixed fraction of the measured maximum rate through two
`geneve-dp up` daemons, watching what must not drift.

    python -m bench.soak --minutes 10            # the issue's run (80% of max)
    python -m bench.soak --seconds 30            # what CI runs (tests/test_soak.py)

Two namespaces joined by a veth; a C-engine TAP tunnel in each. First a short full-rate
probe measures the most the tunnel delivers; then bench/pktgen sends UDP through the
tunnel at ``fraction`` of that for the whole run while the daemons are sampled: RSS,
open file descriptors, threads, counters. At the end every packet the generator sent
and the sink did not receive must be accounted for by a drop counter somewhere on the
path (the TAP queues, the engines' drop reasons, the kernel's UDP receive-buffer
errors, the veth and backlog drops). Prints one JSON object; exit status 1 if RSS grew
by more than the bound after warm-up, the fd count changed, or a loss is unexplained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import netenv, pktgen

RSS_BOUND_KIB = 1024
PORT = 9000
VNI = 4242
INNER_A, INNER_B = "192.168.240.1", "192.168.240.2"


@dataclass
class Daemon:
    ns: str
    proc: subprocess.Popen[str]
    samples: list[dict[str, int]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sample(self) -> dict[str, int]:
        status = Path(f"/proc/{self.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        s = {
            "t": int(time.monotonic()),
            "rss_kib": int(fields["VmRSS"].split()[0]),
            "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
            "threads": int(fields["Threads"]),
        }
        self.samples.append(s)
        return s


def start_daemon(ns: str, remote: str, address: str) -> Daemon:
    argv = [sys.executable, "-m", "geneve_dp", "up", "--netns", ns, "gdp0", "--vni", str(VNI)]
    argv += ["--remote", remote, "--address", address]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        raise RuntimeError(f"geneve-dp up in {ns} did not get ready: {err.strip()[-300:]}")
    return Daemon(ns, proc)


def tunnel_counters(pid: int) -> dict[str, Any]:
    from geneve_dp.control import query_all

    for reply in query_all():
        if reply.get("pid") == pid:
            t = reply["tunnels"][0]
            return {"counters": t["counters"], "socket": t["socket"]}
    raise RuntimeError(f"dataplane {pid} does not answer")


def losses(u: netenv.Underlay, a: Daemon, b: Daemon) -> dict[str, int]:
    """Every counter on the path that counts a lost packet (cumulative)."""
    out: dict[str, int] = {}
    for side, ns in (("a", u.a), ("b", u.b)):
        for key, value in netenv.drop_counters(ns).items():
            if key.endswith("_dropped") or key == "udp.InErrors":
                out[f"{side}.{key}"] = value
    for side, d in (("a", a), ("b", b)):
        c = tunnel_counters(d.pid)
        out[f"{side}.engine_drops"] = sum(c["counters"]["drops"].values()) + sum(
            c["socket"]["drops"].values()
        )
    with open("/proc/net/softnet_stat") as f:
        out["softnet_dropped"] = sum(int(line.split()[1], 16) for line in f)
    return out


def soak(
    seconds: float, fraction: float = 0.8, sample_every: float | None = None
) -> dict[str, Any]:
    sample_every = sample_every or max(1.0, min(10.0, seconds / 15))
    warmup = max(3.0, min(60.0, seconds / 10))
    result: dict[str, Any] = {"seconds": seconds, "fraction": fraction, "warmup_s": warmup}
    saved_run_dir = os.environ.get("GENEVE_DP_RUN_DIR")
    with tempfile.TemporaryDirectory(prefix="gdp-soak-") as run_dir, netenv.Underlay() as u:
        os.environ["GENEVE_DP_RUN_DIR"] = run_dir  # the daemons' and query_all's
        a = start_daemon(u.a, u.b_ip, f"{INNER_A}/24")
        b = start_daemon(u.b, u.a_ip, f"{INNER_B}/24")
        try:
            netenv.sh("ip", "netns", "exec", u.a, "ping", "-c", "1", "-W", "2", INNER_B)
            probe = pktgen.udp_stream(u.a, u.b, INNER_B, port=PORT, duration=3.0, flows=4)
            max_pps = probe["sink"]["valid_packets"] / probe["send"]["elapsed_s"]
            rate = max(100.0, fraction * max_pps)
            result.update(probe_max_pps=round(max_pps), rate_pps=round(rate))

            before = losses(u, a, b)
            stream: dict[str, Any] = {}
            th = threading.Thread(
                target=lambda: stream.update(
                    pktgen.udp_stream(
                        u.a, u.b, INNER_B, port=PORT, rate=rate, duration=seconds, flows=4
                    )
                )
            )
            t0 = time.monotonic()
            th.start()
            baseline: dict[str, dict[str, int]] = {}
            while th.is_alive():
                th.join(sample_every)
                for d in (a, b):
                    s = d.sample()
                    if time.monotonic() - t0 >= warmup and d.ns not in baseline:
                        baseline[d.ns] = s
            for d in (a, b):
                # Once more, idle: the end state. Before the status queries below,
                # whose connections the daemons are still closing for a moment after.
                d.sample()
                baseline.setdefault(d.ns, d.samples[0])
            after = losses(u, a, b)
        finally:
            for d in (a, b):
                if d.proc.poll() is None:
                    d.proc.terminate()
                d.proc.communicate(timeout=15)
            if saved_run_dir is None:
                os.environ.pop("GENEVE_DP_RUN_DIR", None)
            else:
                os.environ["GENEVE_DP_RUN_DIR"] = saved_run_dir
    sent = int(stream["send"]["sent_packets"])
    received = int(stream["sink"]["valid_packets"])
    counted = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    lost = max(0, sent - received)
    result.update(sent=sent, received=received, lost=lost, loss_counters=counted)
    result["unexplained"] = max(0, lost - sum(counted.values()))
    result["daemons"] = {}
    ok = result["unexplained"] == 0
    for side, d in (("a", a), ("b", b)):
        base, end = baseline[d.ns], d.samples[-1]
        growth = end["rss_kib"] - base["rss_kib"]
        fds = sorted({s["fds"] for s in d.samples})
        result["daemons"][side] = {
            "rss_start_kib": d.samples[0]["rss_kib"],
            "rss_after_warmup_kib": base["rss_kib"],
            "rss_end_kib": end["rss_kib"],
            "rss_growth_kib": growth,
            "fds": fds,
            "threads": sorted({s["threads"] for s in d.samples}),
            "samples": len(d.samples),
            "rss_series_kib": [s["rss_kib"] for s in d.samples],
            "fds_series": [s["fds"] for s in d.samples],
        }
        ok &= growth < RSS_BOUND_KIB and len(fds) == 1
    result["ok"] = bool(ok)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="run length (default 10)")
    length.add_argument("--seconds", type=float, help="run length in seconds")
    ap.add_argument("--fraction", type=float, default=0.8, help="of the probed maximum (0.8)")
    ap.add_argument("--sample-every", type=float, help="seconds between samples")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    if not 5 <= seconds <= 86400:
        ap.error(f"run length {seconds:g} s is out of range 5..86400")
    if not 0 < args.fraction <= 1:
        ap.error(f"--fraction: {args.fraction} is out of range (0, 1]")
    result = soak(seconds, args.fraction, args.sample_every)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
