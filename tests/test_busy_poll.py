"""Busy polling (``up --busy-poll US``, config key ``busy_poll_us``; engine.h): after
one direction forwards, the other polls for the answer without sleeping for a bounded
window. Off by default; with it on, sparse request/response traffic is answered by
polling workers (counted in ``socket.busy_poll_hits``), and nothing polls while no
traffic flows."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from geneve_dp.cli import build_parser
from geneve_dp.commands.tunnel import _daemon_args
from geneve_dp.dataplane import Dataplane
from geneve_dp.dataplane.spec import MAX_BUSY_POLL_US, build_spec
from geneve_dp.errors import UserError
from tests.endpoint_helpers import endpoint, underlay
from tests.netns import Netns


def spec(remote: str, host: int) -> list[dict[str, object]]:
    return [{"name": "gt0", "vni": 9, "remote": remote, "addresses": [f"192.168.100.{host}/24"]}]


def test_range_is_checked() -> None:
    s = [build_spec({"name": "gt0", "vni": 1, "remote": "10.0.0.2"})]
    with pytest.raises(UserError) as err:
        Dataplane(s, busy_poll_us=MAX_BUSY_POLL_US + 1)
    assert err.value.field == "busy_poll_us"
    argv = ["up", "gt0", "--vni", "1", "--remote", "10.0.0.2"]
    args = build_parser("up").parse_args([*argv, "--busy-poll", "200"])
    assert _daemon_args(args, {}, "c", None)["busy_poll_us"] == 200
    for bad in ("-1", "x", str(MAX_BUSY_POLL_US + 1)):
        args = build_parser("up").parse_args([*argv, "--busy-poll", bad])
        with pytest.raises(UserError) as err:
            _daemon_args(args, {}, "c", None)
        assert err.value.field == "--busy-poll"


def _cpu_s(pid: int) -> float:
    """utime + stime of every thread of ``pid``, in seconds."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.root
@pytest.mark.parametrize("busy_us", [0, 1000])
def test_requests_answered_by_polling_workers(
    netns_factory: Callable[[str], Netns], busy_us: int
) -> None:
    a, b = netns_factory("bpa"), netns_factory("bpb")
    underlay(a, b)
    engine = f"c+offload+bp{busy_us}"
    with (
        endpoint(a, engine, spec("10.0.0.2", 1)) as ea,
        endpoint(b, engine, spec("10.0.0.1", 2)) as eb,
    ):
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        # Sparse round trips: each answer follows what was just forwarded.
        out = a.run("ping", "-c", "20", "-i", "0.05", "-W", "2", "192.168.100.2").stdout
        assert " 0% packet loss" in out, out
        hits = [e.tunnel("gt0")["socket"]["busy_poll_hits"] for e in (ea, eb)]
        if busy_us:
            assert sum(hits) > 0, hits
        else:
            assert hits == [0, 0]
        # No traffic, nothing polled: the idle endpoint's CPU stays where it was
        # (allowing a few clock ticks for the supervisor's own checks).
        cpu0 = _cpu_s(ea.proc.pid)
        time.sleep(2)
        assert _cpu_s(ea.proc.pid) - cpu0 < 0.1
