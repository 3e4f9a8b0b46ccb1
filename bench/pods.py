"""Pods on one node: how fast `pod add/del` go with many pods, what the reconcile
watchers cost at rest, and whether their memory stays flat under route churn.

    python -m bench.pods                          # 1,000 pods: add/del rate, watcher CPU
    python -m bench.pods --churn-minutes 30       # and the watchers' RSS slope under churn
    python -m bench.pods --pods 0 --churn-minutes 5

The demo topology in namespaces (node, ztunnel pod, server), `node up` and `ztunnel
up` as a user runs them, then PODS pods, each a veth of its own on the node with a /32
route (a veth-based CNI's shape), the node's `default.rp_filter` at 1 first so that
every pod device starts filtering. The pods are enrolled with one `geneve-dp pod add
--batch` run and removed with one `pod del --batch` run (timed: pods per second
including the CLI's start); a single `pod add` at full load is timed apart. Watcher CPU
is its utime+stime over REST_SECONDS with nothing changing. Churn: a route of table 55
replaced in the node and the ztunnel namespaces every CHURN_INTERVAL, both watchers'
RSS sampled every SAMPLE_SECONDS; the slope is a least-squares fit over the samples
after the first WARMUP_FRACTION of the run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from geneve_dp.ambient import topology as t

POD_NET = "10.250"  # pod i: 10.250.(i // 250).(i % 250 + 1)
REST_SECONDS = 30.0
CHURN_INTERVAL = 0.5
SAMPLE_SECONDS = 30.0
WARMUP_FRACTION = 0.2
CHURN_TABLE = "55"


def pod_ip(i: int) -> str:
    return f"{POD_NET}.{i // 250}.{i % 250 + 1}"


def _batch(w: t.World, ns: str, lines: list[str]) -> None:
    path = w.workdir / f"batch-{ns}-{time.monotonic_ns()}"
    path.write_text("\n".join(lines) + "\n")
    w.run(ns, "ip", "-batch", str(path), timeout=600)
    path.unlink()


def make_pods(w: t.World, n: int) -> None:
    """n veths on the node (the peers stay on the node too: only the host side
    matters here), each with its pod's /32 route, made with rp_filter=1."""
    lines = []
    for i in range(n):
        lines += [
            f"link add gpb{i} type veth peer name gpq{i}",
            f"link set gpb{i} up",
            f"link set gpq{i} up",
            f"route add {pod_ip(i)}/32 dev gpb{i} scope link",
        ]
    _batch(w, w.node, lines)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _watcher(w: t.World, ns: str, role: str) -> int:
    return int((w.state_root / ns / f"{role}-watch.pid").read_text().split()[0])


