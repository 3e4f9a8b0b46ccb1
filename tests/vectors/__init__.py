"""Golden vectors for the GENEVE codec, each with its provenance.

``hand.json``: built by hand, byte by byte, from the field layout of RFC 8926 §3.4 and
§3.5 (the bytes and the expected fields were written independently of any codec).
``scapy.json``: bytes produced by scapy's GENEVE layer (``scapy.contrib.geneve``) and
recorded by ``make_scapy_vectors.py``; each one keeps the scapy fields it was built from
so that a test can rebuild it and notice if scapy's output ever changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Vector:
    name: str
    provenance: str
    data: bytes
    expect: dict[str, Any]  # codec.header_to_json() form, or {"error": reason}
    scapy: dict[str, Any] | None  # the scapy fields it was built from, if any

    @property
    def error(self) -> str | None:
        reason = self.expect.get("error")
        return str(reason) if reason is not None else None


def load(name: str) -> list[Vector]:
    """The vectors of one file (``hand`` or ``scapy``)."""
    doc = json.loads((HERE / f"{name}.json").read_text())
    out = []
    for item in doc["vectors"]:
        out.append(
            Vector(
                name=item["name"],
                provenance=item.get("provenance", doc["provenance"]),
                data=bytes.fromhex("".join(item["hex"].split())),
                expect=item["expect"],
                scapy=item.get("scapy"),
            )
        )
    return out


def all_vectors() -> list[Vector]:
    return load("hand") + load("scapy")
