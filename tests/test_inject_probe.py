"""The inject device's probe (dataplane/inject.py): it turns injection off only on
evidence that what is written there does not leave, never because the supervisor
looked late, and turns it on again once a probe leaves.

Two namespaces joined by a veth underlay, C-engine endpoints with offloads
(tests.endpoint_helpers); the supervisor's probe runs on every status request.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from geneve_dp.dataplane.inject import (
    BACKOFF_MAX,
    LATE,
    LEFT,
    PROBE_INTERVAL,
    PROBE_TOKEN,
    PROBE_TRIES,
    STOPPED,
    UNSEEN,
    Injector,
)
from tests.endpoint_helpers import Endpoint, endpoint, underlay, wait_for
from tests.netns import Netns, veth
from tests.test_endpoint_inject import MIB, spec, transfer


def _injector() -> Injector:
    return Injector(fd=-1, name="gdpx0", mac=bytes(6), ident=1)


def _run(inj: Injector, outcomes: list[str]) -> list[bool]:
    """inj.check at each due time, the probes answering ``outcomes`` in turn."""
    answers = iter(outcomes)
    inj._probe = lambda local, remote: next(answers)  # type: ignore[method-assign]
    out = []
    for _ in outcomes:
        out.append(inj.check("10.0.0.1", "10.0.0.2", now=inj.next_probe))
    return out


def test_rule_only_stopped_probes_turn_it_off_and_one_that_leaves_turns_it_on() -> None:
    """The decision rule alone (the probes' outcomes given): late and unseen probes
    count for nothing, PROBE_TRIES stopped in a row turn injection off, retries back
    off within their bound, the first probe that leaves turns it on again."""
    inj = _injector()
    assert _run(inj, [LATE, UNSEEN, LATE, UNSEEN, UNSEEN, LEFT]) == [True] * 6
    assert inj.next_probe > 0 and inj.retry == 0.0
    # Two stopped, then one that leaves: the count starts again.
    assert _run(inj, [STOPPED, STOPPED, LATE, STOPPED, STOPPED]) == [True] * 5
    assert _run(inj, [STOPPED]) == [False]
    assert inj.misses == PROBE_TRIES
    # Off: probing goes on, less and less often, never more than BACKOFF_MAX apart.
    delays = []
    for _ in range(12):
        before = inj.next_probe
        assert _run(inj, [STOPPED]) == [False]
        delays.append(inj.next_probe - before)
    assert delays == sorted(delays) and delays[-1] == BACKOFF_MAX
    assert _run(inj, [UNSEEN]) == [False]
    assert _run(inj, [LATE]) == [True]
    assert inj.retry == 0.0 and inj.misses == 0
    assert inj.probes == {LEFT: 1, LATE: 4, STOPPED: 17, UNSEEN: 4}


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns]) -> tuple[Netns, Netns]:
    a, b = netns_factory("prba"), netns_factory("prbb")
    underlay(a, b)
    return a, b


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[Any]:
    with open(tmp_path / "endpoint.log", "w+") as f:
        yield f


def _lines(f: Any, event: str) -> list[str]:
    f.seek(0)
    return [ln for ln in f.read().splitlines() if event in ln]


OFF_LINE, ON_LINE = "did not leave by the underlay", "left by the underlay again"

# Wakes on the probe leaving by the underlay and spins on the CPU it shares with the
# supervisor, at a real-time priority, far past the probe's wait: the supervisor is
# descheduled on its way back from writing the probe, every time.
HOG = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 3))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    if addr[2] == socket.PACKET_OUTGOING and TOKEN in data:
        end = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < end:
            pass
""".replace("TOKEN", repr(PROBE_TOKEN))


def _status(ep: Endpoint) -> dict[str, Any]:
    return ep.tunnel("gt0")


@pytest.mark.root
def test_supervisor_starved_past_the_wait_keeps_injecting(
    pair: tuple[Netns, Netns], logged: Any
) -> None:
    """A busy real-time process on the supervisor's CPU takes it over as each probe
    leaves, for five times the probe's wait: every probe is found late, none counts
    against the device, and injection stays on throughout."""
    a, b = pair
    cpu = max(os.sched_getaffinity(0))
    with (
        endpoint(a, "c+offload", spec("10.0.0.2", 1), stderr=logged) as ea,
        endpoint(b, "c+offload", spec("10.0.0.1", 2)) as eb,
    ):
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        assert ea.ready[0]["offloads"]["tx_inject"] is True
        # The supervisor (the helper's main thread) shares one CPU with the hog; the
        # forwarding threads keep theirs.
        subprocess.run(["taskset", "-p", "-c", str(cpu), str(ea.proc.pid)], check=True,
                       capture_output=True)  # fmt: skip
        hog = a.popen(
            ["chrt", "-f", "50", "taskset", "-c", str(cpu), sys.executable, "-c", HOG, "ua",
             "0.25"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "ready"
            seen: list[dict[str, Any]] = []

            def starved_enough() -> bool:
                seen.append(_status(ea))
                return bool(seen[-1]["inject_probes"][LATE] >= PROBE_TRIES)

            assert wait_for(
                starved_enough, timeout=PROBE_INTERVAL * (PROBE_TRIES + 2), interval=0.2
            )
        finally:
            hog.kill()
            hog.wait(5)
        # Never off, not for one status request.
        assert all(t["offloads"]["tx_inject"] for t in seen), [t["inject_probes"] for t in seen]
        assert seen[-1]["inject_probes"][STOPPED] == 0, seen[-1]["inject_probes"]
        before = _status(ea)["counters"]["tx_injected"]
        assert transfer(a, b, 8 * MIB) == 8 * MIB
        assert _status(ea)["counters"]["tx_injected"] > before
    assert _lines(logged, OFF_LINE) == []


@pytest.mark.root
def test_forward_drop_turns_it_off_and_removing_it_turns_it_on(
    pair: tuple[Netns, Netns], logged: Any
) -> None:
    """A FORWARD DROP on what the inject device carries turns injection off (one log
    line); once the rule goes, a probe leaves and injection is on again (one log
    line), and super-frames go whole again."""
    a, b = pair
    with (
        endpoint(a, "c+offload", spec("10.0.0.2", 1), stderr=logged) as ea,
        endpoint(b, "c+offload", spec("10.0.0.1", 2)) as eb,
    ):
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        dev = ea.ready[0]["inject_device"]
        rule = ["FORWARD", "-i", dev, "-j", "DROP"]
        a.run("iptables", "-A", *rule)
        assert wait_for(
            lambda: not _status(ea)["offloads"]["tx_inject"], timeout=PROBE_INTERVAL * 3
        )
        off = _status(ea)
        assert off["inject_device"] is None
        assert off["inject_probes"][STOPPED] >= PROBE_TRIES
        # Segmented here meanwhile: the transfer completes without the device.
        injected = off["counters"]["tx_injected"]
        assert transfer(a, b, 4 * MIB) == 4 * MIB
        assert _status(ea)["counters"]["tx_injected"] == injected
        a.run("iptables", "-D", *rule)
        assert wait_for(lambda: _status(ea)["offloads"]["tx_inject"], timeout=BACKOFF_MAX)
        assert transfer(a, b, 8 * MIB) == 8 * MIB
        assert _status(ea)["counters"]["tx_injected"] > injected
    assert len(_lines(logged, OFF_LINE)) == 1
    assert len(_lines(logged, ON_LINE)) == 1


@pytest.mark.root
def test_peer_that_comes_up_late_ends_with_injection_on(
    netns_factory: Callable[[str], Netns], logged: Any
) -> None:
    """The peer's underlay address is not there when the endpoint starts: the probes
    enter and cannot leave (no neighbour), injection goes off; the address appears,
    the peer's endpoint starts, and injection comes back on by itself."""
    a, b = netns_factory("prla"), netns_factory("prlb")
    veth(a, "ua", b, "ub")
    a.run("ip", "addr", "add", "10.0.0.1/24", "dev", "ua")
    with endpoint(a, "c+offload", spec("10.0.0.2", 1), stderr=logged) as ea:
        assert ea.error is None, ea.error
        assert wait_for(lambda: not _status(ea)["offloads"]["tx_inject"], timeout=PROBE_INTERVAL)
        b.run("ip", "addr", "add", "10.0.0.2/24", "dev", "ub")
        with endpoint(b, "c+offload", spec("10.0.0.1", 2)) as eb:
            assert eb.error is None, eb.error
            assert wait_for(lambda: _status(ea)["offloads"]["tx_inject"], timeout=BACKOFF_MAX)
            a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")
            before = _status(ea)["counters"]["tx_injected"]
            assert transfer(a, b, 8 * MIB) == 8 * MIB
            assert _status(ea)["counters"]["tx_injected"] > before
    assert len(_lines(logged, OFF_LINE)) == 1
    assert len(_lines(logged, ON_LINE)) == 1
