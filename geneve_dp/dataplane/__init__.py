"""Tunnel endpoints: devices, sockets and worker threads running the forwarding loops.

``Dataplane`` is what the daemon drives; ``DROP_REASONS`` names every drop counter.
"""

from __future__ import annotations

from .dataplane import ControlHook, Dataplane
from .reasons import DROP_REASONS, SOCKET_DROP_REASONS, TUNNEL_DROP_REASONS

__all__ = [
    "DROP_REASONS",
    "SOCKET_DROP_REASONS",
    "TUNNEL_DROP_REASONS",
    "ControlHook",
    "Dataplane",
]
