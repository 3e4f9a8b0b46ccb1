"""Hostile control inputs (issue 7): config files and control-socket requests.

Malformed TOML, values of the wrong type or out of range, unknown keys: a one-line
error naming the field, exit code 2, nothing created. A garbage, huge or silent client
of a running daemon's control socket gets an error (or nothing) and the daemon keeps
running. The control socket is a 0600 unix socket in a 0700 directory, and nothing of
the daemon listens anywhere else (the GENEVE port itself aside, as with the kernel).
"""

from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geneve_dp.dataplane.spec import KEYS, load_config
from geneve_dp.errors import UserError
from tests.daemon_helpers import GDP, Up, up
from tests.endpoint_helpers import underlay
from tests.netns import Netns

# Daemons started here keep their sockets in a run directory of this test's own.
pytestmark = pytest.mark.usefixtures("run_dir")

OK = {"name": '"gt0"', "vni": 9, "remote": '"10.0.0.2"'}  # TOML values as written


def toml_table(extra: dict[str, object]) -> str:
    lines = ["[[tunnel]]"]
    for key, value in {**OK, **extra}.items():
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


BAD_CONFIGS = [
    ("[[tunnel]\nname = 1\n", "--config", "not valid TOML"),
    ("tunnel = [1]\n", "tunnel[0]", "not a table"),
    ("tunnel = [[1, 2]]\n", "tunnel[0]", "not a table"),
    ('tunnel = "x"\n', "--config", "no [[tunnel]] tables"),
    ("", "--config", "no [[tunnel]] tables"),
    ('colour = "red"\n' + toml_table({}), "colour", "unknown top-level key"),
    (toml_table({"bogus": 1}), "tunnel[0].bogus", "unknown key"),
    (toml_table({"vni": 16777216}), "tunnel[0].vni", "0..16777215"),
    (toml_table({"vni": -1}), "tunnel[0].vni", "0..16777215"),
    (toml_table({"vni": 1.5}), "tunnel[0].vni", "whole number"),
    (toml_table({"vni": '"x"'}), "tunnel[0].vni", "not a number"),
    (toml_table({"vni": "true"}), "tunnel[0].vni", "0..16777215"),
    (toml_table({"port": "1e400"}), "tunnel[0].port", "1..65535"),
    (toml_table({"port": "nan"}), "tunnel[0].port", "1..65535"),
    (toml_table({"port": 0}), "tunnel[0].port", "1..65535"),
    (toml_table({"ttl": 256}), "tunnel[0].ttl", "1..255"),
    (toml_table({"mtu": 67}), "tunnel[0].mtu", "68..65535"),
    (toml_table({"tos": "[1]"}), "tunnel[0].tos", "0..255"),
    (toml_table({"options": 5}), "tunnel[0].options", "not a list"),
    (toml_table({"options": '["0x0102:0x01:zz"]'}), "tunnel[0].options", "not hex"),
    (toml_table({"addresses": '"10.1.1.1/24"'}), "tunnel[0].addresses", "not a list"),
    (toml_table({"addresses": '["10.0.0.1/99"]'}), "tunnel[0].addresses", "address/prefix"),
    (toml_table({"remote": 5}), "tunnel[0].remote", "IPv4 or IPv6"),
    (toml_table({"remote": '"224.0.0.1"'}), "tunnel[0].remote", "unicast"),
    (toml_table({"mode": '"tunnel"'}), "tunnel[0].mode", "tap, tun"),
    (toml_table({"df": "1"}), "tunnel[0].df", "unset, set, inherit"),
    (toml_table({"udp_csum": '"yes"'}), "tunnel[0].udp_csum", "true or false"),
    (toml_table({"mac": '"01:00:00:00:00:01"'}), "tunnel[0].mac", "unicast MAC"),
    (toml_table({"name": '"a/b"'}), "tunnel[0].name", "device name"),
    (toml_table({}) + toml_table({"vni": 10}), "name", "appears twice"),
]


@pytest.mark.parametrize(("text", "field", "words"), BAD_CONFIGS)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, field: str, words: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{field}: "), message
    assert words in message, message


def test_config_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'[[tunnel]]\nname = "\x87\xff"\n')
    with pytest.raises(UserError, match=r"^--config: .* is not UTF-8 text"):
        load_config(path)


# Any TOML document built from our keys with values of any type: load_config either
# accepts it or raises UserError (one line); never another exception.
_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(["10.0.0.2", "fd00::2", "0x0102:0x01:deadbeef", "192.168.1.1/24", "tap"]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3), st.dictionaries(
    st.text(max_size=5), _scalars, max_size=2))  # fmt: skip


