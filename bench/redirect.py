"""What each of Istio's node-level redirect designs costs, measured through the ztunnel
stand-in (geneve_dp/ambient/proxy.py) in the demo's namespaces.

Two worlds side by side, one in iptables + GENEVE mode (the SYN of each captured
connection crosses the geneve-dp tunnel endpoints, later packets the veth via
connmark), one in eBPF mode (tc programs redirect frames L2-to-L2, bpf_sk_assign
hands them to the proxy). In each, an ambient pod talks to the server beyond the node
through the proxy; a plain pod's traffic to the same server, not captured, is the
floor. Per path: connections set up per second (connect, one request and its reply,
close: TCP_CRR), request/response latency on one connection (TCP_RR), and the
machine's busy CPU time per connection and per transaction. The paths are measured
in turns, ``rounds`` times, so load that comes and goes falls on all of them; each
figure is the median over the rounds.

Clients and server are ``python -m bench.redirect serve|crr|rr`` run in the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .netenv import busy_seconds

Json = dict[str, Any]
PORT = 7070
MODES = ("uncaptured", "iptables", "ebpf")
CLIENT_TIMEOUT = 5.0


# --- in the namespaces -----------------------------------------------------------------


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed before the whole reply came")
        buf += chunk
    return buf


def serve(port: int) -> None:
    """Echo whatever comes, on every connection, until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(512)
    lsock.settimeout(0.2)

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(30)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    print("ready", flush=True)
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
    lsock.close()


def _percentiles(ns: list[int]) -> Json:
    if not ns:
        return {}
    s = sorted(ns)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] / 1000, 1)

    return {"p50_us": at(0.50), "p90_us": at(0.90), "p99_us": at(0.99)}


def crr(host: str, port: int, seconds: float, payload: int) -> Json:
    """Connections, each: connect, one request, its reply, close."""
    msg = b"x" * payload
    lat: list[int] = []
    errors = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        start = time.perf_counter_ns()
        try:
            with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(msg)
                _recv_exactly(s, payload)
        except OSError:
            errors += 1
            continue
        lat.append(time.perf_counter_ns() - start)
    elapsed = time.monotonic() - t0
    return {"count": len(lat), "errors": errors, "elapsed_s": elapsed, **_percentiles(lat)}


def rr(host: str, port: int, seconds: float, payload: int) -> Json:
    """Requests and replies on one connection."""
    msg = b"x" * payload
    lat: list[int] = []
    with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            start = time.perf_counter_ns()
            s.sendall(msg)
            _recv_exactly(s, payload)
            lat.append(time.perf_counter_ns() - start)
        elapsed = time.monotonic() - t0
    return {"count": len(lat), "errors": 0, "elapsed_s": elapsed, **_percentiles(lat)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.redirect")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve").add_argument("--port", type=int, default=PORT)
    for name in ("crr", "rr"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("--port", type=int, default=PORT)
        c.add_argument("--seconds", type=float, default=1.0)
        c.add_argument("--payload", type=int, default=64)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port)
        return 0
    fn = crr if args.cmd == "crr" else rr
    print(json.dumps(fn(args.host, args.port, args.seconds, args.payload)))
    return 0


# --- the bench step ---------------------------------------------------------------------


