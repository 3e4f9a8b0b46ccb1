"""Log lines of the long-running commands: human text or one JSON object per line.

One line per event (a tunnel up or down, a repair, a drop-rate alarm), never per
packet. An event names itself with ``extra={"event": ..., "device": ...}``; the JSON
form carries those fields as keys so a log shipper can filter on them, the text form
shows only the message.

The choice travels to the processes a command starts (`node up` starts an endpoint
daemon and a watcher) through the ``GENEVE_DP_LOG_FORMAT`` environment variable, so a
child logs the way its parent was asked to without a flag on every command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

from .errors import UserError

FORMATS: Final = ("text", "json")
ENV: Final = "GENEVE_DP_LOG_FORMAT"

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_RECORD_KEYS: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _timestamp(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z geneve-dp[123] INFO message``."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} geneve-dp[{record.process}] "
            f"{record.levelname} {record.getMessage()}"
        )
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "pid": ..., "msg": ..., <extra>...}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_KEYS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        metavar="FORMAT",
        help=f"log lines as text (default) or json, one object per line; also ${ENV}",
    )


def resolve(value: str | None) -> str:
    """The format asked for by the flag, else the environment, else text."""
    if value is None:
        env = os.environ.get(ENV)
        if env is None:
            return "text"
        if env not in FORMATS:
            raise UserError(f"{env!r} is not a log format; accepted: {', '.join(FORMATS)}", ENV)
        return env
    if value not in FORMATS:
        raise UserError(
            f"{value!r} is not a log format; accepted: {', '.join(FORMATS)}", "--log-format"
        )
    return value


def setup(fmt: str, verbose: bool = False, stream: TextIO | None = None) -> None:
    """Send the root logger's records to ``stream`` (stderr) in ``fmt``; children
    started from here on inherit the choice."""
    os.environ[ENV] = fmt
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def setup_from_args(args: argparse.Namespace) -> str:
    """``setup`` for a command with ``--log-format`` (and maybe ``-v``); the format."""
    fmt = resolve(getattr(args, "log_format", None))
    setup(fmt, bool(getattr(args, "verbose", False)))
    return fmt


class Throttle:
    """The log lines of one kind of per-packet event: the first ``burst`` of each
    ``interval`` seconds, then one summary line saying how many were left out.

    The events themselves are counted elsewhere (the dataplane's counters); this only
    bounds what reaches the log. ``flush`` writes the summary of an interval that has
    ended (the daemon calls it every pass, so a summary comes even when the events
    stop); ``close`` writes what is pending. Safe to call from any thread.
    """

    def __init__(
        self,
        logger: logging.Logger,
        event: str,
        what: str,
        burst: int = 10,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._event = event
        self._what = what
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # start of the current interval
        self._logged = 0
        self._skipped = 0

    def info(self, msg: str, *args: object, **extra: object) -> None:
        with self._lock:
            self._roll(self._clock(), force=False)
            if self._since is None:
                self._since = self._clock()
            if self._logged >= self._burst:
                self._skipped += 1
                return
            self._logged += 1
        self._log.info(msg, *args, extra={"event": self._event, **extra})

    def flush(self) -> None:
        with self._lock:
            self._roll(self._clock(), force=False)

    def close(self) -> None:
        with self._lock:
            self._roll(self._clock(), force=True)

    def _roll(self, now: float, force: bool) -> None:
        """End the current interval if it is over (or ``force``): summary, then reset."""
        if self._since is None or (not force and now - self._since < self._interval):
            return
        if self._skipped:
            self._log.info(
                "%d more %s in the last %.0f s not logged (all are counted)",
                self._skipped,
                self._what,
                max(now - self._since, 1.0),
                extra={"event": f"{self._event}_not_logged", "count": self._skipped},
            )
        self._since = None
        self._logged = self._skipped = 0
