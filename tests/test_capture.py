"""`geneve-dp capture`: the outer BPF filter run by a small classic-BPF interpreter, and
real captures of live tunnels read back by tshark (inner TAP/TUN frames, outer GENEVE
packets with other traffic on the same wire left out), bounded by count and time."""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import time
from pathlib import Path

import pytest

from geneve_dp import capture
from tests.endpoint_helpers import ether, geneve, send_udp
from tests.netns import Netns
from tests.ops_helpers import (
    A_UL,
    B_IN,
    B_UL,
    GDP,
    gdp,
    ping,
    tunnel_pair,
)

# ---- the filter, interpreted ----------------------------------------------------------


def run_bpf(prog: bytes, pkt: bytes) -> int:
    """Classic BPF as the kernel runs it (the subset outer_filter uses); the snap length
    it returns, 0 for "drop". A read past the end drops, as in the kernel."""
    a = x = pc = 0
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]

    def load(off: int, size: int) -> int:
        if off + size > len(pkt):
            raise IndexError
        return int.from_bytes(pkt[off : off + size], "big")

    try:
        while True:
            code, jt, jf, k = insns[pc]
            pc += 1
            if code in (0x20, 0x28, 0x30):
                a = load(k, {0x20: 4, 0x28: 2, 0x30: 1}[code])
            elif code in (0x40, 0x48):
                a = load(x + k, 4 if code == 0x40 else 2)
            elif code == 0xB1:
                x = 4 * (load(k, 1) & 0xF)
            elif code == 0x54:
                a &= k
            elif code == 0x15:
                pc += jt if a == k else jf
            elif code == 0x45:
                pc += jt if a & k else jf
            elif code == 0x06:
                return k
            else:
                raise AssertionError(f"opcode {code:#x} not interpreted")
    except IndexError:
        return 0


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag: int = 0) -> bytes:
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0)
        + ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + payload
    )


def ipv6(src: str, dst: str, nxt: int, payload: bytes) -> bytes:
    return (
        struct.pack("!IHBB", 0x60000000, len(payload), nxt, 64)
        + ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + payload
    )


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def eth(l3: bytes, ethertype: int) -> bytes:
    return ether(b"\x02" * 6, b"\x04" * 6, ethertype, l3)


def test_outer_filter_ipv4_keeps_only_this_tunnel() -> None:
    prog = capture.outer_filter(14, "10.0.0.2", 6081, 77)
    g77, g78 = geneve(77, 0x6558, b"x" * 20), geneve(78, 0x6558, b"x" * 20)

    def v4(src: str, dst: str, payload: bytes, frag: int = 0, proto: int = 17) -> bytes:
        return eth(ipv4(src, dst, proto, payload, frag), 0x0800)

    keep = [
        v4("10.0.0.1", "10.0.0.2", udp(40123, 6081, g77)),  # sent, entropy source port
        v4("10.0.0.2", "10.0.0.1", udp(51000, 6081, g77)),  # received
        v4("10.0.0.1", "10.0.0.2", udp(40123, 6081, g77), frag=0x2000),  # first fragment
    ]
    drop = [
        v4("10.0.0.1", "10.0.0.2", udp(40123, 6081, g78)),  # another tunnel's VNI
        v4("10.0.0.1", "10.0.0.3", udp(40123, 6081, g77)),  # another peer
        v4("10.0.0.1", "10.0.0.2", udp(6081, 6082, g77)),  # another port
        v4("10.0.0.1", "10.0.0.2", udp(40123, 6081, g77), proto=6),  # not UDP
        v4("10.0.0.1", "10.0.0.2", b"\0" * 40, frag=0x0010),  # a later fragment
        v4("10.0.0.1", "10.0.0.2", udp(1, 6081, b"")),  # too short for a VNI
        eth(ipv6("fd00::1", "fd00::2", 17, udp(1, 6081, g77)), 0x86DD),
        eth(b"\0" * 28, 0x0806),  # ARP
    ]
    # An IPv4 header with options moves the UDP header: the filter follows IHL.
    opts = bytearray(ipv4("10.0.0.2", "10.0.0.1", 17, b"\1\1\1\0" + udp(9, 6081, g77)))
    opts[0] = 0x46
    keep.append(eth(bytes(opts), 0x0800))
    assert [run_bpf(prog, p) for p in keep] == [capture.SNAPLEN] * len(keep)
    assert [run_bpf(prog, p) for p in drop] == [0] * len(drop)


