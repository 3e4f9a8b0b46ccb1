"""TCP super-frames sent whole through the inject device (dataplane/inject.py), and
the receive side's rule for super-packets (csrc/seg.c super_plan).

Two namespaces joined by a veth underlay, a C-engine endpoint with offloads in each
(tests.endpoint_helpers). Byte-exact 1 GiB transfers over this path, and the on-wire
shape of the segments the kernel cuts from it, are in test_endpoint_bulk.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.endpoint_helpers import Endpoint, endpoint, underlay, wait_for
from tests.hostile import snmp
from tests.netns import Netns

pytestmark = pytest.mark.root

VNI = 100
MIB = 1 << 20


def spec(remote: str, host: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "gt0", "vni": VNI, "remote": remote, "addresses": [f"192.168.100.{host}/24"]}
        | extra
    ]


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns]) -> tuple[Netns, Netns]:
    a, b = netns_factory("inja"), netns_factory("injb")
    underlay(a, b)
    return a, b


@pytest.fixture
def tunnel(pair: tuple[Netns, Netns]) -> Iterator[tuple[Endpoint, Endpoint]]:
    a, b = pair
    with endpoint(a, "c+offload", spec("10.0.0.2", 1)) as ea:
        with endpoint(b, "c+offload", spec("10.0.0.1", 2)) as eb:
            assert ea.error is None and eb.error is None, (ea.error, eb.error)
            a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")
            yield ea, eb


SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5301)); s.listen(1); s.settimeout(30)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(30); n = 0
while True:
    k = len(c.recv(1 << 20))
    if not k:
        break
    n += k
print(n, flush=True)
"""

SOURCE = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 5301), timeout=30)
block = bytes(range(256)) * 4096
left = int(sys.argv[2])
while left > 0:
    c.sendall(block[:left]); left -= len(block)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def transfer(a: Netns, b: Netns, size: int, timeout: float = 60, dst: str = "192.168.100.2") -> int:
    """Bytes received of ``size`` sent from a to b (at ``dst``) over TCP through the
    tunnel."""
    srv = b.popen([sys.executable, "-c", SINK, dst], stdout=subprocess.PIPE)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        a.run(sys.executable, "-c", SOURCE, dst, str(size), timeout=timeout)
        out, _ = srv.communicate(timeout=30)
        return int(out)
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(5)


def sysctl(ns: Netns, dev: str, key: str) -> str:
    return ns.run("cat", f"/proc/sys/net/ipv4/conf/{dev}/{key}").stdout.strip()


def test_inject_device_made_and_removed(pair: tuple[Netns, Netns]) -> None:
    a, _b = pair
    with endpoint(a, "c+offload", spec("10.0.0.2", 1)) as ea:
        assert ea.ready[0]["offloads"]["tx_inject"] is True
        dev = ea.ready[0]["inject_device"]
        assert dev.startswith("gdpx")
        links = json.loads(a.run("ip", "-j", "link", "show", "dev", dev).stdout)
        assert links[0]["operstate"] in ("UP", "UNKNOWN")
        # Forwarding is the device's own, never the netns' global switch.
        assert sysctl(a, dev, "forwarding") == "1"
        assert sysctl(a, dev, "accept_local") == "1"
        assert sysctl(a, "all", "forwarding") == "0"
        addrs = json.loads(a.run("ip", "-j", "addr", "show", "dev", dev).stdout)
        assert addrs[0]["addr_info"] == []
    gone = a.run("ip", "link", "show", "dev", dev, check=False)
    assert gone.returncode != 0, "the inject device outlived its dataplane"


def test_inject_off_where_it_cannot_work(pair: tuple[Netns, Netns]) -> None:
    """No inject device with UDP checksums, over IPv6, or with --no-offload; and none
    when the netns filters reverse paths (our own source arriving on a device)."""
    a, _b = pair
    cases = [
        ("c+offload", spec("10.0.0.2", 1, udp_csum=True)),
        ("c+offload", spec("fd00::2", 1)),
        ("c", spec("10.0.0.2", 1)),
    ]
    for engine, s in cases:
        with endpoint(a, engine, s) as ea:
            assert ea.ready[0]["offloads"]["tx_inject"] is False, (engine, s)
    a.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
    with endpoint(a, "c+offload", spec("10.0.0.2", 1)) as ea:
        assert ea.ready[0]["offloads"]["tx_inject"] is False
        assert ea.ready[0]["inject_device"] is None
        assert "gdpx" not in a.run("ip", "-o", "link").stdout


def test_super_frames_go_whole_and_arrive_whole(
    pair: tuple[Netns, Netns], tunnel: tuple[Endpoint, Endpoint]
) -> None:
    """The sender writes TSO super-frames whole; through the veth the receiver gets
    them as super-packets and writes each as one GSO frame: far fewer frames than
    segments on both sides, and every byte arrives."""
    a, b = pair
    ea, eb = tunnel
    assert transfer(a, b, 64 * MIB) == 64 * MIB
    sent, got = ea.tunnel("gt0")["counters"], eb.tunnel("gt0")["counters"]
    assert sent["tx_injected"] > 0
    # A 64 KiB super-frame is ~45 segments: whole frames dominate both ends.
    assert sent["tx_packets"] > 10 * sent["tx_injected"], sent
    assert got["rx_packets"] > 10 * got["rx_gro_frames"] > 0, got
    assert eb.tunnel("gt0")["socket"]["rx_packets"] < got["rx_packets"] // 5
    assert sum(sent["drops"].values()) == 0 and sum(got["drops"].values()) == 0


