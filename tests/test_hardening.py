"""Issue 19: what a hostile peer, a busy node and odd local input must not break.

A flood of O-bit (control) packets is counted, and logged only as a few lines plus a
summary per interval.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from geneve_dp.control import query_all
from tests.endpoint_helpers import geneve
from tests.netns import Netns
from tests.ops_helpers import A_UL, B_UL, gdp

pytestmark = pytest.mark.root

# Sends the same datagram N times from one socket bound to SRC: argv SRC DST HEX N.
FLOOD_SCRIPT = r"""
import socket, sys
src, dst, data, n = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
sent = 0
for _ in range(n):
    try:
        s.sendto(data, (dst, 6081))
        sent += 1
    except OSError:
        pass
print(sent)
"""


def flood(ns: Netns, src: str, dst: str, packet: bytes, n: int) -> int:
    """Send ``packet`` ``n`` times from ``ns``; how many left the socket."""
    proc = ns.run(sys.executable, "-c", FLOOD_SCRIPT, src, dst, packet.hex(), str(n), timeout=60)
    return int(proc.stdout.strip())


@contextmanager
def detached(ns: Netns, tmp_path: Path, *args: str) -> Iterator[int]:
    """`geneve-dp up --detach` in ``ns``: yields its pid, SIGTERMs it at the end."""
    pidfile = tmp_path / f"{ns.name}.pid"
    proc = gdp("up", "--netns", ns.name, *args, "--detach", "--pidfile", str(pidfile))
    assert proc.returncode == 0, proc.stderr
    pid = int(pidfile.read_text())
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def status_of(pid: int) -> dict[str, Any]:
    (reply,) = [r for r in query_all() if r.get("pid") == pid]
    return reply


def test_control_packet_flood_is_counted_and_its_log_stays_bounded(
    pair: tuple[Netns, Netns], run_dir: Path, tmp_path: Path
) -> None:
    a, b = pair
    args = ["gt0", "--vni", "77", "--remote", B_UL, "--log-format", "json"]
    with detached(a, tmp_path, *args) as pid:
        packet = geneve(77, 0x6558, b"\0" * 60, oam=True)
        sent = flood(b, B_UL, A_UL, packet, 20000)
        assert sent == 20000
        log = run_dir / f"gdp-{pid}.log"

        def tally() -> tuple[int, int, list[dict[str, Any]]]:
            lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
            logged = sum(1 for ln in lines if ln.get("event") == "control_message")
            skipped = sum(
                int(ln["count"]) for ln in lines if ln.get("event") == "control_message_not_logged"
            )
            return logged, skipped, lines

        # Every O-bit packet is counted (or dropped by the kernel before the dataplane
        # saw it, and counted there); those handed to the daemon appear in the log as a
        # line each for the first few and in a summary for the rest.
        deadline = time.monotonic() + 20
        while True:
            t = status_of(pid)["tunnels"][0]
            c, overflow = t["counters"], t["socket"]["rx_queue_overflow"]
            handed = c["control"] - c["drops"]["control_queue_full"]
            logged, skipped, lines = tally()
            if c["control"] + overflow == sent and logged + skipped == handed:
                break
            assert time.monotonic() < deadline, (c, overflow, logged, skipped, len(lines))
            time.sleep(0.2)
        assert c["control"] > sent // 2
        assert 0 < logged <= 40, logged  # 10 per 5 s interval
        assert len(lines) < 60, len(lines)
        assert log.stat().st_size < 64 * 1024
