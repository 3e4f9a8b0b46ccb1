"""Bulk TCP through real `geneve-dp up` tunnels, and what the underlay carries.

Two namespaces joined by a veth underlay, a `python -m geneve_dp up` endpoint (C engine)
in each. A deterministic byte stream (a seeded pseudo-random block, each chunk stamped
with its index) is streamed over TCP through the tunnel by small Python programs run in
the namespaces; sender and receiver hash what they sent / got with SHA-256 and the
digests and byte counts must match.

Sizes: the full 1 GiB in every case (TAP and TUN, offload on and --no-offload over an
IPv4 underlay, plus TAP with offload over IPv6, the UDP GSO path). One case took 4-12 s
here (0.9-3.8 Gbit/s on a 2-CPU machine), under the ~20 s past which the others would
have been cut to 256 MiB. The offload counters must show the offload paths were taken
(or not, with --no-offload).

On the wire: tcpdump captures the underlay veth in the receiving namespace during a
20 MB transfer; tshark dissects the capture and every UDP datagram to port 6081 must be
GENEVE with the configured VNI, no IP datagram may exceed the underlay MTU or be a
fragment, outer UDP checksums are zero over IPv4 and verified good over IPv6, and every
inner TCP checksum verifies good.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.endpoint_helpers import underlay
from tests.netns import Netns

pytestmark = pytest.mark.root

GDP = [sys.executable, "-m", "geneve_dp"]
ROOT = str(Path(__file__).resolve().parent.parent)
VNI = 4242
PORT = 5201
GIB = 1 << 30
MIB = 1 << 20

RECEIVER = r"""
import hashlib, socket, sys
addr = sys.argv[1]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, int(sys.argv[2]))); s.listen(1); s.settimeout(30)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(30)
h = hashlib.sha256(); n = 0
buf = bytearray(1 << 20); view = memoryview(buf)
while True:
    k = c.recv_into(buf)
    if not k:
        break
    h.update(view[:k]); n += k
print(n, h.hexdigest(), flush=True)
"""

SENDER = r"""
import hashlib, random, socket, sys, time
addr, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = bytearray(random.Random(20260124).randbytes(1 << 20))
c = socket.create_connection((addr, port), timeout=30)
h = hashlib.sha256(); sent = 0; i = 0
t0 = time.monotonic()
while sent < size:
    block[:8] = i.to_bytes(8, "big")
    chunk = memoryview(block)[: min(len(block), size - sent)]
    c.sendall(chunk); h.update(chunk)
    sent += len(chunk); i += 1
