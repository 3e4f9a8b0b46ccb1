"""Finding and stopping the helper processes the profiles start (endpoint daemons,
reconcile watchers) in the current network namespace.

A pidfile is the first way to find one; a crash or a lost state directory leaves a
process without one, so they are also found by their command line, restricted to
this network namespace (another namespace's node has its own).

Paths under /proc are plain strings: the reconcile watcher looks at its daemon every
pass, and pathlib interns every part it parses, so a pid interned afresh each time
takes a new slot of CPython's interned-string table until the table grows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from ..netns import netns_id

STOP_TIMEOUT = 5.0


def _argv(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def matches(pid: int, words: Sequence[str]) -> bool:
    """``pid`` runs in this namespace with ``words`` as consecutive arguments."""
    args, want = _argv(pid), [w.encode() for w in words]
    n = len(want)
    found = any(args[i : i + n] == want for i in range(len(args) - n + 1))
    return found and netns_id(pid) == netns_id()


def find(words: Sequence[str], pidfile: Path | None = None) -> list[int]:
    """Processes here whose command line holds ``words`` (the pidfile's one included)."""
    pids: set[int] = set()
    if pidfile is not None:
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(pidfile.read_text().split()[0]))
    pids.update(int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
    pids.discard(os.getpid())
    return sorted(p for p in pids if matches(p, words))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def terminate(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait up to ``timeout`` for them to exit, then SIGKILL the rest."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
