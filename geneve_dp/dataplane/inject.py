"""The inject device: where the C engine sends TCP super-frames whole.

Linux refuses UDP GSO on a socket without UDP checksums, and the IPv4 default of
GENEVE is checksum 0, so a socket can only send a TSO super-frame one segment at a
time. A TAP device with UDP tunnel GSO (TUN_F_UDP_TUNNEL_GSO, Linux 6.17+) takes the
whole encapsulated super-frame instead, the way the kernel's own tunnels hand theirs
to the stack: the kernel forwards it to the underlay, passes it whole through a veth
(the peer's socket gets the super-packet, csrc/seg.c super_plan) and cuts it into
segments, each with every outer header, only where a device cannot take it whole.

The frames enter the stack as if received on this device, so the device forwards
(its own ``forwarding`` sysctl, nothing global), accepts our own source address
(``accept_local``) and has no reverse-path filter. Where any of that cannot be had
the device is not made and the engine segments as before, with a log line saying why.

Forwarded packets pass the FORWARD hook, which the netns' firewall may close (a
policy of DROP, as Docker sets). So a probe goes the same way now and then: an ICMP
echo reply (which nobody answers) from the tunnel's local address to its remote,
written to the device and looked for by an AF_PACKET socket whose BPF filter passes
only it. The socket is open only for the probe's few milliseconds: while any packet
socket is open, the kernel clones every packet for it.

The socket sees the probe twice: entering the inject device (the kernel took the
write in) and leaving by the underlay. A probe is judged on that evidence, never on
how soon the supervisor got to look:

- left: it left by the underlay within PROBE_WAIT, or ``late``: after it (the
  supervisor was not scheduled in time and found it queued, or the underlay's queue
  held it);
- stopped: it entered and did not leave within PROBE_QUEUED_WAIT (or the write
  failed): a FORWARD rule, no route, no neighbour;
- unseen: the kernel had not even taken it in when the wait was over (softirq
  backlog): no evidence either way, so it counts for nothing.

PROBE_TRIES stopped probes in a row turn injection off (the engine then segments);
probing goes on, backing off, and the first probe that leaves turns it on again.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import random
import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from .. import clib
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
from .packet import inet_csum
from .spec import TunnelSpec

log = logging.getLogger("geneve_dp.dataplane")

TUN_F_UDP_TUNNEL_GSO = 0x080
INJECT_VNET_HDR_LEN = 24  # struct virtio_net_hdr_v1_hash_tunnel (csrc/proto.h VNET_TUNNEL_LEN)
CONF = Path("/proc/sys/net/ipv4/conf")


PROBE_INTERVAL = 5.0  # seconds between probes while they leave
PROBE_WAIT = 0.05  # how long a probe takes to leave, write included (else: late)
PROBE_QUEUED_WAIT = 0.2  # how long one seen entering may sit in the underlay's queue
PROBE_TRIES = 3  # stopped probes in a row that turn injection off
PROBE_RETRY = 0.2  # the first retry after a probe that did not leave, while on
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0  # retries while off: doubling, within these
# What became of a probe (module doc); the status counts each.
LEFT, LATE, STOPPED, UNSEEN = "left", "late", "stopped", "unseen"
PROBE_OUTCOMES = (LEFT, LATE, STOPPED, UNSEEN)
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


def _watch_socket(ident: int) -> socket.socket:
    """A packet socket on every device that receives only the probes: opened with
    protocol 0 (nothing arrives), filtered, then bound to all protocols, so nothing
    unfiltered can fill its buffer in between."""
    watch = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        attach_filter(watch, _probe_filter(ident))
        # struct sockaddr_ll with ifindex 0 (every device), which Python's bind
        # cannot name.
        addr = struct.pack("=HHiHBB8s", socket.AF_PACKET, socket.htons(ETH_P_ALL), 0, 0, 0, 0, b"")
        if clib.libc().bind(watch.fileno(), ctypes.c_char_p(addr), len(addr)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        watch.setblocking(False)
    except BaseException:
        watch.close()
        raise
    return watch


@dataclass
class Injector:
    fd: int
    name: str
    mac: bytes
    ident: int
    seq: int = 0
    misses: int = 0  # stopped probes in a row
    next_probe: float = 0.0  # monotonic time of the next probe
    retry: float = 0.0  # the last delay after a probe that did not leave
    on: bool = True  # whether injecting is wanted (module doc)
    users: int = 1
    netns: int = 0  # inode of the network namespace it lives in

    def __post_init__(self) -> None:
        self.probes = dict.fromkeys(PROBE_OUTCOMES, 0)

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

    def check(self, local: str, remote: str, now: float | None = None) -> bool:
        """Probe when one is due; whether to inject (module doc)."""
        now = time.monotonic() if now is None else now
        if now < self.next_probe:
            return self.on
        outcome = self._probe(local, remote)
        self.probes[outcome] += 1
        if outcome in (LEFT, LATE):
            self.misses, self.retry, self.on = 0, 0.0, True
            self.next_probe = now + PROBE_INTERVAL
            return True
        if outcome == STOPPED:
            self.misses += 1
            if self.misses >= PROBE_TRIES:
                self.on = False
        # Again soon, then less and less often while nothing is learnt.
        low, high = (PROBE_RETRY, PROBE_INTERVAL) if self.on else (BACKOFF_MIN, BACKOFF_MAX)
        self.retry = min(high, max(low, 2 * self.retry))
        self.next_probe = now + self.retry
        return self.on

    def _probe(self, local: str, remote: str) -> str:
        """Write one probe and judge it by what the packet socket saw (module doc)."""
        self.seq = (self.seq + 1) & 0xFFFF
        try:
            watch = _watch_socket(self.ident)
        except OSError:
            return UNSEEN  # cannot look: no evidence against the device
        with watch:
            # The wait counts from before the write: a supervisor descheduled on
            # the way back from it has let the wait run out.
            waited = time.monotonic() + PROBE_WAIT
            try:
                os.write(self.fd, bytes(INJECT_VNET_HDR_LEN) + self._frame(local, remote))
            except OSError:
                return STOPPED
            entered = False
            deadline = waited
            while True:
                # Everything queued is read before the clock is looked at: a
                # supervisor scheduled late finds the probe there.
                for ifname, pkttype in self._drain(watch):
                    if pkttype == PACKET_OUTGOING:
                        return LATE if time.monotonic() > waited else LEFT
                    if ifname == self.name and not entered:
                        # In: it leaves within the same softirq pass, or once the
                        # underlay's queue lets it.
                        entered = True
                        deadline = max(deadline, time.monotonic() + PROBE_QUEUED_WAIT)
                left = deadline - time.monotonic()
                if left <= 0:
                    return STOPPED if entered else UNSEEN
                select.select([watch], [], [], left)

    def _drain(self, watch: socket.socket) -> list[tuple[str, int]]:
        """(device, packet type) of this probe's copies queued on ``watch``."""
        out: list[tuple[str, int]] = []
        while True:
            try:
                data, addr = watch.recvfrom(256)
            except BlockingIOError:
                return out
            seq = struct.unpack_from("!H", data, 14 + 20 + 6)[0] if len(data) >= 42 else -1
            if seq == self.seq and PROBE_TOKEN in data:
                out.append((addr[0], addr[2]))

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
refusal = ""  # why the last open_injector() made no device (for status)


