"""Traffic through real tunnels: two namespaces joined by a veth underlay, a Dataplane
in each (both engines, TAP and TUN, IPv4 and IPv6 underlay)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.endpoint_helpers import Endpoint, endpoint, underlay, wait_for
from tests.netns import Netns

pytestmark = pytest.mark.root

ENGINES = ["c", "python"]

SERVER = r"""
import hashlib, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(60)
h = hashlib.sha256(); n = 0
while True:
    d = c.recv(65536)
    if not d: break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = r"""
import hashlib, os, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
data = os.urandom(int(sys.argv[2]))
c = socket.create_connection((sys.argv[1], 5001), timeout=60)
c.sendall(data); c.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def tcp_transfer(client: Netns, server: Netns, addr: str, size: int) -> None:
    """Send ``size`` random bytes over TCP and check the digest on the other side."""
    srv = server.popen([sys.executable, "-c", SERVER, addr], stdout=subprocess.PIPE)
    try:
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "listening"
        sent = client.run(sys.executable, "-c", CLIENT, addr, str(size), timeout=90).stdout.split()
        got, _ = srv.communicate(timeout=90)
        assert got.split() == sent, f"server got {got!r}, client sent {sent!r}"
    finally:
        srv.kill()
        srv.wait(5)


Pair = tuple[Netns, Netns, Endpoint, Endpoint]


def _specs(
    mode: str, family: int, **extra: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ra, rb = ("10.0.0.2", "10.0.0.1") if family == 4 else ("fd00::2", "fd00::1")
    a = {
        "name": "gt0",
        "vni": 100,
        "remote": ra,
        "mode": mode,
        "addresses": ["192.168.100.1/24", "fd10::1/64"],
        **extra,
    }
    b = {
        "name": "gt0",
        "vni": 100,
        "remote": rb,
        "mode": mode,
        "addresses": ["192.168.100.2/24", "fd10::2/64"],
        **extra,
    }
    return [a], [b]


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns], request: pytest.FixtureRequest) -> Iterator[Pair]:
    engine, mode, family = request.param
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    sa, sb = _specs(mode, family)
    with endpoint(a, engine, sa) as ea, endpoint(b, engine, sb) as eb:
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        yield a, b, ea, eb


CASES = [(e, m, f) for e in [*ENGINES, "c+offload"] for m in ("tap", "tun") for f in (4, 6)]


@pytest.mark.parametrize("pair", CASES, indirect=True, ids=lambda c: f"{c[0]}-{c[1]}-ipv{c[2]}")
def test_ping_and_tcp(pair: Pair) -> None:
    a, b, ea, eb = pair
    a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.100.2", timeout=20)
    a.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "fd10::2", timeout=20)
    tcp_transfer(a, b, "192.168.100.2", 4 << 20)
    tcp_transfer(b, a, "fd10::1", 1 << 20)
    ta, tb = ea.tunnel("gt0"), eb.tunnel("gt0")
    assert ta["counters"]["tx_packets"] > 100 and tb["counters"]["rx_packets"] > 100
    if ta["engine"] == "c" and ea.proc.args[-2].endswith("+offload"):
        # The kernel handed over TCP super-frames and the engine segmented them.
        assert ta["counters"]["tx_gso_frames"] > 0
        assert tb["counters"]["rx_gro_frames"] > 0
    assert ta["counters"]["tx_bytes"] > 4 << 20
    for t in (ta, tb):
        assert sum(t["counters"]["drops"].values()) == 0, t["counters"]["drops"]
        assert sum(t["socket"]["drops"].values()) == 0, t["socket"]["drops"]


@pytest.mark.parametrize("pair", [(e, "tap", 4) for e in ENGINES], indirect=True, ids=ENGINES)
def test_arp_resolves_through_tap(pair: Pair) -> None:
    a, b, _ea, _ = pair
    a.run("ping", "-c", "1", "-W", "2", "192.168.100.2", timeout=10)
    neigh = a.run("ip", "neigh", "show", "192.168.100.2", "dev", "gt0").stdout
    mac_b = b.run("cat", "/sys/class/net/gt0/address").stdout.strip()
    assert mac_b in neigh and re.search(r"REACHABLE|STALE|DELAY", neigh), neigh


@pytest.mark.parametrize("pair", [(e, "tap", 4) for e in ENGINES], indirect=True, ids=ENGINES)
def test_stop_removes_devices(pair: Pair) -> None:
    a, _, ea, _ = pair
    assert "gt0" in a.run("ip", "-o", "link").stdout
    ea.close()
    assert wait_for(lambda: "gt0" not in a.run("ip", "-o", "link").stdout, timeout=5)


@pytest.mark.parametrize("engine", ENGINES)
def test_start_errors_name_the_field(netns_factory: Callable[[str], Netns], engine: str) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    a.run("ip", "link", "add", "taken0", "type", "veth", "peer", "name", "taken0p")
    with endpoint(a, engine, [{"name": "taken0", "vni": 1, "remote": "10.0.0.2"}]) as ep:
        assert ep.error is not None and ep.error["field"] == "name", ep.error
    with endpoint(a, engine, [{"name": "gt1", "vni": 1, "remote": "10.9.9.9"}]) as ep:
        assert ep.error is not None and ep.error["field"] == "remote", ep.error
    bad_local = {"name": "gt1", "vni": 1, "remote": "10.0.0.2", "local": "10.7.7.7"}
    with endpoint(a, engine, [bad_local]) as ep:
        assert ep.error is not None and ep.error["field"] == "local", ep.error
    # Port in use: nothing of the first tunnel is left behind.
    hold = (
        "import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        "s.bind(('0.0.0.0',6081));print('x',flush=True);time.sleep(30)"
    )
    blocker = a.popen(["python3", "-c", hold], stdout=subprocess.PIPE)
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == "x"
        with endpoint(a, engine, [{"name": "gt1", "vni": 1, "remote": "10.0.0.2"}]) as ep:
            assert ep.error is not None and ep.error["field"] == "port", ep.error
        assert "gt1" not in a.run("ip", "-o", "link").stdout
    finally:
        blocker.kill()
        blocker.wait(5)


@pytest.mark.parametrize("engine", ENGINES)
def test_many_tunnels_share_sockets(netns_factory: Callable[[str], Netns], engine: str) -> None:
    """Three tunnels in one Dataplane: two IPv4 ones on one socket told apart by VNI,
    one over IPv6 (a second socket group); traffic and O-bit control messages reach the
    right tunnel."""
    from tests.endpoint_helpers import geneve, send_udp

    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)

    def specs(remote4: str, remote6: str, host: int) -> list[dict[str, Any]]:
        return [
            {"name": "gt0", "vni": 100, "remote": remote4, "addresses": [f"192.168.100.{host}/24"]},
            {
                "name": "gt1",
                "vni": 200,
                "remote": remote4,
                "mode": "tun",
                "addresses": [f"192.168.101.{host}/24"],
            },
            {"name": "gt2", "vni": 100, "remote": remote6, "addresses": [f"192.168.102.{host}/24"]},
        ]

    with (
        endpoint(a, engine, specs("10.0.0.2", "fd00::2", 1)) as ea,
        endpoint(b, engine, specs("10.0.0.1", "fd00::1", 2)) as eb,
    ):
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        for net in (100, 101, 102):
            a.run("ping", "-c", "2", "-i", "0.2", "-W", "2", f"192.168.{net}.2", timeout=10)
        st = {t["name"]: t for t in eb.status()["status"]}
        assert all(st[n]["counters"]["rx_packets"] >= 2 for n in ("gt0", "gt1", "gt2")), st
        assert st["gt0"]["socket"]["family"] == 4 and st["gt2"]["socket"]["family"] == 6
        # An O-bit packet for the IPv6 tunnel is handed to the hook under its name.
        send_udp(a, [("fd00::1", "fd00::2", 6081, 0, geneve(100, 0x6558, b"\0" * 14, oam=True))])
        assert wait_for(lambda: any(m[0] == "gt2" for m in eb.status()["control_messages"]))
        assert eb.tunnel("gt2")["counters"]["control"] == 1


def test_offload_udp_gso_over_ipv4(netns_factory: Callable[[str], Netns]) -> None:
    """With a UDP checksum on IPv4 the offload mode sends TSO segments as UDP GSO
    super-packets (the kernel refuses UDP GSO without a checksum)."""
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    sa, sb = _specs("tap", 4, udp_csum=True)
    with endpoint(a, "c+offload", sa) as ea, endpoint(b, "c+offload", sb) as eb:
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        tcp_transfer(a, b, "192.168.100.2", 8 << 20)
        ta, tb = ea.tunnel("gt0")["counters"], eb.tunnel("gt0")["counters"]
        assert ta["tx_gso_frames"] > 0 and tb["rx_gro_frames"] > 0
        assert sum(ta["drops"].values()) == 0 and sum(tb["drops"].values()) == 0
