"""The reconcile watcher of a profile: `geneve-dp node watch` / `geneve-dp ztunnel watch`.

`node up` / `ztunnel up` start it detached in their namespace, with a pidfile and a log
in the state directory. It reads the state file (the intent) under the state
directory's lock and puts back whatever of it is missing (reconcile.py), logging one
line per repair: once a second, and also at once when the kernel announces a change of
links, addresses, routes or rules (rtnetlink), so a deleted rule or device is back in
well under the second. iptables and ipset changes have no such notification: they wait
for the next periodic pass. ip rules and routes, which cannot change without one, are
read on a notification and every ROUTING_INTERVAL only (pyroute2 dumps keep memory for
good, see links.link_names). It exits by itself once the state file is gone.

A plain loop with a sleep: nothing here needs an event loop, and pyroute2's sync API
is then used the way ARCHITECTURE rule 5 allows (no uvloop anywhere near it).
`down` stops it first, so the watcher never fights a teardown, and also kills a watcher
of this role in this namespace that a crash left without a pidfile.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..netconf import ipset, links
from . import procs, reconcile
from .profile import use_recorded_iptables
from .state import StateFile, locked

INTERVAL = 1.0
TICK = 0.2  # how long a wait for a change lasts before SIGTERM is looked at again
SETTLE = 0.02  # after a change, a moment for the rest of a burst (a flush, a restart)
ROUTING_INTERVAL = 30.0  # rules and routes are read at least this often without a change
# Passes started by changes are at least this far apart (and twice the last pass's
# length): a burst of changes (hundreds of pods enrolled) costs a few passes a second,
# not one pass per change. A change after a quiet spell is looked at at once.
BURST_GAP = 0.3
# A full garbage collection after every this many passes. The interpreter keeps freed
# tuples for reuse, up to 2,000 of each length, and a tuple built from a generator is
# freed at a length nothing else allocates: a pass (intent tuples of 8 and 17 items)
# filled two such lists by one each, ~15 KiB a minute for the first half hour of a
# watcher's life. Only a full collection empties them; it also frees what a repair's
# pyroute2 request left in reference cycles. ~15 ms of CPU, so ~0.05% of a core.
COLLECT_EVERY = 30

# What a profile's state file asks to exist (node.intent, ztunnel.intent).
IntentOf = Callable[[StateFile], reconcile.Intent]


def pidfile(directory: Path, role: str) -> Path:
    return directory / f"{role}-watch.pid"


def logfile(directory: Path, role: str) -> Path:
    return directory / f"{role}-watch.log"


def start(directory: Path, role: str) -> int:
    """Start `geneve-dp ROLE watch` in the background in this namespace; its pid."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(logfile(directory, role), "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "geneve_dp", role, "watch"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not killed with the terminal of the `up` that made it
        )
    pidfile(directory, role).write_text(f"{proc.pid}\n")
    return proc.pid


def stop(directory: Path, role: str) -> bool:
    """Stop this namespace's ROLE watcher(s), with or without a pidfile; True if one ran."""
    pids = procs.find(["geneve_dp", role, "watch"], pidfile(directory, role))
    procs.terminate(pids)
    pidfile(directory, role).unlink(missing_ok=True)
    logfile(directory, role).unlink(missing_ok=True)
    return bool(pids)


def run(
    directory: Path,
    state_name: str,
    intent_of: IntentOf,
    say: Callable[[str], None],
    interval: float = INTERVAL,
    repaired: Callable[[str], None] | None = None,
) -> int:
    """The loop: one reconcile pass per ``interval`` until SIGTERM or the state is gone.
    ``say`` reports the watcher's own comings and goings, ``repaired`` (default ``say``)
    each repair."""
    stop_event = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_event.set())
    say(f"watching {directory / state_name} every {interval:g}s and on netlink changes")
    memory = reconcile.Memory()
    changes = links.Changes()
    # One pyroute2 ipset socket for every repair of the set (pyroute2 keeps a little
    # memory for good each time one is opened), opened again after a pass that failed.
    # Reading the set needs none (ipsetdump).
    held = _hold_ipset(say)
    try:
        next_pass = time.monotonic() + interval
        next_routing = 0.0  # the first pass reads everything
        last_change_pass = 0.0  # when a pass last ran because of a change
        gap = BURST_GAP
        pending = False  # a change seen and not yet looked at
        overflows_said = 0
        passes = 0
        while not stop_event.is_set():
            due = min(next_pass, last_change_pass + gap) if pending else next_pass
            try:
                woke = changes.wait(max(0.0, min(TICK, due - time.monotonic())))
            except OSError as exc:  # the subscription broke: a new one, and a full pass
                say(f"change notifications failed ({exc.strerror}); subscribing again")
                changes.close()
                changes = links.Changes()
                woke = True
            if stop_event.is_set():
                break
            pending = pending or woke
            now = time.monotonic()
            if now < next_pass and (not pending or now < last_change_pass + gap):
                continue
            if woke:
                time.sleep(SETTLE)
                while changes.wait(0):
                    pass
            if changes.overflows != overflows_said:
                overflows_said = changes.overflows
                say(
                    f"change notifications overflowed ({overflows_said} times so far); "
                    "this pass reads the whole state"
                )
            now = time.monotonic()
            if pending:
                last_change_pass = now
            next_pass = now + interval
            routing = pending or now >= next_routing
            pending = False
            if routing:
                next_routing = now + ROUTING_INTERVAL
            try:
                if not reconcile_once(
                    directory, state_name, intent_of, repaired or say, memory, routing
                ):
                    say("the state file is gone (down ran); exiting")
                    return 0
            except Exception as exc:  # keep watching: the next pass may succeed
                say(f"reconcile pass failed: {exc}")
                held.close()
                held = _hold_ipset(say)
            passes += 1
            if passes % COLLECT_EVERY == 0:
                gc.collect()
            # A pass that took long (many pods) makes the next change-driven one wait
            # longer: at most a third of the time goes to passes during a burst.
            gap = max(BURST_GAP, 2 * (time.monotonic() - now))
    finally:
        held.close()
        changes.close()
    return 0


def _hold_ipset(say: Callable[[str], None]) -> contextlib.ExitStack:
    """This thread's ipset calls share one socket until the stack is closed; without
    one (the kernel refuses it) each call opens its own, as outside the watcher."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(ipset.session())
    except UserError as exc:
        say(f"no shared ipset socket ({exc}); each pass opens its own")
    return stack


def reconcile_once(
    directory: Path,
    state_name: str,
    intent_of: IntentOf,
    say: Callable[[str], None],
    memory: reconcile.Memory | None = None,
    routing: bool = True,
) -> bool:
    """One pass; False when there is nothing to watch any more."""
    view = reconcile.read_view() if routing else None  # outside the lock (reconcile.View)
    with locked(directory) as held:
        if not held:
            return False
        st = StateFile.load(directory / state_name)
        if not st.exists:
            return False
        # An incomplete record is a setup still running (or one that crashed, for
        # `down` to clean): nothing to hold on to yet.
        if st.data.get("complete"):
            use_recorded_iptables(st)
            reconcile.repair(intent_of(st), say, memory, routing, view)
    return True
