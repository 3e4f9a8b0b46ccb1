"""`geneve-dp decode` and `geneve-dp encode`: the codec from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import codec, pcap, wire
from ..dataplane.spec import whole_number
from ..errors import UserError
from ..options import ACCEPTED as OPTIONS_ACCEPTED
from ..options import parse_option

# Built-in sample for `geneve-dp decode --sample`: a plain Ethernet-carrying header
# (Istio's inbound VNI), one with a non-critical and a critical option, and an OAM
# frame carrying IPv4.
SAMPLES = (
    "000065580003e800",
    "0440655800000a00" + "0102030100000001" + "ffff8001deadbeef",
    "008008000007d100",
)

# The subcommands register() adds (cli builds only the module a command line names).
COMMANDS = ("decode", "encode")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "decode",
        help="decode GENEVE headers from hex or a pcap file, one JSON object per packet",
        description=(
            "Decode GENEVE headers. Input: hex strings as arguments, or one per line on "
            "stdin, or --pcap FILE (outer IPv4/IPv6 + UDP to the GENEVE port are skipped). "
            "Prints one JSON object per packet: option class and type in hex as `up "
            "--option` takes them, opt_len_words in 4-byte words, payload_offset_bytes in "
            "bytes. --pcap reads classic pcap and pcapng (tshark's default). Exit code 1 if "
            "some packet did not decode, 2 on unreadable input."
        ),
    )
    p.add_argument("hex", nargs="*", help="a packet starting at the GENEVE header, as hex")
    p.add_argument(
        "--pcap", type=Path, metavar="FILE", help="read packets from a pcap or pcapng file"
    )
    p.add_argument(
        "--port", type=int, default=wire.GENEVE_PORT, help="UDP port in pcap input (6081)"
    )
    p.add_argument("--sample", action="store_true", help="decode a few built-in sample headers")
    p.add_argument("--engine", choices=("c", "python"), default="c", help="codec to use (c)")
    p.set_defaults(func=cmd_decode)

    e = sub.add_parser(
        "encode",
        help="print a GENEVE header as hex",
        description="Build a GENEVE header and print it as hex (the C bit follows the options).",
    )
    e.add_argument(
        "--vni",
        required=True,
        help="virtual network identifier, 0..16777215 (decimal or 0x hex, as `up --vni`)",
    )
    e.add_argument(
        "--protocol",
        default="ethernet",
        help="payload protocol: ethernet (0x6558), ipv4, ipv6, or a number (default ethernet)",
    )
    e.add_argument("--oam", action="store_true", help="set the O bit (control message)")
    e.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="CLASS:TYPE:HEX",
        help="add an option, e.g. 0x0102:0x80:deadbeef (data a multiple of 4 bytes)",
    )
    e.set_defaults(func=cmd_encode)


def printed(header: codec.Header, payload_offset: int) -> dict[str, Any]:
    """What `decode` prints for a header: numbers as `up`, `stats` and the metrics show
    them (option class and type in hex), lengths with their unit in the key."""
    return {
        "vni": header.vni,
        "protocol": header.protocol_name,
        "oam": header.oam,
        "critical": header.critical,
        "opt_len_words": header.opt_len,  # Opt Len counts 4-byte words (RFC 8926 3.4)
        "options": [
            {
                "class": f"0x{o.opt_class:04x}",
                "type": f"0x{o.type:02x}",
                "critical": o.critical,
                "data_bytes": len(o.data),
                "data": o.data.hex(),
            }
            for o in header.options
        ],
        "payload_offset_bytes": payload_offset,
    }


def parse_protocol(text: str) -> int:
    """A protocol name or number, as `--protocol` accepts it."""
    try:
        return int(wire.Protocol[text.upper()])
    except KeyError:
        pass
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 0xFFFF:
        raise UserError(
            f"{text!r} is not a protocol; accepted: ethernet, ipv4, ipv6 or a number 0..0xffff",
            "--protocol",
        )
    return value


def _hex_inputs(args: argparse.Namespace) -> Iterator[tuple[str, bytes]]:
    items: list[str] = list(SAMPLES) if args.sample else list(args.hex)
    if not items and args.pcap is None:
        items = [line.strip() for line in sys.stdin if line.strip()]
    for n, text in enumerate(items, start=1):
        try:
            yield text, bytes.fromhex(text.replace(":", ""))
        except ValueError as exc:
            raise UserError(
                f"input {n} ({text[:40]!r}) is not hex; accepted: hex digits, ':' allowed",
                "hex",
            ) from exc


def cmd_decode(args: argparse.Namespace) -> int:
    if args.engine == "c":
        from .. import fastpath

        decode = fastpath.decode
    else:
        decode = codec.decode
    failed = False

    def emit(pkt: bytes, extra: dict[str, Any]) -> None:
        nonlocal failed
        try:
            header, offset = decode(pkt)
            record: dict[str, Any] = printed(header, offset)
        except codec.DecodeError as exc:
            failed = True
            record = {"error": exc.reason, "length": len(pkt)}
        record.update(extra)
        print(json.dumps(record), flush=True)

    if args.pcap is not None:
        if not 1 <= args.port <= 0xFFFF:
            raise UserError(f"{args.port} is out of range; accepted: 1..65535", field="--port")
        try:
            datagrams = list(pcap.geneve_datagrams(args.pcap, args.port))
        except pcap.PcapError as exc:
            raise UserError(str(exc), field="--pcap") from exc
        for d in datagrams:
            emit(
                d.payload,
                {"frame": d.index, "src": d.src, "dst": d.dst, "sport": d.sport, "dport": d.dport},
            )
    else:
        for _text, pkt in list(_hex_inputs(args)):
            emit(pkt, {})
    return 1 if failed else 0


def cmd_encode(args: argparse.Namespace) -> int:
    options = tuple(parse_option(text) for text in args.option)
    vni = whole_number(args.vni, "--vni", 0, wire.MAX_VNI)
    header = codec.Header(
        vni=vni, protocol=parse_protocol(args.protocol), options=options, oam=args.oam
    )
    try:
        print(codec.encode(header).hex())
    except codec.EncodeError as exc:
        raise UserError(f"{exc}; accepted: {OPTIONS_ACCEPTED}", field="--option") from exc
    return 0
