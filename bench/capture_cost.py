"""What `geneve-dp capture` costs the dataplane: UDP packets/s delivered through a pair of
`geneve-dp up` endpoints with no capture, with an inner capture, with an outer one, and
with none again afterwards, in one run and interleaved (the machines are noisy: compare
within a run only).

``python -m bench.capture_cost [--seconds 3] [--rounds 2] [--payload 64]`` (root).
Prints one line per step and the ratios of each capture state to the idle mean.

Idle costs nothing by construction (the capture's AF_PACKET socket exists only while a
capture runs); the "after" steps check that a finished capture leaves nothing behind.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from . import pktgen
from .netenv import Underlay

GDP = [sys.executable, "-m", "geneve_dp"]
INNER = ("192.168.240.1", "192.168.240.2")


def _up(ul: Underlay, ns: str, remote: str, addr: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*GDP, "up", "--netns", ns, "gt0", "--vni", "42", "--remote", remote, "--address", addr],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    if "ready" not in proc.stdout.readline():
        proc.kill()
        raise RuntimeError("geneve-dp up did not get ready")
    return proc


def _capture(ns: str, side: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*GDP, "capture", "gt0", "--netns", ns, side, "-w", "/dev/null"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    if "listening" not in proc.stderr.readline():
        proc.kill()
        raise RuntimeError("geneve-dp capture did not start")
    return proc


def measure(seconds: float, rounds: int, payload: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"idle": [], "inner": [], "outer": []}
    with Underlay(mtu=1600) as ul:
        daemons = [
            _up(ul, ul.a, ul.b_ip, f"{INNER[0]}/24"),
            _up(ul, ul.b, ul.a_ip, f"{INNER[1]}/24"),
        ]
        try:
            ul.exec_a("ping", "-c", "3", "-i", "0.2", "-W", "2", INNER[1])
            plan = ["idle"] + ["inner", "idle", "outer", "idle"] * rounds
            for step in plan:
                # Capture on the receiving side: that is where every packet passes.
                cap = None if step == "idle" else _capture(ul.b, f"--{step}")
                try:
                    r = pktgen.udp_stream(
                        ul.a, ul.b, INNER[1], payload=payload, duration=seconds, flows=4
                    )
                finally:
                    if cap is not None:
                        cap.terminate()
                        cap.wait(10)
                pps = r["sink"]["valid_packets"] / r["send"]["elapsed_s"]
                results[step].append(pps)
                print(f"{step:5}: {pps / 1e3:7.1f} kpps delivered", flush=True)
                time.sleep(0.5)
        finally:
            for d in daemons:
                d.terminate()
                d.wait(15)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capture_cost", description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per step (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="inner/outer rounds (default 2)")
    p.add_argument("--payload", type=int, default=64, help="UDP payload bytes (default 64)")
    args = p.parse_args(argv)
    results = measure(args.seconds, args.rounds, args.payload)
    idle = statistics.mean(results["idle"])
    for step in ("idle", "inner", "outer"):
        mean = statistics.mean(results[step])
        print(
            f"{step:5} mean {mean / 1e3:7.1f} kpps over {len(results[step])} steps, "
            f"{mean / idle:.2f} x idle",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
