"""The ztunnel stand-in proxy on its own: transparent listeners, log format, passthrough.

A client namespace reaches 10.9.0.2:7000 through a proxy namespace whose mangle
PREROUTING hands that TCP flow to the proxy with TPROXY (no tunnels involved). The
proxy must log the original destination and connect to it from the client's address.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.netns import Netns, veth

pytestmark = pytest.mark.root


def _records(log: Path) -> list[dict[str, object]]:
    try:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _wait(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_proxy_logs_original_destination_and_keeps_the_client_address(
    netns_factory: Callable[[str], Netns], tmp_path: Path
) -> None:
    client, proxy, server = netns_factory("pc"), netns_factory("pp"), netns_factory("ps")
    veth(client, "eth0", proxy, "c0")
    veth(proxy, "s0", server, "eth0")
    client.run("ip", "addr", "add", "10.8.0.2/24", "dev", "eth0")
    client.run("ip", "route", "add", "default", "via", "10.8.0.1")
    proxy.run("ip", "addr", "add", "10.8.0.1/24", "dev", "c0")
    proxy.run("ip", "addr", "add", "10.9.0.1/24", "dev", "s0")
    server.run("ip", "addr", "add", "10.9.0.2/24", "dev", "eth0")
    server.run("ip", "route", "add", "default", "via", "10.9.0.1")
    proxy.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    # TPROXY plumbing as in the ztunnel namespace (rule 20000 / table 100 local).
    proxy.run("ip", "rule", "add", "priority", "20000", "fwmark", "0x400/0xfff", "lookup", "100")
    proxy.run("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    proxy.run("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-i", "c0",
              "-j", "TPROXY", "--tproxy-mark", "0x400/0xfff", "--on-port", "15001",
              "--on-ip", "127.0.0.1")  # fmt: skip
    # Server replies to the spoofed client address come back into the proxy namespace
    # and must reach the proxy's transparent upstream socket: deliver them locally.
    proxy.run("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-i", "s0",
              "-j", "MARK", "--set-mark", "0x4d3/0xfff")  # fmt: skip
    proxy.run("ip", "rule", "add", "priority", "20003", "fwmark", "0x4d3/0xfff", "lookup", "100")
    for key in ("all", "c0", "s0"):
        proxy.run("sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")

    log = tmp_path / "proxy.jsonl"
    echo = [sys.executable, "-m", "geneve_dp.ambient.echo"]
    srv = server.popen([*echo, "serve", "server", "--tcp", "7000"], stdout=subprocess.PIPE)
    px = proxy.popen(
        [sys.executable, "-m", "geneve_dp", "proxy", "--ports", "15001", "--log", str(log)]
    )
    try:
        _wait(lambda: any(r.get("event") == "listening" for r in _records(log)), "listener")
        assert srv.stdout is not None and "ready" in srv.stdout.readline()
        reply = client.run(*echo, "tcp", "10.9.0.2", "7000", "through-the-proxy").stdout
        assert reply.startswith("server saw 10.8.0.2:")  # the client's address, not ours
        assert reply.strip().endswith("through-the-proxy")
        accepts = [r for r in _records(log) if r.get("event") == "accept"]
        assert len(accepts) == 1
        rec = accepts[0]
        assert rec["listener"] == 15001
        assert rec["orig_dst"] == "10.9.0.2:7000"
        assert str(rec["client"]).startswith("10.8.0.2:")
        assert rec["upstream"] == "connected" and str(rec["upstream_src"]).startswith("10.8.0.2:")

        # Addressed to the listener itself (not redirected): logged and refused, no loop.
        proxy.run(*echo, "tcp", "127.0.0.1", "15001", "x", check=False)
        _wait(lambda: any("refused" in str(r.get("upstream")) for r in _records(log)), "refusal")
    finally:
        for p in (px, srv):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
