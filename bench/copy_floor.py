"""A measured lower bound on geneve-dp's TCP cost per byte, hence an upper bound on its
throughput.

geneve-dp does all the work kernel VXLAN does on a TCP stream (the senders, the
receivers, the IP stacks; minus header-only encap/decap) and on top copies every payload
byte four more times: TAP read and inject write on the sender, UDP receive and TAP write
on the receiver. Nothing here can avoid those copies (no vhost-net, no AF_XDP zero copy
on veth, no zero-copy TUN write), so its CPU seconds per GB are at least kernel VXLAN's
plus four copies of a GB, and the machine's cores divided by that is the most it can
carry. Both terms are measured in the same run as everything else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

Json = dict[str, Any]

COPIES = 4
GB = 1e9


def _cpu_time(loop: Callable[[int], None], iterations: int) -> float:
    # The thread's own CPU time: a hypervisor running another guest meanwhile (steal)
    # or another process on this core does not count, as it would with a wall clock.
    t0 = time.thread_time()
    loop(iterations)
    return time.thread_time() - t0


def _calibrate(loop: Callable[[int], None], target_s: float) -> int:
    """Iterations that take about ``target_s`` of CPU: a doubling pilot run up to an
    eighth of the target, then scaled, so a slow or fast machine spends the same time."""
    n = 1
    while True:
        spent = _cpu_time(loop, n)
        if spent >= target_s / 8:
            return max(1, math.ceil(n * target_s / spent))
        n *= 2


def _loops(src: memoryview, block: int) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """A loop copying ``n`` blocks from ``src`` in turn into one destination block, and
    the same loop moving zero bytes."""
    dst = memoryview(bytearray(b"\x5a") * block)
    offsets = range(0, len(src) - block + 1, block)

    # memoryview to memoryview is one memmove; a bytearray slice assigned from a
    # memoryview would first copy it into a temporary bytearray (twice the cost).
    def run(n: int, size: int) -> None:
        while n > 0:
            for off in offsets[:n]:
                dst[:size] = src[off : off + size]
            n -= len(offsets)

    return (lambda n: run(n, block)), (lambda n: run(n, 0))


def _s_per_gb(src: memoryview, block: int, target_s: float) -> float:
    copy, empty = _loops(src, block)
    n = _calibrate(copy, target_s)
    spent = _cpu_time(copy, n)
    # The interpreter's own cost per iteration (the same loop moving zero bytes) is not
    # copying, and the kernel's copies have no such cost: taking it out keeps the
    # figure a floor.
    spent -= _cpu_time(empty, n)
    if spent <= 0:
        raise RuntimeError(f"copying {n} blocks cost no more CPU than the empty loop")
    return spent / (n * block) * GB


def measure_copy_cost(
    block: int = 65536, working_set: int = 64 << 20, target_s: float = 0.4
) -> Json:
    """CPU seconds per GB (1e9 bytes) that memcpy of ``block``-byte blocks costs on this
    machine: "hot" copies one block over and over, source and destination in cache (the
    cheapest a copy gets, so a bound built on it is never too low); "cold" walks a
    source of ``working_set`` bytes, larger than the caches, into the same destination.
    Each case runs for about ``target_s`` of this thread's CPU time."""
    if block <= 0 or working_set < block:
        raise ValueError("need 0 < block <= working_set")
    # Written, not just allocated: a zeroed allocation may be the kernel's one shared
    # zero page, which would read from cache however large it looks.
    hot = memoryview(bytearray(b"\xa5") * block)
    cold = memoryview(bytearray(b"\xa5") * (working_set - working_set % block))
    return {
        "block_bytes": block,
        "working_set_bytes": len(cold),
        "hot_s_per_gb": round(_s_per_gb(hot, block, target_s), 6),
        "cold_s_per_gb": round(_s_per_gb(cold, block, target_s), 6),
    }


def _no_bound(streams: Any, gbps: Any, error: str) -> Json:
    return {
        "streams": streams,
        "vxlan_gbps": gbps,
        "vxlan_s_per_gb": None,
        "floor_s_per_gb": None,
        "max_gbps": None,
        "max_ratio": None,
        "error": error,
    }


def tcp_bound(
    vxlan_tcp_steps: list[Json], copy_s_per_gb: float, cores: int, copies: int = COPIES
) -> list[Json]:
    """For each kernel-VXLAN TCP step (results.json ``tcp[]`` entries): its machine CPU
    per GB, the floor geneve-dp cannot go below (that plus ``copies`` copies of a GB),
    the throughput ``cores`` CPUs give at that floor, and that as a ratio to the step's
    own. A failed step, or one without CPU figures, gets an entry with an error."""
    out = []
    for step in vxlan_tcp_steps:
        streams, gbps = step.get("streams"), step.get("gbps")
        cpu = step.get("cpu") or {}
        if step.get("error"):
            # Its own error is in the step; repeating it here would say nothing new.
            out.append(_no_bound(streams, None, "kernel VXLAN step failed"))
            continue
        busy, steal, wall = cpu.get("busy_s"), cpu.get("steal_s"), cpu.get("wall_s")
        if busy is None or steal is None or not wall or not gbps:
            out.append(_no_bound(streams, gbps, "no CPU figures (busy_s, steal_s, wall_s)"))
            continue
        # GB over the metered window (which also holds iperf3's start-up) rather than
        # the bytes iperf3 counted: it credits a little more traffic to the same CPU, so
        # the kernel's cost per GB errs low and the bound high.
        vxlan_s_per_gb = (busy - steal) / (gbps * wall / 8)
        floor = vxlan_s_per_gb + copies * copy_s_per_gb
        max_gbps = cores / floor * 8
        out.append(
            {
                "streams": streams,
                "vxlan_gbps": gbps,
                "vxlan_s_per_gb": round(vxlan_s_per_gb, 6),
                "floor_s_per_gb": round(floor, 6),
                "max_gbps": round(max_gbps, 4),
                "max_ratio": round(max_gbps / gbps, 4),
                "error": None,
            }
        )
    return out
