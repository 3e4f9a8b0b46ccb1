"""The `geneve-dp` command line: parse, then call. No dataplane logic lives here.

Each module in ``geneve_dp.commands`` registers its own subcommands and names them in
``COMMANDS``, so adding a command group never means editing this file. A command line
that names a known command builds only that module's parsers: `show` and `stats` (a
liveness probe's commands) never import the bench suite or pyroute2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from . import __version__, commands
from .errors import UserError

# Command modules in the order `--help` lists their commands: tunnels first, as `ip`
# lists `link` first; modules not named here follow in name order.
ORDER = ("tunnel", "live", "capture", "codec", "ambient", "bench")

_ARGUMENT = re.compile(r"^argument ([^:]+): (.*)$", re.S)
_CHOICE = re.compile(r"^invalid choice: (.*) \(choose from (.*)\)$", re.S)
_TYPED = re.compile(r"^invalid (\w+) value: (.*)$", re.S)
_REQUIRED = "the following arguments are required: "


def one_style(message: str) -> str:
    """argparse's own messages in the house style: ``field: what is wrong; what is accepted``."""
    if message.startswith(_REQUIRED):
        first = message.removeprefix(_REQUIRED).split(", ")[0].split("/")[0]
        return f"{first}: is required; accepted: see the usage line above"
    m = _ARGUMENT.match(message)
    if not m:
        return message
    field, what = m.group(1).split("/")[0], m.group(2)
    if c := _CHOICE.match(what):
        return f"{field}: {c.group(1)} is not accepted; accepted: {c.group(2)}"
    if t := _TYPED.match(what):
        kind = {"int": "a whole number", "float": "a number"}.get(t.group(1), t.group(1))
        return f"{field}: {t.group(2)} is not {kind}; accepted: {kind}"
    if what.startswith("not allowed with argument "):
        other = what.removeprefix("not allowed with argument ")
        return f"{field}: is given with {other}; accepted: one of the two"
    if what.startswith("expected"):
        return f"{field}: has no value; accepted: {field} VALUE"
    return f"{field}: {what}"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors keep the house style (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {one_style(message)}\n")


def _modules() -> list[ModuleType]:
    names = [m.name for m in pkgutil.iter_modules(commands.__path__)]
    rank = {name: i for i, name in enumerate(ORDER)}
    names.sort(key=lambda n: (rank.get(n, len(ORDER)), n))
    return [importlib.import_module(f"{commands.__name__}.{n}") for n in names]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``command`` only the parsers of the module that owns it."""
    parser = Parser(
        prog="geneve-dp",
        description=(
            "A userspace GENEVE (RFC 8926) dataplane: tunnel endpoints over TAP/TUN "
            "(`ip link add type geneve` without the kernel module), a header codec, and "
            "Istio ambient's node/ztunnel redirection built on them."
        ),
    )
    parser.add_argument("--version", action="version", version=f"geneve-dp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = _modules()
    owner = [m for m in modules if command in getattr(m, "COMMANDS", ())]
    for module in owner[:1] or modules:
        module.register(sub)
    return parser


def _leaf(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)parser the command line reached, e.g. `node up`'s for `node up --x`."""
    current = parser
    for token in argv:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if actions and token in actions[0].choices:
            current = actions[0].choices[token]
    return current


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse would blame the top-level parser; the subcommand's usage helps more.
        what = "unknown option" if extra[0].startswith("-") else "unexpected argument"
        _leaf(parser, argv).error(
            f"{extra[0]}: {what}; accepted: the options in the usage line above (--help)"
        )
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
