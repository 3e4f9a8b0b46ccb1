"""Logs: one line per event (tunnel up/down, repair, drop-rate alarm), as text or JSON,
never one per packet; the alarm fires once per crossing and says when it is over."""

from __future__ import annotations

import io
import json
import logging
import os
import time

import pytest

from geneve_dp import alarms, logs
from geneve_dp.errors import UserError
from tests.netns import Netns
from tests.ops_helpers import (
    A_IN,
    A_UL,
    B_IN,
    B_UL,
    gdp,
    json_lines,
    ping,
    send_bad,
    start,
    stop,
)


def test_json_lines_carry_the_event_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.ENV, raising=False)
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("json", stream=out)
        assert os.environ[logs.ENV] == "json"  # children inherit the format
        logging.getLogger("geneve_dp.test").warning(
            "tunnel %s down", "gt0", extra={"event": "tunnel_down", "device": "gt0"}
        )
        logs.setup("text", stream=out)
        logging.getLogger("geneve_dp.test").info("plain %d", 1)
    finally:
        root.handlers[:], root.level = saved
    first, second = out.getvalue().splitlines()
    rec = json.loads(first)
    assert rec["msg"] == "tunnel gt0 down" and rec["level"] == "warning"
    assert rec["event"] == "tunnel_down" and rec["device"] == "gt0"
    assert rec["pid"] == os.getpid() and rec["ts"].endswith("Z")
    assert second.endswith(f"geneve-dp[{os.getpid()}] INFO plain 1")


def test_format_choice_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.ENV, raising=False)
    assert logs.resolve(None) == "text"
    monkeypatch.setenv(logs.ENV, "json")
    assert logs.resolve(None) == "json" and logs.resolve("text") == "text"
    monkeypatch.setenv(logs.ENV, "yaml")
    with pytest.raises(
        UserError, match=f"^{logs.ENV}: 'yaml' is not a log format; accepted: text, json"
    ):
        logs.resolve(None)
    with pytest.raises(UserError, match=r"^--log-format: 'xml'"):
        logs.resolve("xml")


def _rows(drops: int) -> list[dict[str, object]]:
    return [{"name": "gt0", "counters": {"drops": {"critical_option": drops}}}]


def test_alarm_fires_once_per_crossing_and_clears() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("geneve_dp.test_alarm")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(Keep())
    alarm = alarms.DropAlarm(log, threshold=10, repeat=60)
    total = 0
    for t in range(8):  # 50 drops/s for 5 s, then nothing
        total += 50 if t < 6 else 0
        alarm.update(float(t), _rows(total))
    events = [(r.event, r.device) for r in records]  # type: ignore[attr-defined]
    assert events == [("drop_alarm", "gt0"), ("drop_alarm_cleared", "gt0")]
    assert records[0].reasons == {"critical_option": 50}  # type: ignore[attr-defined]
    assert "50 packets/s" in records[0].getMessage()
    # A minute later and still over: one reminder, no more.
    records.clear()
    for t in range(100, 190):
        total += 50
        alarm.update(float(t), _rows(total))
    assert len(records) == 2 and "still" in records[1].getMessage()
    records.clear()
    off = alarms.DropAlarm(log, threshold=0)
    off.update(0.0, _rows(0))
    off.update(1.0, _rows(10**6))
    assert records == []


def test_throttle_logs_the_first_few_then_one_summary_per_interval() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("geneve_dp.test_throttle")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(Keep())
    now = [0.0]
    throttle = logs.Throttle(log, "ping", "pings", burst=3, interval=5.0, clock=lambda: now[0])
    for i in range(1000):  # 1000 events in the first second
        now[0] = i / 1000
        throttle.info("ping %d", i, device="gt0")
        throttle.flush()
    assert [r.getMessage() for r in records] == ["ping 0", "ping 1", "ping 2"]
    assert records[0].event == "ping" and records[0].device == "gt0"  # type: ignore[attr-defined]
    now[0] = 5.5  # the interval is over: its summary, even with no new event
    throttle.flush()
    assert len(records) == 4
    assert records[3].event == "ping_not_logged"  # type: ignore[attr-defined]
    assert records[3].count == 997  # type: ignore[attr-defined]
    assert "997 more pings" in records[3].getMessage()
    throttle.flush()
    assert len(records) == 4  # nothing new: no second summary
    for i in range(5):  # a new interval starts with a burst again
        now[0] = 6.0 + i
        throttle.info("ping %d", i)
    assert len(records) == 4 + 3
    throttle.close()  # pending at stop: summarised at once
    assert len(records) == 8 and records[7].count == 2  # type: ignore[attr-defined]


def test_daemon_json_log_has_one_line_per_event(pair: tuple[Netns, Netns]) -> None:
    a, b = pair
    common = ["gt0", "--vni", "77", "--log-format", "json"]
    pa = start(a, *common, "--remote", B_UL, "--address", f"{A_IN}/24", "--drop-alarm", "20")
    pb = start(b, "gt0", "--vni", "77", "--remote", A_UL, "--address", f"{B_IN}/24")
    try:
        ping(a, B_IN, 20, interval=0.02)  # traffic: no line of its own
        send_bad(b, B_UL, A_UL, 200)  # well over 20 drops/s
        time.sleep(1.2)
        send_bad(b, B_UL, A_UL, 200)  # still over: quiet (rate-limited)
        a.run("ip", "addr", "del", f"{A_IN}/24", "dev", "gt0")  # a repair
        time.sleep(3.0)  # the rate falls back: cleared
    finally:
        rc, err = stop(pa)
        stop(pb)
    assert rc == 0
    lines = json_lines(err)  # every line is JSON
    events = [ln.get("event") for ln in lines]
    assert events.count("tunnel_up") == 1 and events.count("tunnel_down") == 1
    assert events.count("drop_alarm") == 1 and events.count("drop_alarm_cleared") == 1
    assert events.count("repair") == 1
    alarm = next(ln for ln in lines if ln.get("event") == "drop_alarm")
    assert alarm["device"] == "gt0" and alarm["level"] == "warning"
    assert set(alarm["reasons"]) == {"critical_option"}  # type: ignore[arg-type]
    repair = next(ln for ln in lines if ln.get("event") == "repair")
    assert repair["address"] == f"{A_IN}/24"
    assert len(lines) <= 8, lines  # 400 bad packets and 40 good ones: no per-packet lines


def test_text_log_by_default_and_bad_format(pair: tuple[Netns, Netns]) -> None:
    a, _b = pair
    p = start(a, "gt0", "--vni", "5", "--remote", B_UL)
    rc, err = stop(p)
    assert rc == 0
    lines = err.strip().splitlines()
    assert any(ln.endswith("INFO tunnel gt0 down") for ln in lines), lines
    assert any(" INFO tunnel gt0 up: VNI 5 to " in ln for ln in lines), lines
    assert not any(ln.startswith("{") for ln in lines)
    proc = gdp("up", "--netns", a.name, "gt0", "--vni", "5", "--remote", B_UL, "--log-format", "x")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--log-format" in proc.stderr
    for role in ("node", "ztunnel"):
        helptext = gdp(role, "watch", "--help").stdout
        assert "--log-format" in helptext
