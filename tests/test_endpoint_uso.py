"""Receive coalescing (offload mode): runs of same-sized datagrams of one UDP flow are
written to the device as one UDP_L4 super-frame, and the kernel hands the receiving
socket exactly the datagrams that were sent; only packets whose GENEVE headers and
outer sources are the same are merged; a UDP GSO batch with bad packets inside loses
only those.

The endpoint is paused (SIGSTOP) while a burst is queued on its socket, so one
recvmmsg sees the whole burst and what gets merged does not depend on timing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.endpoint_helpers import (
    Endpoint,
    Sniffer,
    ether,
    geneve,
    ip_checksum,
    option,
    send_udp,
    underlay,
    wait_for,
)
from tests.netns import Netns

pytestmark = pytest.mark.root

VNI = 100
PEER_MAC = bytes.fromhex("020000000077")
INNER_SRC, INNER_DST = "192.168.100.9", "192.168.100.1"
SPORT, DPORT = 40001, 9999

SINK = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
got = []
try:
    while True:
        data, addr = s.recvfrom(70000)
        got.append(data.hex())
except socket.timeout:
    pass
print(json.dumps(got), flush=True)
"""


def udp4(payload: bytes, ip_id: int, *, good_csum: bool = True, zero_csum: bool = False) -> bytes:
    """An inner IPv4/UDP datagram with a chosen IP ID and a real (or broken) checksum."""
    src, dst = ipaddress.ip_address(INNER_SRC).packed, ipaddress.ip_address(INNER_DST).packed
    ulen = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", SPORT, DPORT, ulen, 0) + payload
    csum = 0 if zero_csum else (ip_checksum(pseudo + udp) or 0xFFFF)
    if not good_csum:
        csum ^= 0x5A5A
    udp = udp[:6] + csum.to_bytes(2, "big") + udp[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ip_id, 0x4000, 64, 17, 0, src, dst)
    hdr = hdr[:10] + ip_checksum(hdr).to_bytes(2, "big") + hdr[12:]
    return hdr + udp


@pytest.fixture
def rx_env() -> Iterator[tuple[Netns, Netns, Endpoint, bytes]]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    a, b = Netns("usoa"), Netns("usob")
    try:
        underlay(a, b)
        spec = {
            "name": "gt0",
            "vni": VNI,
            "remote": "10.0.0.2",
            "mode": "tap",
            "addresses": ["192.168.100.1/24"],
        }
        # One worker: packets from two source ports meet in one receive queue.
        ep = Endpoint(a, "c+offload+w1", [spec])
        try:
            assert ep.error is None, ep.error
            mac = bytes.fromhex(
                a.run("cat", "/sys/class/net/gt0/address").stdout.strip().replace(":", "")
            )
            yield a, b, ep, mac
        finally:
            ep.close()
    finally:
        a.delete()
        b.delete()


def _burst(b: Netns, mac: bytes, datagrams: list[bytes]) -> None:
    pkts = [
        ("10.0.0.2", "10.0.0.1", 6081, 0, geneve(VNI, 0x6558, ether(mac, PEER_MAC, 0x0800, d)))
        for d in datagrams
    ]
    send_udp(b, pkts)


