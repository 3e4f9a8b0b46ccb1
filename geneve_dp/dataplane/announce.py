"""Gratuitous ARP from a TAP device that has just been opened (again).

A device opened again after a restart or a deletion has a new MAC unless its spec
names one, and peers that resolved its address before hold the old one until their
neighbour entry goes stale and fails (tens of seconds). An ARP request for our own
address from the new MAC (RFC 5227 announcement) updates their entry at once, the way
the kernel announces a device with arp_notify. It is written to the device with a
packet socket, so it leaves through the tunnel like any frame the kernel sends there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def arp_announcement(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """An Ethernet broadcast ARP request whose sender and target are both ``ip``."""
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip.packed + b"\0" * 6 + ip.packed
    return BROADCAST + mac + ETH_P_ARP.to_bytes(2, "big") + arp


def announce(ifname: str, mac: bytes, addresses: list[ipaddress.IPv4Address]) -> int:
    """Send one announcement per address out of ``ifname``; how many were sent. A
    failure only costs the peers a slower update, so it is not raised."""
    sent = 0
    with contextlib.suppress(OSError), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, ETH_P_ARP))
        for ip in addresses:
            s.send(arp_announcement(mac, ip))
            sent += 1
    return sent
