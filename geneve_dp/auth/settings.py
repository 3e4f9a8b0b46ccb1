"""`--auth-key-file` / `--auth-option-class` (config keys ``auth_key_file``,
``auth_option_class``): shared by `up`, `node up` and `ztunnel up`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .keys import KeyRing, load_key_file
from .option import CLASS_MAX, CLASS_MIN, DEFAULT_CLASS


@dataclass(frozen=True)
class AuthSettings:
    key_file: Path  # absolute: a reload reads it again
    keys: KeyRing
    option_class: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auth-key-file",
        metavar="FILE",
        help="authenticate every packet with this key file (root-owned, mode 0600: 32 raw "
        "bytes, or lines 'ID HEX [send]' for two keys); SIGHUP reloads it",
    )
    parser.add_argument(
        "--auth-option-class",
        metavar="CLASS",
        help=f"GENEVE option class of the integrity option, 0x{CLASS_MIN:04X}..0x{CLASS_MAX:04X} "
        f"(default 0x{DEFAULT_CLASS:04X})",
    )


def parse_class(value: object, field: str) -> int:
    try:
        number = int(value, 0) if isinstance(value, str) else value
    except ValueError:
        number = None
    if (
        isinstance(number, bool)
        or not isinstance(number, int)
        or not (CLASS_MIN <= number <= CLASS_MAX)
    ):
        raise UserError(
            f"{value!r} is not an experimental option class, 0x{CLASS_MIN:04X}..0x{CLASS_MAX:04X}",
            field,
        )
    return number


def resolve(
    key_file: str | None, option_class: str | None, settings: dict[str, Any] | None = None
) -> AuthSettings | None:
    """The flags, else the config's top-level keys; the key file is read and checked
    now, before anything is set up."""
    settings = settings or {}
    file_field, raw_file = "--auth-key-file", key_file
    if raw_file is None:
        file_field, raw_file = "auth_key_file", settings.get("auth_key_file")
    class_field, raw_class = "--auth-option-class", option_class
    if raw_class is None:
        class_field, raw_class = "auth_option_class", settings.get("auth_option_class")
    if raw_file is None:
        if raw_class is not None:
            raise UserError("needs an auth key file (--auth-key-file)", class_field)
        return None
    if not isinstance(raw_file, str) or not raw_file:
        raise UserError(f"{raw_file!r} is not a file name", file_field)
    path = Path(raw_file).absolute()
    keys = load_key_file(path, file_field)
    from .cauth import check_available

    check_available()
    cls = DEFAULT_CLASS if raw_class is None else parse_class(raw_class, class_field)
    return AuthSettings(path, keys, cls)
