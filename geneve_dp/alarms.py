"""The drop-rate alarm: one log line when a tunnel's (or a receive socket's) drops per
second cross a threshold, not one per second while they stay there.

The daemon feeds it a reading of the counters once per supervise pass. A key that
goes over the threshold logs a warning and is then quiet for ``repeat`` seconds (a
reminder follows if it is still over); one info line says when it is back under.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import rates

DEFAULT_THRESHOLD = 100.0  # drops/s; a healthy tunnel drops next to nothing
REPEAT_SECONDS = 60.0


@dataclass
class _State:
    over: bool = False
    logged_at: float = 0.0


def _describe(key: rates.Key) -> tuple[str, dict[str, Any]]:
    if key[0] == "tunnel":
        return f"tunnel {key[2]}", {"device": key[2]}
    _, _, family, port = key
    return f"receive socket udp{'6' if family == 6 else ''}:{port}", {
        "socket": f"ipv{family}:{port}"
    }


class DropAlarm:
    """``threshold`` drops/s, 0 to turn the alarm off."""

    def __init__(
        self,
        log: logging.Logger,
        threshold: float = DEFAULT_THRESHOLD,
        repeat: float = REPEAT_SECONDS,
    ) -> None:
        self.log = log
        self.threshold = threshold
        self.repeat = repeat
        self._last: tuple[float, dict[rates.Key, rates.Reading]] | None = None
        self._reasons: dict[rates.Key, dict[str, int]] = {}
        self._states: dict[rates.Key, _State] = {}

    def update(self, now: float, rows: Iterable[Mapping[str, Any]]) -> None:
        """Take a reading at monotonic time ``now`` and log what crossed the line."""
        if self.threshold <= 0:
            return
        rows = list(rows)
        reading = rates.readings(rows)
        reasons, self._reasons = self._reasons, _reasons(rows)
        last, self._last = self._last, (now, reading)
        if last is None or now <= last[0]:
            return
        for key, r in rates.rates(last[1], reading, now - last[0]).items():
            old, new = reasons.get(key, {}), self._reasons.get(key, {})
            moved = {k: n - old.get(k, 0) for k, n in new.items() if n > old.get(k, 0)}
            self._check(key, r.drops_ps, now, moved)

    def _check(self, key: rates.Key, per_s: float, now: float, moved: dict[str, int]) -> None:
        state = self._states.setdefault(key, _State())
        what, fields = _describe(key)
        extra = {**fields, "drops_per_s": round(per_s, 1), "threshold": self.threshold}
        if per_s >= self.threshold:
            if state.over and now - state.logged_at < self.repeat:
                return
            again = "still " if state.over else ""
            state.over, state.logged_at = True, now
            top = ", ".join(f"{k} {n}" for k, n in sorted(moved.items(), key=lambda kv: -kv[1]))
            self.log.warning(
                "%s is %sdropping %.0f packets/s (alarm at %g/s): %s",
                what,
                again,
                per_s,
                self.threshold,
                top or "no reason counted",
                extra={"event": "drop_alarm", "reasons": moved, **extra},
            )
        elif state.over:
            state.over = False
            self.log.info(
                "%s drop rate is back under %g/s (%.0f/s)",
                what,
                self.threshold,
                per_s,
                extra={"event": "drop_alarm_cleared", **extra},
            )


def _reasons(rows: list[Mapping[str, Any]]) -> dict[rates.Key, dict[str, int]]:
    """Cumulative drops by reason under the keys of ``rates.readings``."""
    out: dict[rates.Key, dict[str, int]] = {}
    for t in rows:
        pid = t.get("pid")
        out[("tunnel", pid, t.get("name"))] = dict(t.get("counters", {}).get("drops", {}))
        s = t.get("socket")
        if s is not None:
            out[("socket", pid, s.get("family"), s.get("port"))] = dict(s.get("drops", {}))
    return out
