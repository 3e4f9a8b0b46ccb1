"""rtdump.py against pyroute2's reading of the same dump: every table, every shape of
IPv4 route the dataplane writes or meets (device, gateway, default, host, other tables),
and the policy rules (lookup, fwmark/mask, goto, tables past 255, the defaults)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest

from geneve_dp.netconf import rtdump
from tests.netns import Netns

# Runs inside the namespace: both readings of every table, and of each one alone.
COMPARE = r"""
import json
from pyroute2 import IPRoute
from geneve_dp.netconf import rtdump

def by_pyroute2(table):
    with IPRoute(strict_check=True) as ipr:
        kw = {} if table is None else {"table": table}
        out = set()
        for m in ipr.get_routes(family=2, **kw):
            t = m.get_attr("RTA_TABLE")
            if table is not None and t != table:
                continue
            dst = f"{m.get_attr('RTA_DST') or '0.0.0.0'}/{m['dst_len']}"
            out.add((t, dst, m.get_attr("RTA_OIF"), m.get_attr("RTA_GATEWAY")))
        return out

res = {}
for table in (None, 100, 101, 254, 255, 1000):
    mine, theirs = set(rtdump.route_keys(table)), by_pyroute2(table)
    res[str(table)] = [sorted(map(list, mine)) == sorted(map(list, theirs)), len(mine)]
print(json.dumps(res))
"""


@pytest.mark.root
def test_dump_reads_what_pyroute2_reads(netns_factory: Callable[[str], Netns]) -> None:
    ns = netns_factory("rtd")
    ns.run("ip", "link", "add", "rta", "type", "veth", "peer", "name", "rtb")
    for dev in ("rta", "rtb"):
        ns.run("ip", "link", "set", dev, "up")
    ns.run("ip", "addr", "add", "10.77.0.1/24", "dev", "rta")
    routes = [
        "default via 10.77.0.254 dev rta",
        "10.78.0.0/16 via 10.77.0.2 dev rta",
        "10.79.1.1/32 dev rtb scope link",
        "default via 10.77.0.9 dev rta table 100",
        *(f"10.80.{i // 250}.{i % 250 + 1}/32 dev rtb scope link table 100" for i in range(600)),
        "10.81.0.0/24 dev rta table 101",
        "10.82.0.0/24 dev rta table 1000",
    ]
    for r in routes:
        ns.run("ip", "route", "add", *r.split())
    got = json.loads(ns.run(sys.executable, "-c", COMPARE).stdout)
    assert all(same for same, _n in got.values()), got
    # Each table alone: the kernel's filter, not ours, left the others out.
    assert got["100"][1] == 601 and got["101"][1] == 1 and got["1000"][1] == 1, got


def test_parse_route_reads_four_attributes_and_skips_the_rest() -> None:
    attrs = b"".join(
        rtdump.RTATTR.pack(4 + len(data), kind) + data + bytes(-len(data) % 4)
        for kind, data in (
            (rtdump.RTA_TABLE, (100).to_bytes(4, sys.byteorder)),
            (rtdump.RTA_DST, bytes([10, 1, 2, 3])),
            (7, b"\x01\x02\x03"),  # RTA_PREFSRC-like attribute of odd length: skipped
            (rtdump.RTA_OIF, (9).to_bytes(4, sys.byteorder)),
            (rtdump.RTA_GATEWAY, bytes([10, 1, 2, 254])),
        )
    )
    msg = rtdump.RTMSG.pack(2, 32, 0, 0, 100, 0, 0, 1, 0) + attrs
    assert rtdump.parse_route(msg) == (100, "10.1.2.3/32", 9, "10.1.2.254")
    assert rtdump.parse_route(msg[:-3]) == (100, "10.1.2.3/32", 9, None)  # cut short
    assert rtdump.parse_route(rtdump.RTMSG.pack(10, 0, 0, 0, 254, 0, 0, 1, 0)) is None


RULES = r"""
import json
from pyroute2 import IPRoute
from geneve_dp.netconf import links

