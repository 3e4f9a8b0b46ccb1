"""Capture files: a reader that finds GENEVE inside, and a classic pcap writer (`capture`).

Reads classic pcap (a 24-byte header and 16-byte records) and pcapng, what tshark,
text2pcap and editcap write by default, through python-pcapng. Only what `geneve-dp
decode --pcap` and the interop tests need: link types Ethernet, raw IP and Linux cooked
capture (v1 and v2), outer IPv4/IPv6 and UDP.
"""

from __future__ import annotations

import io
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import wire

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229

_MAGIC = {
    b"\xd4\xc3\xb2\xa1": "<",
    b"\xa1\xb2\xc3\xd4": ">",
    b"\x4d\x3c\xb2\xa1": "<",  # nanosecond resolution
    b"\xa1\xb2\x3c\x4d": ">",
}


class PcapError(Exception):
    """The file is not a classic pcap we can read."""


@dataclass(frozen=True)
class UdpDatagram:
    """A UDP datagram found in a captured frame."""

    index: int  # 1-based frame number, as Wireshark counts
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes


PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"  # a Section Header Block: what tshark writes by default


def read_frames(path: Path) -> Iterator[tuple[int, bytes]]:
    """(link type, frame) for each frame of a classic pcap or a pcapng file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PcapError(f"cannot read {path}: {exc.strerror}") from exc
    if data[:4] == PCAPNG_MAGIC:
        return _pcapng_frames(path, data)
    if len(data) < 24 or data[:4] not in _MAGIC:
        raise PcapError(f"{path} is not a pcap or pcapng file")
    endian = _MAGIC[data[:4]]
    linktype = struct.unpack_from(endian + "I", data, 20)[0]

    def frames() -> Iterator[tuple[int, bytes]]:
        pos = 24
        while pos + 16 <= len(data):
            incl = struct.unpack_from(endian + "I", data, pos + 8)[0]
            pos += 16
            yield linktype, data[pos : pos + incl]
            pos += incl

    return frames()


def _pcapng_frames(path: Path, data: bytes) -> Iterator[tuple[int, bytes]]:
    """pcapng through python-pcapng: every section, every interface's link type."""
    from pcapng import FileScanner, blocks

    frames: list[tuple[int, bytes]] = []
    try:
        for block in FileScanner(io.BytesIO(data)):
            if isinstance(block, blocks.EnhancedPacket | blocks.SimplePacket):
                frames.append((int(block.interface.link_type), bytes(block.packet_data)))
    except Exception as exc:  # the library's errors for a damaged file vary by block
        raise PcapError(
            f"{path} is a damaged pcapng file ({type(exc).__name__}: {exc})"[:300]
        ) from exc
    return iter(frames)


def _l3_offset(linktype: int, frame: bytes) -> tuple[int, int] | None:
    """(offset of the IP header, ethertype) for a frame of ``linktype``."""
    if linktype == LINKTYPE_ETHERNET:
        pos, ethertype = 12, None
        while True:
            if len(frame) < pos + 2:
                return None
            ethertype = struct.unpack_from("!H", frame, pos)[0]
            if ethertype in (0x8100, 0x88A8):  # VLAN tags
                pos += 4
                continue
            return pos + 2, ethertype
    if linktype == LINKTYPE_LINUX_SLL:
        return (16, struct.unpack_from("!H", frame, 14)[0]) if len(frame) >= 16 else None
    if linktype == LINKTYPE_LINUX_SLL2:
        return (20, struct.unpack_from("!H", frame, 0)[0]) if len(frame) >= 20 else None
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6) and frame:
        version = frame[0] >> 4
        return (0, 0x0800 if version == 4 else 0x86DD) if version in (4, 6) else None
    return None


def udp_datagrams(path: Path) -> Iterator[UdpDatagram]:
    """Every UDP datagram in the file (IPv4 without fragments, IPv6 without extension headers)."""
    for index, (linktype, frame) in enumerate(read_frames(path), start=1):
        found = _l3_offset(linktype, frame)
        if found is None:
            continue
        off, ethertype = found
        if ethertype == 0x0800 and len(frame) >= off + 20:
            ihl = (frame[off] & 0x0F) * 4
            if ihl < 20 or frame[off + 9] != 17:  # not a valid header, or not UDP
                continue
            if struct.unpack_from("!H", frame, off + 6)[0] & 0x3FFF:  # a fragment
                continue
            src = ipaddress.IPv4Address(frame[off + 12 : off + 16])
            dst = ipaddress.IPv4Address(frame[off + 16 : off + 20])
            udp = off + ihl
        elif ethertype == 0x86DD and len(frame) >= off + 40:
            if frame[off + 6] != 17:
                continue
            src = ipaddress.IPv6Address(frame[off + 8 : off + 24])  # type: ignore[assignment]
            dst = ipaddress.IPv6Address(frame[off + 24 : off + 40])  # type: ignore[assignment]
            udp = off + 40
        else:
            continue
        if len(frame) < udp + 8:
            continue
        sport, dport, length = struct.unpack_from("!HHH", frame, udp)
        end = min(len(frame), udp + length) if length >= 8 else len(frame)
        yield UdpDatagram(index, str(src), str(dst), sport, dport, frame[udp + 8 : end])


def geneve_datagrams(path: Path, port: int = wire.GENEVE_PORT) -> Iterator[UdpDatagram]:
    """The UDP datagrams sent to the GENEVE port."""
    return (d for d in udp_datagrams(path) if d.dport == port)


class Writer:
    """A classic little-endian microsecond pcap written as frames come (`capture`).

    Each record is written whole, so a reader of a file still being written (or of one
    whose writer was killed) sees every frame up to the last flush.
    """

    def __init__(self, out: BinaryIO, linktype: int, snaplen: int = 65535) -> None:
        self.out = out
        self.snaplen = snaplen
        self.frames = 0
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype))

    def write(self, frame: bytes, ts: float, orig_len: int | None = None) -> None:
        """One frame seen at ``ts`` (seconds since the epoch); cut at the snap length."""
        sec, usec = int(ts), round((ts - int(ts)) * 1e6)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        data = frame[: self.snaplen]
        length = len(frame) if orig_len is None else orig_len
        self.out.write(struct.pack("<IIII", sec, usec, len(data), length) + data)
        self.frames += 1


def write(path: Path, frames: list[bytes], linktype: int = LINKTYPE_ETHERNET) -> None:
    """Write ``frames`` as a classic pcap, frame i stamped i seconds after the epoch."""
    with path.open("wb") as out:
        w = Writer(out, linktype)
        for i, frame in enumerate(frames):
            w.write(frame, float(i))
