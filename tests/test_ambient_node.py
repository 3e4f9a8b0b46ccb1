"""`node up/down`, `ztunnel up/down`, `pod add/del` against real namespaces (root).

Each test builds the demo topology (node, ztunnel pod, three pods, server) in its own
uniquely named namespaces and removes it at the end, pass or fail. State is compared
with the outputs of iptables-save, ip rule, ip route show table all, ipset list and
ip link, exactly what `down` promises to give back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from geneve_dp.ambient import constants as k
from geneve_dp.ambient import topology as t

pytestmark = pytest.mark.root

NODE_UP = ["node", "up", "--ztunnel-ip", t.ZTUNNEL_IP, "--ztunnel-veth", t.ZTUNNEL_VETH]
ZT_UP = ["ztunnel", "up", "--host-ip", t.GATEWAY_IP]


@pytest.fixture
def world() -> Iterator[t.World]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    w = t.World(tag=f"gdpn-{os.getpid()}-{time.monotonic_ns() % 100000}")
    try:
        w.build()
        yield w
    finally:
        for ns, args in ((w.node, ["node", "down"]), (w.zt, ["ztunnel", "down"])):
            if ns in w.namespaces:
                w.gdp(ns, *args, check=False)
        w.destroy()


def stable(snap: dict[str, str]) -> dict[str, str]:
    """A snapshot without what differs between two equal setups (ifindexes and so the
    order `ip link` and `tc` list devices in: a device opened again is listed last;
    ipset seeds)."""
    out = dict(snap)
    out["ip link"] = "\n".join(
        sorted(re.sub(r"^\d+: ", "", snap["ip link"], flags=re.M).splitlines())
    )
    if "tc" in snap:
        out["tc"] = "\n".join(sorted(snap["tc"].splitlines()))
    out["ipset list"] = re.sub(r"(initval|Size in memory:?) \S+", "", snap["ipset list"])
    return out


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def daemon_pids(w: t.World, ns: str, role: str) -> int:
    return int((w.state_root / ns / f"{role}-endpoints.pid").read_text().split()[0])


def test_up_installs_the_reference_state_and_down_removes_exactly_it(world: t.World) -> None:
    w = world
    before = {ns: w.snapshot(ns) for ns in (w.node, w.zt)}
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.zt, *ZT_UP)

    rules = w.run(w.node, "ip", "rule").stdout
    assert "100:\tfrom all fwmark 0x200/0x200 goto 32766" in rules
    assert "101:\tfrom all fwmark 0x100/0x100 lookup 101" in rules
    assert "102:\tfrom all fwmark 0x40/0x40 lookup 102" in rules
    assert "103:\tfrom all lookup 100" in rules
    tables = {
        n: w.run(w.node, "ip", "route", "show", "table", str(n)).stdout for n in (100, 101, 102)
    }
    assert f"{t.ZTUNNEL_IP} dev {t.ZTUNNEL_VETH}" in tables[100]
    assert "default via 192.168.127.2 dev istioout" in tables[101]
    assert (
        f"default via {t.ZTUNNEL_IP} dev {t.ZTUNNEL_VETH}" in tables[102]
        and "onlink" in tables[102]
    )
    addrs = w.run(w.node, "ip", "-o", "-4", "addr").stdout
    assert re.search(r"istioin\s+inet 192\.168\.126\.1/30", addrs)
    assert re.search(r"istioout\s+inet 192\.168\.127\.1/30", addrs)
    ipset = w.run(w.node, "ipset", "list", k.IPSET_NAME).stdout
    assert "Type: hash:ip" in ipset and "comment" in ipset and "family inet" in ipset
    for key, value in (("all.rp_filter", "0"), (f"{t.ZTUNNEL_VETH}.accept_local", "1"),
                       ("istioin.accept_local", "1"), ("istioout.rp_filter", "0")):  # fmt: skip
        assert w.run(w.node, "sysctl", "-n", f"net.ipv4.conf.{key}").stdout.strip() == value

    zrules = w.run(w.zt, "ip", "rule").stdout
    assert "20000:\tfrom all fwmark 0x400/0xfff lookup 100" in zrules
    assert "20003:\tfrom all fwmark 0x4d3/0xfff lookup 100" in zrules
    assert "local default dev lo" in w.run(w.zt, "ip", "route", "show", "table", "100").stdout
    zaddrs = w.run(w.zt, "ip", "-o", "-4", "addr").stdout
    assert re.search(r"pistioin\s+inet 192\.168\.126\.2/30", zaddrs)
    assert re.search(r"pistioout\s+inet 192\.168\.127\.2/30", zaddrs)
    assert "TPROXY --on-port 15001" in w.run(w.zt, "iptables-save").stdout

    # The endpoints are geneve-dp TAP devices run by the daemon, towards each other.
    # `show` lists the tunnels of the namespace it runs in, like `ip link`.
    node_names = {t["name"] for t in json.loads(w.gdp(w.node, "show", "--json").stdout)}
    zt_names = {t["name"] for t in json.loads(w.gdp(w.zt, "show", "--json").stdout)}
    assert node_names == {"istioin", "istioout"}
    assert zt_names == {"pistioin", "pistioout"}

    w.gdp(w.node, "node", "down")
    w.gdp(w.zt, "ztunnel", "down")
    assert {ns: w.snapshot(ns) for ns in (w.node, w.zt)} == before
    assert not (w.state_root / w.node / "node.json").exists()


def test_up_twice_is_up_once_and_keeps_pods(world: t.World) -> None:
    w = world
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.node, "pod", "add", t.PODS[0].ip, "--uid", t.PODS[0].uid)
    once = stable(w.snapshot(w.node))
    w.gdp(w.node, *NODE_UP)
    assert stable(w.snapshot(w.node)) == once
    w.gdp(w.zt, *ZT_UP)
    zonce = stable(w.snapshot(w.zt))
    w.gdp(w.zt, *ZT_UP)
    assert stable(w.snapshot(w.zt)) == zonce


def test_pod_add_del(world: t.World) -> None:
    w = world
    a = t.PODS[0]
    before = w.snapshot(w.node)
    w.gdp(w.node, *NODE_UP)
    after_up = w.snapshot(w.node)
    first = w.gdp(w.node, "pod", "add", a.ip, "--uid", a.uid)
    assert "enrolled" in first.stdout
    members = w.run(w.node, "ipset", "list", k.IPSET_NAME).stdout
    assert f'{a.ip} comment "{a.uid}"' in members
    route = w.run(w.node, "ip", "route", "show", "table", "100", f"{a.ip}/32").stdout
    assert f"{a.ip} via 192.168.126.2 dev istioin" in route and f"src {t.GATEWAY_IP}" in route
    assert w.run(w.node, "sysctl", "-n", f"net.ipv4.conf.{a.veth}.rp_filter").stdout.strip() == "0"
    enrolled = w.snapshot(w.node)

    again = w.gdp(w.node, "pod", "add", a.ip, "--uid", a.uid)
    assert again.returncode == 0 and "already enrolled" in again.stdout
    assert w.snapshot(w.node) == enrolled

    gone = w.gdp(w.node, "pod", "del", a.ip)
    assert gone.returncode == 0 and "removed" in gone.stdout
    assert w.snapshot(w.node) == after_up
    unknown = w.gdp(w.node, "pod", "del", a.ip)
    assert unknown.returncode == 0 and "not enrolled" in unknown.stdout

    w.gdp(w.node, "pod", "add", a.ip, "--uid", a.uid)
    w.gdp(w.node, "node", "down")  # takes enrolled pods with it
    assert w.snapshot(w.node) == before


@pytest.mark.parametrize("keep_state", [True, False])
def test_down_after_a_crash(world: t.World, keep_state: bool) -> None:
    w = world
    before = {ns: w.snapshot(ns) for ns in (w.node, w.zt)}
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.node, "pod", "add", t.PODS[1].ip, "--uid", t.PODS[1].uid)
    w.gdp(w.zt, *ZT_UP)
    for ns, role in ((w.node, "node"), (w.zt, "ztunnel")):
        os.kill(daemon_pids(w, ns, role), signal.SIGKILL)
        if not keep_state:
            shutil.rmtree(w.state_root / ns)
    w.gdp(w.node, "node", "down")
    w.gdp(w.zt, "ztunnel", "down")
    after = {ns: w.snapshot(ns) for ns in (w.node, w.zt)}
    if keep_state:
        assert after == before
    else:
        # Without a record, down removes all of ours by name; what it cannot know is
        # which iptables tables existed before, so empty ones created by up may remain.
        for ns in before:
            for what in ("ip rule", "ip route show table all", "ipset list", "ip link"):
                assert after[ns][what] == before[ns][what], (ns, what)
            assert "ztunnel" not in after[ns]["iptables-save"]
            assert "TPROXY" not in after[ns]["iptables-save"]


def test_bad_input_is_one_line_and_leaves_nothing(world: t.World, tmp_path: Path) -> None:
    w = world
    before = w.snapshot(w.node)
    one_line_error(w.gdp(w.node, "node", "up", check=False), "--ztunnel-ip", "required")
    one_line_error(
        w.gdp(w.node, "node", "up", "--ztunnel-ip", "10.244.1.300", "--ztunnel-veth",
              t.ZTUNNEL_VETH, check=False),
        "--ztunnel-ip", "not an IPv4 address",
    )  # fmt: skip
    one_line_error(
        w.gdp(w.node, "node", "up", "--ztunnel-ip", "192.0.2.7", "--ztunnel-veth",
              t.ZTUNNEL_VETH, check=False),
        "--ztunnel-ip", "unreachable",
    )  # fmt: skip
    w.run(w.node, "ip", "link", "add", "br7", "type", "bridge")
    w.run(w.node, "ip", "link", "set", "br7", "up")
    w.run(w.node, "ip", "route", "add", "198.51.100.7/32", "dev", "br7")
    dummy_before = w.snapshot(w.node)
    one_line_error(
        w.gdp(w.node, "node", "up", "--ztunnel-ip", "198.51.100.7", "--ztunnel-veth", "br7",
              check=False),
        "--ztunnel-veth", "accepted: a veth",
    )  # fmt: skip
    one_line_error(
        w.gdp(w.node, "node", "up", "--ztunnel-ip", t.ZTUNNEL_IP, "--ztunnel-veth", "nosuch0",
              check=False),
        "--ztunnel-veth", "is not a device here",
    )  # fmt: skip
    one_line_error(
        w.gdp(w.node, "node", "up", "--ztunnel-ip", t.ZTUNNEL_IP, "--ztunnel-veth", "veth-a",
              check=False),
        "--ztunnel-veth", "accepted: veth-zt",
    )  # fmt: skip
    assert w.snapshot(w.node) == dummy_before
    w.run(w.node, "ip", "link", "del", "br7")
    assert w.snapshot(w.node) == before

    one_line_error(w.gdp(w.zt, "ztunnel", "up", check=False), "--host-ip", "required")
    one_line_error(w.gdp(w.node, "pod", "add", t.PODS[0].ip, "--uid", "u", check=False),
                   "node up")  # fmt: skip


def _gdp_env(
    w: t.World, ns: str, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = ["/usr/sbin/ip", "netns", "exec", ns, sys.executable, "-m", "geneve_dp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_missing_iptables_binaries(world: t.World, tmp_path: Path) -> None:
    w = world
    before = w.snapshot(w.node)
    env = {**w.env(), "PATH": str(tmp_path)}  # nothing installed there
    one_line_error(_gdp_env(w, w.node, env, *NODE_UP), "iptables", "not installed")
    one_line_error(_gdp_env(w, w.zt, env, *ZT_UP), "iptables", "not installed")
    assert w.snapshot(w.node) == before


def test_failure_half_way_is_rolled_back(world: t.World, tmp_path: Path) -> None:
    w = world
    before = w.snapshot(w.node)
    # An iptables-restore that refuses: endpoints and ipset are already up by then.
    for name in ("iptables-restore", "iptables-nft-restore"):  # whichever is chosen
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\necho 'simulated refusal' >&2\nexit 1\n")
        fake.chmod(0o755)
    env = {**w.env(), "PATH": f"{tmp_path}:{os.environ.get('PATH', '')}"}
    proc = _gdp_env(w, w.node, env, *NODE_UP)
    one_line_error(proc, "-restore", "simulated refusal")
    assert w.snapshot(w.node) == before
    assert not (w.state_root / w.node / "node.json").exists()
    assert "istioin" not in w.gdp(w.node, "show", "--json").stdout


def test_not_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process with a faked euid: as a real unprivileged user the interpreter here
    # cannot even read its site-packages, which would test the environment, not us.
    from geneve_dp.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for args in (NODE_UP, ZT_UP, ["node", "down"], ["pod", "add", "10.0.0.1", "--uid", "u"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "as root" in err[0], err


def test_netns_option_acts_on_that_namespace(world: t.World) -> None:
    w = world
    before = w.snapshot(w.node)

    def gdp(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "geneve_dp", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=w.env())

    up = gdp("node", "up", "--netns", w.node, *NODE_UP[2:])
    assert up.returncode == 0, up.stderr
    assert gdp("pod", "add", "--netns", w.node, t.PODS[0].ip, "--uid", "u1").returncode == 0
    assert gdp("pod", "list", "--netns", w.node).stdout.split() == [t.PODS[0].ip, "u1"]
    assert "istioin" in w.run(w.node, "ip", "-o", "link").stdout
    assert gdp("node", "down", "--netns", w.node).returncode == 0
    assert w.snapshot(w.node) == before
    one_line_error(gdp("node", "down", "--netns", "gdp-no-such-ns"), "--netns")


def test_down_keeps_what_was_there_before_up(world: t.World) -> None:
    """Only what up added goes: a pre-existing ipset (and its entries), other ip rules,
    other routes in table 100 and other iptables rules stay."""
    w = world
    w.run(w.node, "ipset", "create", k.IPSET_NAME, "hash:ip", "family", "inet", "comment")
    w.run(w.node, "ipset", "add", k.IPSET_NAME, "10.244.1.99", "comment", "someone-else")
    w.run(w.node, "ip", "rule", "add", "priority", "200", "fwmark", "0x7", "lookup", "200")
    w.run(w.node, "ip", "route", "add", "table", "200", "10.9.0.0/16", "dev", "eth0")
    w.run(w.node, "iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "icmp", "-j", "ACCEPT")
    before = w.snapshot(w.node)
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.node, "pod", "add", t.PODS[0].ip, "--uid", t.PODS[0].uid)
    assert t.PODS[0].ip in w.run(w.node, "ipset", "list", k.IPSET_NAME).stdout
    w.gdp(w.node, "node", "down")
    assert w.snapshot(w.node) == before


def test_ztunnel_up_starts_from_istios_clean_slate(world: t.World) -> None:
    """Istio flushes tables 100-102, deletes rules 20000-20003 and stale pistio* devices
    in the ztunnel namespace before setting it up (reference §4 step 1): leftovers of an
    older setup (the Envoy-era rules 20001/20002, a crashed run's device) must not stay."""
    w = world
    w.run(w.zt, "ip", "route", "add", "table", "101", "10.66.0.0/24", "dev", "eth0")
    w.run(w.zt, "ip", "route", "add", "table", "100", "10.67.0.0/24", "dev", "eth0")
    w.run(w.zt, "ip", "rule", "add", "priority", "20001", "fwmark", "0x401/0xfff", "lookup", "101")
    w.run(w.zt, "ip", "rule", "add", "priority", "20002", "lookup", "102")
    w.run(w.zt, "ip", "rule", "add", "priority", "20000", "lookup", "101")  # a stale copy
    w.run(w.zt, "ip", "tuntap", "add", "pistiostale", "mode", "tap")
    w.gdp(w.node, *NODE_UP)
    up = w.gdp(w.zt, *ZT_UP)
    assert "clean slate:" in up.stdout and "device pistiostale" in up.stdout, up.stdout
    routes = w.run(w.zt, "ip", "route", "show", "table", "all").stdout
    assert "10.66.0.0/24" not in routes and "10.67.0.0/24" not in routes
    rules = w.run(w.zt, "ip", "rule").stdout
    assert "20001:" not in rules and "20002:" not in rules
    assert [ln for ln in rules.splitlines() if ln.startswith("20000:")] == [
        "20000:\tfrom all fwmark 0x400/0xfff lookup 100"
    ]
    assert "pistiostale" not in w.run(w.zt, "ip", "link").stdout
    ping = w.run(w.node, "ping", "-c", "1", "-w", "10", "192.168.126.2", check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # Not in the node's namespace, whose tables 100-102 are the node's.
    one_line_error(w.gdp(w.node, *ZT_UP, check=False), "ztunnel up", "node's")


def test_iptables_backend_is_the_one_kubelet_uses(world: t.World) -> None:
    """Istio 1.20 takes the backend whose mangle table holds kubelet's chains; where
    `iptables` points at nft but kubelet (and kube-proxy) use legacy, rules written to
    nft would not end traversal where kube-proxy's are. Said in the output and status."""
    w = world
    w.run(w.node, "iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
    before = w.snapshot(w.node)
    up = w.gdp(w.node, *NODE_UP)
    assert "iptables backend: legacy (kubelet's chains are in iptables-legacy)" in up.stdout
    assert up.stdout.strip().splitlines()[-1].endswith("iptables legacy"), up.stdout
    legacy = w.run(w.node, "iptables-legacy-save").stdout
    assert "-A ztunnel-PREROUTING -i istioin -j MARK --set-xmark 0x200/0x200" in legacy
    assert "ztunnel-" not in w.run(w.node, "iptables-nft-save").stdout
    status = json.loads(w.gdp(w.node, "node", "status", "--json").stdout)
    assert status["iptables_backend"] == "legacy" and status["state"] == "up"
    # The watcher repairs in the same backend.
    w.run(w.node, "iptables-legacy", "-t", "mangle", "-D", "ztunnel-PREROUTING", "1")
    deadline = time.monotonic() + 20
    while "-i istioin -j MARK" not in w.run(w.node, "iptables-legacy-save").stdout:
        assert time.monotonic() < deadline, "the legacy rule was not put back"
        time.sleep(0.2)
    w.gdp(w.node, "node", "down")
    after = w.snapshot(w.node)
    # Legacy tables, once used in a namespace, stay listed (empty): only ours must go.
    legacy = after.pop("iptables-legacy-save")
    assert "ztunnel" not in legacy and ":KUBE-IPTABLES-HINT" in legacy
    before.pop("iptables-legacy-save")
    assert after == before


def test_iptables_backend_defaults_to_nft_and_counts_rules_before_120(world: t.World) -> None:
    w = world
    up = w.gdp(w.node, *NODE_UP)
    assert "iptables backend: nft (no kubelet chains in either backend: the default)" in up.stdout
    w.gdp(w.node, "node", "down")
    # 1.18/1.19: more than ten legacy rules make it legacy.
    for i in range(11):
        w.run(w.node, "iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", str(7000 + i),
              "-j", "ACCEPT")  # fmt: skip
    up = w.gdp(w.node, *NODE_UP, "--istio-version", "1.19")
    assert "iptables backend: legacy (11 iptables-legacy rules (more than 10))" in up.stdout
    assert "ztunnel-FORWARD" in w.run(w.node, "iptables-legacy-save", "-t", "filter").stdout
