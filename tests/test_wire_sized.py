"""``wire_sized`` (``up --wire-sized``): no packet leaves bigger than the underlay MTU,
for a peer that reads the underlay raw, as Open vSwitch's userspace datapath does
with an AF_PACKET socket on a veth.

By default TCP super-frames leave whole (the inject device over IPv4, UDP GSO sends
with checksums) and cross a veth as one packet; the peer's raw reader then gets
64 KiB frames. These tests read the underlay raw the same way.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from bench import ovs
from geneve_dp.dataplane.spec import build_spec
from geneve_dp.errors import UserError
from tests.endpoint_helpers import endpoint, underlay
from tests.netns import Netns
from tests.test_endpoint_inject import MIB, transfer

VNI = 100

# Reads ub raw (every frame that arrives, the length it had, not what fits the buffer)
# until stdin closes; prints the largest frame and how many frames.
RAW_READER = r"""
import select, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("ub", 3))
print("reading", flush=True)
buf = bytearray(2048)
biggest = frames = 0
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if sys.stdin in ready:
        break
    while True:
        try:
            n, addr = s.recvfrom_into(buf, 0, socket.MSG_TRUNC | socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if addr[2] != socket.PACKET_OUTGOING:
            biggest, frames = max(biggest, n), frames + 1
print(biggest, frames, flush=True)
"""


def spec(remote: str, host: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "gt0", "vni": VNI, "remote": remote, "addresses": [f"192.168.100.{host}/24"]}
        | extra
    ]


def test_key_is_a_boolean() -> None:
    base = {"name": "gt0", "vni": 1, "remote": "10.0.0.2"}
    assert build_spec(base).wire_sized is False
    assert build_spec(base | {"wire_sized": True}).wire_sized is True
    with pytest.raises(UserError) as err:
        build_spec(base | {"wire_sized": "yes"}, where="tunnel[0].")
    assert err.value.field == "tunnel[0].wire_sized"
    assert "accepted: true, false" in str(err.value)


def test_flag_sets_the_key() -> None:
    from geneve_dp.cli import build_parser
    from geneve_dp.commands.tunnel import specs_from_args

    argv = ["up", "gt0", "--vni", "1", "--remote", "10.0.0.2"]
    for extra, want in (([], False), (["--wire-sized"], True)):
        args = build_parser("up").parse_args([*argv, *extra])
        assert specs_from_args(args)[0][0].wire_sized is want


@pytest.mark.root
@pytest.mark.parametrize(("family", "wire_sized"), [(4, False), (4, True), (6, False), (6, True)])
def test_raw_reader_sees_only_wire_sized_frames(
    netns_factory: Callable[[str], Netns], family: int, wire_sized: bool
) -> None:
    """TCP through the tunnel, the peer's underlay read raw: by default super-packets
    arrive whole (bigger than the underlay MTU); with wire_sized none does, and every
    byte still arrives."""
    a, b = netns_factory("wsa"), netns_factory("wsb")
    underlay(a, b)
    ra, rb = ("10.0.0.2", "10.0.0.1") if family == 4 else ("fd00::2", "fd00::1")
    extra = {"wire_sized": True} if wire_sized else {}
    with (
        endpoint(a, "c+offload", spec(ra, 1, **extra)) as ea,
        endpoint(b, "c+offload", spec(rb, 2)) as eb,
    ):
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        assert ea.ready[0]["wire_sized"] is wire_sized
        if wire_sized:
            assert ea.ready[0]["offloads"]["tx_inject"] is False
            assert ea.ready[0]["offloads"]["udp_gso"] is False
        a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")
        reader = b.popen([sys.executable, "-c", RAW_READER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
            assert transfer(a, b, 16 * MIB) == 16 * MIB
            out, _ = reader.communicate("", timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait(5)
        biggest, frames = map(int, out.split())
        sent = ea.tunnel("gt0")["counters"]
    assert frames >= 16 * MIB // 65536, frames  # 16 MiB of TCP crossed the veth
    wire = 1500 + 14  # the underlay MTU plus the Ethernet header
    if wire_sized:
        assert biggest <= wire, biggest
        assert sent["tx_injected"] == 0
    else:
        assert biggest > wire, biggest


@pytest.mark.root
def test_tcp_to_open_vswitch_userspace_peer(netns_factory: Callable[[str], Netns]) -> None:
    """An Open vSwitch userspace (netdev datapath) bridge as the peer, reading its end
    of the veth by AF_PACKET: with wire_sized, TCP crosses both ways, every byte."""
    why = ovs.missing()
    if why is not None:
        pytest.fail(f"Open vSwitch is needed (.ci/setup installs it): {why}")
    a, b = netns_factory("wsoa"), netns_factory("wsob")
    underlay(a, b)
    node = ovs.OvsNode(b.name).start()
    try:
        node.geneve("ub", "10.0.0.2/24", "10.0.0.1", VNI, "192.168.100.2/24", 1450)
        with endpoint(a, "c+offload", spec("10.0.0.2", 1, wire_sized=True)) as ea:
            assert ea.error is None, ea.error
            a.run("ping", "-c", "3", "-i", "0.2", "-W", "5", "192.168.100.2", timeout=30)
            assert transfer(a, b, 16 * MIB) == 16 * MIB
            assert transfer(b, a, 16 * MIB, dst="192.168.100.1") == 16 * MIB
    finally:
        node.stop()
