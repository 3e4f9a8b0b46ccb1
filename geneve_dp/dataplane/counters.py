"""Sums of counter dicts: what the supervisor and the dataplane carry over when an
engine is replaced, so that counters never go backwards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def add_counters(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` + ``b`` key by key, into nested dicts and lists of numbers (element by
    element); keys of either are kept, other values from ``a`` first."""
    out: dict[str, Any] = dict(a)
    for key, value in b.items():
        mine = out.get(key)
        if isinstance(value, Mapping):
            out[key] = add_counters(mine if isinstance(mine, Mapping) else {}, value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = (mine if isinstance(mine, int) else 0) + value
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            ours = mine if isinstance(mine, list) else []
            n = max(len(ours), len(value))
            out[key] = [
                (ours[k] if k < len(ours) else 0) + (value[k] if k < len(value) else 0)
                for k in range(n)
            ]
        else:
            out.setdefault(key, value)
    return out
