"""Tunnels changed on a running endpoint, as iproute2 changes links: `up` again adds a
tunnel to the endpoint already serving the netns and port, `set` changes one in place,
`down` removes one (the last ends the process), a config reload applies the
difference; the other tunnels lose nothing meanwhile."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from geneve_dp.pcap import read_frames
from tests.netns import Netns
from tests.ops_helpers import A_IN, A_UL, B_IN, B_UL, gdp, make_pair, ping, start, stop

pytestmark = pytest.mark.root

A_IN1, B_IN1 = "172.16.9.1", "172.16.9.2"


def links(ns: Netns) -> str:
    return ns.run("ip", "-o", "link").stdout


def show(ns: Netns) -> dict[str, dict[str, object]]:
    out = gdp("show", "--json", "--netns", ns.name)
    assert out.returncode == 0, out.stderr
    return {str(t["name"]): t for t in json.loads(out.stdout)}


def port_free(ns: Netns, port: int = 6081) -> bool:
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"try: s.bind(('0.0.0.0', {port}))\nexcept OSError: sys.exit(1)"
    )
    return ns.run("python3", "-c", code, check=False).returncode == 0


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2 with one line naming ``words``."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def wait_for(cond: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_tunnels_added_and_removed_under_traffic_lose_nothing_on_the_others(
    netns_factory: Callable[[str], Netns], run_dir: Path
) -> None:
    a, b = make_pair(netns_factory)
    common = ["gt0", "--vni", "77"]
    pa = start(a, *common, "--remote", B_UL, "--address", f"{A_IN}/24")
    pb = start(b, *common, "--remote", A_UL, "--address", f"{B_IN}/24")
    try:
        # 500 echo requests a second through gt0 for the whole test: each must come back.
        count = 2500
        flood = a.popen(
            ["ping", "-q", "-n", "-i", "0.002", "-W", "3", "-c", str(count), B_IN],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.3)
        for cycle in range(3):
            for ns, remote, mine in ((a, B_UL, A_IN1), (b, A_UL, B_IN1)):
                out = ok(
                    gdp(
                        "up", "--netns", ns.name, "gt1", "--vni", "78", "--remote", remote,
                        "--address", f"{mine}/24",
                    )
                )  # fmt: skip
                want = pa.pid if ns is a else pb.pid
                assert f"gt1 added to the endpoint on port 6081 (pid {want}" in out, out
            ping(a, B_IN1, 2, interval=0.05)
            ok(gdp("set", "--netns", a.name, "gt1", "--ttl", str(30 + cycle), "--tos", "0x20"))
            row = show(a)["gt1"]
            assert (row["ttl"], row["tos"]) == (30 + cycle, 0x20)
            ping(a, B_IN1, 2, interval=0.05)
            for ns in (a, b):
                out = ok(gdp("down", "--netns", ns.name, "gt1"))
                assert "gt1 removed: rx" in out and "ended" not in out, out
                assert "gt1" not in links(ns)
            assert pa.poll() is None and pb.poll() is None
        out, _ = flood.communicate(timeout=60)
        assert f"{count} packets transmitted, {count} received" in out, out
        # gt0's counters went on across the engine swaps: never reset.
        c = show(a)["gt0"]
        assert c["pid"] == pa.pid
        stats = json.loads(ok(gdp("stats", "--json", "--netns", a.name)))
        assert stats["gt0"]["tx_packets"] >= count

        # gt0 was the only tunnel writing to the inject device: it goes with gt0's
        # `down` while gt2 (UDP checksums: the sockets' GSO) keeps the process.
        assert "gdpx" in links(a)
        ok(gdp("up", "--netns", a.name, "gt2", "--vni", "79", "--remote", B_UL, "--udp-csum"))
        assert "gt0 removed: rx" in ok(gdp("down", "--netns", a.name, "gt0"))
        assert "gdpx" not in links(a) and pa.poll() is None
        # The last tunnel's `down` ends the process; nothing is left.
        out = ok(gdp("down", "--netns", a.name, "gt2"))
        assert "gt2 removed: rx" in out and f"endpoint pid {pa.pid} ended" in out, out
        assert pa.wait(timeout=10) == 0
        out = ok(gdp("down", "--all", "--netns", b.name))
        assert f"endpoint pid {pb.pid} ended" in out
        assert pb.wait(timeout=10) == 0
        for ns in (a, b):
            assert "gt0" not in links(ns) and "gt1" not in links(ns) and "gdpx" not in links(ns)
            assert port_free(ns)
        assert list(run_dir.iterdir()) == []
        assert ok(gdp("down", "--all", "--netns", a.name)).startswith("geneve-dp: no tunnels")
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                stop(p)


def test_a_deleted_device_comes_back_while_the_others_lose_nothing(
    netns_factory: Callable[[str], Netns], run_dir: Path
) -> None:
    """`ip link del` of a configured tunnel's device: opened again (the tunnel's intent
    wins), on its own; gt0 beside it on the same port forwards on without a loss."""
    a, b = make_pair(netns_factory)
    pa = start(a, "gt0", "--vni", "77", "--remote", B_UL, "--address", f"{A_IN}/24")
    pb = start(b, "gt0", "--vni", "77", "--remote", A_UL, "--address", f"{B_IN}/24")
    try:
        for ns, remote, mine in ((a, B_UL, A_IN1), (b, A_UL, B_IN1)):
            ok(gdp("up", "--netns", ns.name, "gt1", "--vni", "78", "--remote", remote,
                   "--address", f"{mine}/24"))  # fmt: skip
        mac = show(a)["gt1"]["mac"]
        count = 1500
        flood = a.popen(
            ["ping", "-q", "-n", "-i", "0.002", "-W", "3", "-c", str(count), B_IN],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        a.run("ip", "link", "del", "gt1")
        assert wait_for(lambda: f"inet {A_IN1}/24" in a.run("ip", "addr", "show").stdout, 5)
        ping(a, B_IN1, 2, interval=0.05)
        out, _ = flood.communicate(timeout=60)
        assert f"{count} packets transmitted, {count} received" in out, out
        assert show(a)["gt1"]["mac"] == mac
        status = json.loads(gdp("show", "--json", "--netns", a.name).stdout)
        assert {t["pid"] for t in status} == {pa.pid}
    finally:
        stop(pa)
        stop(pb)


def test_up_again_refuses_what_the_running_endpoint_cannot_take(
    netns_factory: Callable[[str], Netns], run_dir: Path
) -> None:
    a, _b = make_pair(netns_factory)
    pa = start(a, "gt0", "--vni", "77", "--remote", B_UL, "--address", f"{A_IN}/24")
    try:
        before = links(a)
        again = ["up", "--netns", a.name, "--remote", B_UL]
        refused(gdp(*again, "gt0", "--vni", "5"), "gt0", "already exists", "set gt0")
        refused(gdp(*again, "gt1", "--vni", "77"), "--vni", "same port, VNI and remote")
        refused(gdp(*again, "gt1", "--vni", "5", "--workers", "9"), "--workers", f"pid {pa.pid}")
        refused(gdp(*again, "gt1", "--vni", "5", "--engine", "python"), "--engine")
        refused(gdp(*again, "gt1", "--vni", "5", "--pidfile", "/tmp/x.pid"), "--pidfile")
        # A name another device holds: refused by the endpoint, nothing made.
        a.run("ip", "link", "add", "gtx", "type", "veth", "peer", "name", "gtxp")
        refused(gdp(*again, "gtx", "--vni", "5"), "gtx", "already exists")
        a.run("ip", "link", "del", "gtx")
        assert links(a) == before
        assert list(show(a)) == ["gt0"] and pa.poll() is None
        # Another port is another endpoint process.
        out = ok(gdp(*again, "gt2", "--vni", "5", "--port", "7081", "--detach"))
        assert "ready: gt2" in out
        rows = show(a)
        assert rows["gt2"]["pid"] != rows["gt0"]["pid"] == pa.pid
        ok(gdp("down", "--netns", a.name, "gt2"))
        assert "gt2" not in links(a) and port_free(a, 7081)
    finally:
        stop(pa)


def test_set_changes_the_wire_and_names_what_it_cannot(
    netns_factory: Callable[[str], Netns], run_dir: Path, tmp_path: Path
) -> None:
    a, b = make_pair(netns_factory)
    pa = start(a, "gt0", "--vni", "77", "--remote", B_UL, "--address", f"{A_IN}/24")
    pb = start(b, "gt0", "--vni", "77", "--remote", A_UL, "--address", f"{B_IN}/24")
    try:
        mac = show(a)["gt0"]["mac"]
        refused(gdp("set", "--netns", a.name, "gt0"), "nothing to change")
        refused(gdp("set", "--netns", a.name, "gt0", "--mode", "tun"), "--mode", "down gt0")
        refused(gdp("set", "--netns", a.name, "gt0", "--port", "7000"), "--port")
        refused(gdp("set", "--netns", a.name, "gt0", "--ttl", "300"), "--ttl", "1..255")
        refused(gdp("set", "--netns", a.name, "gt0", "--remote", "fd00::2"), "--remote", "family")
        refused(gdp("set", "--netns", a.name, "nosuch", "--ttl", "5"), "nosuch", "no geneve-dp")
        ok(
            gdp(
                "set", "--netns", a.name, "gt0", "--ttl", "33", "--df", "set",
                "--option", "0x0102:0x01:aabbccdd",
            )
        )  # fmt: skip
        row = show(a)["gt0"]
        assert (row["ttl"], row["df"], row["options"]) == (33, "set", ["0x0102:0x01:aabbccdd"])
        assert row["mac"] == mac and row["pid"] == pa.pid
        assert row["mtu"] == 1450 - 8  # the option's 8 bytes come off the device MTU
        pcap = tmp_path / "outer.pcap"
        cap = b.popen(
            [*_gdp(), "capture", "gt0", "--outer", "-w", str(pcap), "--count", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.8)
        ping(a, B_IN, 3, interval=0.1)
        cap.communicate(timeout=20)
        frames = [f for _lt, f in read_frames(pcap) if f[14 + 12 : 14 + 16] == _ip(A_UL)]
        assert frames, "no outer frame from a"
        ip = frames[0][14:]
        assert ip[8] == 33  # TTL
        assert ip[6] & 0x40  # DF
        assert bytes.fromhex("01020101aabbccdd") in ip[28 + 8 :]
    finally:
        stop(pa)
        stop(pb)


def _gdp() -> list[str]:
    from tests.ops_helpers import GDP

    return GDP


def _ip(text: str) -> bytes:
    return socket.inet_aton(text)


def test_config_reload_applies_the_difference(
    netns_factory: Callable[[str], Netns], run_dir: Path, tmp_path: Path
) -> None:
    a, _b = make_pair(netns_factory)
    config = tmp_path / "tunnels.toml"

    def write(*tunnels: str) -> None:
        """Each tunnel as NAME:VNI:TTL[:MODE]."""
        out = ""
        for t in tunnels:
            name, vni, ttl, mode = [*t.split(":"), "tap"][:4]
            out += f'[[tunnel]]\nname = "{name}"\nvni = {vni}\nremote = "{B_UL}"\n'
            out += f'ttl = {ttl}\nmode = "{mode}"\n'
        config.write_text(out)

    write("gr0:100:64", "gr1:101:64")
    out = ok(gdp("up", "--netns", a.name, "--config", str(config), "--detach"))
    pid = int(out.split("(pid ")[1].split(",")[0])
    try:
        gr0 = show(a)["gr0"]
        write("gr0:100:20", "gr2:102:64")
        out = ok(gdp("up", "--netns", a.name, "--config", str(config)))
        assert "added gr2; removed gr1; changed gr0" in out, out
        rows = show(a)
        assert sorted(rows) == ["gr0", "gr2"] and rows["gr0"]["ttl"] == 20
        assert rows["gr0"]["pid"] == pid and rows["gr0"]["ifindex"] == gr0["ifindex"]
        assert "gr1" not in links(a)
        # SIGHUP reads the file again; a bad file changes nothing.
        config.write_text(config.read_text() + "[[tunnel]]\nname = 3\n")
        subprocess.run(["kill", "-HUP", str(pid)], check=True)
        time.sleep(0.5)
        assert sorted(show(a)) == ["gr0", "gr2"]
        write("gr2:102:64")
        subprocess.run(["kill", f"-{signal.SIGHUP.value}", str(pid)], check=True)
        assert wait_for(lambda: sorted(show(a)) == ["gr2"])
        assert "gr0" not in links(a)
        # A TAP that becomes a TUN is a new device: taken down, then made anew.
        write("gr2:102:64:tun")
        out = ok(gdp("up", "--netns", a.name, "--config", str(config)))
        assert "changed gr2" in out, out
        assert show(a)["gr2"]["mode"] == "tun" and show(a)["gr2"]["pid"] == pid
        assert "link/none" in a.run("ip", "link", "show", "gr2").stdout
    finally:
        gdp("down", "--all", "--netns", a.name)
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists())
    assert list(run_dir.iterdir()) == []  # the detached endpoint's log went with it


def test_help_says_a_deleted_device_comes_back_and_down_removes_it() -> None:
    text = ok(gdp("up", "--help"))
    assert "ip link del" in text and "geneve-dp down" in text
