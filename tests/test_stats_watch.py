"""`geneve-dp stats --watch`: the rate arithmetic, and real runs against live tunnels:
JSON lines, a table into a pipe, and the in-place view on a terminal ended by Ctrl-C."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time

import pytest

from geneve_dp import rates
from geneve_dp.statsview import rows_of
from tests.netns import Netns
from tests.ops_helpers import (
    A_UL,
    B_IN,
    B_UL,
    GDP,
    gdp,
    json_lines,
    send_bad,
    tunnel_pair,
)


def test_rates_per_second_and_reset_is_zero() -> None:
    old = rates.Reading(rx_packets=100, rx_bytes=10_000, tx_packets=50, tx_bytes=5_000, drops=1)
    new = rates.Reading(rx_packets=300, rx_bytes=30_000, tx_packets=40, tx_bytes=9_000, drops=11)
    r = rates.rate(old, new, 2.0)
    assert r.rx_pps == 100 and r.rx_bps == 80_000
    assert r.tx_pps == 0  # went backwards: a restart, not a negative rate
    assert r.tx_bps == 16_000 and r.drops_ps == 5
    with pytest.raises(ValueError):
        rates.rate(old, new, 0)


def test_rows_follow_tunnels_and_show_sockets_only_when_dropping() -> None:
    def tunnel(name: str, rx: int, sock_drops: int) -> dict[str, object]:
        return {
            "pid": 7,
            "name": name,
            "counters": {"rx_packets": rx, "rx_bytes": rx * 10, "drops": {"too_big": rx // 10}},
            "socket": {"family": 4, "port": 6081, "rx_packets": rx, "drops": {"x": sock_drops}},
        }

    old = rates.readings([tunnel("gt0", 0, 0)])
    new = rates.readings([tunnel("gt0", 100, 0), tunnel("gt1", 5, 0)])
    rows = rows_of(old, new, 1.0)
    # gt1 just appeared: no rate yet; the socket dropped nothing: not shown.
    assert [r.get("device") for r in rows] == ["gt0"]
    assert rows[0]["rx_pps"] == 100 and rows[0]["rx_bps"] == 8000 and rows[0]["drops_ps"] == 10
    rows = rows_of(old, rates.readings([tunnel("gt0", 0, 30)]), 0.5)
    assert [r.get("socket") for r in rows] == [None, "ipv4:6081"] and rows[1]["drops_ps"] == 60
    assert rates.human(1_234_567, "bit/s") == "1.23 Mbit/s" and rates.human(12, "pps") == "12 pps"


def _pinging(ns: Netns, dst: str, count: int, interval: float) -> subprocess.Popen[str]:
    return ns.popen(
        ["ping", "-q", "-c", str(count), "-i", str(interval), dst],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_watch_json_lines_show_the_offered_rate(pair: tuple[Netns, Netns]) -> None:
    a, b = pair
    with tunnel_pair(a, b):
        pinger = _pinging(a, B_IN, 60, 0.05)  # 20 requests/s for 3 s
        try:
            time.sleep(0.5)
            proc = gdp(
                "stats", "--watch", "--json", "--count", "2", "--interval", "1", "--netns", a.name
            )
        finally:
            pinger.wait(10)
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert len(lines) == 2
    for line in lines:
        assert 0.9 <= float(line["interval_s"]) <= 1.5  # type: ignore[arg-type]
        (row,) = line["rates"]  # type: ignore[misc]
        assert row["device"] == "gt0"
        # 20 echo requests out and 20 replies in per second (give or take a tick).
        assert 12 <= row["tx_pps"] <= 30, row
        assert 12 <= row["rx_pps"] <= 30, row
        assert row["tx_bps"] >= row["tx_pps"] * 98 * 8 * 0.9
        assert row["drops_ps"] == 0


def test_watch_counts_drops_and_prints_tables_into_a_pipe(pair: tuple[Netns, Netns]) -> None:
    a, b = pair
    with tunnel_pair(a, b):
        watcher = subprocess.Popen(
            [*GDP, "stats", "--watch", "--count", "3", "--interval", "0.7", "--all"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.9)
        send_bad(b, B_UL, A_UL, 150, why="critical")  # dropped by a's gt0
        out, err = watcher.communicate(timeout=20)
    assert watcher.returncode == 0, err
    assert "\x1b[" not in out  # no cursor movement or colour into a pipe
    assert out.count("geneve-dp rates over") == 3
    assert "rx bit/s" in out and "drops/s" in out and out.count("gt0") == 6
    dropping = [ln for ln in out.splitlines() if "gt0" in ln and ln.split("│")[-2].strip() != "0"]
    assert dropping, out


def _task_states(pid: int) -> list[tuple[str, str, str]]:
    """(thread name, state, wait channel) of each thread of ``pid``."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"{base}/comm") as f, open(f"{base}/wchan") as g:
                out.append((f.read().strip(), state, g.read()))
        except OSError:
            continue
    return out


def test_watch_on_a_terminal_redraws_in_place_and_ctrl_c_exits_0(
    pair: tuple[Netns, Netns],
) -> None:
    a, b = pair
    with tunnel_pair(a, b):
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [*GDP, "stats", "--watch", "--interval", "0.3", "--netns", a.name],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "100", "LINES": "30"},
            # What a shell gives a program it starts on a terminal: Ctrl-C's default.
            # Started from a background job (`cmd &` without job control) the test
            # runner ignores SIGINT, and the program would inherit that.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        os.close(slave)
        screen = b""
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                screen += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        # The terminal is read until the program has gone: a terminal nobody reads
        # blocks the program's last redraw, and with it its exit.
        end = time.monotonic() + 10
        try:
            while proc.poll() is None and time.monotonic() < end:
                if select.select([master], [], [], 0.2)[0]:
                    screen += os.read(master, 65536)
            while select.select([master], [], [], 0.2)[0]:
                screen += os.read(master, 65536)
        except OSError:  # the other side closed: the program is exiting, maybe not gone
            pass
        os.close(master)
        try:
            rc = proc.wait(15)  # a bound on its exit, not a timing
        except subprocess.TimeoutExpired:
            state = _task_states(proc.pid)
            proc.kill()
            proc.wait()
            raise AssertionError(f"still running 25 s after Ctrl-C: {state}") from None
    assert rc == 0
    text = screen.decode(errors="replace")
    assert "gt0" in text and "Traceback" not in text
    assert "\x1b[1A" in text or "\x1b[2K" in text  # moved back up to redraw


def test_watch_bad_values_are_one_line(pair: tuple[Netns, Netns]) -> None:
    for args, field in (
        (["--interval", "0"], "--interval"),
        (["--count", "1.5"], "--count"),
        (["--count", "x"], "--count"),
    ):
        proc = gdp("stats", "--watch", *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and field in proc.stderr
    proc = gdp("stats", "--watch", "nosuchdev", "--count", "1")
    assert proc.returncode == 2 and "nosuchdev" in proc.stderr
