"""The inject device: where the C engine sends TCP super-frames whole.

Linux refuses UDP GSO on a socket without UDP checksums, and the IPv4 default of
GENEVE is checksum 0, so a socket can only send a TSO super-frame one segment at a
time. A TAP device with UDP tunnel GSO (TUN_F_UDP_TUNNEL_GSO, Linux 6.17+) takes the
whole encapsulated super-frame instead, the way the kernel's own tunnels hand theirs
to the stack: the kernel forwards it to the underlay, passes it whole through a veth
(the peer's socket gets the super-packet, engine.c rx_super) and cuts it into
segments, each with every outer header, only where a device cannot take it whole.

The frames enter the stack as if received on this device, so the device forwards
(its own ``forwarding`` sysctl, nothing global), accepts our own source address
(``accept_local``) and has no reverse-path filter. Where any of that cannot be had
the device is not made and the engine segments as before, with a log line saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from .endpoint import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
)

log = logging.getLogger("geneve_dp.dataplane")

TUN_F_UDP_TUNNEL_GSO = 0x080
INJECT_VNET_HDR_LEN = 24  # struct virtio_net_hdr_v1_hash_tunnel (engine.c INJ_VNET_LEN)
CONF = Path("/proc/sys/net/ipv4/conf")
SNMP = Path("/proc/net/snmp")


@dataclass
class Injector:
    fd: int
    name: str
    mac: bytes

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # the device goes with its fd
            self.fd = -1


def device_name(pid: int | None = None) -> str:
    """One per dataplane process (names are per netns, pids per host): at most 15."""
    return f"gdpx{(os.getpid() if pid is None else pid):x}"[:15]


def _sysctl(dev: str, key: str, value: str | None = None) -> str:
    path = CONF / dev / key
    if value is not None:
        path.write_text(value)
    return path.read_text().strip()


def open_injector() -> Injector | None:
    """The inject device, or None (logged) where the kernel or the netns' settings do
    not allow it."""
    if _sysctl("all", "rp_filter") not in ("0",):
        # The strictest of "all" and the device's own applies, and a strict or loose
        # filter drops packets from our own address arriving on a device.
        log.info(
            "TCP super-frames are segmented here: net.ipv4.conf.all.rp_filter is not 0, "
            "so the inject device cannot send them whole"
        )
        return None
    name = device_name()
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        log.info("no inject device (/dev/net/tun: %s)", exc.strerror)
        return None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", INJECT_VNET_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UDP_TUNNEL_GSO)
    except OSError as exc:
        os.close(fd)
        log.info(
            "TCP super-frames are segmented here: this kernel's TAP has no UDP tunnel GSO "
            "(Linux 6.17+; %s)",
            exc.strerror,
        )
        return None
    try:
        # Never an address, never IPv6 (no autoconfiguration chatter queued on it).
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        for key, value in (("forwarding", "1"), ("accept_local", "1"), ("rp_filter", "0")):
            _sysctl(name, key, value)
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx, state="up")
            link = ipr.link("get", index=idx)[0]
        mac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
    except (OSError, IndexError) as exc:
        os.close(fd)
        log.info("TCP super-frames are segmented here: the inject device failed (%s)", exc)
        return None
    return Injector(fd=fd, name=name, mac=mac)


def forwarded_datagrams() -> int:
    """The netns' count of forwarded IPv4 datagrams (/proc/net/snmp ForwDatagrams):
    the kernel counts it after the FORWARD hook, so it shows whether what the engine
    writes to the inject device leaves."""
    lines = [ln.split() for ln in SNMP.read_text().splitlines() if ln.startswith("Ip:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("ForwDatagrams")])
