"""Tunnel endpoints: devices, sockets and worker threads running the forwarding loops.

``Dataplane`` is what the daemon drives; ``DROP_REASONS`` names every drop counter.
``Dataplane`` is imported on first use: `spec` (what the CLI validates with) must not
pull pyroute2 and the engines into `show` and `stats`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .reasons import DROP_REASONS, SOCKET_DROP_REASONS, TUNNEL_DROP_REASONS

if TYPE_CHECKING:
    from .dataplane import ControlHook, Dataplane

__all__ = [
    "DROP_REASONS",
    "SOCKET_DROP_REASONS",
    "TUNNEL_DROP_REASONS",
    "ControlHook",
    "Dataplane",
]


def __getattr__(name: str) -> Any:
    if name in ("ControlHook", "Dataplane"):
        from . import dataplane

        return getattr(dataplane, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
