"""Wire constants of RFC 8926 GENEVE and of the encapsulation around it.

Every number the codec, the engines and the Istio profiles share lives here, so a
constant has exactly one definition.
"""

from __future__ import annotations

import enum

GENEVE_PORT = 6081
"""IANA-assigned UDP destination port (RFC 8926 §3.3)."""

GENEVE_VERSION = 0
BASE_HEADER_LEN = 8
"""Fixed part of the header: Ver/OptLen, flags, protocol type, VNI, reserved."""

OPTION_HEADER_LEN = 4
MAX_OPT_LEN_WORDS = 0x3F
"""Opt Len is 6 bits of 4-byte words: at most 252 bytes of options."""
MAX_OPTIONS_LEN = MAX_OPT_LEN_WORDS * 4
MAX_OPTION_DATA_WORDS = 0x1F
"""An option's Length is 5 bits of 4-byte words: at most 124 bytes of data."""
MAX_OPTION_DATA_LEN = MAX_OPTION_DATA_WORDS * 4
MAX_HEADER_LEN = BASE_HEADER_LEN + MAX_OPTIONS_LEN

MAX_VNI = 0xFFFFFF
OPTION_TYPE_CRITICAL = 0x80
"""High bit of an option's type: a receiver that does not know the option must drop."""

FLAG_OAM = 0x80
FLAG_CRITICAL = 0x40

UDP_HEADER_LEN = 8
IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
ETH_HEADER_LEN = 14

# Overhead the kernel subtracts from the underlay MTU for a geneve device without
# options (drivers/net/geneve.c: GENEVE_IPV4_HLEN / GENEVE_IPV6_HLEN plus the inner
# Ethernet header for L2 devices).
OVERHEAD_IPV4 = IPV4_HEADER_LEN + UDP_HEADER_LEN + BASE_HEADER_LEN
OVERHEAD_IPV6 = IPV6_HEADER_LEN + UDP_HEADER_LEN + BASE_HEADER_LEN


class Protocol(enum.IntEnum):
    """Protocol Type field: an EtherType naming the encapsulated payload."""

    ETHERNET = 0x6558  # Transparent Ethernet Bridging: what Istio's devices carry
    IPV4 = 0x0800
    IPV6 = 0x86DD


def protocol_name(value: int) -> str:
    """A readable name for a protocol type; unnamed ones print as hex."""
    try:
        return Protocol(value).name.lower()
    except ValueError:
        return f"0x{value:04x}"
