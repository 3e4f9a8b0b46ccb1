"""The command line front: help everywhere, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from geneve_dp.cli import build_parser


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geneve_dp", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_has_help(name: str) -> None:
    proc = run(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: geneve-dp" in proc.stdout


def test_decode_sample_prints_json_per_packet() -> None:
    proc = run("decode", "--sample")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) >= 3
    assert '"vni": 1000' in lines[0]


def test_decode_failure_exit_1_and_bad_hex_exit_2() -> None:
    bad = run("decode", "4000655800000100")
    assert bad.returncode == 1
    assert '"error": "bad_version"' in bad.stdout
    nothex = run("decode", "zz")
    assert nothex.returncode == 2
    assert len(nothex.stderr.strip().splitlines()) == 1
    assert "not hex" in nothex.stderr


def test_decode_reads_stdin() -> None:
    proc = run("decode", stdin="000065580003e800\n\n000008000003e900\n")
    assert proc.returncode == 0
    assert [line.count('"vni"') for line in proc.stdout.splitlines()] == [1, 1]


def test_encode_roundtrips_through_decode() -> None:
    enc = run("encode", "--vni", "1001", "--option", "0x0102:0x80:deadbeef")
    assert enc.returncode == 0, enc.stderr
    dec = run("decode", enc.stdout.strip())
    assert '"vni": 1001' in dec.stdout and '"critical": true' in dec.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--vni", "16777216"], "--vni"),
        (["--vni", "1", "--option", "1:2:abc"], "--option"),
        (["--vni", "1", "--option", "1:2:abcdef"], "multiple of 4"),
        (["--vni", "1", "--protocol", "ipx"], "--protocol"),
    ],
)
def test_encode_rejects_bad_input_in_one_line(args: list[str], needle: str) -> None:
    proc = run("encode", *args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
