"""Status that does not mislead: `show` names each tunnel's namespace (with --all) and
transmit path (inject device or sockets, and why) and explains the inject device;
`stats` shows the receive socket's drops; `stats --all --json` keys by namespace and
device; without access to the run directory, status commands say so and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.netns import Netns
from tests.ops_helpers import A_UL, B_IN, B_UL, gdp, make_pair, ping, send_bad, tunnel_pair

pytestmark = pytest.mark.root


def test_show_and_stats_name_namespaces_paths_and_socket_drops(
    netns_factory: Callable[[str], Netns], run_dir: Path
) -> None:
    a, b = make_pair(netns_factory)
    for ns in (a, b):
        ns.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
    # gt0 in both namespaces (the same name twice); a's with UDP checksums, which
    # keeps it on the sockets; b's through the inject device.
    with tunnel_pair(a, b, "--udp-csum"):
        ping(a, B_IN, 3)
        send_bad(b, B_UL, A_UL, 2, why="vni")

        every = gdp("show", "--all")
        assert every.returncode == 0, every.stderr
        lines = every.stdout.splitlines()
        assert lines[0].split()[:2] == ["netns", "device"]
        rows = [
            ln.split() for ln in lines[1:] if ln.split()[:2] in ([a.name, "gt0"], [b.name, "gt0"])
        ]
        assert sorted(r[0] for r in rows) == sorted([a.name, b.name])

        mine = gdp("show", "--netns", a.name).stdout
        assert "sockets" in mine.splitlines()[1]
        assert "gt0: sockets: --udp-csum" in mine
        assert "inject device" not in mine

        theirs = gdp("show", "--netns", b.name).stdout
        dev = json.loads(gdp("show", "--json", "--netns", b.name).stdout)[0]["tx_path"]["device"]
        assert dev and dev.startswith("gdpx"), theirs
        assert dev in theirs.splitlines()[1]
        assert f"gt0: {dev}: IPv4 without UDP checksums" in theirs
        flat = " ".join(theirs.split())
        assert f"{dev} (in `ip link`) is the endpoint's inject device, not a tunnel" in flat
        assert f"{a.name}/gt0: sockets" in every.stdout
        assert dev in b.run("ip", "-o", "link").stdout

        # Receive-socket drops, which no tunnel can be named for, in the text too.
        stats = gdp("stats", "--netns", a.name).stdout
        assert "socket IPv4 port 6081" in stats and "unknown_vni 2" in stats, stats

        # Two gt0: two entries, keyed by namespace, then device.
        keyed = json.loads(gdp("stats", "--all", "--json").stdout)
        assert set(keyed) == {a.name, b.name}
        assert keyed[a.name]["gt0"]["tx_packets"] >= 3 and keyed[b.name]["gt0"]["rx_packets"] >= 3


def test_status_commands_without_access_to_the_run_dir_exit_2(
    netns_factory: Callable[[str], Netns], run_dir: Path
) -> None:
    """The run directory is root's only (0700): a non-root user gets EACCES listing
    it. Here the same kernel check with uid 0 and no capability at all (so without
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), the directory's read bit taken from its
    owner for the test (mode 0300; the daemons, root with capabilities, go on)."""
    a, b = make_pair(netns_factory)
    with tunnel_pair(a, b):
        run_dir.chmod(0o300)
        try:
            for args in (
                ["show", "--all"],
                ["stats", "--all"],
                ["capture", "gt0", "--netns", a.name, "-w", "/dev/null", "--count", "1"],
            ):
                proc = subprocess.run(
                    ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
                     sys.executable, "-m", "geneve_dp", *args],
                    capture_output=True, text=True, timeout=30,
                )  # fmt: skip
                assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
                line = proc.stderr.strip().splitlines()
                assert len(line) == 1 and "permission denied" in line[0], (args, line)
                assert str(run_dir) in line[0] and "no tunnels" not in proc.stdout
        finally:
            run_dir.chmod(0o700)
