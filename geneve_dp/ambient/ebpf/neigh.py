"""The MAC address behind an IPv4 neighbour on a device (the pod's or ztunnel's eth0).

The eBPF programs write destination MACs themselves, so the node must know them. It
reads the neighbour table (pyroute2); when the address is not there yet it sends one
UDP datagram to the discard port, which makes the kernel resolve it, and waits.
"""

from __future__ import annotations

import contextlib
import socket
import time

from ...netconf import links

NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20
RESOLVE_TIMEOUT = 3.0
DISCARD_PORT = 9


def _lookup(ip: str, ifindex: int) -> str | None:
    with links.iproute() as ipr:
        for msg in ipr.get_neighbours(family=socket.AF_INET, ifindex=ifindex):
            if msg.get_attr("NDA_DST") != ip:
                continue
            mac = msg.get_attr("NDA_LLADDR")
            if mac and not msg["state"] & (NUD_INCOMPLETE | NUD_FAILED):
                return str(mac)
    return None


def resolve(ip: str, dev: str, timeout: float = RESOLVE_TIMEOUT) -> str | None:
    """``ip``'s MAC as seen on ``dev``, resolving it if needed; None if nobody answers."""
    try:
        ifindex = socket.if_nametoindex(dev)
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    poked = False
    while True:
        mac = _lookup(ip, ifindex)
        if mac is not None:
            return mac
        if time.monotonic() >= deadline:
            return None
        if not poked:
            with (
                contextlib.suppress(OSError),
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
            ):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
                s.sendto(b"", (ip, DISCARD_PORT))
            poked = True
        time.sleep(0.05)
