"""Hostile underlay traffic for the flood tests: frames built from raw bytes, each with
the drop reason the receiver must count for it (an oracle that follows the engine's
order of checks: decode, then VNI and outer source, then critical options)."""

from __future__ import annotations

import ipaddress
import json
import random
import struct
from dataclasses import dataclass

from geneve_dp import codec
from tests.endpoint_helpers import geneve, ip_checksum, option
from tests.netns import Netns

TEB = 0x6558
MARKER = b"GDP-FLOOD-MUST-NOT-ARRIVE"


@dataclass(frozen=True)
class Hostile:
    what: str  # for messages
    frame: bytes  # whole Ethernet frame, as written to the underlay
    reason: str  # the drop counter that must count it


def ipv4_udp_frame(
    dst_mac: bytes, src_mac: bytes, src: str, dst: str, sport: int, dport: int, payload: bytes
) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        17,
        0,
        ipaddress.ip_address(src).packed,
        ipaddress.ip_address(dst).packed,
    )
    ip = ip[:10] + ip_checksum(ip).to_bytes(2, "big") + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def classify(payload: bytes, src: str, vni: int, remote: str) -> str:
    """The drop reason for a GENEVE payload from ``src``, or "deliver"."""
    try:
        header, _ = codec.decode(payload)
    except codec.DecodeError as exc:
        return exc.reason
    if header.vni != vni:
        return "unknown_vni"
    if src != remote:
        return "wrong_remote"
    critical = any(o.critical for o in header.options)
    if critical != header.critical:
        return "c_bit_mismatch"
    if critical:
        return "critical_option"
    return "deliver"


def inner_frame() -> bytes:
    """What a flood packet would carry if it got through: a broadcast with a marker."""
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x99" + b"\x08\x00" + MARKER.ljust(46, b"\0")


def flood(
    dst_mac: bytes, src_mac: bytes, dst: str, remote: str, vni: int, port: int, seed: int = 7
) -> list[Hostile]:
    """The issue's list: random bytes, truncated headers, Opt Len past the packet, options
    overrunning Opt Len, versions 1-3, unknown critical options, wrong VNI, and the right
    VNI from spoofed outer sources (on the underlay's subnet, so rp_filter passes them)."""
    rng = random.Random(seed)
    inner = inner_frame()
    out: list[Hostile] = []

    def add(what: str, payload: bytes, src: str = remote, expect: str | None = None) -> None:
        reason = classify(payload, src, vni, remote)
        assert reason != "deliver", what
        assert expect is None or reason == expect, (what, reason)
        sport = 30000 + len(out)
        frame = ipv4_udp_frame(dst_mac, src_mac, src, dst, sport, port, payload)
        out.append(Hostile(what, frame, reason))

    # Random bytes: keep those the oracle can name (nearly all; a random header that
    # decodes with our VNI and C bit right would be a valid packet, not garbage).
    while sum(1 for h in out if h.what.startswith("random")) < 48:
        payload = rng.randbytes(rng.randrange(0, 300))
        if classify(payload, remote, vni, remote) == "deliver":
            continue
        add(f"random {len(payload)} bytes", payload)
    for n in range(0, 8):
        add(f"truncated to {n} bytes", geneve(vni, TEB, inner)[:n], expect="truncated")
    for words in (1, 8, 63):
        pkt = geneve(vni, TEB, b"", opt_len=words)
        add(f"Opt Len {words} words, none there", pkt, expect="options_truncated")
    big = option(0x0102, 0x01, b"\0" * 8)
    add("Opt Len 40 words over a 12-byte area", geneve(vni, TEB, b"", big, opt_len=40))
    for words, length in ((1, 1), (2, 5), (3, 31)):
        opts = (0x0102).to_bytes(2, "big") + bytes([0x01, length]) + b"\0" * (4 * words - 4)
        pkt = geneve(vni, TEB, inner, opts, opt_len=words)
        add(f"option of {length} words in Opt Len {words}", pkt, expect="option_overruns")
    for version in (1, 2, 3):
        add(f"version {version}", geneve(vni, TEB, inner, version=version), expect="bad_version")
    crit = option(0x0102, 0x80, b"\xde\xad\xbe\xef")
    add("unknown critical option, C set", geneve(vni, TEB, inner, crit, critical=True),
        expect="critical_option")  # fmt: skip
    add("unknown critical option, C clear", geneve(vni, TEB, inner, crit),
        expect="c_bit_mismatch")  # fmt: skip
    for other in (vni + 1, 0, 0xFFFFFF):
        add(f"wrong VNI {other}", geneve(other, TEB, inner), expect="unknown_vni")
    net = ipaddress.ip_interface(f"{remote}/24").network
    for host in (77, 200, 254):
        spoofed = str(net.network_address + host)
        add(f"right VNI from {spoofed}", geneve(vni, TEB, inner), src=spoofed,
            expect="wrong_remote")  # fmt: skip
    return out


def link_stats(ns: Netns, dev: str) -> dict[str, int]:
    """Kernel counters of a device: rx/tx packets and drops."""
    (info,) = json.loads(ns.run("ip", "-s", "-j", "link", "show", dev).stdout)
    s = info["stats64"]
    return {
        "rx_packets": s["rx"]["packets"],
        "rx_dropped": s["rx"]["dropped"],
        "tx_packets": s["tx"]["packets"],
        "tx_dropped": s["tx"]["dropped"],
    }


def snmp(ns: Netns, proto: str, field: str) -> int:
    """A /proc/net/snmp counter of the namespace (e.g. Icmp OutMsgs)."""
    lines = [ln.split() for ln in ns.run("cat", "/proc/net/snmp").stdout.splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names[0] == f"{proto}:":
            return int(values[names.index(field)])
    raise KeyError(proto)


def softnet_dropped() -> int:
    """Packets the kernel dropped from full per-CPU backlogs (all namespaces)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f)