def test_udp_run_is_coalesced_and_delivered_exactly(
    rx_env: tuple[Netns, Netns, Endpoint, bytes],
) -> None:
    a, b, ep, mac = rx_env
    assert ep.tunnel("gt0")["offloads"]["rx_coalesce_udp"] is True
    payloads = [bytes([i]) * 200 for i in range(24)] + [b"tail" * 10]
    # 24 full-sized datagrams with consecutive IDs and a shorter last one: one run.
    good = [udp4(p, 1000 + i) for i, p in enumerate(payloads)]
    # A bad checksum ends the run: it goes to the kernel as is, which drops it.
    bad = udp4(b"x" * 200, 1025, good_csum=False)
    # Out-of-sequence IDs cannot be merged (segmentation would renumber them); a
    # zero checksum (allowed over IPv4) can.
    loose = [udp4(b"L" * 200, 3000), udp4(b"M" * 200, 2000), udp4(b"N" * 200, 2001, zero_csum=True)]
    before = ep.tunnel("gt0")["counters"]
    snmp_before = _udp_snmp(a)
    sink = a.popen([sys.executable, "-c", SINK, INNER_DST, str(DPORT), "2"], stdout=subprocess.PIPE)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    sniff = Sniffer(a, "gt0", 4.0, b"\x9c\x41", sentinel=b"N" * 200)  # 40001 as bytes
    os.kill(ep.proc.pid, signal.SIGSTOP)
    try:
        _burst(b, mac, [*good, bad, *loose])
    finally:
        os.kill(ep.proc.pid, signal.SIGCONT)
    out, _ = sink.communicate(timeout=30)
    received = [bytes.fromhex(h) for h in json.loads(out)]
    expected = [*payloads, b"L" * 200, b"M" * 200, b"N" * 200]
    assert received == expected  # every good datagram, once, in order; the bad one not

    after = ep.tunnel("gt0")["counters"]
    assert after["rx_packets"] - before["rx_packets"] == len(good) + 1 + len(loose)
    # The run of 25 is one frame; "L" alone; "M"+"N" one more.
    assert after["rx_gro_frames"] - before["rx_gro_frames"] == 2
    assert _udp_snmp(a)["InCsumErrors"] - snmp_before["InCsumErrors"] == 1

    frames = sniff.frames()
    big = [f for f in frames if len(f) > 1000]
    assert len(big) == 1, [len(f) for f in frames]
    ip = big[0][14:]
    assert struct.unpack("!H", ip[4:6])[0] == 1000  # the first datagram's ID leads
    assert ip[28:] == b"".join(payloads)  # payloads back to back behind one header


def _udp_snmp(ns: Netns) -> dict[str, int]:
    lines = [ln.split() for ln in ns.run("cat", "/proc/net/snmp").stdout.splitlines()]
    udp = [ln for ln in lines if ln[0] == "Udp:"]
    return dict(zip(udp[0][1:], map(int, udp[1][1:]), strict=True))


@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_pktgen_flows_arrive_in_order_through_coalescing(mode: str) -> None:
    """A real UDP load through two endpoints: every datagram of every flow arrives,
    none reordered or duplicated, and the receiver wrote super-frames."""
    from bench import pktgen

    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    a, b = Netns("usoa"), Netns("usob")
    try:
        underlay(a, b)
        specs = {
            a: {"remote": "10.0.0.2", "addresses": ["192.168.100.1/24"]},
            b: {"remote": "10.0.0.1", "addresses": ["192.168.100.2/24"]},
        }
        eps = [
            Endpoint(ns, "c+offload", [{"name": "gt0", "vni": VNI, "mode": mode, **s}])
            for ns, s in specs.items()
        ]
        try:
            for ep in eps:
                assert ep.error is None, ep.error
            a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")
            # A rate the endpoints keep up with, so every loss would be a bug.
            r = pktgen.udp_stream(
                a.name, b.name, "192.168.100.2", payload=64, flows=4, rate=20000, count=20000
            )
            sink = r["sink"]
            assert sink["valid_packets"] == 20000, r
            assert sink["reordered"] == 0 and sink["duplicates"] == 0, r
            assert wait_for(lambda: eps[1].tunnel("gt0")["counters"]["rx_gro_frames"] > 0)
            # The bursts left the sender as UDP runs through the inject device, and
            # the receiver counted every datagram in them.
            sent, got = eps[0].tunnel("gt0")["counters"], eps[1].tunnel("gt0")["counters"]
            assert 0 < sent["tx_injected"] < 20000 // 2, sent
            assert got["rx_packets"] >= 20000 and sent["tx_packets"] >= 20000
        finally:
            for ep in eps:
                ep.close()
    finally:
        a.delete()
        b.delete()


