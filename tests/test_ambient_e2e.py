"""The reference's packet walks (istio-ambient-redirect.md §6), observed for real.

One world for the module (node, ztunnel pod, two ambient pods, one plain pod, server,
in namespaces), with geneve-dp endpoints as istioin/istioout/pistioin/pistioout. The
tests are the `geneve-dp demo` steps, in order (pod del and down change the world, so they come
last). Assertions are on counters and logs: the proxy's accept log (listener, client,
original destination), GENEVE packets per VNI counted by the endpoints, iptables rule
counters, and what the echo servers saw; never on timing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from geneve_dp.ambient import demo
from geneve_dp.ambient import topology as t

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def scenario() -> Iterator[demo.Scenario]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    sc = demo.Scenario(t.World(tag=f"gdpe-{os.getpid()}-{time.monotonic_ns() % 100000}"))
    try:
        sc.setup()
        yield sc
    finally:
        sc.destroy()


def assert_step(step: demo.Step) -> None:
    detail = "\n".join([*step.observed, *(f"FAILED: {f}" for f in step.failures)])
    assert step.passed, f"step {step.number} ({step.title}):\n{detail}"


def test_1_ambient_pod_to_server_tcp_is_captured_outbound(scenario: demo.Scenario) -> None:
    step = scenario.step1()
    assert_step(step)
    rec = [r for r in scenario.accepts() if r["listener"] == 15001]
    assert rec and rec[-1]["orig_dst"] == f"{t.SERVER_IP}:{t.TCP_PORT}"


def test_2_plain_pod_to_server_is_not_captured(scenario: demo.Scenario) -> None:
    assert_step(scenario.step2())


def test_3_ambient_pod_udp_is_not_captured(scenario: demo.Scenario) -> None:
    assert_step(scenario.step3())


def test_4_server_to_ambient_pod_is_captured_inbound(scenario: demo.Scenario) -> None:
    step = scenario.step4()
    assert_step(step)
    listeners = [r["listener"] for r in scenario.accepts()[-2:]]
    assert listeners == [15006, 15008]


def test_5_spoofed_source_legs_and_return_paths(scenario: demo.Scenario) -> None:
    assert_step(scenario.step5())


def test_5b_forged_packets_to_ztunnel_are_dropped_and_counted(scenario: demo.Scenario) -> None:
    assert_step(scenario.step_forged())


def test_6_pod_del_stops_capture(scenario: demo.Scenario) -> None:
    assert_step(scenario.step6())


def test_7_down_leaves_no_trace(scenario: demo.Scenario) -> None:
    assert_step(scenario.step7())