c.shutdown(socket.SHUT_WR)
c.recv(1)
c.close()
print(sent, h.hexdigest(), time.monotonic() - t0, flush=True)
"""


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns], run_dir: Path) -> tuple[Netns, Netns]:
    a, b = netns_factory("bka"), netns_factory("bkb")
    underlay(a, b)  # ua 10.0.0.1 / fd00::1 <-> ub 10.0.0.2 / fd00::2, MTU 1500
    return a, b


class Tunnels:
    """`geneve-dp up gt0` in both namespaces; the ``tunnels`` fixture stops them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, a: Netns, b: Netns, mode: str, family: int, offload: bool) -> None:
        ra, rb = ("10.0.0.2", "10.0.0.1") if family == 4 else ("fd00::2", "fd00::1")
        flag = "--offload" if offload else "--no-offload"
        for ns, remote, host in ((a, ra, 1), (b, rb, 2)):
            args = ["gt0", "--vni", str(VNI), "--remote", remote, "--mode", mode, flag]
            args += ["--address", f"192.168.77.{host}/24"]
            self._up(ns, args)

    def _up(self, ns: Netns, args: list[str]) -> None:
        # stderr to a file (nothing has to drain it), read back only on failure.
        with tempfile.TemporaryFile(mode="w+") as err:
            proc = subprocess.Popen(
                [*GDP, "up", "--netns", ns.name, *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=ROOT,
            )
            self.procs.append(proc)
            stdout = proc.stdout
            assert stdout is not None
            got: list[str] = []
            reader = threading.Thread(target=lambda: got.append(stdout.readline()))
            reader.start()
            reader.join(30)
            if not got or "ready" not in got[0]:
                proc.kill()
                proc.wait(10)
                err.seek(0)
                pytest.fail(f"up did not get ready within 30 s: {got!r} {err.read()}")

    def stop(self) -> list[int | None]:
        rcs: list[int | None] = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rcs.append(proc.wait(timeout=15))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                rcs.append(None)
        return rcs


@pytest.fixture
def tunnels(pair: tuple[Netns, Netns]) -> Iterator[Callable[[str, int, bool], Tunnels]]:
    made: list[Tunnels] = []

    def make(mode: str, family: int, offload: bool) -> Tunnels:
        t = Tunnels()
        made.append(t)  # before starting: a half-started pair is stopped too
        t.start(pair[0], pair[1], mode, family, offload)
        return t

    yield make
    for t in made:
        assert t.stop() == [0, 0], "geneve-dp up did not exit 0 on SIGTERM"


def counters(ns: Netns) -> dict[str, Any]:
    out = subprocess.run(
        [*GDP, "stats", "gt0", "--json", "--netns", ns.name],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["gt0"]  # type: ignore[no-any-return]


def transfer(client: Netns, server: Netns, addr: str, size: int) -> float:
    """Stream ``size`` deterministic bytes client -> server over TCP; the byte count and
    SHA-256 must match on both ends. Returns the sender's elapsed seconds."""
    srv = server.popen(
        [sys.executable, "-c", RECEIVER, addr, str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "listening"
        limit = 30 + size / (20 * MIB)  # at least 20 MiB/s, or it is broken
        out = client.run(sys.executable, "-c", SENDER, addr, str(PORT), str(size), timeout=limit)
        n_sent, digest_sent, elapsed = out.stdout.split()
        got, err = srv.communicate(timeout=30)
        assert got.split() == [n_sent, digest_sent], f"received {got!r} {err}, sent {out.stdout!r}"
        assert int(n_sent) == size
        return float(elapsed)
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(5)


CASES = [
    pytest.param("tap", 4, True, GIB, id="tap-ipv4-offload-1GiB"),
    pytest.param("tap", 6, True, GIB, id="tap-ipv6-offload-1GiB"),
    pytest.param("tap", 4, False, GIB, id="tap-ipv4-no-offload-1GiB"),
    pytest.param("tun", 4, True, GIB, id="tun-ipv4-offload-1GiB"),
    pytest.param("tun", 4, False, GIB, id="tun-ipv4-no-offload-1GiB"),
]


@pytest.mark.parametrize(("mode", "family", "offload", "size"), CASES)
def test_bulk_tcp_is_byte_exact(
    pair: tuple[Netns, Netns],
    tunnels: Callable[[str, int, bool], Tunnels],
    mode: str,
    family: int,
    offload: bool,
    size: int,
) -> None:
    a, b = pair
    tunnels(mode, family, offload)
    elapsed = transfer(a, b, "192.168.77.2", size)
    print(f"{mode} ipv{family} offload={offload}: {size * 8 / elapsed / 1e9:.2f} Gbit/s")
    # The offload paths were really taken (or really not): TSO super-frames segmented by
    # the sender, coalesced frames written by the receiver.
    sent, got = counters(a), counters(b)
    if offload:
        assert sent["tx_gso_frames"] > 0 and got["rx_gro_frames"] > 0, (sent, got)
    else:
        assert sent["tx_gso_frames"] == 0 and got["rx_gro_frames"] == 0, (sent, got)
    # Over IPv4 without checksums the super-frames leave whole by the inject device
    # (this kernel has UDP tunnel GSO on TAP), from TAP and TUN tunnels alike; over
    # IPv6 by UDP GSO.
    assert (sent["tx_injected"] > 0) == (offload and family == 4), sent
    assert got["rx_bytes"] >= size and sent["tx_bytes"] >= size


# Turn transmit checksum offload off on a device (legacy ETHTOOL_STXCSUM ioctl, no
# ethtool binary needed); the kernel then drops the TSO/GSO features that depend on it
# and prints the resulting value read back with ETHTOOL_GTXCSUM.
TXCSUM_OFF = r"""
import ctypes, fcntl, socket, struct, sys
SIOCETHTOOL, GTXCSUM, STXCSUM = 0x8946, 0x16, 0x17
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def call(cmd, data):
    ev = ctypes.create_string_buffer(struct.pack("II", cmd, data), 8)
    ifr = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(ev)).ljust(40, b"\0")
    fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    return struct.unpack("II", ev.raw)[1]
call(STXCSUM, 0)
print(call(GTXCSUM, 0))
"""

# Wireshark's checksum status values (proto_checksum_enum_e); pinned by
# test_tshark_checksum_status_values below rather than assumed.
CSUM_BAD, CSUM_GOOD, CSUM_NOT_PRESENT = 0, 1, 3
FIELDS = [
    "frame.number",
    "frame.len",
    "udp.dstport",
    "geneve.vni",
    "udp.checksum.status",
    "tcp.checksum.status",
    "tcp.len",
    "ip.src",
    "tcp.seq_raw",
    "tcp.flags",
    "ip.flags.mf",
    "ip.frag_offset",
    "ipv6.fraghdr.offset",
]


def dissect(pcap: Path) -> list[dict[str, list[str]]]:
    """One dict per frame: field -> its occurrences (outer first)."""
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-o",
            "udp.check_checksum:TRUE",
            "-o",
            "tcp.check_checksum:TRUE",
            "-T",
            "fields",
            "-E",
            "separator=/t",
            "-E",
            "aggregator=,",
            *[x for f in FIELDS for x in ("-e", f)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = []
    for line in out.stdout.splitlines():
        cols = line.split("\t")
        rows.append({f: [v for v in c.split(",") if v] for f, c in zip(FIELDS, cols, strict=True)})
    return rows


def test_tshark_checksum_status_values(tmp_path: Path) -> None:
    """The status numbers the wire test relies on, from a good and a corrupted packet."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    MAC = "02:00:00:00:00:01"

    good = Ether(
        bytes(Ether(src=MAC, dst=MAC) / IP(src="10.1.1.1", dst="10.1.1.2") / TCP() / (b"x" * 10))
    )
    bad_tcp = good.copy()
    bad_tcp[TCP].chksum ^= 0x5555
    zero_udp = (
        Ether(src=MAC, dst=MAC)
        / IP(src="10.1.1.1", dst="10.1.1.2")
        / UDP(sport=1, dport=2, chksum=0)
    )
    pcap = tmp_path / "c.pcap"
    wrpcap(str(pcap), [good, bad_tcp, zero_udp])
    rows = dissect(pcap)
    assert [r["tcp.checksum.status"] for r in rows[:2]] == [[str(CSUM_GOOD)], [str(CSUM_BAD)]]
    assert rows[2]["udp.checksum.status"] == [str(CSUM_NOT_PRESENT)]


@pytest.mark.parametrize(
    ("mode", "family"),
    [("tap", 4), ("tap", 6), ("tun", 4)],
    ids=["tap-ipv4", "tap-ipv6", "tun-ipv4"],
)
def test_underlay_wire(
    pair: tuple[Netns, Netns],
    tunnels: Callable[[str, int, bool], Tunnels],
    tmp_path: Path,
    mode: str,
    family: int,
) -> None:
    """20 MB over a tunnel with offloads on, captured on the receiver's underlay veth.

    A veth passes GSO super-packets and CHECKSUM_PARTIAL skbs through unchanged, so a
    capture would show 60 KB "datagrams" with unfinished outer checksums that no real
    link carries. Transmit checksum offload (and with it TSO/UDP GSO) is turned off on
    both veth ends, so the kernel segments and checksums in software before the capture
    point, as a NIC would before the wire. Nothing merges frames on the receiving veth
    here (no XDP, so no veth GRO): 1514-byte frames are what is captured, and the size
    assertion below would catch merged ones. Without the ethtool change this test fails
    (58 KB UDP GSO frames over IPv6, outer checksums only partial).
    """
    a, b = pair
    for ns, dev in ((a, "ua"), (b, "ub")):
        assert ns.run(sys.executable, "-c", TXCSUM_OFF, dev).stdout.strip() == "0"
    tunnels(mode, family, True)
    gso_before = counters(a)["tx_gso_frames"]
    pcap = tmp_path / "ul.pcap"
    # The dataplane's workers run at nice -10: the capture must outrank them, or on two
    # cores it is the one left without CPU (and drops what it should record).
    cap = b.popen(
        [
            "nice",
            "-n",
            "-20",
            "tcpdump",
            "-i",
            "ub",
            "-s",
            "0",
            "-B",
            "65536",
            "-n",
            "--immediate-mode",
            "-w",
            str(pcap),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        assert cap.stderr is not None
        assert "listening on ub" in cap.stderr.readline()
        transfer(a, b, "192.168.77.2", 20_000_000)
        time.sleep(0.3)
    finally:
        cap.send_signal(signal.SIGINT)
        _out, err = cap.communicate(timeout=15)
    # tcpdump on a busy 2-core machine may lose a few packets of its own (its buffer,
    # not the dataplane): the checks below hold for every packet it did capture, and it
    # must have captured nearly all of them for them to mean something.
    counts = dict((v, int(k)) for k, v in re.findall(r"^(\d+) packets? (.+)$", err, re.M))
    dropped = counts["dropped by kernel"]
    assert counts["captured"] + dropped == counts["received by filter"], err
    assert dropped <= counts["received by filter"] // 10, err
    enough = int(0.9 * 20_000_000) // 1500
    assert counts["captured"] > enough
    # What was captured came out of the offload path: the sender segmented TSO
    # super-frames itself (and sent them with UDP GSO over IPv6).
    assert counters(a)["tx_gso_frames"] > gso_before
    # Over IPv4 they went whole to the inject device and the kernel cut them (its
    # software GSO, the veth taking none): these segments are the kernel's, checked
    # here like ours.
    assert (counters(a)["tx_injected"] > 0) == (family == 4)
    rows = dissect(pcap)

    geneve = [r for r in rows if r["udp.dstport"] == ["6081"]]
    assert len(geneve) > enough
    not_geneve = [
        r["frame.number"] for r in geneve if [int(v, 0) for v in r["geneve.vni"]] != [VNI]
    ]
    assert not_geneve == [], f"UDP/6081 frames without GENEVE VNI {VNI}: {not_geneve[:20]}"
    # (tshark prints the VNI in hex: 0x00001092.)
    # The transfer's payload is inside GENEVE on the wire (less what tcpdump lost).
    inner = sum(int(r["tcp.len"][0]) for r in geneve if r["tcp.len"])
    assert inner >= 0.9 * 20_000_000

    too_big = [(r["frame.number"], r["frame.len"]) for r in rows if int(r["frame.len"][0]) > 1514]
    assert too_big == [], f"IP datagrams over the 1500-byte underlay MTU: {too_big[:20]}"
    assert max(int(r["frame.len"][0]) for r in geneve) == 1514  # full-size segments seen
    frags = [
        r["frame.number"]
        for r in rows
        if "1" in r["ip.flags.mf"]
        or any(v != "0" for v in r["ip.frag_offset"])
        or r["ipv6.fraghdr.offset"]
    ]
    assert frags == [], f"fragmented IP on the underlay: {frags[:20]}"

    udp_want = str(CSUM_NOT_PRESENT if family == 4 else CSUM_GOOD)
    udp_wrong = [
        (r["frame.number"], r["udp.checksum.status"])
        for r in geneve
        if r["udp.checksum.status"] != [udp_want]
    ]
    assert udp_wrong == [], f"outer UDP checksum status other than {udp_want}: {udp_wrong[:20]}"
    tcp_frames = [r for r in geneve if r["tcp.checksum.status"]]
    assert len(tcp_frames) > enough
    # Each with what tells where it came from: inner source, sequence, flags, lengths.
    tcp_wrong = [
        (
            r["frame.number"],
            r["tcp.checksum.status"],
            r["ip.src"],
            r["tcp.seq_raw"],
            r["tcp.flags"],
            r["tcp.len"],
            r["frame.len"],
        )
        for r in tcp_frames
        if r["tcp.checksum.status"] != [str(CSUM_GOOD)]
    ]
    assert tcp_wrong == [], f"inner TCP checksums not good: {tcp_wrong[:20]}"
