"""Drop reason names, in the order of the GDP_DROP_* numbers of csrc/engine.h."""

from __future__ import annotations

from typing import Final

SOCKET_DROP_REASONS: Final = (
    "truncated",  # UDP payload shorter than the 8-byte GENEVE header
    "bad_version",  # Ver != 0
    "options_truncated",  # Opt Len reaches past the end of the packet
    "option_overruns",  # option lengths do not add up exactly to Opt Len
    "unknown_vni",  # no tunnel on this port has the VNI
    "wrong_remote",  # a tunnel has the VNI, but the outer source is not its remote
)
"""Counted per receive socket: no tunnel can be named for these packets."""

TUNNEL_DROP_REASONS: Final = (
    "critical_option",  # an option with the critical bit: we know no options
    "c_bit_mismatch",  # C bit set without a critical option, or clear with one
    "wrong_protocol",  # protocol type not carried in this mode (or not the inner version)
    "inner_truncated",  # inner frame too short for its own headers
    "ecn_not_ect",  # outer CE on a Not-ECT inner packet (RFC 6040)
    "own_mac",  # inner source MAC is the device's own (loop guard, as the kernel)
    "control_queue_full",  # O-bit packet while the control queue was full
    "dev_write",  # writing the inner frame to the device failed
    "too_big",  # inner packet over the path MTU; ICMP too-big sent back when IP
    "tx_bad_frame",  # frame read from the device cannot be encapsulated
    "tx_error",  # the underlay send failed
    # Authenticated tunnels (geneve_dp/auth), checked first, in this order:
    "auth_missing",  # no integrity option
    "auth_unknown_key",  # its key ID is not in the key ring
    "auth_bad_mac",  # the MAC does not verify
    "auth_replayed",  # sequence number seen already or older than the window
)
"""Counted per tunnel."""

DROP_REASONS: Final = SOCKET_DROP_REASONS + TUNNEL_DROP_REASONS
"""Every drop reason, one counter each (as the kernel's geneve.c counts per reason)."""