def injectable(spec: TunnelSpec) -> bool:
    """Whether a tunnel may send through the inject device: IPv4 without checksums
    (elsewhere the sockets' UDP GSO serves), a TTL that forwarding can take one off
    of (not "inherit": each packet's own), super-packets allowed on the underlay (not
    ``wire_sized``), and no mark (what is written to a device starts with mark 0). Not
    with authentication: each segment must carry its own MAC, and the kernel would
    copy one MAC to every segment it cuts."""
    ttl_ok = spec.ttl == "auto" or (isinstance(spec.ttl, int) and spec.ttl < 255)
    return (
        spec.family == 4
        and not spec.tx_udp_csum
        and ttl_ok
        and not spec.wire_sized
        and not spec.mark
        and spec.auth_class is None
    )


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
    if shared is not None:
        shared.users += 1
        return shared
    made = _make_injector()
    if made is not None:
        made.netns = netns
        _open[netns] = made
    return made


def _refuse(why: str) -> None:
    """Log why there is no inject device, and keep it for status."""
    global refusal
    refusal = why
    log.info("TCP super-frames are segmented here: %s", why)


def _make_injector() -> Injector | None:
    if _sysctl("all", "rp_filter") not in ("0",):
        # The strictest of "all" and the device's own applies, and a strict or loose
        # filter drops packets from our own address arriving on a device.
        _refuse("net.ipv4.conf.all.rp_filter is not 0, so the inject device cannot send them whole")
        return None
    fd, name = -1, ""
    for name in NAMES:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            _refuse(f"no inject device (/dev/net/tun: {exc.strerror})")
            return None
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            break
        except OSError:  # another process's, or not a TAP at all: the next name
            os.close(fd)
            fd = -1
    if fd < 0:
        _refuse("no free inject device name")
        return None
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", INJECT_VNET_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UDP_TUNNEL_GSO)
    except OSError as exc:
        os.close(fd)
        _refuse(f"this kernel's TAP has no UDP tunnel GSO (Linux 6.17+; {exc.strerror})")
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
        _refuse(f"the inject device failed ({exc})")
        return None
    return Injector(fd=fd, name=name, mac=mac, ident=random.getrandbits(16))
