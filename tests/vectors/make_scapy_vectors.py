"""Regenerate ``scapy.json``: GENEVE headers as scapy's GENEVE layer builds them.

Run from the checkout: ``python tests/vectors/make_scapy_vectors.py``. Each vector keeps
the scapy fields it was built from; the expected decode is written from those fields
(never from geneve-dp's codec), so the file is evidence independent of our code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import scapy
from scapy.contrib.geneve import GENEVE, GeneveOptions
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

HERE = Path(__file__).resolve().parent

PROTOCOL_NAMES = {0x6558: "ethernet", 0x0800: "ipv4", 0x86DD: "ipv6"}

# (name, GENEVE fields, options as (classid, type, data), inner payload or None)
CASES: list[tuple[str, dict[str, int], list[tuple[int, int, bytes]], Any]] = [
    ("scapy-plain-ethernet", {"vni": 1000, "proto": 0x6558}, [], None),
    ("scapy-ipv4-oam", {"vni": 4242, "proto": 0x0800, "oam": 1}, [], None),
    ("scapy-ipv6-max-vni", {"vni": 0xFFFFFF, "proto": 0x86DD}, [], None),
    (
        "scapy-one-option",
        {"vni": 77, "proto": 0x6558},
        [(0x0101, 0x01, b"\x00\x00\x00\x2a")],
        None,
    ),
    (
        "scapy-critical-option",
        {"vni": 78, "proto": 0x6558, "critical": 1},
        [(0x0102, 0x80, b"\xde\xad\xbe\xef\x00\x00\x00\x01")],
        None,
    ),
    (
        "scapy-four-options",
        {"vni": 123456, "proto": 0x6558},
        [
            (0x0100, 0x01, b""),
            (0x0103, 0x02, b"\x01\x02\x03\x04"),
            (0xFFFF, 0x7F, bytes(range(16))),
            (0x0000, 0x05, b"\xff" * 8),
        ],
        None,
    ),
    (
        "scapy-max-option-data",
        {"vni": 5, "proto": 0x6558},
        [(0x0104, 0x10, bytes(range(124)))],
        None,
    ),
    (
        "scapy-inner-ethernet-ipv4-udp",
        {"vni": 1001, "proto": 0x6558},
        [],
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2", id=1)
        / UDP(sport=1234, dport=5678)
        / Raw(b"hello"),
    ),
    (
        "scapy-inner-ipv4",
        {"vni": 1002, "proto": 0x0800},
        [(0x0105, 0x03, b"\x00\x00\x00\x07")],
        IP(src="10.1.0.1", dst="10.1.0.2", id=2) / UDP(sport=53, dport=53) / Raw(b"x"),
    ),
]


def build(fields: dict[str, Any], options: list[tuple[int, int, bytes]], inner: Any) -> bytes:
    pkt: Any = GENEVE(
        **fields, options=[GeneveOptions(classid=c, type=t, data=d) for c, t, d in options]
    )
    if inner is not None:
        pkt = pkt / inner
    return bytes(pkt)


def expected(fields: dict[str, int], options: list[tuple[int, int, bytes]]) -> dict[str, Any]:
    opt_len = sum(4 + len(d) for _c, _t, d in options) // 4
    proto = fields["proto"]
    return {
        "vni": fields["vni"],
        "protocol": PROTOCOL_NAMES.get(proto, f"0x{proto:04x}"),
        "oam": bool(fields.get("oam", 0)),
        "critical": bool(fields.get("critical", 0)),
        "opt_len": opt_len,
        "options": [
            {"class": c, "type": t, "critical": bool(t & 0x80), "data": d.hex()}
            for c, t, d in options
        ],
        "payload_offset": 8 + 4 * opt_len,
    }


def main() -> None:
    vectors = []
    for name, fields, options, inner in CASES:
        vectors.append(
            {
                "name": name,
                "hex": build(fields, options, inner).hex(),
                "expect": expected(fields, options),
                "scapy": {
                    "fields": fields,
                    "options": [[c, t, d.hex()] for c, t, d in options],
                    "inner_hex": bytes(inner).hex() if inner is not None else None,
                },
            }
        )
    doc = {
        "provenance": f"built with scapy {scapy.__version__} scapy.contrib.geneve "
        "(GENEVE / GeneveOptions) by tests/vectors/make_scapy_vectors.py",
        "vectors": vectors,
    }
    (HERE / "scapy.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
