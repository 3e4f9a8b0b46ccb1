"""`geneve-dp bench`: the benchmark suite, and `geneve-dp bench codec`.

The suite lives in the top-level ``bench`` package (also `python -m bench`); this
module only parses the command line and hands over, so `geneve-dp --help` never pays
for importing it.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from ..errors import UserError

# The subcommands register() adds (cli builds only the module a command line names).
COMMANDS = ("bench",)


def register(sub: Any) -> None:
    from bench.suite import add_arguments

    p = sub.add_parser(
        "bench",
        help="benchmark geneve-dp against the bare veth and kernel VXLAN (root)",
        description=(
            "Run the benchmark suite: in two fresh network namespaces joined by a veth, send "
            "the same traffic over the bare veth, kernel VXLAN, and geneve-dp (C engine in "
            "TAP and TUN mode, Python engine); measure UDP packets per second and loss by "
            "packet size, TCP throughput (iperf3, 1 and 4 streams), round-trip latency "
            "percentiles and CPU time. Writes results.json, results.md (ratios to kernel "
            "VXLAN) and PNG plots, and prints the table. `geneve-dp bench codec --help`: "
            "the header codec micro-benchmark."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    # `bench codec ARGS...` hands every following argument, --help included, to
    # bench.codec.main, which owns its own options. A prefix character no option uses
    # makes this parser see "--x" as plain words (REMAINDER alone stops at them).
    bsub = p.add_subparsers(dest="bench_command", metavar="{codec}")
    c = bsub.add_parser(
        "codec",
        add_help=False,
        prefix_chars="\x00",
        help="header encode/decode speed, C vs Python (see `geneve-dp bench codec --help`)",
    )
    c.add_argument("codec_args", nargs=argparse.REMAINDER)
    c.set_defaults(func=cmd_codec)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.suite import BenchError, run

    try:
        return run(args)
    except BenchError as exc:
        raise UserError(str(exc)) from None


def cmd_codec(args: argparse.Namespace) -> int:
    # Imported by name: bench/codec.py is written separately and may be absent.
    try:
        codec = importlib.import_module("bench.codec")
    except ImportError as exc:
        raise UserError(f"the codec benchmark is not available: {exc}") from None
    main: Callable[[list[str] | None], int] = codec.main
    return int(main(list(args.codec_args)))
