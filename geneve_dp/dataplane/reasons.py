"""Drop reason and counter names, as the compiled engine spells them (csrc/counters.h
is the one list; index i of DROP_REASONS is the engine's drop counter i)."""

from __future__ import annotations

from typing import Final

from ..fastpath import ffi, lib


def _names(count: int, name_of: object) -> tuple[str, ...]:
    return tuple(ffi.string(name_of(i)).decode() for i in range(count))  # type: ignore[operator]


DROP_REASONS: Final = _names(lib.GDP_DROP_COUNT, lib.gdp_drop_name)
"""Every drop reason, one counter each (as the kernel's geneve.c counts per reason)."""

SOCKET_DROP_REASONS: Final = tuple(
    name for i, name in enumerate(DROP_REASONS) if lib.gdp_drop_on_socket(i)
)
"""Counted per receive socket: no tunnel can be named for these packets."""

TUNNEL_DROP_REASONS: Final = tuple(
    name for i, name in enumerate(DROP_REASONS) if not lib.gdp_drop_on_socket(i)
)
"""Counted per tunnel."""

TUNNEL_COUNTERS: Final = _names(lib.GDP_COUNTER_COUNT, lib.gdp_counter_name)
"""The per-tunnel event counters (rx_packets, tx_packets, ...), in the engine's order."""
