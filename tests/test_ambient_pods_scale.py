"""Pod add/del and the node watcher with hundreds of pods: work per pod does not grow.

Counted, not timed: the route and rule dumps and full ipset listings each `pod add` and
`pod del` make (links.DUMPS, ipset.LISTINGS), and those of one watcher pass, at a few
pods and at many. The pods are veths of the node with /32 routes (bench/pods.py makes
them the same way), made while the node's default rp_filter is 1.
"""

from __future__ import annotations

import json
import os

import pytest

from bench.pods import make_pods, pod_ip
from geneve_dp.ambient import topology as t
from tests.test_ambient_node import NODE_UP
from tests.test_ambient_node import world as world  # the fixture

pytestmark = pytest.mark.root

PODS = 200
EARLY = range(0, 10)
LATE = range(PODS - 10, PODS)

# Runs inside the node namespace: enrol PODS pods one call each, counting the work of
# each call, then one watcher pass at the end, then remove them all the same way.
SCRIPT = """
import json, sys
from geneve_dp.ambient import node, pods, state, watch
from geneve_dp.netconf import ipset, links
ips = json.loads(sys.argv[1])

def work():
    return links.DUMPS["routes"] + links.DUMPS["rules"] + ipset.LISTINGS["entries"]

def one_pass():
    before = dict(links.DUMPS)
    path = node.state_path()
    repairs = []
    watch.reconcile_once(path.parent, path.name, node.intent, repairs.append, None, True)
    return {k: links.DUMPS[k] - before[k] for k in before}, repairs

out = {"add": [], "del": []}
for n, ip in enumerate(ips):
    w0 = work()
    r = pods.add(ip, f"uid-{n}")
    assert r.changed, r
    out["add"].append(work() - w0)
    if n == 9:
        out["pass_early"] = one_pass()
out["pass_late"] = one_pass()
for ip in ips:
    w0 = work()
    assert pods.delete(ip).changed
    out["del"].append(work() - w0)
print(json.dumps(out))
"""


def test_pod_work_does_not_grow_with_the_number_of_pods(world: t.World) -> None:
    w = world
    w.gdp(w.node, *NODE_UP)
    watcher = int((w.state_root / w.node / "node-watch.pid").read_text().split()[0])
    make_pods(w, PODS)
    ips = [pod_ip(i) for i in range(PODS)]
    proc = w.run(w.node, "env", f"GENEVE_DP_AMBIENT_STATE={w.state_root}", "python3", "-c",
                 SCRIPT, json.dumps(ips), timeout=600)  # fmt: skip
    out = json.loads(proc.stdout)
    # No dump or listing at all per pod: what one pod does is one lookup and adds.
    assert [out["add"][i] for i in EARLY] == [0] * len(EARLY), out["add"]
    assert [out["add"][i] for i in LATE] == [0] * len(LATE), out["add"]
    assert max(out["del"]) == 0, out["del"]
    # One watcher pass reads each of tables 100-102 once and the rules once, at 10 pods
    # or 200, lists no devices (a node's pods bring two each), and finds nothing to
    # repair.
    for key in ("pass_early", "pass_late"):
        dumps, repairs = out[key]
        assert dumps == {"routes": 3, "rules": 1, "links": 0}, (key, dumps)
        assert repairs == [], (key, repairs)
    # The watcher saw the whole burst of links, routes and rules, and is still there.
    assert os.path.exists(f"/proc/{watcher}"), (
        w.state_root / w.node / "node-watch.log"
    ).read_text()


def test_pod_add_turns_off_rp_filter_on_the_pods_device(world: t.World) -> None:
    """Istio's disableRPFiltersForLink on the device the main table names (the pod's
    own route in table 100 leads into istioin, which must not be the one chosen)."""
    w = world
    a = t.PODS[0]

    def rp(dev: str) -> str:
        return w.run(w.node, "sysctl", "-n", f"net.ipv4.conf.{dev}.rp_filter").stdout.strip()

    assert rp(a.veth) == "1"  # the hostile default every pod device starts with
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.node, "pod", "add", a.ip, "--uid", a.uid)
    assert rp(a.veth) == "0"
    assert rp("istioin") == "0"
    w.gdp(w.node, "pod", "del", a.ip)
    assert rp(a.veth) == "1"  # given back as it was
