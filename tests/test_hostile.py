"""Hostile underlay input (issue 7): a 20-second flood of malformed and misaddressed
GENEVE packets from the peer namespace, at the generator's full rate, while a
legitimate flow runs through the same tunnel.

The flood is written with AF_PACKET (bench/pktgen.c send-frames), so outer sources can
be spoofed. Every template carries the drop reason the receiver must count for it
(tests/hostile.py), and the generator reports how many of each it sent: the receiver's
counters must add up to that, reason by reason, short by no more than what the kernel
dropped before the dataplane could see it (the socket's drop counter, SO_RXQ_OVFL, and
the veth/backlog drop counters). Nothing from the flood may reach the device, and the
dataplane must send nothing in answer (no reflection, no amplification).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench import pktgen
from geneve_dp.dataplane.reasons import SOCKET_DROP_REASONS, TUNNEL_DROP_REASONS
from tests import hostile
from tests.daemon_helpers import up
from tests.endpoint_helpers import Endpoint, geneve, underlay
from tests.netns import Netns
from tests.packets import Flow, eth, udp

# Daemons started here keep their sockets in a run directory of this test's own.
pytestmark = [pytest.mark.root, pytest.mark.usefixtures("run_dir")]

FLOOD_SECONDS = float(os.environ.get("GDP_FLOOD_SECONDS", "20"))
LEGIT_PPS = 2000
VNI = 100


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns]) -> Iterator[tuple[Netns, Netns]]:
    a, b = netns_factory("fa"), netns_factory("fb")
    underlay(a, b)
    yield a, b


def mac(ns: Netns, dev: str) -> bytes:
    return bytes.fromhex(
        ns.run("cat", f"/sys/class/net/{dev}/address").stdout.strip().replace(":", "")
    )


def drops(t: dict[str, Any]) -> dict[str, int]:
    """Drop counters of one tunnel and its receive socket, by reason."""
    out = {r: int(t["socket"]["drops"][r]) for r in SOCKET_DROP_REASONS}
    out.update({r: int(t["counters"]["drops"][r]) for r in TUNNEL_DROP_REASONS})
    return out


def kernel_drops(a: Netns, b: Netns, t: dict[str, Any]) -> dict[str, int]:
    return {
        "socket_rx_queue_overflow": int(t["socket"]["rx_queue_overflow"]),
        "veth_ua_tx_dropped": hostile.link_stats(a, "ua")["tx_dropped"],
        "veth_ub_rx_dropped": hostile.link_stats(b, "ub")["rx_dropped"],
        "softnet_dropped": hostile.softnet_dropped(),
    }


def test_flood_is_counted_not_delivered_not_answered(pair: tuple[Netns, Netns]) -> None:
    a, b = pair
    templates = hostile.flood(
        dst_mac=mac(b, "ub"), src_mac=mac(a, "ua"), dst="10.0.0.2", remote="10.0.0.1",
        vni=VNI, port=6081,
    )  # fmt: skip
    expected_reasons = {h.reason for h in templates}
    assert {"truncated", "bad_version", "options_truncated", "option_overruns", "unknown_vni",
            "wrong_remote", "critical_option", "c_bit_mismatch"} <= expected_reasons  # fmt: skip
    args = ["gt0", "--vni", str(VNI), "--mode", "tap"]
    with (
        up(a, *args, "--remote", "10.0.0.2", "--address", "192.168.100.1/24") as da,
        up(b, *args, "--remote", "10.0.0.1", "--address", "192.168.100.2/24") as db,
    ):
        a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")  # ARP through the tunnel
        before = db.tunnel("gt0")
        k_before = kernel_drops(a, b, before)
        ub_before = hostile.link_stats(b, "ub")
        gt_before = hostile.link_stats(b, "gt0")
        icmp_before = hostile.snmp(b, "Icmp", "OutMsgs")

        legit: dict[str, Any] = {}

        def legit_flow() -> None:
            legit.update(
                pktgen.udp_stream(
                    a.name,
                    b.name,
                    "192.168.100.2",
                    rate=LEGIT_PPS,
                    duration=FLOOD_SECONDS,
                    flows=2,
                    sport=21000,
                )
            )

        th = threading.Thread(target=legit_flow)
        th.start()
        sent = pktgen.send_frames(
            a.name, "ua", [h.frame for h in templates], duration=FLOOD_SECONDS
        )
        th.join(FLOOD_SECONDS + 60)
        assert not th.is_alive() and legit, "the legitimate flow did not finish"

        # No crash: both daemons still answer, and the flooded one still forwards.
        after = db.tunnel("gt0")
        da.status()
        assert db.proc.poll() is None and da.proc.poll() is None
        k_after = kernel_drops(a, b, after)
        ub_after = hostile.link_stats(b, "ub")
        gt_after = hostile.link_stats(b, "gt0")
        icmp_after = hostile.snmp(b, "Icmp", "OutMsgs")

    per_template = sent["per_template"]
    assert len(per_template) == len(templates) and sum(per_template) == sent["sent_packets"]
    expected = dict.fromkeys(drops(after), 0)
    for h, n in zip(templates, per_template, strict=True):
        expected[h.reason] += n
    d0, d1 = drops(before), drops(after)
    counted = {r: d1[r] - d0[r] for r in d1}
    kernel = {k: k_after[k] - k_before[k] for k in k_after}
    flood_sent = int(sent["sent_packets"])
    print(
        f"flood: {flood_sent} frames in {sent['elapsed_s']:.1f} s ({sent['pps']:.0f} pps), "
        f"counted {sum(counted.values())}, kernel drops {kernel}; by reason "
        + ", ".join(f"{r} {counted[r]}/{expected[r]}" for r in sorted(expected) if expected[r])
        + f"; legit {legit['sink']['valid_packets']}/{legit['send']['sent_packets']} delivered"
    )
    assert flood_sent > 0
    # Reason by reason: never more than was sent of that kind (a miscount), and nothing
    # counted under a reason the flood did not contain.
    for reason in expected:
        assert counted[reason] <= expected[reason], (reason, counted, expected)
    # In total, short only by what the kernel dropped before the dataplane read it.
    shortfall = flood_sent - sum(counted.values())
    assert 0 <= shortfall <= sum(kernel.values()), (shortfall, kernel, counted, expected)
    for reason in expected_reasons:
        assert counted[reason] > 0, reason

    # Nothing from the flood reached the device: what the dataplane wrote to gt0 is the
    # legitimate flow and the ARP before it, and so is what the kernel received there.
    legit_sent = int(legit["send"]["sent_packets"])
    delivered = after["counters"]["rx_packets"] - before["counters"]["rx_packets"]
    assert delivered <= legit_sent + 20, (delivered, legit_sent)
    assert gt_after["rx_packets"] - gt_before["rx_packets"] <= legit_sent + 20

    # Nothing sent in answer: the underlay carried out only what the tunnel sent (the
    # legitimate flow is one way, so that is ARP replies through it and little else),
    # the kernel's own ARP, and no ICMP at all.
    tunnel_tx = after["counters"]["tx_packets"] - before["counters"]["tx_packets"]
    underlay_tx = ub_after["tx_packets"] - ub_before["tx_packets"]
    assert tunnel_tx <= 20, tunnel_tx
    assert underlay_tx <= tunnel_tx + 20, (underlay_tx, tunnel_tx)
    assert icmp_after == icmp_before

    # The legitimate flow still got through (it shares the socket with the flood, so a
    # full socket costs it too: most of it, not all of it, is the bound).
    assert legit["sink"]["valid_packets"] >= 0.5 * legit_sent, legit


# ---- one packet must not become many (issue 19 item 1) -----------------------------

AMP_PORT = 9998
COUNT_SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
n = 0
try:
    while True:
        s.recv(70000)
        n += 1
except socket.timeout:
    pass
print(n, flush=True)
"""
# From the tunnel's remote address: once as one datagram, once as a UDP GSO send of
# two segments, which the veth carries whole to a socket that reports its segment size.
AMP_SEND = r"""
import socket, struct, sys
pkt = bytes.fromhex(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.0.0.2", 0))
s.connect(("10.0.0.1", 6081))
s.send(pkt)
s.sendmsg([pkt], [(socket.SOL_UDP, 103, struct.pack("H", (len(pkt) + 1) // 2))])
"""


