"""The `geneve-dp` command line: parse, then call. No dataplane logic lives here.

Each module in ``geneve_dp.commands`` registers its own subcommands, so adding a
command group never means editing this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from . import __version__, commands
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geneve-dp",
        description=(
            "A userspace GENEVE (RFC 8926) dataplane: header codec, tunnel endpoints over "
            "TAP/TUN, and Istio ambient's node/ztunnel redirection built on them."
        ),
    )
    parser.add_argument("--version", action="version", version=f"geneve-dp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"geneve-dp {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
