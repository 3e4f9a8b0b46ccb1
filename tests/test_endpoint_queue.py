"""The device queue absorbs the time a worker is not scheduled (endpoint.py
DEVICE_QUEUE_LEN): frames written while the endpoint cannot run wait there and are
all forwarded once it runs again, instead of being dropped (tx_dropped) past the
kernel's default of 1000."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from geneve_dp.dataplane.endpoint import DEVICE_QUEUE_LEN
from tests.endpoint_helpers import endpoint, underlay, wait_for
from tests.netns import Netns

pytestmark = pytest.mark.root

# Counts distinct datagrams until stdin closes.
SINK = r"""
import select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
s.bind(("192.168.100.2", 7000))
print("bound", flush=True)
seen = set()
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [], 0.5)
    if s in ready:
        while True:
            try:
                seen.add(s.recv(64, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
    elif sys.stdin in ready:
        break
    print(len(seen), flush=True)
"""

BURST = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("192.168.100.2", 7000))
for i in range(int(sys.argv[1])):
    s.send(i.to_bytes(4, "big") * 8)
"""


def tx_dropped(ns: Netns, dev: str) -> int:
    link = json.loads(ns.run("ip", "-j", "-s", "link", "show", "dev", dev).stdout)[0]
    return int(link["stats64"]["tx"]["dropped"])


def test_frames_queued_while_the_endpoint_is_stopped_all_arrive(
    netns_factory: Callable[[str], Netns],
) -> None:
    a, b = netns_factory("qa"), netns_factory("qb")
    underlay(a, b)
    n = 3 * DEVICE_QUEUE_LEN // 4  # well past the kernel's default of 1000
    assert n > 2 * 1000
    spec = {"name": "gt0", "vni": 5, "remote": "10.0.0.2", "addresses": ["192.168.100.1/24"]}
    peer = {"name": "gt0", "vni": 5, "remote": "10.0.0.1", "addresses": ["192.168.100.2/24"]}
    with endpoint(a, "c+offload", [spec]) as ea, endpoint(b, "c+offload", [peer]) as eb:
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")
        link = json.loads(a.run("ip", "-j", "link", "show", "dev", "gt0").stdout)[0]
        assert link["txqlen"] == DEVICE_QUEUE_LEN
        sink = b.popen([sys.executable, "-c", SINK], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert sink.stdout is not None and sink.stdout.readline().strip() == "bound"
            dropped = tx_dropped(a, "gt0")
            os.kill(ea.proc.pid, signal.SIGSTOP)  # every worker thread stops
            try:
                a.run(sys.executable, "-c", BURST, str(n))
            finally:
                os.kill(ea.proc.pid, signal.SIGCONT)
            counts: list[int] = [0]

            def all_arrived() -> bool:
                assert sink.stdout is not None
                counts.append(int(sink.stdout.readline()))
                return counts[-1] >= n

            assert wait_for(all_arrived, timeout=30, interval=0), counts[-1]
            assert tx_dropped(a, "gt0") == dropped
        finally:
            sink.kill()
            sink.wait(5)
