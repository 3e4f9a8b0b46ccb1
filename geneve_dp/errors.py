"""Errors meant for people: one line, naming what was wrong and what is accepted."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the command line or a config file (exit code 2).

    ``field`` names the option or key at fault, so the message can start with it.
    """

    exit_code = 2

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
