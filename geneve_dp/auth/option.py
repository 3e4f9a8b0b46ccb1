"""The integrity option on the wire: constants and a pure codec.

Option data (36 bytes): key ID, 3 reserved bytes (zero), a 64-bit sender salt, a
64-bit sequence number and a 16-byte MAC. csrc/auth.h lays out the same bytes;
tests/test_auth_option.py checks that the constants agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import wire

OPT_TYPE = 0x81
"""Critical bit + 1: a receiver that does not know the option drops the packet."""
DEFAULT_CLASS = 0xFFF0
CLASS_MIN, CLASS_MAX = 0xFFF0, 0xFFFF
"""The experimental option classes of RFC 8926 §3.5 (IANA: 0xFFF0-0xFFFF)."""
DATA_LEN = 36
OPT_LEN = wire.OPTION_HEADER_LEN + DATA_LEN
TAG_LEN = 16
KEY_LEN = 32
MAX_KEYS = 2
WINDOW = 8192
"""How far (in sequence numbers) a packet may lag the newest one and still pass."""
SEQ_SHIFT = 12
"""A sender's first sequence number is (unix time in microseconds) << SEQ_SHIFT: it
exceeds every number it sent before a restart unless it sent over 4096 packets per
microsecond, so no number repeats under a key across restarts (while the realtime
clock does not go back)."""
SLACK_US = 2_000_000
"""How far a sender's clock may lag a receiver's. Senders number packets from the
realtime clock (never below the time they send at); a receiver refuses numbers below
its own start less this, so nothing sent before it (re)started can be replayed to it."""
KDF_CTX = b"gdpauth1"

OFF_KEY_ID, OFF_SALT, OFF_SEQ, OFF_TAG = 4, 8, 16, 24
"""Offsets inside the option, from its 4-byte header."""


class OptionError(ValueError):
    """Bytes that are not an integrity option."""


@dataclass(frozen=True)
class AuthOption:
    key_id: int
    salt: int
    seq: int
    tag: bytes = bytes(TAG_LEN)

    def encode(self, opt_class: int = DEFAULT_CLASS) -> bytes:
        """The whole option: 4-byte option header and 36 bytes of data."""
        if not 0 <= self.key_id <= 0xFF or len(self.tag) != TAG_LEN:
            raise OptionError("key ID must be 0..255 and the tag 16 bytes")
        return (
            opt_class.to_bytes(2, "big")
            + bytes([OPT_TYPE, DATA_LEN // 4, self.key_id, 0, 0, 0])
            + self.salt.to_bytes(8, "big")
            + self.seq.to_bytes(8, "big")
            + self.tag
        )


def decode(option: bytes | bytearray | memoryview) -> AuthOption:
    """An AuthOption from the 40 bytes of an option (header included)."""
    b = bytes(option)
    if len(b) != OPT_LEN or b[2] != OPT_TYPE or (b[3] & 0x1F) * 4 != DATA_LEN:
        raise OptionError(f"not a {OPT_LEN}-byte integrity option")
    return AuthOption(
        key_id=b[OFF_KEY_ID],
        salt=int.from_bytes(b[OFF_SALT:OFF_SEQ], "big"),
        seq=int.from_bytes(b[OFF_SEQ:OFF_TAG], "big"),
        tag=b[OFF_TAG:],
    )


def find(geneve: bytes | bytearray, opt_class: int) -> int:
    """Byte offset of the first integrity option in a GENEVE header, or -1 (as C's
    gdp_auth_find: a walk that stops at the first option overrunning the area)."""
    if len(geneve) < wire.BASE_HEADER_LEN:
        return -1
    end = wire.BASE_HEADER_LEN + (geneve[0] & 0x3F) * 4
    if end > len(geneve):
        return -1
    pos = wire.BASE_HEADER_LEN
    while end - pos >= 4:
        olen = 4 + (geneve[pos + 3] & 0x1F) * 4
        if olen > end - pos:
            return -1
        if (
            int.from_bytes(geneve[pos : pos + 2], "big") == opt_class
            and geneve[pos + 2] == OPT_TYPE
        ):
            return pos
        pos += olen
    return -1


def placeholder(opt_class: int) -> bytes:
    """The option as a header template carries it before signing."""
    return AuthOption(0, 0, 0).encode(opt_class)