GSO_SEND = r"""
import json, socket, struct, sys
port, packets = int(sys.argv[1]), [bytes.fromhex(h) for h in json.loads(sys.argv[2])]
size = len(packets[0])
assert all(len(p) == size for p in packets)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.0.0.2", 0))
s.connect(("10.0.0.1", port))
# UDP_SEGMENT (103): one send, cut into datagrams of `size` bytes; through the veth
# the super-packet reaches the endpoint's UDP_GRO socket whole.
s.sendmsg([b"".join(packets)], [(socket.SOL_UDP, 103, struct.pack("H", size))])
"""


def _frame(
    mac: bytes, datagram: bytes, *, vni: int = VNI, options: bytes = b"", version: int = 0
) -> bytes:
    return geneve(vni, 0x6558, ether(mac, PEER_MAC, 0x0800, datagram), options, version=version)


def test_bad_packets_inside_a_gso_batch_cost_only_themselves(
    rx_env: tuple[Netns, Netns, Endpoint, bytes],
) -> None:
    a, b, ep, mac = rx_env
    payloads = [bytes([0x30 + i]) * 120 for i in range(8)]
    frames = [_frame(mac, udp4(p, 500 + i)) for i, p in enumerate(payloads)]
    frames[2] = _frame(mac, udp4(payloads[2], 502), version=1)
    frames[5] = _frame(mac, udp4(payloads[5], 505), vni=VNI + 1)
    before = ep.tunnel("gt0")
    sink = a.popen([sys.executable, "-c", SINK, INNER_DST, str(DPORT), "2"], stdout=subprocess.PIPE)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    b.run(sys.executable, "-c", GSO_SEND, "6081", json.dumps([f.hex() for f in frames]))
    out, _ = sink.communicate(timeout=30)
    received = [bytes.fromhex(h) for h in json.loads(out)]
    assert received == [p for i, p in enumerate(payloads) if i not in (2, 5)]
    after = ep.tunnel("gt0")
    sock0, sock1 = before["socket"]["drops"], after["socket"]["drops"]
    assert sock1["bad_version"] - sock0["bad_version"] == 1
    assert sock1["unknown_vni"] - sock0["unknown_vni"] == 1
    assert after["counters"]["rx_packets"] - before["counters"]["rx_packets"] == 6


def test_only_identical_geneve_headers_and_outer_sources_merge(
    rx_env: tuple[Netns, Netns, Endpoint, bytes],
) -> None:
    a, b, ep, mac = rx_env
    opt_a = option(0x0102, 0x01, b"AAAA")
    opt_b = option(0x0102, 0x01, b"BBBB")
    payloads = [bytes([0x40 + i]) * 150 for i in range(9)]
    datagrams = [udp4(p, 700 + i) for i, p in enumerate(payloads)]
    # 0-2 with option A, 3-5 with option B (same length: only the contents differ),
    # 6-8 again B but from another outer source port.
    first = [
        ("10.0.0.2", "10.0.0.1", 6081, 0, _frame(mac, d, options=opt_a if i < 3 else opt_b))
        for i, d in enumerate(datagrams[:6])
    ]
    before = ep.tunnel("gt0")["counters"]
    sink = a.popen([sys.executable, "-c", SINK, INNER_DST, str(DPORT), "2"], stdout=subprocess.PIPE)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    os.kill(ep.proc.pid, signal.SIGSTOP)
    try:
        send_udp(b, first)
        # Another send_udp is another socket: the same outer address (the tunnel's
        # remote), another source port.
        send_udp(b, [("10.0.0.2", "10.0.0.1", 6081, 0, _frame(mac, d, options=opt_b))
                     for d in datagrams[6:]])  # fmt: skip
    finally:
        os.kill(ep.proc.pid, signal.SIGCONT)
    out, _ = sink.communicate(timeout=30)
    assert [bytes.fromhex(h) for h in json.loads(out)] == payloads
    after = ep.tunnel("gt0")["counters"]
    assert after["rx_packets"] - before["rx_packets"] == 9
    assert after["rx_gro_frames"] - before["rx_gro_frames"] == 3
    assert after["options_seen"]["0x0102:0x01"] - before["options_seen"].get("0x0102:0x01", 0) == 9
