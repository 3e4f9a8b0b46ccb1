"""Rates from two readings of the counters: what `stats --watch` shows and what the
daemon's drop-rate alarm compares with its threshold.

A reading is taken from the status layout of ``Dataplane.status()`` (one dict per
tunnel). Rates are per second of wall time between the readings; a counter that went
backwards (the dataplane restarted under the same key) counts as zero, not as a
negative rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reading:
    """The counters of one tunnel (or, with ``device`` None, one receive socket)."""

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: int = 0


@dataclass(frozen=True)
class Rate:
    rx_pps: float
    rx_bps: float  # bits per second
    tx_pps: float
    tx_bps: float
    drops_ps: float


def _sum(values: Any) -> int:
    return sum(int(v) for v in (values or {}).values())


def tunnel_reading(tunnel: Mapping[str, Any]) -> Reading:
    c = tunnel.get("counters", {})
    return Reading(
        int(c.get("rx_packets", 0)),
        int(c.get("rx_bytes", 0)),
        int(c.get("tx_packets", 0)),
        int(c.get("tx_bytes", 0)),
        _sum(c.get("drops")),
    )


def socket_reading(tunnel: Mapping[str, Any]) -> Reading:
    """The drops of the receive socket a tunnel shares with the others on its port:
    the packets that no tunnel could be named for."""
    s = tunnel.get("socket", {})
    return Reading(rx_packets=int(s.get("rx_packets", 0)), drops=_sum(s.get("drops")))


Key = tuple[Any, ...]


def readings(rows: Iterable[Mapping[str, Any]]) -> dict[Key, Reading]:
    """Readings keyed ("tunnel", pid, device) and ("socket", pid, family, port); pid is
    None for a dataplane's own status (the daemon reading itself)."""
    out: dict[Key, Reading] = {}
    for t in rows:
        pid = t.get("pid")
        out[("tunnel", pid, t.get("name"))] = tunnel_reading(t)
        sock = t.get("socket")
        if sock is not None:
            out[("socket", pid, sock.get("family"), sock.get("port"))] = socket_reading(t)
    return out


def _per_second(new: int, old: int, dt: float) -> float:
    return max(new - old, 0) / dt


def rate(old: Reading, new: Reading, dt: float) -> Rate:
    if dt <= 0:
        raise ValueError("the readings must be apart in time")
    return Rate(
        _per_second(new.rx_packets, old.rx_packets, dt),
        8 * _per_second(new.rx_bytes, old.rx_bytes, dt),
        _per_second(new.tx_packets, old.tx_packets, dt),
        8 * _per_second(new.tx_bytes, old.tx_bytes, dt),
        _per_second(new.drops, old.drops, dt),
    )


def rates(old: Mapping[Key, Reading], new: Mapping[Key, Reading], dt: float) -> dict[Key, Rate]:
    """Rates of the keys in both readings (a tunnel that just appeared has none yet)."""
    return {k: rate(old[k], r, dt) for k, r in new.items() if k in old}


def human(value: float, unit: str) -> str:
    """1234567 -> '1.23 M' + unit: the SI prefixes `ip -h` and iperf use."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"
