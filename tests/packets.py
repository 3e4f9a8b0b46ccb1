"""Synthetic inner packets for the C engine's pure parts (tests/test_c_*.py), built
field by field with a checksum of their own, independent of geneve_dp's."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from geneve_dp.fastpath import ffi, lib

ACK, PSH, FIN, SYN, RST, URG, CWR = 0x10, 0x08, 0x01, 0x02, 0x04, 0x20, 0x80
TAP, TUN = 0, 1
VNET_NEEDS_CSUM = 1
GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 1, 4, 5
MAC_A, MAC_B = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")


def ones_sum(data: bytes) -> int:
    """The 16-bit one's complement sum, folded, not complemented (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])


@dataclass(frozen=True)
class Flow:
    src: str = "10.1.0.1"
    dst: str = "10.1.0.2"
    sport: int = 40000
    dport: int = 5201

    @property
    def ipver(self) -> int:
        return ipaddress.ip_address(self.src).version

    def addrs(self) -> tuple[bytes, bytes]:
        return ipaddress.ip_address(self.src).packed, ipaddress.ip_address(self.dst).packed


def ip_header(
    flow: Flow,
    proto: int,
    l4_len: int,
    ip_id: int = 1,
    tos: int = 0,
    df: bool = True,
    ttl: int = 64,
) -> bytes:
    src, dst = flow.addrs()
    if flow.ipver == 4:
        hdr = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            tos,
            20 + l4_len,
            ip_id & 0xFFFF,
            0x4000 if df else 0,
            ttl,
            proto,
            0,
            src,
            dst,
        )
        return hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:]
    first = (6 << 28) | (tos << 20)
    return struct.pack("!IHBB", first, l4_len, proto, ttl) + src + dst


def tcp(
    flow: Flow,
    seq: int,
    payload: bytes,
    flags: int = ACK,
    ack: int = 1,
    window: int = 512,
    options: bytes = b"",
    csum: str = "full",
    **ip: object,
) -> bytes:
    """An IP/TCP packet. csum: "full" (valid), "partial" (the pseudo-header sum, as a
    virtio NEEDS_CSUM frame carries it) or "bad"."""
    doff = (20 + len(options)) // 4
    hdr = (
        struct.pack(
            "!HHIIBBHHH",
            flow.sport,
            flow.dport,
            seq & 0xFFFFFFFF,
            ack,
            doff << 4,
            flags,
            window,
            0,
            0,
        )
        + options
    )
    seg = hdr + payload
    src, dst = flow.addrs()
    ph = pseudo(src, dst, 6, len(seg))
    value = {"full": checksum(ph + seg), "partial": ones_sum(ph), "bad": checksum(ph + seg) ^ 1}[
        csum
    ]
    seg = seg[:16] + value.to_bytes(2, "big") + seg[18:]
    return ip_header(flow, 6, len(seg), **ip) + seg  # type: ignore[arg-type]


def udp(
    flow: Flow, payload: bytes, csum: str = "full", length: int | None = None, **ip: object
) -> bytes:
    """An IP/UDP packet; csum as for tcp(), or "none" (0)."""
    ulen = 8 + len(payload) if length is None else length
    seg = struct.pack("!HHHH", flow.sport, flow.dport, ulen, 0) + payload
    src, dst = flow.addrs()
    ph = pseudo(src, dst, 17, ulen if csum == "partial" else len(seg))
    value = {
        "full": checksum(ph + seg) or 0xFFFF,
        "partial": ones_sum(ph),
        "none": 0,
        "bad": (checksum(ph + seg) or 0xFFFF) ^ 1,
    }[csum]
    seg = seg[:6] + value.to_bytes(2, "big") + seg[8:]
    return ip_header(flow, 17, len(seg), **ip) + seg  # type: ignore[arg-type]


def eth(packet: bytes, dst: bytes = MAC_B, src: bytes = MAC_A) -> bytes:
    etype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    return dst + src + etype.to_bytes(2, "big") + packet


def vnet(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


def parse_vnet(b: bytes) -> tuple[int, int, int, int, int, int]:
    return struct.unpack("<BBHHHH", b[:10])  # type: ignore[return-value]


def l4_valid(frame: bytes, ip_off: int) -> bool:
    """Whether the frame's TCP or UDP checksum verifies (independent of the engine)."""
    ip = frame[ip_off:]
    if ip[0] >> 4 == 4:
        ihl = (ip[0] & 15) * 4
        src, dst, proto, l4 = ip[12:16], ip[16:20], ip[9], ip[ihl:]
    else:
        src, dst, proto, l4 = ip[8:24], ip[24:40], ip[6], ip[40:]
    return ones_sum(pseudo(src, dst, proto, len(l4)) + l4) == 0xFFFF


def split_outputs(out: bytes, lens: Sequence[int], n: int) -> list[bytes]:
    frames, pos = [], 0
    for i in range(n):
        frames.append(out[pos : pos + lens[i]])
        pos += lens[i]
    return frames


def c_gro(
    frames: Sequence[bytes],
    mode: int = TAP,
    uso: bool = False,
    osports: Sequence[int] | None = None,
    hold_every: int = 0,
) -> list[bytes]:
    """The C receive path's coalescing of frames: each output is a virtio header and a
    frame, as written to the device."""
    data = b"".join(frames)
    lens = ffi.new("uint32_t[]", [len(f) for f in frames] or [0])
    cap = len(data) + 16 * len(frames) + 64
    out = ffi.new("uint8_t[]", cap)
    out_lens = ffi.new("uint32_t[]", max(1, len(frames)))
    ports = ffi.new("uint16_t[]", list(osports)) if osports is not None else ffi.NULL
    n = lib.gdp_test_gro(
        data,
        lens,
        len(frames),
        mode,
        int(uso),
        ports,
        hold_every,
        out,
        cap,
        out_lens,
        max(1, len(frames)),
    )
    assert n >= 0, n
    return split_outputs(bytes(ffi.buffer(out, cap)), out_lens, n)


def c_seg(frame: bytes, vnet_hdr: bytes, mode: int = TAP) -> list[bytes] | None:
    """The C transmit path's TSO segmentation: each segment's inner frame, or None when
    the super-frame is refused."""
    cap = 2 * len(frame) + 200 * 256
    out = ffi.new("uint8_t[]", cap)
    out_lens = ffi.new("uint32_t[]", 1024)
    n = lib.gdp_test_seg(frame, len(frame), mode, vnet_hdr, out, cap, out_lens, 1024)
    if n == -1:
        return None
    assert n >= 0, n
    return split_outputs(bytes(ffi.buffer(out, cap)), out_lens, n)


def tso_frame(
    flow: Flow,
    seq: int,
    payload: bytes,
    mss: int,
    flags: int = ACK,
    ip_id: int = 100,
    mode: int = TAP,
    **kw: object,
) -> tuple[bytes, bytes]:
    """A TSO super-frame as a TAP/TUN device hands it over (partial checksum) and its
    virtio header."""
    pkt = tcp(flow, seq, payload, flags=flags, csum="partial", ip_id=ip_id, **kw)
    frame = eth(pkt) if mode == TAP else pkt
    ip_off = 14 if mode == TAP else 0
    l4 = ip_off + (20 if flow.ipver == 4 else 40)
    hdrs = l4 + (pkt[l4 - ip_off + 12] >> 4) * 4
    gso = GSO_TCPV4 if flow.ipver == 4 else GSO_TCPV6
    return frame, vnet(VNET_NEEDS_CSUM, gso, hdrs, mss, l4, 16)
