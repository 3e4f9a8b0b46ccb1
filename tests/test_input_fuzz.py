"""Fuzzing `up`'s inputs (issue 19 item 8): whatever the --config text or the command
line, `up` either accepts it or refuses it with one line naming the field (UserError,
exit 2); argparse's own refusals exit 2 too. A traceback is a bug.

Runs `up`'s checks in-process (plan_up: everything checked before anything is
created), so it needs no root and each example takes milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geneve_dp.cli import build_parser
from geneve_dp.commands.tunnel import plan_up
from geneve_dp.dataplane.spec import KEYS, TOP_LEVEL_KEYS
from geneve_dp.errors import UserError

FUZZ = settings(
    max_examples=int(os.environ.get("GDP_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

# TOML values a careless or hostile config might hold, as TOML source text.
TRICKY_STRINGS = [
    "gt0", "gt%d", "é" * 8, "a\\u0000b", "", ".", "..", "/", "n" * 300, "10.0.0.2",
    "::1", "fe80::1%eth0", "0.0.0.0", "255.255.255.255", "tap", "tun", "c", "py",
    "set", "inherit", "unset", "0x0102:0x80:deadbeef", "1:2", "[::1]:9464", "9464",
    "127.0.0.1:0", "02:00:00:00:00:01", "ff:ff:ff:ff:ff:ff", "10.0.0.1/33", "10.0.0.1/24",
    "\\udcff", "true", "json", "%s%s%s", "a b", "../../etc",
]  # fmt: skip
TRICKY_VALUES = (
    [f'"{s}"' for s in TRICKY_STRINGS]
    + ["0", "1", "-1", "255", "256", "65535", "65536", "16777215", "16777216", "2147483648",
       "9223372036854775807", "-9223372036854775808", "1e308", "nan", "inf", "-inf",
       "0.5", "true", "false", "[]", "[1, 2]", '["a", 1]', "{}", '{ a = 1 }',
       '[{ class = 1, type = 2 }]', '["10.0.0.1/24", "fd00::1/64"]', "1979-05-27",
       '"""multi\nline"""', "[[]]", '[["x"]]']
)  # fmt: skip

VALID = '[[tunnel]]\nname = "gt0"\nvni = 7\nremote = "10.0.0.2"\n'


@st.composite
def config_text(draw: st.DrawFn) -> str:
    """A config: key = value lines drawn from the real keys and tricky values, at the
    top level and in [[tunnel]] tables, sometimes mangled character by character."""
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*TOP_LEVEL_KEYS, "bogus"]))
        lines.append(f"{key} = {draw(st.sampled_from(TRICKY_VALUES))}")
    for _ in range(draw(st.integers(0, 3))):
        table = draw(st.sampled_from(["[[tunnel]]", "[tunnel]", "[remotes.x]", "[[remotes]]"]))
        lines.append(table)
        base = {"name": '"gt0"', "vni": "7", "remote": '"10.0.0.2"'}
        for key in draw(st.lists(st.sampled_from([*KEYS, "bogus"]), max_size=6)):
            base[key] = draw(st.sampled_from(TRICKY_VALUES))
        lines += [f"{k} = {v}" for k, v in base.items()]
    text = "\n".join(lines) + "\n"
    for _ in range(draw(st.integers(0, 2))):  # mangle
        at = draw(st.integers(0, len(text)))
        junk = draw(st.text(max_size=4))
        text = text[:at] + junk + text[at + draw(st.integers(0, 3)) :]
    return text


PARSER = build_parser("up")


def run_up_checks(argv: list[str]) -> None:
    """Parse and check like `geneve-dp up ARGV`; fail on anything but acceptance, a
    one-line UserError, or argparse's exit 2."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = PARSER.parse_args(["up", *argv])
    except SystemExit as exc:
        assert exc.code == 2, (argv, err.getvalue())
        assert "error:" in err.getvalue() and "Traceback" not in err.getvalue()
        return
    try:
        plan_up(args)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message, (argv, message)
        assert exc.exit_code == 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(autouse=True, scope="module")
def _no_kube() -> None:
    # A [remotes] table resolves through the Kubernetes API only with NODE_NAME set.
    os.environ.pop("NODE_NAME", None)


def test_the_valid_config_passes(workdir: Path) -> None:
    path = workdir / "valid.toml"
    path.write_text(VALID)
    plan = plan_up(build_parser().parse_args(["up", "--config", str(path)]))
    assert [s.name for s in plan.specs] == ["gt0"]


@FUZZ
@given(text=config_text())
def test_config_text_never_gives_a_traceback(workdir: Path, text: str) -> None:
    path = workdir / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    run_up_checks(["--config", str(path)])


UP_FLAGS = [
    "--vni", "--remote", "--local", "--port", "--mode", "--mtu", "--ttl", "--tos", "--df",
    "--option", "--mac", "--address", "--netns", "--engine", "--workers", "--nice",
    "--metrics-addr", "--drop-alarm", "--log-format", "--udp-csum", "--pidfile",
]  # fmt: skip
ARG_VALUES = [v.replace("\\u0000", "\x01") for v in TRICKY_STRINGS] + [
    "0", "-1", "7", "256", "65536", "16777216", "0x10", "1e9", "nan", "", "--", "-x",
]  # fmt: skip


@FUZZ
@given(
    name=st.sampled_from([*ARG_VALUES, None]),
    pairs=st.lists(
        st.tuples(st.sampled_from(UP_FLAGS), st.sampled_from(ARG_VALUES) | st.text(max_size=8)),
        max_size=6,
    ),
)
def test_up_arguments_never_give_a_traceback(
    name: str | None, pairs: list[tuple[str, str]]
) -> None:
    argv = [] if name is None else [name]
    argv += ["--vni", "7", "--remote", "10.0.0.2"]
    for flag, value in pairs:
        argv += [flag, value.replace("\x00", "")]  # argv cannot hold NUL
    run_up_checks(argv)
