"""The outer packet carries the inner packet's mark, as the kernel's geneve gives it.

Kernel geneve routes (and the firewall sees) the outer packet of a captured outbound
packet with mark 0x100: rule 101 and table 101 choose its route, and the node's
mangle/nat rules that match 0x100 see it. geneve-dp's endpoint reads the inner frame
from a TAP device, which carries no mark; istioout's outer packets are sent marked
instead (all its inner packets have 0x100). Observed by an iptables counter in the
node's mangle POSTROUTING that counts outer GENEVE packets to the ztunnel by mark.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from geneve_dp.ambient import constants as k
from geneve_dp.ambient import demo
from geneve_dp.ambient import topology as t

pytestmark = pytest.mark.root


@pytest.fixture
def scenario() -> Iterator[demo.Scenario]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    sc = demo.Scenario(t.World(tag=f"gdpm-{os.getpid()}-{time.monotonic_ns() % 100000}"))
    try:
        sc.setup()
        yield sc
    finally:
        sc.destroy()


def test_captured_outbound_leaves_the_node_with_the_outbound_mark(
    scenario: demo.Scenario,
) -> None:
    sc, w = scenario, scenario.w
    for mark, tag in ((k.OUTBOUND_MARK, "gdp-outer-marked"), (0, "gdp-outer-unmarked")):
        w.run(w.node, "iptables", "-t", "mangle", "-A", "POSTROUTING", "-p", "udp",
              "-d", t.ZTUNNEL_IP, "--dport", "6081", "-m", "mark", "--mark",
              f"{mark:#x}/{k.OUTBOUND_MARK:#x}", "-m", "comment", "--comment", tag)  # fmt: skip
    reply = sc.client("pod-a", "tcp", t.SERVER_IP, t.TCP_PORT, "mark-check")
    assert reply is not None
    assert any(r["listener"] == k.ZTUNNEL_OUTBOUND_PORT for r in sc.accepts())  # captured
    # The SYN (and what else goes before the proxy's upstream leg takes the connection
    # to table 102) crosses istioout: each outer packet marked.
    marked = sc.rule_packets(w.node, "gdp-outer-marked")
    unmarked = sc.rule_packets(w.node, "gdp-outer-unmarked")
    assert marked >= 1 and unmarked == 0, (marked, unmarked)
    # Inbound to an ambient pod goes through istioin, whose packets come by rule 103
    # without the 0x100 bit: their outer packets stay unmarked, as with the kernel.
    b = t.PODS[1]
    assert sc.client("server", "tcp", b.ip, t.TCP_PORT, "inbound") is not None
    assert sc.rule_packets(w.node, "gdp-outer-unmarked") >= 1
    assert sc.rule_packets(w.node, "gdp-outer-marked") == marked
    # The route a marked outer packet takes is table 101's, as the kernel's would.
    route = w.run(w.node, "ip", "route", "get", t.ZTUNNEL_IP, "mark", "0x100").stdout
    assert f"dev {t.ZTUNNEL_VETH}" in route
