"""Parsing of `--option CLASS:TYPE:HEX`, shared by `encode`, `up` and config files."""

from __future__ import annotations

from . import codec
from .errors import UserError

ACCEPTED = (
    "accepted: CLASS:TYPE:HEX, class 0..0xffff, type 0..0xff, data a multiple of 4 bytes up "
    "to 124, e.g. 0x0102:0x80:deadbeef"
)


def parse_option(text: str, field: str = "--option") -> codec.Option:
    """``CLASS:TYPE:HEX`` (numbers in decimal or 0x hex) to a checked Option."""
    parts = text.split(":")
    if len(parts) != 3:
        raise UserError(f"{text!r} is not three parts; {ACCEPTED}", field=field)
    try:
        opt_class, opt_type = int(parts[0], 0), int(parts[1], 0)
    except ValueError as exc:
        raise UserError(f"{text!r}: CLASS or TYPE is not a number; {ACCEPTED}", field) from exc
    try:
        data = bytes.fromhex(parts[2])
    except ValueError as exc:
        raise UserError(f"{text!r}: data {parts[2]!r} is not hex; {ACCEPTED}", field) from exc
    option = codec.Option(opt_class, opt_type, data)
    try:
        option.check()
    except codec.EncodeError as exc:
        raise UserError(f"{text!r}: {exc}; {ACCEPTED}", field=field) from exc
    return option