def _pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    words = (*struct.unpack("!4H", src + dst), 6, length)
    s = sum(words)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def test_reassembled_datagram_is_not_taken_for_a_super_packet(
    pair: tuple[Netns, Netns], tunnel: tuple[Endpoint, Endpoint]
) -> None:
    """A datagram larger than the underlay MTU that arrived in fragments, carrying a
    TCP packet whose checksum field holds just the pseudo-header sum (what a local
    super-packet has), is not trusted: it reaches the device as it came, and the
    kernel's TCP drops it for its checksum."""
    a, b = pair
    ea, _eb = tunnel
    mac = bytes.fromhex(ea.ready[0]["mac"].replace(":", ""))
    src, dst = socket.inet_aton("192.168.100.2"), socket.inet_aton("192.168.100.1")
    payload = bytes(4000)
    tcp_len = 20 + len(payload)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5999, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", _pseudo_sum(src, dst, tcp_len)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0, 64, 6, 0, src, dst)
    s = sum(struct.unpack("!10H", ip))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - s) + ip[12:]
    frame = mac + bytes.fromhex("020000000002") + b"\x08\x00" + ip + tcp + payload
    geneve = struct.pack("!BBHI", 0, 0, 0x6558, VNI << 8) + frame
    send = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.setsockopt(socket.IPPROTO_IP, 10, 0); "  # IP_MTU_DISCOVER: DONT, so fragments
        "s.bind(('10.0.0.2', 0)); s.sendto(bytes.fromhex(sys.argv[1]), ('10.0.0.1', 6081))"
    )

    def csum_errors() -> int:
        lines = [ln.split() for ln in a.run("cat", "/proc/net/snmp").stdout.splitlines()]
        tcp_rows = [ln for ln in lines if ln[0] == "Tcp:"]
        return int(tcp_rows[1][tcp_rows[0].index("InCsumErrors")])

    before_errors = csum_errors()
    before = ea.tunnel("gt0")["counters"]
    b.run(sys.executable, "-c", send, geneve.hex())
    assert wait_for(lambda: ea.tunnel("gt0")["counters"]["rx_packets"] > before["rx_packets"])
    after = ea.tunnel("gt0")["counters"]
    # Not written as a super-frame (the device's own ND/MLD chatter may add packets).
    assert after["rx_gro_frames"] == before["rx_gro_frames"]
    assert wait_for(lambda: csum_errors() > before_errors)


BURST = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("192.168.100.2", 7777))
for i in range(int(sys.argv[1])):
    s.send(bytes([i]) * 200)
"""


PORT_7777 = r"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.168.100.2", 7777))
print("bound", flush=True)
time.sleep(60)
"""


def test_udp_run_on_the_wire_is_one_datagram_per_geneve_packet(
    pair: tuple[Netns, Netns], tunnel: tuple[Endpoint, Endpoint], tmp_path: Any
) -> None:
    """A burst of one UDP flow leaves the sender as UDP runs through the inject device.
    With transmit checksum offload off on the veth (so the kernel segments in software,
    as before a NIC's wire) every captured GENEVE packet carries exactly one of the
    datagrams, in order, whole, with a correct UDP checksum and consecutive IDs."""
    from tests.test_endpoint_bulk import TXCSUM_OFF

    a, b = pair
    ea, eb = tunnel
    assert a.run(sys.executable, "-c", TXCSUM_OFF, "ua").stdout.strip() == "0"
    pcap = tmp_path / "burst.pcap"
    argv = ["tcpdump", "-i", "ub", "-s", "0", "-n", "--immediate-mode", "-w", str(pcap)]
    cap = b.popen([*argv, "udp port 6081"], stderr=subprocess.PIPE)
    n = 40
    before = ea.tunnel("gt0")["counters"]["tx_injected"]
    got_before = eb.tunnel("gt0")["counters"]["rx_packets"]
    # A bound port: no ICMP port unreachable comes back to fail the sender's sends.
    sink = b.popen([sys.executable, "-c", PORT_7777], stdout=subprocess.PIPE)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "bound"
    try:
        assert cap.stderr is not None and "listening on ub" in cap.stderr.readline()
        # Queued on the device while the sender is paused, so it reads them in a row
        # however the scheduler runs the burst's writer and the engine's tx worker.
        os.kill(ea.proc.pid, signal.SIGSTOP)
        try:
            a.run(sys.executable, "-c", BURST, str(n))
        finally:
            os.kill(ea.proc.pid, signal.SIGCONT)
        assert wait_for(lambda: eb.tunnel("gt0")["counters"]["rx_packets"] >= got_before + n)
        time.sleep(0.3)
    finally:
        cap.send_signal(signal.SIGINT)
        cap.communicate(timeout=10)
        sink.kill()
        sink.wait(5)
    assert ea.tunnel("gt0")["counters"]["tx_injected"] > before
    from scapy.all import IP, UDP, Ether, rdpcap  # type: ignore[import-untyped]

    inner = []
    for pkt in rdpcap(str(pcap)):
        outer = pkt[IP]
        assert len(bytes(outer)) <= 1500
        payload = bytes(outer[UDP].payload)
        frame = Ether(payload[8 + (payload[0] & 0x3F) * 4 :])
        if UDP in frame and frame[UDP].dport == 7777:
            inner.append(frame)
    # The receiver counted all n; the capture may miss a few on a busy machine, so what
    # it did see is checked: most of the burst, in order, each datagram whole.
    seq = [bytes(f[UDP].payload)[0] for f in inner]
    assert len(seq) >= n // 2 and seq == sorted(set(seq)), seq
    assert [bytes(f[UDP].payload) for f in inner] == [bytes([i]) * 200 for i in seq]
    for f in inner:
        got = f[UDP].chksum
        del f[UDP].chksum
        assert Ether(bytes(f))[UDP].chksum == got  # scapy recomputes it
        assert f[IP].len == 20 + 8 + 200 and f[UDP].len == 8 + 200
    ids = [f[IP].id for f in inner]
    assert ids == [(ids[0] + i - seq[0]) & 0xFFFF for i in seq]  # one ID per datagram sent


