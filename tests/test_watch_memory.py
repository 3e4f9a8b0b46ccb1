"""A watcher's passes leave nothing behind: no string in CPython's interned-string
table, no object that only the cycle collector frees, no block the interpreter keeps
for good in its free lists.

pathlib interns every part of every path it parses. A part made afresh on each pass
(a pid, a device's sysctl path) is inserted into the table again each time it is
interned after the previous copy died, and each insertion takes a slot for good until
the table is rebuilt, at twice its size (about 1 MiB more RSS for the watcher, once,
whenever the slots run out: the step `python -m bench.pods --churn-minutes 30` showed).

Garbage in reference cycles is freed only by a collection of its generation, and most
of it reaches the oldest one, which CPython collects rarely (when a quarter as many
objects again as live there have been added): between two such collections the
watcher's heap grows by whatever its passes left in cycles, under route churn ~20 KiB
a minute for the node watcher before its ipset reads left pyroute2 (130-165 objects a
pass: tasks, frames, exceptions of an asyncio loop per request).

Counted, not timed: `sys.intern` (what pathlib calls) is wrapped to count the strings it
inserts (the call returns the very object it was given, which was not interned before:
CPython keeps that in the string's header, read with ctypes and checked first), over
watcher passes with pods enrolled, after a warm-up.
"""

from __future__ import annotations

import json

import pytest

from bench.pods import make_pods, pod_ip
from geneve_dp.ambient import topology as t
from tests.test_ambient_node import NODE_UP, ZT_UP
from tests.test_ambient_node import world as world  # the fixture

pytestmark = pytest.mark.root

PODS = 3
PASSES = 20

SCRIPT = """
import ctypes, gc, json, sys
_intern = sys.intern
def interned(s):  # PyASCIIObject.state.interned: the low 2 bits at offset 32 (3.11)
    return ctypes.c_uint32.from_address(id(s) + 32).value & 3 != 0
probe = "".join(["not-yet-", "interned"])
assert not interned(probe) and interned(_intern(probe)) and interned("len"), "layout"
inserted = []  # per pass: the strings sys.intern inserted into the table
def counting_intern(s):
    was = interned(s)
    r = _intern(s)
    if r is s and not was and inserted:
        inserted[-1].append(s.encode())  # a copy: s itself would then live on
    return r
sys.intern = counting_intern
from geneve_dp.ambient import node, pods, watch
from geneve_dp.ambient.reconcile import Memory
for n, ip in enumerate(json.loads(sys.argv[1])):
    assert pods.add(ip, f"uid-{n}").changed
path = node.state_path()
memory = Memory()
for i in range(6 + int(sys.argv[2])):  # a warm-up first: modules, caches, first lookups
    if i >= 6:
        inserted.append([])
    watch.reconcile_once(path.parent, path.name, node.intent, print, memory, i % 2 == 0)
    gc.collect()  # what only a cycle kept alive dies between passes, as it would
print(json.dumps([[b.decode() for b in p] for p in inserted]))
"""


def test_watcher_passes_intern_no_new_strings(world: t.World) -> None:
    w = world
    w.gdp(w.node, *NODE_UP)
    make_pods(w, PODS)
    ips = [pod_ip(i) for i in range(PODS)]
    proc = w.run(w.node, "env", f"GENEVE_DP_AMBIENT_STATE={w.state_root}", "python3", "-c",
                 SCRIPT, json.dumps(ips), str(PASSES), timeout=300)  # fmt: skip
    inserted = json.loads(proc.stdout.strip().splitlines()[-1])
    # Before: the sysctl paths' parts of the node's and the pods' devices, the daemon's
    # pid in /proc paths and its config file's name, again on every pass.
    again = [p for p in inserted[1:] if p]
    assert not again, f"interned afresh on {len(again)} of {PASSES - 1} passes: {again[:2]}"


CYCLES_SCRIPT = """
import gc, json, subprocess, sys, weakref
from geneve_dp.ambient import node, pods, watch, ztunnel
from geneve_dp.ambient.reconcile import Memory
from geneve_dp.netconf import ipset, links
role, ips, passes = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
for n, ip in enumerate(ips):
    assert pods.add(ip, f"uid-{n}").changed
mod = ztunnel if role == "ztunnel" else node  # node.intent reads the eBPF record too
path = mod.state_path()
memory = Memory()
changes = links.Changes()
def one(i, routing):
    if routing:  # a route changed, as under churn: the pass that reads everything
        subprocess.run(["ip", "route", "replace", f"10.251.{i}.0/24", "dev", "lo",
                        "table", "55"], check=True)
        changes.wait(1.0)
    watch.reconcile_once(path.parent, path.name, mod.intent, print, memory, routing)
with ipset.session():  # as watch.run holds it
    for i in range(6):  # a warm-up first: modules, caches, first lookups
        one(i, i % 2 == 0)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept
    for i in range(passes):
        one(i, i % 2 == 0)
    gc.collect()
    alive = [o for o in gc.garbage if not isinstance(o, weakref.ProxyTypes)]
    kinds = sorted({type(o).__qualname__ for o in alive})
    print(json.dumps({"objects": len(gc.garbage), "kinds": kinds[:12]}))
"""


