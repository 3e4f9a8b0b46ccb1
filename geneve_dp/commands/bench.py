"""`geneve-dp bench`: the benchmark suite, and `geneve-dp bench codec`.

The suite is the source tree's ``bench/`` folder (also `python -m bench` from the
tree). It is not installed: a top-level package named ``bench`` would collide with
others in site-packages. It is found beside the ``geneve_dp`` package, which a checkout
and an editable install (`pip install -e .`) have; a built wheel has no benchmark.
This module only parses the command line and hands over.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import UserError

# The subcommands register() adds (cli builds only the module a command line names).
COMMANDS = ("bench",)

# The source tree's bench/ folder: beside the geneve_dp package.
BENCH_DIR = Path(__file__).resolve().parent.parent.parent / "bench"


def _bench_module(name: str) -> ModuleType:
    """``bench.<name>`` of the source tree, loaded from BENCH_DIR whatever sys.path holds."""
    package = sys.modules.get("bench")
    if package is None or Path(str(package.__file__)).resolve().parent != BENCH_DIR:
        init = BENCH_DIR / "__init__.py"
        if not init.is_file():
            raise UserError(
                f"the benchmark suite comes with the source tree ({BENCH_DIR} is missing); "
                "run it from a checkout or an editable install (pip install -e .)"
            )
        spec = importlib.util.spec_from_file_location(
            "bench", init, submodule_search_locations=[str(BENCH_DIR)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"bench.{name}")


def _suite() -> Any:
    return _bench_module("suite")


def register(sub: Any) -> None:
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
    if (BENCH_DIR / "suite.py").is_file():  # else cmd_bench says where the suite is
        _suite().add_arguments(p)
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
    suite = _suite()
    try:
        return int(suite.run(args))
    except suite.BenchError as exc:
        raise UserError(str(exc)) from None


def cmd_codec(args: argparse.Namespace) -> int:
    # Imported by name: bench/codec.py is written separately and may be absent.
    try:
        codec = _bench_module("codec")
    except ImportError as exc:
        raise UserError(f"the codec benchmark is not available: {exc}") from None
    main: Callable[[list[str] | None], int] = codec.main
    return int(main(list(args.codec_args)))
