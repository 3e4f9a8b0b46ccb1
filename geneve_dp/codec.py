"""Pure-Python reference codec for the RFC 8926 GENEVE header.

This is the oracle the C fast path is tested against and the codec of the Python
engine. It is sans-I/O: bytes in, dataclasses out, and one exception type for every
way a received header can be wrong.

Layout (RFC 8926 §3.4)::

     0                   1                   2                   3
    |Ver|  Opt Len  |O|C|    Rsvd.  |          Protocol Type        |
    |        Virtual Network Identifier (VNI)       |    Reserved   |
    |                    Variable-Length Options                    |

and each option (§3.5)::

    |          Option Class         |      Type     |R|R|R| Length  |
    |                      Variable-Length Option Data              |
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from . import wire

DECODE_REASONS: Final = (
    "truncated",  # shorter than the 8-byte base header
    "bad_version",  # Ver is not 0
    "options_truncated",  # Opt Len reaches past the end of the buffer
    "option_overruns",  # an option's Length reaches past the end of Opt Len
)
"""Every reason a header can fail to decode, in the order the checks run."""


class GeneveError(Exception):
    """Base of the codec's errors."""


class DecodeError(GeneveError):
    """A received header is malformed; ``reason`` is one of ``DECODE_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in DECODE_REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class EncodeError(GeneveError, ValueError):
    """A header we were asked to build cannot be represented on the wire."""


@dataclass(frozen=True)
class Option:
    """One TLV option. ``data`` excludes the 4-byte option header."""

    opt_class: int
    type: int
    data: bytes = b""

    @property
    def critical(self) -> bool:
        return bool(self.type & wire.OPTION_TYPE_CRITICAL)

    @property
    def wire_len(self) -> int:
        return wire.OPTION_HEADER_LEN + len(self.data)

    def check(self) -> None:
        """Raise EncodeError unless this option can be written."""
        if not 0 <= self.opt_class <= 0xFFFF:
            raise EncodeError(f"option class {self.opt_class} is out of range 0..65535")
        if not 0 <= self.type <= 0xFF:
            raise EncodeError(f"option type {self.type} is out of range 0..255")
        if len(self.data) > wire.MAX_OPTION_DATA_LEN:
            raise EncodeError(
                f"option data is {len(self.data)} bytes; at most "
                f"{wire.MAX_OPTION_DATA_LEN} bytes are accepted"
            )
        if len(self.data) % 4:
            raise EncodeError(f"option data is {len(self.data)} bytes; it must be a multiple of 4")


@dataclass(frozen=True)
class Header:
    """A GENEVE header.

    ``opt_len`` (in 4-byte words) and ``critical`` describe what is on the wire. When
    left as None they are derived from ``options``; ``encode`` refuses a header whose
    explicit values disagree with its options, so a Header built by hand is always
    what gets written.
    """

    vni: int
    protocol: int = wire.Protocol.ETHERNET
    options: tuple[Option, ...] = ()
    oam: bool = False
    critical: bool = field(default=None)  # type: ignore[assignment]
    opt_len: int = field(default=None)  # type: ignore[assignment]
    version: int = wire.GENEVE_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if self.critical is None:
            object.__setattr__(self, "critical", any(o.critical for o in self.options))
        if self.opt_len is None:
            words = sum(o.wire_len for o in self.options) // 4
            object.__setattr__(self, "opt_len", words)

    @property
    def header_len(self) -> int:
        return wire.BASE_HEADER_LEN + 4 * self.opt_len

    @property
    def protocol_name(self) -> str:
        return wire.protocol_name(self.protocol)


_BASE = struct.Struct("!BBHI")  # ver|optlen, flags, protocol, vni<<8|reserved
_OPT = struct.Struct("!HBB")  # class, type, reserved|length


def decode(buf: bytes | bytearray | memoryview) -> tuple[Header, int]:
    """Decode the header at the start of ``buf``; return it and the payload offset.

    Checks run in a fixed order (the order of ``DECODE_REASONS``) so that the C codec
    and this one name the same reason for the same bytes.
    """
    if len(buf) < wire.BASE_HEADER_LEN:
        raise DecodeError("truncated", f"{len(buf)} bytes, need {wire.BASE_HEADER_LEN}")
    b0, flags, protocol, vni_word = _BASE.unpack_from(buf, 0)
    version = b0 >> 6
    if version != wire.GENEVE_VERSION:
        raise DecodeError("bad_version", f"version {version}")
    opt_len = b0 & 0x3F
    end = wire.BASE_HEADER_LEN + 4 * opt_len
    if end > len(buf):
        raise DecodeError("options_truncated", f"options end at {end}, buffer is {len(buf)}")
    options = []
    pos = wire.BASE_HEADER_LEN
    # The option area is a whole number of words and every option is too, so the walk
    # either lands exactly on ``end`` or an option overruns it.
    while pos < end:
        opt_class, opt_type, length_byte = _OPT.unpack_from(buf, pos)
        data_len = 4 * (length_byte & 0x1F)
        data_start = pos + wire.OPTION_HEADER_LEN
        if data_start + data_len > end:
            raise DecodeError("option_overruns", f"option at {pos} needs {data_len} bytes of data")
        options.append(Option(opt_class, opt_type, bytes(buf[data_start : data_start + data_len])))
        pos = data_start + data_len
    header = Header(
        vni=vni_word >> 8,
        protocol=protocol,
        options=tuple(options),
        oam=bool(flags & wire.FLAG_OAM),
        critical=bool(flags & wire.FLAG_CRITICAL),
        opt_len=opt_len,
        version=version,
    )
    return header, end


def encode_options(options: tuple[Option, ...] | list[Option]) -> bytes:
    """The option area for ``options``, each checked."""
    out = bytearray()
    for opt in options:
        opt.check()
        out += _OPT.pack(opt.opt_class, opt.type, len(opt.data) // 4)
        out += opt.data
    if len(out) > wire.MAX_OPTIONS_LEN:
        raise EncodeError(
            f"options take {len(out)} bytes; at most {wire.MAX_OPTIONS_LEN} bytes fit"
        )
    return bytes(out)


def encode(header: Header) -> bytes:
    """The wire form of ``header``; reserved fields are written as zero."""
    if not 0 <= header.vni <= wire.MAX_VNI:
        raise EncodeError(f"VNI {header.vni} is out of range 0..{wire.MAX_VNI}")
    if not 0 <= header.protocol <= 0xFFFF:
        raise EncodeError(f"protocol type {header.protocol} is out of range 0..65535")
    if not 0 <= header.version <= 3:
        raise EncodeError(f"version {header.version} is out of range 0..3")
    opts = encode_options(header.options)
    critical = any(o.critical for o in header.options)
    if header.critical != critical:
        raise EncodeError("the C bit must be set exactly when some option is critical")
    if header.opt_len != len(opts) // 4:
        raise EncodeError(f"opt_len {header.opt_len} does not match options of {len(opts)} bytes")
    flags = (wire.FLAG_OAM if header.oam else 0) | (wire.FLAG_CRITICAL if critical else 0)
    b0 = (header.version << 6) | (len(opts) // 4)
    return _BASE.pack(b0, flags, header.protocol, header.vni << 8) + opts


def header_to_json(header: Header, payload_offset: int) -> dict[str, object]:
    """The JSON-ready form `geneve-dp decode` prints for one header."""
    return {
        "vni": header.vni,
        "protocol": header.protocol_name,
        "oam": header.oam,
        "critical": header.critical,
        "opt_len": header.opt_len,
        "options": [
            {
                "class": o.opt_class,
                "type": o.type,
                "critical": o.critical,
                "data": o.data.hex(),
            }
            for o in header.options
        ],
        "payload_offset": payload_offset,
    }