@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_one_packet_is_delivered_at_most_once(mode: str) -> None:
    """A GENEVE packet whose inner UDP length says 18 while its IP packet carries 1,280
    bytes, with only the pseudo-header sum for 18 as checksum, looks like a UDP
    super-frame of 128 datagrams. It came as one datagram (and then as one GSO send of
    two), so it is at most one datagram each time: kernel geneve never amplifies."""
    a, b = Netns("ampa"), Netns("ampb")
    try:
        underlay(a, b)
        spec = {"name": "gt0", "vni": VNI, "remote": "10.0.0.2", "mode": mode,
                "addresses": ["192.168.100.1/24"]}  # fmt: skip
        ep = Endpoint(a, "c+offload+w1", [spec])
        try:
            assert ep.error is None, ep.error
            before = ep.tunnel("gt0")
            assert before["offloads"]["rx_coalesce_udp"] is True  # the path under test
            inner = udp(Flow("192.168.100.9", "192.168.100.1", 40000, AMP_PORT),
                        bytes(1272), csum="partial", length=18)  # fmt: skip
            assert len(inner) == 20 + 1280
            if mode == "tap":
                dev_mac = mac(a, "gt0")
                packet = geneve(VNI, hostile.TEB, eth(inner, dst=dev_mac))
            else:
                packet = geneve(VNI, 0x0800, inner)
            sink = a.popen([sys.executable, "-c", COUNT_SINK, "192.168.100.1", str(AMP_PORT), "2"],
                           stdout=subprocess.PIPE)  # fmt: skip
            assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            b.run(sys.executable, "-c", AMP_SEND, packet.hex())
            out, _ = sink.communicate(timeout=30)
            after = ep.tunnel("gt0")
        finally:
            ep.close()
    finally:
        a.delete()
        b.delete()
    received = int(out)
    c0, c1 = before["counters"], after["counters"]
    counted = {k: c1[k] - c0[k] for k in ("rx_packets", "rx_gro_frames")}
    dropped = {r: c1["drops"][r] - c0["drops"][r] for r in c1["drops"]}
    socket_rx = after["socket"]["rx_packets"] - before["socket"]["rx_packets"]
    print(f"{mode}: sink got {received}, tunnel {counted}, socket rx {socket_rx}")
    assert socket_rx == 2, json.dumps(after["socket"])  # each send read as one datagram
    # Each is counted once, delivered whole (the kernel then finds its UDP checksum
    # wrong) and nothing dropped: never as a super-frame.
    assert counted == {"rx_packets": 2, "rx_gro_frames": 0}, counted
    assert not any(dropped.values()), dropped
    assert received <= 2
