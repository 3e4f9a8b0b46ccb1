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

Forwarded packets pass the FORWARD hook, which the netns' firewall may close (a
policy of DROP, as Docker sets). So a probe goes the same way every PROBE_INTERVAL
seconds: an ICMP echo reply (which nobody answers) from the tunnel's local address to
its remote, written to the device and looked for leaving by an AF_PACKET socket whose
BPF filter passes only it. The socket is open only for the probe's few milliseconds:
while any packet socket is open, the kernel clones every outgoing packet for it. If
PROBE_TRIES probes in a row do not leave, the supervisor stops injecting (engine.c
then segments).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from ..capture import ETH_P_ALL, PACKET_OUTGOING, Insn, assemble, attach_filter
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
from .engine_py import inet_csum
from .spec import TunnelSpec

log = logging.getLogger("geneve_dp.dataplane")

TUN_F_UDP_TUNNEL_GSO = 0x080
INJECT_VNET_HDR_LEN = 24  # struct virtio_net_hdr_v1_hash_tunnel (engine.c INJ_VNET_LEN)
CONF = Path("/proc/sys/net/ipv4/conf")


PROBE_INTERVAL = 5.0  # seconds between probes
PROBE_WAIT = 0.05  # how long a probe may take to leave (it leaves within the write)
PROBE_TRIES = 3  # probes in a row that must fail, PROBE_RETRY apart
PROBE_RETRY = 0.2
ICMP_ECHO_REPLY = 0
PROBE_TOKEN = b"geneve-dp inject probe"

# Classic BPF (linux/filter.h): IPv4, ICMP, echo reply with our identifier.
_LD_H_ABS, _LD_B_ABS, _JEQ, _RET = 0x28, 0x30, 0x15, 0x06


def _probe_filter(ident: int) -> bytes:
    prog: list[Insn | str] = [
        (_LD_H_ABS, 0, 0, 12),
        (_JEQ, 0, "drop", 0x0800),
        (_LD_B_ABS, 0, 0, 14 + 9),
        (_JEQ, 0, "drop", socket.IPPROTO_ICMP),
        (_LD_B_ABS, 0, 0, 14 + 20),
        (_JEQ, 0, "drop", ICMP_ECHO_REPLY),
        (_LD_H_ABS, 0, 0, 14 + 20 + 4),
        (_JEQ, 0, "drop", ident),
        (_RET, 0, 0, 256),
        "drop",
        (_RET, 0, 0, 0),
    ]
    return assemble(prog)


@dataclass
class Injector:
    fd: int
    name: str
    mac: bytes
    ident: int
    seq: int = 0
    misses: int = 0  # probes in a row that did not leave
    next_probe: float = 0.0  # monotonic time of the next probe
    failed: bool = False
    users: int = 1
    netns: int = 0  # inode of the network namespace it lives in

    def close(self) -> None:
        """Let go of it; the device goes with the last user (a supervisor that replaces
        its dataplane keeps the same device, so the netns' links do not churn)."""
        self.users -= 1
        if self.users > 0:
            return
        _open.pop(self.netns, None)
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # the device goes with its fd
            self.fd = -1

    def check(self, local: str, remote: str) -> bool:
        """Probe when one is due; False once PROBE_TRIES in a row failed (for good)."""
        if self.failed:
            return False
        now = time.monotonic()
        if now < self.next_probe:
            return True
        if self._probe(local, remote):
            self.misses = 0
            self.next_probe = now + PROBE_INTERVAL
            return True
        self.misses += 1
        self.next_probe = now + PROBE_RETRY
        self.failed = self.misses >= PROBE_TRIES
        return not self.failed

    def _probe(self, local: str, remote: str) -> bool:
        """Write one probe; whether it left by a device within PROBE_WAIT."""
        self.seq = (self.seq + 1) & 0xFFFF
        try:
            # Unbound, on every device: the probe leaves by whichever the route picks.
            # What arrives before the filter is attached is read past below.
            watch = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except OSError:
            return True  # cannot look: no evidence against the device
        with watch:
            attach_filter(watch, _probe_filter(self.ident))
            try:
                os.write(self.fd, bytes(INJECT_VNET_HDR_LEN) + self._frame(local, remote))
            except OSError:
                return False
            deadline = time.monotonic() + PROBE_WAIT
            while (left := deadline - time.monotonic()) > 0:
                watch.settimeout(left)
                try:
                    data, addr = watch.recvfrom(256)
                except TimeoutError:
                    break
                seq = struct.unpack_from("!H", data, 14 + 20 + 6)[0] if len(data) >= 42 else -1
                if addr[2] == PACKET_OUTGOING and seq == self.seq and PROBE_TOKEN in data:
                    return True
        return False

    def _frame(self, local: str, remote: str) -> bytes:
        icmp = struct.pack("!BBHHH", ICMP_ECHO_REPLY, 0, 0, self.ident, self.seq) + PROBE_TOKEN
        icmp = icmp[:2] + struct.pack("!H", inet_csum(icmp)) + icmp[4:]
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45, 0, 20 + len(icmp), random.getrandbits(16), 0, 65, socket.IPPROTO_ICMP, 0,
            ipaddress.IPv4Address(local).packed, ipaddress.IPv4Address(remote).packed,
        )  # fmt: skip
        ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
        src = bytes([self.mac[0] ^ 0x02]) + self.mac[1:]
        return self.mac + src + b"\x08\x00" + ip + icmp


_open: dict[int, Injector] = {}  # this process's inject devices, by netns inode


def injectable(spec: TunnelSpec) -> bool:
    """Whether a tunnel may send through the inject device: IPv4 without checksums
    (elsewhere the sockets' UDP GSO serves) and a TTL that forwarding can take one
    off of. Not with authentication: each segment must carry its own MAC, and the
    kernel would copy one MAC to every segment it cuts."""
    return spec.family == 4 and not spec.tx_udp_csum and spec.ttl < 255 and spec.auth_class is None


NAMES = [f"gdpx{i}" for i in range(16)]  # names are per netns; the first free one


def _sysctl(dev: str, key: str, value: str | None = None) -> str:
    path = CONF / dev / key
    if value is not None:
        path.write_text(value)
    return path.read_text().strip()


def open_injector() -> Injector | None:
    """The inject device, or None (logged) where the kernel or the netns' settings do
    not allow it. Within one process and netns, every caller shares one."""
    netns = os.stat("/proc/self/ns/net").st_ino
    shared = _open.get(netns)
    if shared is not None and not shared.failed:
        shared.users += 1
        return shared
    made = _make_injector()
    if made is not None:
        made.netns = netns
        _open[netns] = made
    return made


def _make_injector() -> Injector | None:
    if _sysctl("all", "rp_filter") not in ("0",):
        # The strictest of "all" and the device's own applies, and a strict or loose
        # filter drops packets from our own address arriving on a device.
        log.info(
            "TCP super-frames are segmented here: net.ipv4.conf.all.rp_filter is not 0, "
            "so the inject device cannot send them whole"
        )
        return None
    fd, name = -1, ""
    for name in NAMES:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.info("no inject device (/dev/net/tun: %s)", exc.strerror)
            return None
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            break
        except OSError:  # another process's, or not a TAP at all: the next name
            os.close(fd)
            fd = -1
    if fd < 0:
        log.info("TCP super-frames are segmented here: no free inject device name")
        return None
    try:
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
    return Injector(fd=fd, name=name, mac=mac, ident=random.getrandbits(16))
