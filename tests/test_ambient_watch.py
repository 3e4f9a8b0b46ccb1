"""The reconcile watchers (ARCHITECTURE rule 7) and the GENEVE port choice (Istio 1.19+).

Real namespaces, built per test and removed at the end (the ``world`` fixture of
test_ambient_node). Things are deleted behind the profiles' backs with plain ip,
iptables and ipset commands, and must come back within a bounded wait; the state
after the repairs is compared with the state right after `up`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from geneve_dp.ambient import constants as k
from geneve_dp.ambient import endpoints
from geneve_dp.ambient import topology as t
from geneve_dp.control import query_all
from tests.test_ambient_node import NODE_UP, ZT_UP, one_line_error, stable
from tests.test_ambient_node import world as world  # the fixture

WAIT = 20.0  # bound for a repair; the watcher looks once a second
Z2 = ["-p", "tcp", "-i", k.ZT_OUTBOUND_TUN, "-j", "TPROXY", "--tproxy-mark", "0x400/0xfff",
      "--on-port", "15001", "--on-ip", "127.0.0.1"]  # fmt: skip
P2 = ["-i", k.INBOUND_TUN, "-j", "RETURN"]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not come back within {timeout:.0f}s")


def watchers(w: t.World, ns: str) -> list[int]:
    """Pids of `geneve_dp ROLE watch` processes running in ``ns``."""
    out = []
    for pid in w.run(ns, "ip", "netns", "pids", ns).stdout.split():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"geneve_dp" in args and b"watch" in args:
            out.append(int(pid))
    return out


def daemon_pid(w: t.World, ns: str, role: str) -> int:
    return int((w.state_root / ns / f"{role}-endpoints.pid").read_text().split()[0])


def has_rule(w: t.World, ns: str, chain: str, spec: list[str]) -> bool:
    return w.run(ns, "iptables", "-t", "mangle", "-C", chain, *spec, check=False).returncode == 0


def repairs(w: t.World, ns: str, role: str) -> list[str]:
    log = (w.state_root / ns / f"{role}-watch.log").read_text()
    return [ln for ln in log.splitlines() if "was missing" in ln or " lost " in ln]


Snapshots = dict[str, dict[str, str]]


def up_with_pod(w: t.World) -> tuple[Snapshots, Snapshots]:
    """node up, ztunnel up, pod-a enrolled; the snapshots before, and (stable) after."""
    before = {ns: w.snapshot(ns) for ns in (w.node, w.zt)}
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.zt, *ZT_UP)
    w.gdp(w.node, "pod", "add", t.PODS[0].ip, "--uid", t.PODS[0].uid)
    return before, {ns: stable(w.snapshot(ns)) for ns in (w.node, w.zt)}


def test_watchers_put_back_what_was_removed(world: t.World) -> None:
    w, a = world, t.PODS[0]
    before, after_up = up_with_pod(w)
    assert len(watchers(w, w.node)) == 1 and len(watchers(w, w.zt)) == 1

    def ip_rules() -> str:
        return w.run(w.node, "ip", "rule").stdout

    w.run(w.node, "ip", "rule", "del", "priority", "101")
    wait_for(lambda: "101:\tfrom all fwmark 0x100/0x100 lookup 101" in ip_rules(), "ip rule 101")

    def table_100() -> str:
        return w.run(w.node, "ip", "route", "show", "table", "100").stdout

    w.run(w.node, "ip", "route", "del", "table", "100", f"{a.ip}/32")
    wait_for(lambda: f"{a.ip} via 192.168.126.2 dev istioin" in table_100(), "the pod's route")

    w.run(w.node, "iptables", "-t", "mangle", "-D", k.CHAIN_PREROUTING, *P2)
    wait_for(lambda: has_rule(w, w.node, k.CHAIN_PREROUTING, P2), "node rule P2")

    w.run(w.zt, "iptables", "-t", "mangle", "-D", "PREROUTING", *Z2)
    wait_for(lambda: has_rule(w, w.zt, "PREROUTING", Z2), "ztunnel rule Z2")

    def members() -> str:
        return w.run(w.node, "ipset", "list", k.IPSET_NAME).stdout

    w.run(w.node, "ipset", "del", k.IPSET_NAME, a.ip)
    wait_for(lambda: f'{a.ip} comment "{a.uid}"' in members(), "the pod's ipset entry")

    # Back exactly as up left it: the same rules, in the same places and order.
    assert {ns: stable(w.snapshot(ns)) for ns in (w.node, w.zt)} == after_up
    node_log = repairs(w, w.node, "node")
    assert len(node_log) == 4, node_log
    expected_repairs = [
        ("ip rule 101",),
        (f"route {a.ip}/32", "table 100"),
        ("ztunnel-PREROUTING", "-i istioin -j RETURN"),
        ("ipset", a.ip, a.uid),
    ]
    for words in expected_repairs:
        assert sum(all(x in ln for x in words) for ln in node_log) == 1, (words, node_log)
    zt_log = repairs(w, w.zt, "ztunnel")
    assert len(zt_log) == 1 and "PREROUTING lost" in zt_log[0] and "15001" in zt_log[0]

    w.gdp(w.node, "node", "down")
    w.gdp(w.zt, "ztunnel", "down")
    assert {ns: w.snapshot(ns) for ns in (w.node, w.zt)} == before
    assert watchers(w, w.node) == [] and watchers(w, w.zt) == []
    assert not (w.state_root / w.node).exists() and not (w.state_root / w.zt).exists()


def test_watchers_bring_back_a_deleted_device_and_a_dead_daemon(world: t.World) -> None:
    w = world
    before, after_up = up_with_pod(w)
    node_pid = daemon_pid(w, w.node, "node")
    zt_pid = daemon_pid(w, w.zt, "ztunnel")

    w.run(w.node, "ip", "link", "del", k.INBOUND_TUN)
    os.kill(zt_pid, signal.SIGKILL)

    def restarted(ns: str, role: str, old: int) -> bool:
        pidfile = w.state_root / ns / f"{role}-endpoints.pid"
        return pidfile.exists() and daemon_pid(w, ns, role) != old

    # The node's daemon opens its deleted device again itself; the dead one is replaced.
    wait_for(lambda: restarted(w.zt, "ztunnel", zt_pid), "the ztunnel's endpoint daemon")
    # Devices, addresses, routes through them: as up left them.
    wait_for(lambda: {ns: stable(w.snapshot(ns)) for ns in (w.node, w.zt)} == after_up,
             "the state after up")  # fmt: skip
    key = f"net.ipv4.conf.{k.INBOUND_TUN}.accept_local"
    assert w.run(w.node, "sysctl", "-n", key).stdout.strip() == "1"
    # And the tunnel carries packets again, both ways (ARP and ICMP through GENEVE).
    ping = w.run(w.node, "ping", "-c", "1", "-w", "10", k.ZT_INBOUND_TUN_IP, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert daemon_pid(w, w.node, "node") == node_pid
    (status,) = [r for r in query_all() if r["pid"] == node_pid]
    assert status["restarts"] == 1
    assert f"device {k.INBOUND_TUN} was deleted; opened again" in status["repairs"][0]
    node_log = (w.state_root / w.node / "node-watch.log").read_text()
    assert "daemon started again" not in node_log
    zt_log = (w.state_root / w.zt / "ztunnel-watch.log").read_text()
    assert "its daemon had exited; daemon started again" in zt_log

    w.gdp(w.node, "node", "down")
    w.gdp(w.zt, "ztunnel", "down")
    assert {ns: w.snapshot(ns) for ns in (w.node, w.zt)} == before


def test_pod_add_and_del_are_not_fought(world: t.World) -> None:
    w = world
    a, b = t.PODS[0], t.PODS[1]
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.node, "pod", "add", a.ip, "--uid", a.uid)
    w.gdp(w.node, "pod", "del", a.ip)
    w.gdp(w.node, "pod", "add", b.ip, "--uid", b.uid)
    # A repair that happens after the pod commands proves a whole watcher pass ran.
    w.run(w.node, "ip", "rule", "del", "priority", "102")
    wait_for(lambda: "102:\tfrom all" in w.run(w.node, "ip", "rule").stdout, "ip rule 102")
    members = w.run(w.node, "ipset", "list", k.IPSET_NAME).stdout
    assert a.ip not in members and f'{b.ip} comment "{b.uid}"' in members
    table = w.run(w.node, "ip", "route", "show", "table", "100").stdout
    assert a.ip not in table and b.ip in table
    assert [ln for ln in repairs(w, w.node, "node") if "pod" in ln] == []


def test_up_twice_runs_one_watcher_and_down_stops_one_without_pidfile(world: t.World) -> None:
    w = world
    before = w.snapshot(w.node)
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.node, *NODE_UP)
    pids = watchers(w, w.node)
    assert len(pids) == 1
    # A crash that lost the pidfile: down still finds it (by command line and netns).
    (w.state_root / w.node / "node-watch.pid").unlink()
    w.gdp(w.node, "node", "down")
    assert watchers(w, w.node) == []
    assert w.snapshot(w.node) == before


def test_watch_command_bad_input(world: t.World) -> None:
    w = world
    one_line_error(w.gdp(w.node, "node", "watch", "--interval", "0", check=False), "--interval")
    one_line_error(w.gdp(w.zt, "ztunnel", "watch", check=False), "ztunnel up` first")


# --- the GENEVE port -----------------------------------------------------------------------


def test_choose_port_takes_the_first_free_one(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = {6081: "busy", 6082: "busy too"}
    monkeypatch.setattr(endpoints, "port_taken", lambda port, _r, _v: taken.get(port))
    said: list[str] = []
    assert endpoints.choose_port("10.0.0.1", (1000, 1001), said.append) == 6083
    assert said == ["GENEVE port 6081 is taken: busy", "GENEVE port 6082 is taken: busy too"]


@pytest.fixture
def port_users(world: t.World) -> Iterator[Callable[[], None]]:
    """Occupy 6081 (a geneve-dp endpoint, VNI 1000 to the ztunnel IP) and 6082 (a plain
    UDP socket) in the node namespace; the callable frees both."""
    w = world
    pidfile = w.workdir / "other-endpoint.pid"
    w.gdp(w.node, "up", "gdp-other", "--vni", str(k.INBOUND_TUN_VNI), "--remote", t.ZTUNNEL_IP,
          "--port", "6081", "--detach", "--pidfile", str(pidfile))  # fmt: skip
    holder = subprocess.Popen(
        ["ip", "netns", "exec", w.node, sys.executable, "-c",
         "import socket, sys, time\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "s.bind(('0.0.0.0', 6082)); print('bound', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"

    def free() -> None:
        if holder.poll() is None:
            holder.kill()
            holder.wait(5)
        if pidfile.exists():
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
            wait_for(lambda: not pidfile.exists(), "the other endpoint's exit")

    try:
        yield free
    finally:
        free()


def test_port_skips_ports_in_use_and_is_the_same_everywhere(
    world: t.World, port_users: Callable[[], None]
) -> None:
    w = world
    up = w.gdp(w.node, *NODE_UP)
    assert "GENEVE port 6083," in up.stdout
    assert "GENEVE port 6081 is taken: geneve-dp pid" in up.stdout
    assert "runs gdp-other (VNI 1000 to 10.244.1.3) on it: the same VNI and remote" in up.stdout
    assert "GENEVE port 6082 is taken: a UDP socket of another program" in up.stdout
    shown = {tun["name"]: tun for tun in json.loads(w.gdp(w.node, "show", "--json").stdout)}
    assert shown["istioin"]["port"] == shown["istioout"]["port"] == 6083
    assert "-p udp -m udp --dport 6083 -j RETURN" in w.run(w.node, "iptables-save").stdout
    assert json.loads((w.state_root / w.node / "node.json").read_text())["config"]["port"] == 6083

    # The ztunnel side is told the port; a ping through the tunnel shows both ends agree.
    w.gdp(w.zt, *ZT_UP, "--port", "6083")
    ping = w.run(w.node, "ping", "-c", "1", "-w", "10", k.ZT_INBOUND_TUN_IP, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    # up again once 6081 is free: the first free port is 6081 again.
    port_users()
    w.gdp(w.zt, "ztunnel", "down")
    assert "GENEVE port 6081," in w.gdp(w.node, *NODE_UP).stdout


def test_ztunnel_up_takes_the_port_node_up_chose(
    world: t.World, port_users: Callable[[], None]
) -> None:
    """One port for both sides, as Istio passes one geneveDstPort: a ztunnel side left
    on 6081 while the node moved to 6083 would black-hole all captured traffic."""
    w = world
    assert "GENEVE port 6083," in w.gdp(w.node, *NODE_UP).stdout
    before = w.snapshot(w.zt)
    wrong = w.gdp(w.zt, *ZT_UP, "--port", "6081", check=False)
    one_line_error(wrong, "--port", "6083")
    assert w.snapshot(w.zt) == before  # nothing half-applied
    up = w.gdp(w.zt, *ZT_UP)
    assert "tunnels to 10.244.1.1:6083" in up.stdout, up.stdout
    shown = {tun["name"]: tun for tun in json.loads(w.gdp(w.zt, "show", "--json").stdout)}
    assert shown["pistioin"]["port"] == shown["pistioout"]["port"] == 6083
    ping = w.run(w.node, "ping", "-c", "1", "-w", "10", k.ZT_INBOUND_TUN_IP, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr


def test_istio_118_always_uses_6081(world: t.World, port_users: Callable[[], None]) -> None:
    w = world
    before = w.snapshot(w.node)
    proc = w.gdp(w.node, *NODE_UP, "--istio-version", "1.18", check=False)
    one_line_error(proc, "endpoints")
    assert w.snapshot(w.node) == before  # nothing half-applied
    port_users()
    up = w.gdp(w.node, *NODE_UP, "--istio-version", "1.18")
    assert "GENEVE port 6081," in up.stdout and "is taken" not in up.stdout


# --- the iptables repair text (pure) -----------------------------------------------------


def test_repair_text_refills_an_owned_chain_and_its_jump() -> None:
    from geneve_dp.ambient.reconcile import ChainIntent, iptables_repair_text
    from geneve_dp.netconf.iptables import parse_save

    chain = ChainIntent("mangle", "ztunnel-X", ("-i a -j RETURN", "-i b -j RETURN"), True, "INPUT")
    intact = parse_save(
        "*mangle\n:INPUT ACCEPT [0:0]\n:ztunnel-X - [0:0]\n-A INPUT -j ztunnel-X\n"
        "-A ztunnel-X -i a -j RETURN\n-A ztunnel-X -i b -j RETURN\nCOMMIT\n"
    )
    assert iptables_repair_text((chain,), intact) == ("", [])
    broken = parse_save(
        "*mangle\n:INPUT ACCEPT [0:0]\n:ztunnel-X - [0:0]\n-A ztunnel-X -i b -j RETURN\nCOMMIT\n"
    )
    text, fixes = iptables_repair_text((chain,), broken)
    assert text == (
        "*mangle\n:ztunnel-X - [0:0]\n-A ztunnel-X -i a -j RETURN\n-A ztunnel-X -i b -j RETURN\n"
        "-I INPUT 1 -j ztunnel-X\nCOMMIT\n"
    )
    assert len(fixes) == 2 and "lost '-i a -j RETURN'" in fixes[0] and "jump" in fixes[1]


def test_repair_text_puts_our_rules_back_on_top_of_a_shared_chain() -> None:
    from geneve_dp.ambient.reconcile import ChainIntent, iptables_repair_text
    from geneve_dp.netconf.iptables import parse_save

    chain = ChainIntent("mangle", "PREROUTING", ("-i a -j RETURN", "-i b -j RETURN"), False)
    # Someone else's rule stays where it is; ours come back in their order, at the top.
    current = parse_save(
        "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -i b -j RETURN\n"
        "-A PREROUTING -p icmp -j ACCEPT\nCOMMIT\n"
    )
    text, fixes = iptables_repair_text((chain,), current)
    assert text == (
        "*mangle\n-D PREROUTING -i b -j RETURN\n-I PREROUTING 1 -i a -j RETURN\n"
        "-I PREROUTING 2 -i b -j RETURN\nCOMMIT\n"
    )
    assert fixes == ["iptables: mangle PREROUTING lost '-i a -j RETURN'; our rules put back on top"]
