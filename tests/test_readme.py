"""README.md's two commands are the contract with a newcomer and with CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_has_setup_and_test_commands() -> None:
    setup, test = readme_commands()
    assert setup.startswith("bash .ci/setup && geneve-dp ")
    assert "pytest" in test


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _setup, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test
    assert "bash .ci/setup" in ci