def toml_value(v: object) -> str:
    """TOML for a generated value (a string that TOML refuses is also a fine input)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if v != v else ("inf" if v > 0 else "-inf") if abs(v) == float("inf") else repr(v)
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)


# A valid table with up to three keys replaced or added, so most examples get past the
# required keys to the checks of the others.
_tables = st.dictionaries(st.sampled_from([*KEYS, "bogus"]), _values, max_size=3).map(
    lambda d: {"name": "gt0", "vni": 9, "remote": "10.0.0.2", **d}
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tunnel=st.one_of(st.lists(_tables, min_size=1, max_size=3), _values),
    top=st.dictionaries(st.sampled_from(["engine", "netns", "offload", "x"]), _scalars, max_size=2),
)
def test_any_typed_config_gives_a_config_or_a_user_error(
    tmp_path: Path, tunnel: object, top: dict[str, object]
) -> None:
    path = tmp_path / "h.toml"
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in top.items()]
    if isinstance(tunnel, list) and tunnel and all(isinstance(t, dict) for t in tunnel):
        for table in tunnel:
            lines += [
                "[[tunnel]]",
                *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()),
            ]
    else:
        lines.append(f"tunnel = {toml_value(tunnel)}")
    path.write_text("\n".join(lines) + "\n")
    try:
        load_config(path)
    except UserError as exc:
        assert "\n" not in str(exc)


def test_up_with_a_bad_config_creates_nothing(
    netns_factory: Callable[[str], Netns], tmp_path: Path
) -> None:
    a, b = netns_factory("ca"), netns_factory("cb")
    underlay(a, b)
    before = a.run("ip", "-o", "link").stdout
    good = toml_table({"remote": '"10.0.0.2"', "addresses": '["192.168.100.1/24"]'})
    for text in (good + toml_table({"name": '"gt1"', "ttl": 0}),
                 good + "[[tunnel]]\nname = 'gt1'\n", "[[tunnel]\n"):  # fmt: skip
        path = tmp_path / "c.toml"
        path.write_text(text)
        proc = subprocess.run([*GDP, "up", "--netns", a.name, "--config", str(path)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert a.run("ip", "-o", "link").stdout == before


# ------------------------------------------------------------- the control socket


@pytest.fixture
def daemon(netns_factory: Callable[[str], Netns]) -> Iterator[Up]:
    a, b = netns_factory("sa"), netns_factory("sb")
    underlay(a, b)
    with up(a, "gt0", "--vni", "9", "--remote", "10.0.0.2", "--address", "192.168.9.1/24") as d:
        yield d


def test_garbage_and_huge_requests_get_errors_and_the_daemon_keeps_running(daemon: Up) -> None:
    d = daemon
    before = d.status()
    for request, words in (
        (b"garbage\n", "not a JSON object"),
        (b"\x00\xff\xfe\n", "not a JSON object"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'"status"\n', "not a JSON object"),
        (b'{"cmd": "reboot"}\n', "unknown request"),
        (b'{"cmd": ["status"]}\n', "unknown request"),
        (b"{" * 100_000 + b"\n", "longer than 65536 bytes"),
        (b"x" * (4 << 20) + b"\n", "longer than 65536 bytes"),
        (b"x" * (1 << 20), "longer than 65536 bytes"),  # and no newline at all
    ):
        reply = json.loads(d.request(request))
        assert words in reply["error"], (request[:20], reply)
        assert '{"cmd": "status"}' in reply["error"] or "longer" in reply["error"]
    # Clients that send nothing, or half a line, do not hold up the others; they are
    # dropped after the client timeout.
    silent = []
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.sock))
        s.sendall(b'{"cmd": "sta')
        silent.append(s)
    try:
        after = d.status()
    finally:
        for s in silent:
            s.close()
    assert d.proc.poll() is None
    assert after["pid"] == before["pid"] and after["restarts"] == 0
    # Many at once.
    replies: list[dict[str, object]] = []
    threads = [threading.Thread(target=lambda: replies.append(d.status())) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(replies) == 16
    rc, _took, err = d.stop()
    assert rc == 0 and "Traceback" not in err, err


def test_control_socket_is_private_and_nothing_else_listens(daemon: Up, run_dir: Path) -> None:
    d = daemon
    mode = d.sock.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    ns = d.ns
    pid = f"pid={d.pid},"
    # TCP: nothing listens.
    tcp = [ln for ln in ns.run("ss", "-Htlnp").stdout.splitlines() if pid in ln]
    assert tcp == []
    # UDP: the GENEVE port (as a kernel geneve device binds it); every other UDP
    # socket of the daemon is connected to the remote's GENEVE port (TSO segments).
    for line in ns.run("ss", "-Huanp").stdout.splitlines():
        if pid not in line:
            continue
        local, peer = line.split()[3], line.split()[4]
        assert (local.endswith(":6081") and peer.endswith(":*")) or peer == "10.0.0.2:6081", line
    assert any(ln.split()[3].endswith(":6081") for ln in ns.run("ss", "-Huanp").stdout.splitlines()
               if pid in ln)  # fmt: skip
    # Raw sockets: IPPROTO_RAW (255) only, which never receives.
    for line in ns.run("ss", "-Hwanp").stdout.splitlines():
        if pid in line:
            assert re.search(r":255\b|:ipproto-255\b|:raw\b", line.split()[3]), line
    # Unix: the control socket is the only one it listens on.
    unix = [ln for ln in ns.run("ss", "-Hxlp").stdout.splitlines() if pid in ln]
    assert [ln.split()[4] for ln in unix] == [str(d.sock)], unix


def test_show_and_stats_survive_a_stale_or_hostile_socket_file(daemon: Up, run_dir: Path) -> None:
    # A socket file nobody serves (a kill -9) is swept; a listener that answers garbage
    # is a one-line error for `show`, not a traceback.
    stale = run_dir / "gdp-999999.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    proc = subprocess.run([*GDP, "show", "--all", "--json"], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [r["pid"] for r in json.loads(proc.stdout)] == [daemon.pid]
    assert not stale.exists()

    liar = run_dir / "gdp-999998.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(liar))
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        conn.recv(100)
        conn.sendall(b"this is not json\n")
        conn.close()

    th = threading.Thread(target=answer)
    th.start()
    try:
        proc = subprocess.run([*GDP, "show", "--all"], capture_output=True, text=True, timeout=30)
    finally:
        th.join(10)
        srv.close()
        liar.unlink(missing_ok=True)
    # The others are still listed; the bad one is named in one line on stderr.
    assert proc.returncode == 0, proc.stderr
    assert str(daemon.pid) in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and str(liar) in proc.stderr, proc.stderr