def by_pyroute2():
    out = []
    with IPRoute() as ipr:
        for m in ipr.get_rules(family=2):
            action = m["action"]
            table = m.get_attr("FRA_TABLE") or m["table"]
            out.append([m.get_attr("FRA_PRIORITY") or 0,
                        table if action == links.FR_ACT_TO_TBL else None,
                        m.get_attr("FRA_FWMARK"), m.get_attr("FRA_FWMASK"),
                        m.get_attr("FRA_GOTO") if action == links.FR_ACT_GOTO else None])
    return sorted(out, key=repr)

mine = [[r.priority, r.table, r.fwmark, r.fwmask, r.goto] for r in links.list_rules()]
mine.sort(key=repr)
print(json.dumps({"same": mine == by_pyroute2(), "n": len(mine), "mine": mine}))
"""


@pytest.mark.root
def test_rule_dump_reads_what_pyroute2_reads(netns_factory: Callable[[str], Netns]) -> None:
    ns = netns_factory("rtr")
    for rule in (
        "priority 100 fwmark 0x200/0x200 goto 32766",
        "priority 101 fwmark 0x100/0x100 lookup 101",
        "priority 102 fwmark 0x40/0xffffffff lookup 102",
        "priority 103 lookup 100",
        "priority 20000 fwmark 0x400/0xfff lookup 1000",
    ):
        ns.run("ip", "rule", "add", *rule.split())
    got = json.loads(ns.run(sys.executable, "-c", RULES).stdout)
    assert got["same"], got
    assert got["n"] == 8, got  # the five and the kernel's local, main and default
    assert [100, None, 0x200, 0x200, 32766] in got["mine"], got


FILTERS = r"""
import json, socket, subprocess
from pyroute2 import IPRoute
from geneve_dp.ambient.ebpf import facts, objects, tc
from geneve_dp.netconf import rtdump

obj = objects.load(objects.NODE_OBJECT)
tc.add_clsact("tfa")
tc.attach(tc.Attachment("tfa", "ingress", facts.APP_OUTBOUND), obj.program_fd(facts.APP_OUTBOUND))
tc.attach(tc.Attachment("tfa", "egress", facts.APP_INBOUND), obj.program_fd(facts.APP_INBOUND))
obj.close()
# A classic BPF filter beside ours at priority 7: no name.
subprocess.run(["tc", "filter", "add", "dev", "tfa", "ingress", "prio", "7", "bpf",
                "bytecode", "1,6 0 0 0,", "classid", "1:1"], check=True)

def by_pyroute2(idx, parent):
    with IPRoute() as ipr:
        out = []
        for m in ipr.get_filters(index=idx, parent=parent):
            opts = m.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            out.append([m.get_attr("TCA_KIND"), name if m.get_attr("TCA_KIND") == "bpf" else None])
        return out

res = {}
for dev in ("tfa", "tfb"):
    idx = socket.if_nametoindex(dev)
    for hook, parent in tc.PARENT.items():
        mine = [list(f) for f in rtdump.tc_filters(idx, parent)]
        res[f"{dev} {hook}"] = [mine == by_pyroute2(idx, parent), mine, tc.filters(dev, hook)]
print(json.dumps(res))
"""


@pytest.mark.root
def test_tc_filter_dump_reads_what_pyroute2_reads(netns_factory: Callable[[str], Netns]) -> None:
    """Named eBPF filters (ours, attached by tc.py), an unnamed classic one beside them
    at another priority, and a device without clsact (no such hook: nothing)."""
    ns = netns_factory("rtf")
    ns.run("ip", "link", "add", "tfa", "type", "veth", "peer", "name", "tfb")
    got = json.loads(ns.run(sys.executable, "-c", FILTERS, timeout=60).stdout)
    assert all(same for same, _m, _n in got.values()), got
    assert got["tfa ingress"][2] == ["geneve-dp:app_outbound"], got
    assert got["tfa egress"][2] == ["geneve-dp:app_inbound"], got
    assert ["bpf", None] in got["tfa ingress"][1], got  # the classic one
    assert got["tfb ingress"][1] == [] and got["tfb egress"][1] == [], got
