"""A tunnel's `mark`: every outer packet it sends carries it (SO_MARK), on each transmit
path: the C engine's raw socket (no offloads), its connected UDP sockets (offloads), and
the Python engine. A tunnel without a mark on the same port sends unmarked. Observed by
iptables counters in the sender's OUTPUT chain, per mark, on real namespaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.endpoint_helpers import endpoint, underlay
from tests.netns import Netns

pytestmark = pytest.mark.root

MARK = 0x1234


def spec(name: str, vni: int, remote: str, addr: str, mark: int | None) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "vni": vni, "remote": remote, "addresses": [addr]}
    if mark is not None:
        d["mark"] = mark
    return d


def counted(ns: Netns, tag: str) -> int:
    for line in ns.run("iptables-save", "-c", "-t", "mangle").stdout.splitlines():
        if line.endswith(f"--comment {tag}"):
            return int(line[1:].split(":", 1)[0])
    raise AssertionError(f"no counter {tag}")


@pytest.mark.parametrize("engine", ["c", "c+offload", "python"])
def test_marked_tunnel_sends_marked_outer_packets(
    netns_factory: Callable[[str], Netns], engine: str
) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    for ns in (a, b):  # no IPv6 chatter of the devices to count
        for key in ("all", "default"):
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
    for mark, tag in ((MARK, "marked"), (0, "unmarked")):
        a.run("iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "6081",
              "-m", "mark", "--mark", str(mark), "-m", "comment", "--comment", tag)  # fmt: skip
    a_specs = [spec("gm0", 10, "10.0.0.2", "172.16.70.1/24", MARK),
               spec("gm1", 11, "10.0.0.2", "172.16.71.1/24", None)]  # fmt: skip
    b_specs = [spec("gm0", 10, "10.0.0.1", "172.16.70.2/24", None),
               spec("gm1", 11, "10.0.0.1", "172.16.71.2/24", None)]  # fmt: skip
    with endpoint(a, engine, a_specs) as ea, endpoint(b, engine, b_specs) as eb:
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        a.run("ping", "-c", "3", "-i", "0.2", "-W", "5", "172.16.70.2")
        marked = counted(a, "marked")
        assert marked >= 3, marked  # ARP and the echo requests, each marked
        assert counted(a, "unmarked") == 0
        a.run("ping", "-c", "3", "-i", "0.2", "-W", "5", "172.16.71.2")
        assert counted(a, "unmarked") >= 3
        assert counted(a, "marked") == marked
        # A TCP exchange through the marked tunnel (TSO super-frames with offloads).
        srv = b.popen(["python3", "-c",
                       "import socket\ns=socket.create_server(('172.16.70.2', 9100))\n"
                       "c,_=s.accept()\nn=0\nwhile True:\n d=c.recv(65536)\n if not d: break\n"
                       " n+=len(d)\nprint(n)"], stdout=-1)  # fmt: skip
        a.run("python3", "-c", "import socket,time\nfor _ in range(50):\n try:\n"
              "  c=socket.create_connection(('172.16.70.2', 9100)); break\n"
              " except OSError: time.sleep(0.1)\nc.sendall(b'x'*2000000); c.close()")  # fmt: skip
        out, _ = srv.communicate(timeout=30)
        assert out.strip() == "2000000"
        assert counted(a, "marked") > marked + 100
        assert counted(a, "unmarked") < 10  # the second tunnel's pings only