@pytest.mark.parametrize("role", ["node", "ztunnel", "ebpf-node"])
def test_watcher_passes_leave_no_cycles(world: t.World, role: str) -> None:
    w = world
    ebpf = ["--redirect-mode", "ebpf"] if role == "ebpf-node" else []
    w.gdp(w.node, *NODE_UP[:2], *ebpf, *NODE_UP[2:])
    ns, ips = w.node, []
    if role == "ztunnel":
        w.gdp(w.zt, *ZT_UP)
        ns = w.zt
    elif ebpf:  # pods that answer ARP: the eBPF mode learns each pod's MAC
        for pod in (p for p in t.PODS if p.ambient):
            w.gdp(w.node, "pod", "add", pod.ip, "--uid", pod.uid)
    else:
        make_pods(w, PODS)
        ips = [pod_ip(i) for i in range(PODS)]
    proc = w.run(ns, "env", f"GENEVE_DP_AMBIENT_STATE={w.state_root}", "python3", "-c",
                 CYCLES_SCRIPT, role, json.dumps(ips), str(PASSES), timeout=300)  # fmt: skip
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    # Before: 130-165 objects a pass on the node (pyroute2's ipset requests), 100 on a
    # ztunnel's reading pass (the same request, refused: the set is only the node's),
    # ~140 on an eBPF node's (pyroute2's tc filter dumps, one per pod veth hook).
    assert found["objects"] == 0, (
        f"{found['objects']} objects in cycles after {PASSES} passes: {found['kinds']}"
    )


# The real loop (watch.run) at 50 passes a second, no change announced: the number of
# blocks the interpreter's allocator holds, read before each pass into an array made
# beforehand (a list would keep one new int a pass), until LOOP_PASSES.
LOOP_PASSES = 400
LOOP_SCRIPT = """
import array, json, os, signal, sys
from geneve_dp.ambient import node, pods, watch
for n, ip in enumerate(json.loads(sys.argv[1])):
    assert pods.add(ip, f"uid-{n}").changed
blocks, done = array.array("q", bytes(8 * int(sys.argv[2]))), [0]
real = watch.reconcile_once
def counted(*args, **kwargs):
    blocks[done[0]] = sys.getallocatedblocks()
    done[0] += 1
    if done[0] == len(blocks):
        os.kill(os.getpid(), signal.SIGTERM)  # the loop's own way out
    return real(*args, **kwargs)
watch.reconcile_once = counted
path = node.state_path()
watch.run(path.parent, path.name, node.intent, lambda m: None, interval=0.02)
print(json.dumps({"blocks": blocks.tolist(), "every": watch.COLLECT_EVERY}))
"""


def test_watcher_loop_keeps_no_blocks_for_good(world: t.World) -> None:
    """Before the loop's periodic full collection, the interpreter's free lists of 8-
    and 17-item tuples (intent tuples built from generators, freed at lengths nothing
    else allocates) grew by one each a pass: +3 blocks a pass, for 2,000 passes."""
    w = world
    w.gdp(w.node, *NODE_UP)
    w.run(w.node, "pkill", "-f", "geneve_dp node watch", check=False)  # ours runs here
    make_pods(w, PODS)
    ips = [pod_ip(i) for i in range(PODS)]
    proc = w.run(w.node, "env", f"GENEVE_DP_AMBIENT_STATE={w.state_root}", "python3", "-c",
                 LOOP_SCRIPT, json.dumps(ips), str(LOOP_PASSES), timeout=300)  # fmt: skip
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    blocks, every = got["blocks"], got["every"]
    # Read right after a collection, once warm (modules, caches: the first passes) and
    # at the last one: before, +3 a pass (~800 here); now a few in all.
    first, last = 3 * every, (LOOP_PASSES - 1) // every * every
    grown = blocks[last] - blocks[first]
    assert grown <= 40, f"{grown} blocks more after {last - first} passes: {blocks[first::every]}"