def slope_kib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, in KiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mx = sum(s for s, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((s - mx) ** 2 for s, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((s - mx) * (v - my) for s, v in samples)
    return cov / var * 60.0


def measure_pods(w: t.World, n: int, out: dict[str, Any]) -> None:
    make_pods(w, n)
    batch = w.workdir / "pods.txt"
    batch.write_text("".join(f"{pod_ip(i)} uid-{i:05d}\n" for i in range(n)))
    t0 = time.monotonic()
    w.gdp(w.node, "pod", "add", "--batch", str(batch), timeout=3600)
    add_s = time.monotonic() - t0
    enrolled = len(w.gdp(w.node, "pod", "list").stdout.splitlines())
    filtering = sum(
        1
        for i in range(0, n, max(1, n // 50))
        if w.run(w.node, "sysctl", "-n", f"net.ipv4.conf.gpb{i}.rp_filter").stdout.strip() != "0"
    )
    # One more pod through the plain CLI, with n already there.
    make_one = ["link add gpbx type veth peer name gpqx", "link set gpbx up",
                f"route add {pod_ip(n)}/32 dev gpbx scope link"]  # fmt: skip
    _batch(w, w.node, make_one)
    t0 = time.monotonic()
    w.gdp(w.node, "pod", "add", pod_ip(n), "--uid", "uid-one")
    one_s = time.monotonic() - t0
    w.gdp(w.node, "pod", "del", pod_ip(n))

    pid = _watcher(w, w.node, "node")
    time.sleep(5.0)  # the last passes of the burst
    c0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(REST_SECONDS)
    rest_cpu = (_cpu_seconds(pid) - c0) / (time.monotonic() - t0)

    t0 = time.monotonic()
    w.gdp(w.node, "pod", "del", "--batch", str(batch), timeout=3600)
    del_s = time.monotonic() - t0
    left = len(w.gdp(w.node, "pod", "list").stdout.splitlines())
    out["pods"] = {
        "n": n,
        "add_seconds": round(add_s, 2),
        "add_pods_per_s": round(n / add_s, 1) if add_s else None,
        "enrolled_after_add": enrolled,
        "sampled_devices_still_filtering": filtering,
        "one_cli_add_at_n_seconds": round(one_s, 3),
        "watcher_cpu_at_rest_fraction_of_core": round(rest_cpu, 4),
        "del_seconds": round(del_s, 2),
        "del_pods_per_s": round(n / del_s, 1) if del_s else None,
        "enrolled_after_del": left,
    }


def measure_churn(w: t.World, minutes: float, out: dict[str, Any]) -> None:
    sides = {
        "node": (w.node, _watcher(w, w.node, "node")),
        "ztunnel": (w.zt, _watcher(w, w.zt, "ztunnel")),
    }
    samples: dict[str, list[tuple[float, int]]] = {role: [] for role in sides}
    cpu0 = {role: _cpu_seconds(pid) for role, (_ns, pid) in sides.items()}
    start = time.monotonic()
    end = start + minutes * 60
    next_sample = start
    changes = 0
    while time.monotonic() < end:
        for ns, _pid in sides.values():
            # A different route each time, one added and the previous one replaced.
            w.run(ns, "ip", "route", "replace", f"10.251.{changes % 200}.0/24", "dev", "lo",
                  "table", CHURN_TABLE)  # fmt: skip
        changes += 1
        now = time.monotonic()
        if now >= next_sample:
            for role, (_ns, pid) in sides.items():
                samples[role].append((now - start, _rss_kib(pid)))
            next_sample += SAMPLE_SECONDS
        time.sleep(CHURN_INTERVAL)
    elapsed = time.monotonic() - start
    for role, (_ns, pid) in sides.items():
        samples[role].append((elapsed, _rss_kib(pid)))
    res: dict[str, Any] = {"minutes": minutes, "changes_per_side": changes,
                           "interval_s": CHURN_INTERVAL}  # fmt: skip
    for role, (_ns, pid) in sides.items():
        s = samples[role]
        steady = [x for x in s if x[0] >= WARMUP_FRACTION * elapsed]
        res[role] = {
            "rss_kib_first": s[0][1],
            "rss_kib_after_warmup": steady[0][1] if steady else None,
            "rss_kib_last": s[-1][1],
            "slope_kib_per_min_after_warmup": round(slope_kib_per_min(steady), 2),
            "slope_kib_per_min_all": round(slope_kib_per_min(s), 2),
            "cpu_fraction_of_core": round((_cpu_seconds(pid) - cpu0[role]) / elapsed, 4),
            "samples": s,
        }
    out["churn"] = res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pods", description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=1000, help="pods to enrol (default 1000)")
    ap.add_argument("--churn-minutes", type=float, default=0.0, help="route churn to run after")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.pods: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 0 <= args.pods <= 60000:
        print("bench.pods: --pods: out of range 0..60000", file=sys.stderr)
        return 2
    w = t.World(tag=f"gdpbp-{os.getpid()}")
    out: dict[str, Any] = {}
    try:
        w.build()
        for key in ("all", "default"):  # hostile default: what every new pod device gets
            w.run(w.node, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=1")
        up = w.gdp(w.node, "node", "up", "--ztunnel-ip", t.ZTUNNEL_IP,
                   "--ztunnel-veth", t.ZTUNNEL_VETH)  # fmt: skip
        out["node_up"] = up.stdout.strip().splitlines()[-1]
        w.gdp(w.zt, "ztunnel", "up", "--host-ip", t.GATEWAY_IP)
        if args.pods:
            measure_pods(w, args.pods, out)
        if args.churn_minutes > 0:
            measure_churn(w, args.churn_minutes, out)
    finally:
        for ns, role in ((w.node, "node"), (w.zt, "ztunnel")):
            w.gdp(ns, role, "down", check=False, timeout=600)
        w.destroy()
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