def test_python_receiver_takes_super_packets(pair: tuple[Netns, Netns]) -> None:
    """A C sender's TCP super-packets reach a Python-engine receiver on the same host
    whole (its socket has no UDP_GRO to split them): it completes their checksums and
    the transfer arrives."""
    a, b = pair
    with endpoint(a, "c+offload", spec("10.0.0.2", 1)) as ea:
        with endpoint(b, "python", spec("10.0.0.1", 2)) as eb:
            assert ea.error is None and eb.error is None, (ea.error, eb.error)
            a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")
            assert transfer(a, b, 8 * MIB) == 8 * MIB
            assert ea.tunnel("gt0")["counters"]["tx_injected"] > 0


# One connection; each round the client sends one message of the size given and the
# server answers one byte once it has it all, so every message leaves as one TSO
# frame (TCP_NODELAY, nothing else in flight).
PINGPONG_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5302)); s.listen(1); s.settimeout(30)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
size = int(c.recv(16).decode()); c.sendall(b"k")
while True:
    got = 0
    while got < size:
        k = len(c.recv(size - got))
        if not k:
            sys.exit(0)
        got += k
    c.sendall(b"k")
"""

PINGPONG_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 5302), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
size = mss + int(sys.argv[2])
c.sendall(str(size).encode().ljust(16)); c.recv(1)
for _ in range(int(sys.argv[3])):
    c.sendall(b"x" * size)
    assert c.recv(1) == b"k"
print(size, flush=True)
"""


@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_two_segment_frame_that_fits_one_packet_arrives_intact(
    netns_factory: Callable[[str], Netns], mode: str
) -> None:
    """A tunnel MTU below what the underlay carries (1500 over 1600, as the bench
    sets it) lets a TSO frame of two segments, the second short, fit one underlay
    packet. The receiver cannot tell such a datagram from a sender's complete packet,
    so the sender segments it itself: the receiver's TCP sees no checksum errors and
    nothing is retransmitted. (Injected whole, each arrived with its checksum
    unfinished and was dropped.)"""
    a, b = netns_factory("inj2a"), netns_factory("inj2b")
    underlay(a, b, mtu=1600)
    rounds = 100
    with (
        endpoint(a, "c+offload", spec("10.0.0.2", 1, mode=mode, mtu=1500)) as ea,
        endpoint(b, "c+offload", spec("10.0.0.1", 2, mode=mode, mtu=1500)) as eb,
    ):
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")
        csum_errors = snmp(b, "Tcp", "InCsumErrors")
        retrans = snmp(a, "Tcp", "RetransSegs")
        before = ea.tunnel("gt0")["counters"]
        srv = b.popen([sys.executable, "-c", PINGPONG_SERVER, "192.168.100.2"],
                      stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
            # 20 bytes over one MSS: the frame is 20 bytes over the tunnel MTU, still
            # within the 64 the underlay has spare.
            out = a.run(sys.executable, "-c", PINGPONG_CLIENT, "192.168.100.2", "20",
                        str(rounds), timeout=60)  # fmt: skip
        finally:
            srv.kill()
            srv.wait(5)
        after = ea.tunnel("gt0")["counters"]
    print(f"{mode}: {rounds} messages of {out.stdout.strip()} bytes")
    # They really were TSO frames of two segments...
    assert after["tx_gso_frames"] - before["tx_gso_frames"] >= rounds // 2, (before, after)
    # ...and arrived whole the first time.
    assert snmp(b, "Tcp", "InCsumErrors") == csum_errors
    assert snmp(a, "Tcp", "RetransSegs") == retrans