def test_outer_filter_ipv6_and_raw_ip_links() -> None:
    g = geneve(1000, 0x6558, b"y" * 8)
    prog = capture.outer_filter(14, "fd00::2", 6081, 1000)
    assert run_bpf(prog, eth(ipv6("fd00::1", "fd00::2", 17, udp(5, 6081, g)), 0x86DD))
    assert run_bpf(prog, eth(ipv6("fd00::2", "fd00::1", 17, udp(5, 6081, g)), 0x86DD))
    # One differing word of the address, in each of the four places, is another peer.
    for other in ("fd01::2", "fd00:0:1::2", "fd00::1:0:0:2", "fd00::3"):
        assert not run_bpf(prog, eth(ipv6("fd00::1", other, 17, udp(5, 6081, g)), 0x86DD))
    raw = capture.outer_filter(0, "10.0.0.2", 6081, 1000)
    assert run_bpf(raw, ipv4("10.0.0.1", "10.0.0.2", 17, udp(5, 6081, g)))
    assert not run_bpf(raw, ipv6("fd00::1", "fd00::2", 17, udp(5, 6081, g)))


# ---- real captures ----------------------------------------------------------------------


def start_capture(ns: Netns, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*GDP, "capture", "gt0", "--netns", ns.name, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("capture: listening on"), line + proc.stderr.read()
    return proc


def tshark(path: Path, *fields: str) -> list[list[str]]:
    # The first occurrence of a field: the outer header's, where GENEVE nests another.
    argv = ["tshark", "-r", str(path), "-T", "fields", "-E", "occurrence=f"]
    for f in fields:
        argv += ["-e", f]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines()]


def packet_sockets(ns: Netns) -> int:
    return len(ns.run("cat", "/proc/net/packet").stdout.splitlines()) - 1


@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_inner_capture_reads_in_tshark(
    pair: tuple[Netns, Netns], tmp_path: Path, mode: str
) -> None:
    a, b = pair
    out = tmp_path / "inner.pcap"
    with tunnel_pair(a, b, mode=mode):
        ping(a, B_IN, 1)  # ARP (TAP) settled before counting frames
        assert packet_sockets(a) == 0  # idle: no capture socket exists
        cap = start_capture(a, "-w", str(out), "--count", "6", "--duration", "20")
        assert packet_sockets(a) == 1
        ping(a, B_IN, 3)
        _out, err = cap.communicate(timeout=20)
        assert cap.returncode == 0, err
        assert "6 frames written" in err
        assert packet_sockets(a) == 0  # and none is left behind
    linktype = struct.unpack_from("<I", out.read_bytes(), 20)[0]
    assert linktype == (1 if mode == "tap" else 101)
    rows = tshark(out, "ip.src", "ip.dst", "icmp.type")
    assert rows == [["172.16.8.1", B_IN, "8"], [B_IN, "172.16.8.1", "0"]] * 3


def test_outer_capture_keeps_only_the_tunnel(pair: tuple[Netns, Netns], tmp_path: Path) -> None:
    a, b = pair
    out = tmp_path / "outer.pcap"
    with tunnel_pair(a, b):
        ping(a, B_IN, 1)
        cap = start_capture(a, "--outer", "-w", str(out), "--duration", "4")
        # Other traffic on the same wire: plain pings, another VNI to our port.
        ping(a, B_UL, 3, interval=0.05)
        send_udp(b, [(B_UL, A_UL, 6081, 0, geneve(99, 0x6558, b"\0" * 60))] * 5)
        ping(a, B_IN, 4, interval=0.05)
        _out, err = cap.communicate(timeout=20)
        assert cap.returncode == 0, err
    rows = tshark(out, "ip.src", "ip.dst", "udp.dstport", "geneve.vni", "icmp.type")
    # Exactly the 4 requests and 4 replies through the tunnel, dissected as GENEVE with
    # the ICMP inside; the plain pings and the VNI 99 packets were filtered out.
    icmp = [r for r in rows if r[4]]
    assert len(rows) == 8 and len(icmp) == 8, rows
    assert {(r[0], r[1]) for r in rows} == {(A_UL, B_UL), (B_UL, A_UL)}
    assert all(r[2] == "6081" and int(r[3], 0) == 77 for r in rows), rows


def test_capture_count_duration_and_errors(pair: tuple[Netns, Netns], tmp_path: Path) -> None:
    a, b = pair
    out = tmp_path / "idle.pcap"
    with tunnel_pair(a, b):
        t0 = time.monotonic()
        proc = gdp("capture", "gt0", "--netns", a.name, "-w", str(out), "--duration", "1")
        took = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        assert 1 <= took < 6 and "0 frames written" in proc.stderr
        assert tshark(out, "frame.number") == []  # a valid, empty pcap

        missing = tmp_path / "never.pcap"
        for args, field in (
            (["nosuch", "-w", str(missing)], "nosuch"),
            (["gt0", "-w", str(missing), "--count", "-1"], "--count"),
            (["gt0", "-w", str(missing), "--duration", "soon"], "--duration"),
            (["gt0", "-w", str(missing), "--interface", "ul0"], "--interface"),
            (["gt0", "-w", str(missing), "--outer", "--interface", "nope0"], "nope0"),
            (["gt0", "-w", str(tmp_path / "no" / "dir.pcap")], "-w"),
        ):
            proc = gdp("capture", "--netns", a.name, *args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert proc.stderr.count("\n") == 1 and field in proc.stderr, proc.stderr
        assert not missing.exists()
