"""`geneve-dp decode --pcap`: files written by our pcap.write and real captures.

Real captures are taken on the loopback device with tcpdump and tshark (Ethernet link
type on ``lo``, Linux cooked v2 on ``any``, nanosecond timestamps), from datagrams we
send to the GENEVE port with an ordinary UDP socket, over IPv4 and IPv6.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from geneve_dp import codec, pcap, wire
from geneve_dp.codec import Header, Option

SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")


# ---- frame builders (also used by test_interop_tshark.py) ---------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_ip(src: str, dst: str, sport: int, dport: int, payload: bytes, ident: int = 1) -> bytes:
    """An IPv4 or IPv6 packet (by the address family of ``src``) carrying one UDP datagram.

    IPv4 as the kernel's geneve device sends it: TTL 64, DF clear, UDP checksum 0.
    IPv6 needs a real UDP checksum.
    """
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    ulen = wire.UDP_HEADER_LEN + len(payload)
    if s.version == 4:
        total = wire.IPV4_HEADER_LEN + ulen
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0, 64, 17, 0, s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return ip + struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    pseudo = s.packed + d.packed + struct.pack("!IxxxB", ulen, 17)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    csum = checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return struct.pack("!IHBB16s16s", 6 << 28, ulen, 17, 64, s.packed, d.packed) + udp


def ethernet(l3: bytes, vlan: int | None = None) -> bytes:
    """An Ethernet frame (optionally 802.1Q-tagged) around an IP packet, padded to 60."""
    ethertype = 0x0800 if l3[0] >> 4 == 4 else 0x86DD
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    frame = DST_MAC + SRC_MAC + tag + struct.pack("!H", ethertype) + l3
    return frame + bytes(max(0, 60 - len(frame)))


def inner_frame(protocol: int) -> bytes:
    """A small inner packet matching a protocol type: Ethernet/IPv4/UDP, IPv4 or IPv6."""
    if protocol == wire.Protocol.ETHERNET:
        return ethernet(udp_ip("10.0.0.1", "10.0.0.2", 1234, 80, b"inner"))
    if protocol == wire.Protocol.IPV4:
        return udp_ip("10.0.0.1", "10.0.0.2", 1234, 80, b"inner")
    if protocol == wire.Protocol.IPV6:
        return udp_ip("fd00::1", "fd00::2", 1234, 80, b"inner")
    return b"\x00" * 8


def geneve_frame(
    header_bytes: bytes, src: str, dst: str, sport: int = 40000, protocol: int | None = None
) -> bytes:
    inner = inner_frame(protocol) if protocol is not None else b""
    return ethernet(udp_ip(src, dst, sport, wire.GENEVE_PORT, header_bytes + inner))


def run_decode(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "geneve_dp", "decode", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


# ---- files written by pcap.write ------------------------------------------------------------

H1 = Header(vni=1000)
H2 = Header(
    vni=0xABCDEF,
    protocol=wire.Protocol.IPV4,
    oam=True,
    options=(Option(0x0102, 0x80, b"\xde\xad\xbe\xef"), Option(0xFFFF, 1)),
)
H3 = Header(vni=7, protocol=wire.Protocol.IPV6, options=(Option(0x0104, 3, bytes(124)),))


def expected(header: Header) -> dict[str, Any]:
    """What `decode` prints for ``header``: classes and types in hex as `up --option`
    takes them, lengths with their unit in the key."""
    return {
        "vni": header.vni,
        "protocol": header.protocol_name,
        "oam": header.oam,
        "critical": header.critical,
        "opt_len_words": sum(4 + len(o.data) for o in header.options) // 4,
        "options": [
            {
                "class": f"0x{o.opt_class:04x}",
                "type": f"0x{o.type:02x}",
                "critical": bool(o.type & 0x80),
                "data_bytes": len(o.data),
                "data": o.data.hex(),
            }
            for o in header.options
        ],
        "payload_offset_bytes": 8 + sum(4 + len(o.data) for o in header.options),
    }


@pytest.mark.parametrize("engine", ["c", "python"])
def test_decode_pcap_ipv4_ipv6_vlan(tmp_path: Path, engine: str) -> None:
    frames = [
        geneve_frame(codec.encode(H1), "192.0.2.1", "192.0.2.2", 40001, H1.protocol),
        ethernet(udp_ip("192.0.2.1", "192.0.2.9", 5353, 53, b"not geneve")),  # skipped
        geneve_frame(codec.encode(H2), "2001:db8::1", "2001:db8::2", 40002, H2.protocol),
        ethernet(udp_ip("198.51.100.1", "198.51.100.2", 40003, 6081, codec.encode(H3)), vlan=42),
    ]
    path = tmp_path / "ours.pcap"
    pcap.write(path, frames)
    rc, records, stderr = run_decode("--pcap", str(path), "--engine", engine)
    assert rc == 0, stderr
    assert [(r["frame"], r["src"], r["dst"], r["sport"], r["dport"]) for r in records] == [
        (1, "192.0.2.1", "192.0.2.2", 40001, 6081),
        (3, "2001:db8::1", "2001:db8::2", 40002, 6081),
        (4, "198.51.100.1", "198.51.100.2", 40003, 6081),
    ]
    for record, header in zip(records, (H1, H2, H3), strict=True):
        expect = expected(header)
        assert {k: record[k] for k in expect} == expect


def test_decode_pcap_reports_bad_headers_and_exits_1(tmp_path: Path) -> None:
    bad = bytes.fromhex("4000655800000100")  # version 1
    short = bytes.fromhex("0200655800000100")  # Opt Len 2, no options
    path = tmp_path / "bad.pcap"
    pcap.write(
        path,
        [
            geneve_frame(bad, "192.0.2.1", "192.0.2.2"),
            geneve_frame(codec.encode(H1), "192.0.2.1", "192.0.2.2"),
            geneve_frame(short, "2001:db8::1", "2001:db8::2"),
        ],
    )
    rc, records, _ = run_decode("--pcap", str(path))
    assert rc == 1
    assert [r.get("error") for r in records] == ["bad_version", None, "options_truncated"]
    assert records[0]["length"] == 8 and records[2]["src"] == "2001:db8::1"


def test_decode_pcap_other_port(tmp_path: Path) -> None:
    path = tmp_path / "port.pcap"
    frame = ethernet(udp_ip("192.0.2.1", "192.0.2.2", 1, 7000, codec.encode(H1)))
    pcap.write(path, [frame])
    assert run_decode("--pcap", str(path))[1] == []
    rc, records, _ = run_decode("--pcap", str(path), "--port", "7000")
    assert rc == 0 and records[0]["vni"] == 1000 and records[0]["dport"] == 7000


def test_ethernet_padding_is_not_payload(tmp_path: Path) -> None:
    path = tmp_path / "pad.pcap"
    data = codec.encode(H1)
    frame = geneve_frame(data, "192.0.2.1", "192.0.2.2")
    assert len(frame) == 60  # 50 bytes of headers, padded
    pcap.write(path, [frame])
    (d,) = pcap.geneve_datagrams(path)
    assert d.payload == data


def test_raw_ip_linktype_and_ip_options(tmp_path: Path) -> None:
    v4 = bytearray(udp_ip("192.0.2.1", "192.0.2.2", 3000, 6081, codec.encode(H2)))
    # Insert one word of IPv4 options (NOP NOP NOP EOL): IHL 6.
    v4 = v4[:20] + bytearray(b"\x01\x01\x01\x00") + v4[20:]
    v4[0] = 0x46
    v4[2:4] = struct.pack("!H", len(v4))
    v4[10:12] = b"\x00\x00"
    v4[10:12] = struct.pack("!H", checksum(bytes(v4[:24])))
    v6 = udp_ip("2001:db8::1", "2001:db8::2", 3001, 6081, codec.encode(H3))
    fragment = bytearray(udp_ip("192.0.2.1", "192.0.2.2", 3002, 6081, codec.encode(H1)))
    fragment[6] = 0x20  # MF: a first fragment is not a whole datagram
    path = tmp_path / "raw.pcap"
    pcap.write(path, [bytes(v4), v6, bytes(fragment)], linktype=pcap.LINKTYPE_RAW)
    rc, records, _ = run_decode("--pcap", str(path))
    assert rc == 0
    assert [(r["sport"], r["vni"], r["opt_len_words"]) for r in records] == [
        (3000, H2.vni, H2.opt_len),
        (3001, H3.vni, H3.opt_len),
    ]


def test_unreadable_pcap_is_one_line_exit_2(tmp_path: Path) -> None:
    rc, records, stderr = run_decode("--pcap", str(tmp_path / "missing.pcap"))
    assert rc == 2 and records == [] and len(stderr.strip().splitlines()) == 1
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"not a pcap file at all, just text")
    rc, _, stderr = run_decode("--pcap", str(junk))
    assert rc == 2 and "not a pcap or pcapng" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "convert",
    [
        ["tshark", "-r", "{src}", "-w", "{dst}", "-F", "pcapng"],
        ["editcap", "-F", "pcapng", "{src}", "{dst}"],
    ],
    ids=["tshark", "editcap"],
)
def test_pcapng_as_tshark_and_editcap_write_it(tmp_path: Path, convert: list[str]) -> None:
    assert shutil.which(convert[0]), f"{convert[0]} is required (apt install tshark)"
    ours, ng = tmp_path / "ours.pcap", tmp_path / "x.pcapng"
    frames = [
        geneve_frame(codec.encode(H1), "192.0.2.1", "192.0.2.2", 40001, H1.protocol),
        ethernet(udp_ip("192.0.2.1", "192.0.2.9", 5353, 53, b"not geneve")),
        geneve_frame(codec.encode(H2), "2001:db8::1", "2001:db8::2", 40002, H2.protocol),
    ]
    pcap.write(ours, frames)
    argv = [a.format(src=ours, dst=ng) for a in convert]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    assert ng.read_bytes()[:4] == pcap.PCAPNG_MAGIC  # really pcapng, not a copy
    rc, records, stderr = run_decode("--pcap", str(ng))
    assert rc == 0, stderr
    assert [(r["frame"], r["src"], r["sport"]) for r in records] == [
        (1, "192.0.2.1", 40001),
        (3, "2001:db8::1", 40002),
    ]
    for record, header in zip(records, (H1, H2), strict=True):
        assert {k: record[k] for k in expected(header)} == expected(header)
    # A pcapng cut short is one line and exit 2, not a traceback.
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(ng.read_bytes()[:-7])
    rc, _, stderr = run_decode("--pcap", str(cut))
    assert rc in (1, 2) and "Traceback" not in stderr, stderr


def test_text2pcap_default_output_is_pcapng(tmp_path: Path) -> None:
    assert shutil.which("text2pcap"), "text2pcap is required (apt install tshark)"
    frame = geneve_frame(codec.encode(H2), "192.0.2.1", "192.0.2.2", 40001, H2.protocol)
    dump = tmp_path / "frame.txt"
    dump.write_text(
        "".join(f"{i:06x} " + frame[i : i + 16].hex(" ") + "\n" for i in range(0, len(frame), 16))
    )
    out = tmp_path / "t.pcapng"
    subprocess.run(["text2pcap", str(dump), str(out)], check=True, capture_output=True, timeout=60)
    assert out.read_bytes()[:4] == pcap.PCAPNG_MAGIC
    rc, records, stderr = run_decode("--pcap", str(out))
    assert rc == 0, stderr
    assert [r["vni"] for r in records] == [H2.vni]
    assert records[0]["options"][0]["class"] == f"0x{H2.options[0].opt_class:04x}"


# ---- real captures on loopback ---------------------------------------------------------------


def capture(tool: list[str], count: int, send: Any, out: Path) -> None:
    """Run a capture tool until it has ``count`` packets, calling ``send`` once it listens."""
    proc = subprocess.Popen(tool, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        seen = ""
        while "listening on" not in seen.lower() and "capturing on" not in seen.lower():
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"{tool[0]} exited early ({proc.returncode}): {seen.strip()}")
            seen += line
            assert time.monotonic() < deadline, f"{tool[0]} never started: {seen}"
        time.sleep(0.2)  # the filter is attached before the banner; a small margin anyway
        send()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{tool[0]} did not see {count} packets within 20 s")
        assert proc.returncode == 0, f"{tool[0]} failed: {seen}{proc.stderr.read()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.stat().st_size > 24


CAPTURES = {
    "tcpdump-lo": ["tcpdump", "-i", "lo", "-U", "--immediate-mode"],
    "tcpdump-any-sll2": ["tcpdump", "-i", "any", "-U", "--immediate-mode"],
    "tcpdump-lo-nano": [
        *("tcpdump", "-i", "lo", "-U", "--immediate-mode"),
        *("--time-stamp-precision", "nano"),
    ],
    "tshark-lo": ["tshark", "-i", "lo", "-F", "pcap"],
}


@pytest.mark.root  # capturing on loopback
@pytest.mark.parametrize("name", sorted(CAPTURES))
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_decode_real_capture(tmp_path: Path, name: str, family: int) -> None:
    if os.geteuid() != 0:
        pytest.fail("capturing on loopback needs root")
    tool = CAPTURES[name]
    assert shutil.which(tool[0]), f"{tool[0]} is required"
    addr = "127.0.0.1" if family == socket.AF_INET else "::1"
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, 0))
    sport = sock.getsockname()[1]
    out = tmp_path / f"{name}.pcap"
    headers = [H1, H2, H3]
    bpf = f"udp and src port {sport} and dst port {wire.GENEVE_PORT}"
    argv = [*tool, "-c", str(len(headers)), "-w", str(out), bpf]
    # tshark (dumpcap) cannot write into a directory other users own when dropping privileges.
    os.chmod(tmp_path, 0o777)

    def send() -> None:
        for h in headers:
            sock.sendto(codec.encode(h) + inner_frame(h.protocol), (addr, wire.GENEVE_PORT))

    try:
        capture(argv, len(headers), send, out)
    finally:
        sock.close()
    rc, records, stderr = run_decode("--pcap", str(out))
    assert rc == 0, stderr
    assert len(records) == len(headers)
    for record, header in zip(records, headers, strict=True):
        assert (record["src"], record["dst"]) == (addr, addr)
        assert (record["sport"], record["dport"]) == (sport, wire.GENEVE_PORT)
        expect = expected(header)
        assert {k: record[k] for k in expect} == expect
    linktype = struct.unpack_from("<I", out.read_bytes(), 20)[0]
    if "sll2" in name:
        assert linktype == pcap.LINKTYPE_LINUX_SLL2
    else:
        assert linktype == pcap.LINKTYPE_ETHERNET
    if "nano" in name:
        assert out.read_bytes()[:4] == b"\x4d\x3c\xb2\xa1"


def test_ipv4_header_shorter_than_20_bytes_is_skipped(tmp_path: Path) -> None:
    # IHL 4 is invalid. Read naively, the "UDP header" would start at byte 16, inside
    # the IP header: make those bytes look like a datagram to 6081 so a reader that
    # trusts IHL reports a GENEVE packet that is not there.
    payload = codec.encode(H1)
    fake_udp = struct.pack("!HH", 4321, wire.GENEVE_PORT)  # as the destination address
    ip = bytearray(udp_ip("192.0.2.1", socket.inet_ntoa(fake_udp), 9, 9, payload))
    ip[0] = 0x44
    ip[20:24] = struct.pack("!HH", 8 + len(payload), 0)  # the fake UDP length/checksum
    path = tmp_path / "ihl.pcap"
    pcap.write(path, [ethernet(bytes(ip))])
    assert list(pcap.udp_datagrams(path)) == []


def test_big_endian_pcap_and_ip_only_linktypes(tmp_path: Path) -> None:
    v4 = udp_ip("192.0.2.1", "192.0.2.2", 5001, 6081, codec.encode(H1))
    v6 = udp_ip("2001:db8::1", "2001:db8::2", 5002, 6081, codec.encode(H2))
    not_ip = b"\x00" * 40
    be = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, pcap.LINKTYPE_ETHERNET)
    for i, frame in enumerate([ethernet(v4), ethernet(v6)]):
        be += struct.pack(">IIII", i, 0, len(frame), len(frame)) + frame
    (tmp_path / "be.pcap").write_bytes(be)
    pcap.write(tmp_path / "ipv4.pcap", [v4, not_ip], linktype=pcap.LINKTYPE_IPV4)
    pcap.write(tmp_path / "ipv6.pcap", [not_ip, v6], linktype=pcap.LINKTYPE_IPV6)
    got = {
        name: [(d.index, d.src, d.sport) for d in pcap.geneve_datagrams(tmp_path / name)]
        for name in ("be.pcap", "ipv4.pcap", "ipv6.pcap")
    }
    assert got == {
        "be.pcap": [(1, "192.0.2.1", 5001), (2, "2001:db8::1", 5002)],
        "ipv4.pcap": [(1, "192.0.2.1", 5001)],
        "ipv6.pcap": [(2, "2001:db8::1", 5002)],
    }


def test_port_out_of_range_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "p.pcap"
    pcap.write(path, [geneve_frame(codec.encode(H1), "192.0.2.1", "192.0.2.2")])
    rc, records, stderr = run_decode("--pcap", str(path), "--port", "70000")
    assert rc == 2 and records == []
    assert "--port" in stderr and "1..65535" in stderr and len(stderr.strip().splitlines()) == 1
