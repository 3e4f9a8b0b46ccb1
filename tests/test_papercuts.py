"""Issue 18's input papercuts, each against the real command line: device names counted
in bytes, one error style, the subcommand's usage for an unknown flag, hex VNIs in
`encode`, help that leads with the tunnel commands, and `show`/`stats` that import
neither the bench suite nor pyroute2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from geneve_dp.dataplane.spec import IFNAMSIZ, build_spec
from geneve_dp.errors import UserError
from tests.daemon_helpers import Up
from tests.netns import Netns
from tests.ops_helpers import B_UL

GDP = [sys.executable, "-m", "geneve_dp"]
ROOT = Path(__file__).resolve().parent.parent
# `geneve-dp CMD: error: FIELD: what is wrong; accepted: what is accepted`
STYLE = re.compile(r"^geneve-dp [\w -]+: error: ([^\s:]+): [^\n]+; accepted: [^\n]+$")


def gdp(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GDP, *args], capture_output=True, text=True, input=stdin, timeout=60, cwd=ROOT
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line (argparse puts the usage above it)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if not x.startswith(("usage:", " "))]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_device_names_are_counted_in_bytes_as_the_kernel_does() -> None:
    ok = {"vni": 1, "remote": "10.0.0.2"}
    assert build_spec({**ok, "name": "é" * 7}).name == "é" * 7  # 14 bytes
    assert build_spec({**ok, "name": "a" * (IFNAMSIZ - 1)}).name == "a" * 15
    for name, words in (
        ("é" * 8, "16 bytes"),  # 8 characters, 16 bytes: one too many
        ("a" * IFNAMSIZ, "16 bytes"),
        ("\udcff", "not a device name"),  # not encodable
        ("..", "not a device name"),
        ("a\x00b", "not a device name"),
        ("", "not a device name"),
    ):
        with pytest.raises(UserError) as err:
            build_spec({**ok, "name": name})
        assert words in str(err.value) and str(err.value).startswith("name: "), err.value
    # From the command line: the 15-character é name is one line, not a traceback.
    line = error_line(gdp("up", "é" * 15, "--vni", "1", "--remote", "10.0.0.2"))
    assert STYLE.match(line) and "NAME: " in line and "30 bytes" in line, line


# Bad input across the commands: every one a single line in the house style.
BAD_INPUTS = [
    (["up", "gt0", "--vni", "16777216", "--remote", "10.0.0.2"], "--vni"),
    (["up", "gt0", "--vni", "x", "--remote", "10.0.0.2"], "--vni"),
    (["up", "gt0", "--remote", "10.0.0.2"], "--vni"),
    (["up", "gt0", "--vni", "1"], "--remote"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.256"], "--remote"),
    (["up", "gt0", "--vni", "1", "--remote", "224.0.0.1"], "--remote"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--mode", "tunnel"], "--mode"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--ttl", "0"], "--ttl"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--tos", "300"], "--tos"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--df", "maybe"], "--df"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--option", "1:2"], "--option"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--option", "1:2:zz"], "--option"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--mac", "01:00:00:00:00:01"], "--mac"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--address", "10.1.1.1/99"], "--address"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--engine", "rust"], "--engine"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--workers", "0"], "--workers"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--nice", "x"], "--nice"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--drop-alarm", "-1"], "--drop-alarm"),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--metrics-addr", "::1:9"], None),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--metrics-addr", "x:9"], None),
    (["up", "gt0", "--vni", "1", "--remote", "10.0.0.2", "--log-format", "yaml"], None),
    (["up", "--config", "/nonexistent/geneve.toml"], "--config"),
    (["up"], "NAME"),
    (["encode", "--vni", "0x1000000"], "--vni"),
    (["encode", "--vni", "1", "--protocol", "ipx"], "--protocol"),
    (["encode", "--vni", "1", "--option", "0x1:0x2:abc"], "--option"),
    (["decode", "zz"], "hex"),
    (["decode", "--port", "x", "--pcap", "/dev/null"], "--port"),
    (["decode", "--engine", "rust", "00"], "--engine"),
    (["stats", "--watch", "--interval", "0"], "--interval"),
    (["stats", "--watch", "--count", "1.5"], "--count"),
    (["node", "render", "--ztunnel-ip", "x", "--ztunnel-veth", "v", "--host-ip", "1.1.1.1"], None),
    (["node", "up", "--istio-version", "1.17"], "--istio-version"),
    (["proxy", "--ports", "0"], "--ports"),
]


@pytest.mark.parametrize(("argv", "field"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_in_one_style(argv: list[str], field: str | None) -> None:
    line = error_line(gdp(*argv))
    m = STYLE.match(line)
    assert m, line
    if field is not None:
        assert m.group(1) == field, line


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["up", "gt0", "--bogus"], "usage: geneve-dp up "),
        (["show", "--bogus"], "usage: geneve-dp show "),
        (["node", "up", "--bogus"], "usage: geneve-dp node up "),
        (["pod", "list", "--bogus"], "usage: geneve-dp pod list "),
        (["encode", "--vni", "1", "extra"], "usage: geneve-dp encode "),
    ],
)
def test_unknown_flag_prints_the_subcommands_usage(argv: list[str], usage: str) -> None:
    proc = gdp(*argv)
    assert proc.stderr.startswith(usage), proc.stderr
    line = error_line(proc)
    assert STYLE.match(line) and argv[-1] in line, line


def test_encode_takes_the_vni_in_hex_as_up_does() -> None:
    hexed, dec = gdp("encode", "--vni", "0xabcdef"), gdp("encode", "--vni", str(0xABCDEF))
    assert hexed.returncode == 0 and hexed.stdout == dec.stdout and "abcdef" in hexed.stdout


def test_help_lists_tunnel_commands_first_and_describes_every_action() -> None:
    top = gdp("--help").stdout
    listed = re.findall(r"^    (\w+)\s", top, re.M)
    # The tunnel commands, then the rest (the codec, captures, ambient profiles, bench).
    assert listed[:5] == ["up", "show", "stats", "down", "set"], listed
    assert listed.index("node") > listed.index("decode")
    for argv in (
        ["node", "up"],
        ["node", "down"],
        ["node", "render"],
        ["ztunnel", "up"],
        ["ztunnel", "down"],
        ["pod", "add"],
        ["pod", "del"],
        ["pod", "list"],
    ):
        out = gdp(*argv, "--help").stdout
        # A description: a paragraph between the usage and the argument lists.
        body = out.split("\n\n")[1]
        assert not body.startswith(("options:", "positional")) and len(body) > 40, out
    up = gdp("up", "--help").stdout
    where = up[up.index("Where:") :]
    for line in ("VNI  := 0..16777215", "MODE := { tap | tun }", "DF   := { unset | set |"):
        assert line in where, where


@pytest.mark.parametrize("command", [["show"], ["stats"], ["show", "--all", "--json"]])
def test_show_and_stats_import_neither_bench_nor_pyroute2(command: list[str]) -> None:
    code = (
        "import sys\n"
        "from geneve_dp.cli import main\n"
        f"rc = main({command!r})\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'bench', 'pyroute2', "
        "'scapy', 'uvloop', 'prometheus_client', 'matplotlib'})\n"
        "print('HEAVY', heavy, rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert "HEAVY [] " in proc.stdout, proc.stdout + proc.stderr
    # The check can fail: the full parser (`--help`) does import the bench suite.
    full = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from geneve_dp.cli import build_parser; build_parser(); "
            "print('bench' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert full.stdout.strip() == "True", full.stderr


@pytest.mark.root
def test_failed_detach_leaves_no_empty_log(
    netns_factory: Callable[[str], Netns], run_dir: Path
) -> None:
    ns = netns_factory("det")  # no underlay: the child fails with "no route" after the fork
    # A log left empty by a daemon killed with SIGKILL (pid 1 is never one of ours and
    # a pid beyond pid_max never runs) is swept by the next detached `up`.
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = run_dir / f"gdp-{2**22 + 1}.log"
    stale.touch()
    kept = run_dir / f"gdp-{2**22 + 2}.log"
    kept.write_text("a crash's last words\n")
    proc = subprocess.run(
        [*GDP, "up", "--netns", ns.name, "gt0", "--vni", "1", "--remote", "10.77.0.2", "--detach"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    line = error_line(proc)
    assert "remote: " in line and "10.77.0.2" in line, line
    assert sorted(p.name for p in run_dir.iterdir()) == [kept.name], list(run_dir.iterdir())
    assert "gt0" not in ns.run("ip", "-o", "link").stdout


@pytest.mark.root
def test_mtu_above_the_underlay_is_a_warning_naming_the_largest_that_fits(
    pair: tuple[Netns, Netns],
) -> None:
    a, _b = pair
    # TAP over IPv4: 20 (IP) + 8 (UDP) + 8 (GENEVE) + 14 (inner Ethernet) = 50 bytes.
    for mtu, warned in (("1500", True), ("1450", False)):
        d = Up(a, "gt0", "--vni", "5", "--remote", B_UL, "--mtu", mtu, "--log-format", "json")
        try:
            assert f"mtu {mtu}" in a.run("ip", "-o", "link", "show", "gt0").stdout
        finally:
            rc, _took, err = d.stop()
        assert rc == 0, err
        events = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
        found = [e for e in events if e.get("event") == "mtu_above_underlay"]
        if warned:
            (e,) = found
            assert e["level"] == "warning" and e["fits"] == 1450 and e["device"] == "gt0", e
            assert "largest that fits is 1450" in e["msg"] and "ul0" in e["msg"], e
        else:
            assert found == [], found