class _World:
    """One demo world (geneve_dp.ambient.demo) in ``mode``, with the echo server."""

    def __init__(self, mode: str) -> None:
        from geneve_dp.ambient import demo
        from geneve_dp.ambient import topology as t

        pid = os.getpid()
        # gdpb-<pid>-...: bench.netenv.remove_stale deletes them after a SIGKILL.
        world = t.World(
            tag=f"gdpb-{pid}-r{mode[0]}",
            workdir=Path(f"/tmp/geneve-dp-bench-redirect-{mode}-{pid}"),
        )
        self.sc = demo.Scenario(world, mode=mode)
        self.t = t

    def start(self) -> None:
        self.sc.setup()
        w = self.sc.w
        log = w.workdir / "bench-server.log"
        w.spawn(w.server, ["-m", "bench.redirect", "serve", "--port", str(PORT)], log)
        w._wait_for(lambda: "ready" in log.read_text() if log.exists() else False, "server")

    def client(self, role: str, kind: str, seconds: float, payload: int) -> Json:
        w, t = self.sc.w, self.t
        proc = w.run(
            w.ns(role), sys.executable, "-m", "bench.redirect", kind, t.SERVER_IP,
            "--port", str(PORT), "--seconds", str(seconds), "--payload", str(payload),
            timeout=seconds + 60,
        )  # fmt: skip
        out: Json = json.loads(proc.stdout)
        return out

    def stop(self) -> None:
        self.sc.destroy()


def _measure_once(world: _World, role: str, cfg: Json) -> Json:
    seconds, payload = cfg["seconds"], cfg["payload"]
    b0 = busy_seconds()
    c = world.client(role, "crr", seconds, payload)
    b1 = busy_seconds()
    r = world.client(role, "rr", seconds, payload)
    b2 = busy_seconds()
    if not c["count"] or not r["count"]:
        raise RuntimeError(f"{role}: no connection completed ({c['errors']} errors)")
    return {
        "connections_per_s": c["count"] / c["elapsed_s"],
        "connect_p50_us": c["p50_us"],
        "connect_p99_us": c["p99_us"],
        "connect_errors": c["errors"],
        "busy_us_per_connection": (b1 - b0) * 1e6 / c["count"],
        "transactions_per_s": r["count"] / r["elapsed_s"],
        "rr_p50_us": r["p50_us"],
        "rr_p99_us": r["p99_us"],
        "busy_us_per_transaction": (b2 - b1) * 1e6 / r["count"],
    }


def _median(rows: list[Json]) -> Json:
    out: Json = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        out[key] = round(statistics.median(values), 1) if key != "connect_errors" else sum(values)
    return out


def measure(cfg: Json, log: Callable[[str], None]) -> Json:
    """The bench step: every path in turns, ``rounds`` times; medians per path."""
    seconds = float(cfg["rr_seconds"])
    rounds = 1 if cfg["quick"] else 3
    out: Json = {
        "seconds": seconds,
        "rounds": rounds,
        "payload": cfg["rr_payload"],
        "modes": [],
        "error": None,
    }
    worlds: dict[str, _World] = {}
    try:
        for mode in ("iptables", "ebpf"):
            log(f"redirect: setting up the {mode} world (node, ztunnel, pods, stand-in proxy)")
            worlds[mode] = _World(mode)
            worlds[mode].start()
        paths = (
            ("uncaptured", worlds["iptables"], "pod-p"),
            ("iptables", worlds["iptables"], "pod-a"),
            ("ebpf", worlds["ebpf"], "pod-a"),
        )
        samples: dict[str, list[Json]] = {m: [] for m in MODES}
        step = {"seconds": seconds, "payload": cfg["rr_payload"]}
        for i in range(rounds):
            for mode, world, role in paths:
                samples[mode].append(_measure_once(world, role, step))
                s = samples[mode][-1]
                log(
                    f"redirect round {i + 1}/{rounds} {mode:<10} "
                    f"{s['connections_per_s']:7.0f} conn/s (p50 {s['connect_p50_us']:.0f} us), "
                    f"rr p50 {s['rr_p50_us']:.0f} us, {s['transactions_per_s']:6.0f} tr/s"
                )
        for mode in MODES:
            out["modes"].append({"mode": mode, **_median(samples[mode]), "error": None})
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"redirect: ERROR {out['error']}")
    finally:
        for world in worlds.values():
            try:
                world.stop()
            except Exception as exc:  # the other world must still go
                log(f"redirect: teardown: {type(exc).__name__}: {exc}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
