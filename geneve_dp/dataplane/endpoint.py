"""Kernel resources of tunnel endpoints, shared by both engines.

``open_group`` opens a port's receive sockets (one per worker) and raw transmit
socket, ``open_tunnel`` a tunnel's TAP/TUN device (named, MTU set, up) once the route
to its remote is resolved. A failure undoes what that call created and raises
UserError naming the field; the caller (dataplane.py) undoes the rest.
Netlink goes through pyroute2's sync API (ARCHITECTURE rule 5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import UserError
from .spec import IPAddress, TunnelSpec
from .spread import attach_source_port_spread

log = logging.getLogger("geneve_dp.dataplane")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40
VNET_HDR_LEN = 12  # struct virtio_net_hdr_v1 (csrc/engine.h GDP_VNET_LEN)

# Socket options the socket module does not name (linux/in.h, in6.h, udp.h, socket.h).
IP_RECVTOS = 13
IP_RECVFRAGSIZE = 25
IPV6_RECVFRAGSIZE = 77
IPV6_RECVTCLASS = 66
IPV6_HDRINCL = 36
SO_RXQ_OVFL = 40
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SO_MARK = 36
UDP_NO_CHECK6_RX = 102
UDP_GRO = 104
SOCKET_BUFFER = 4 << 20
# Frames the kernel may queue on each device queue for the engine to read (the TAP/TUN
# ring; the kernel's default is 1000). The queue is what absorbs the time a worker is
# not scheduled: a sender the worker keeps up with on average otherwise loses what
# arrives in the gap (tx_dropped, drop reason FULL_RING). Measured at 64 B on a loaded
# 2-core machine (bench/README.md): with 1000 frames (9 ms at 110 kpps) five of six
# probes at 90-130 kpps overflowed; with 4096, none of six at 90-110 kpps. The
# kernel orphans what it queues there, so this bounds what a local sender can keep
# queued: 4096 frames of at most 64 KiB.
DEVICE_QUEUE_LEN = 4096


@dataclass
class Device:
    fd: int
    name: str
    ifindex: int
    mac: bytes  # 6 bytes for TAP, empty for TUN
    mtu: int
    vnet_hdr: bool = False
    rx_uso: bool = False  # takes UDP_L4 super-frames on write (csrc/gro.c offer_udp)
    queue_fds: list[int] = field(default_factory=list)  # IFF_MULTI_QUEUE queues 2..n

    @property
    def fds(self) -> list[int]:
        """One queue per worker."""
        return [self.fd, *self.queue_fds]


@dataclass
class Tunnel:
    """One endpoint: its spec, its device and what was resolved at start."""

    spec: TunnelSpec
    device: Device
    local: IPAddress
    underlay_mtu: int
    underlay_dev: str = ""  # the route's device at start ("" if none was named)
    default_ttl: int = 64  # the namespace's default hop limit towards the underlay

    @property
    def ttl(self) -> int:
        """The outer TTL as a number: the configured one; the default hop limit for
        "auto" (the kernel's ttl 0) and, with "inherit", for frames that are not IP."""
        return self.spec.ttl if isinstance(self.spec.ttl, int) else self.default_ttl


def default_hop_limit(family: int, dev: str) -> int:
    """What the kernel puts in a packet's TTL / hop limit when none is asked for:
    net.ipv4.ip_default_ttl, or the underlay device's IPv6 hop_limit."""
    if family == 4:
        path = Path("/proc/sys/net/ipv4/ip_default_ttl")
    else:
        path = Path(f"/proc/sys/net/ipv6/conf/{dev or 'default'}/hop_limit")
    try:
        value = int(path.read_text())
    except (OSError, ValueError):
        return 64  # IPDEFTTL, the kernel's own default
    return value if 1 <= value <= 255 else 64


@dataclass
class Group:
    """Tunnels sharing one receive socket (same family and port)."""

    family: int
    port: int
    udp: socket.socket
    raw: socket.socket
    tunnels: list[Tunnel] = field(default_factory=list)
    udp_gro: bool = False  # UDP_GRO accepted on the receive socket
    udp_extra: list[socket.socket] = field(default_factory=list)  # workers 2..n (reuseport)
    raw_marked: dict[int, socket.socket] = field(default_factory=dict)  # mark -> raw socket

    @property
    def udps(self) -> list[socket.socket]:
        """One receive socket per worker."""
        return [self.udp, *self.udp_extra]

    def raw_for(self, mark: int | None) -> socket.socket:
        """The raw transmit socket whose packets carry ``mark`` (SO_MARK); one is made
        for a mark first seen here (a tunnel added to a running port)."""
        if not mark:
            return self.raw
        sock = self.raw_marked.get(mark)
        if sock is None:
            sock = self.raw_marked[mark] = _raw_socket(self.family, mark)
        return sock


def _af(family: int) -> socket.AddressFamily:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _route(ipr: IPRoute, spec: TunnelSpec) -> tuple[int, IPAddress, str]:
    """Underlay MTU, local address and device for the route to spec.remote."""
    try:
        kwargs: dict[str, object] = {"dst": str(spec.remote)}
        if spec.local is not None:
            kwargs["src"] = str(spec.local)
        route = ipr.route("get", **kwargs)[0]
    except NetlinkError as exc:
        if spec.local is not None:
            raise UserError(
                f"no route from {spec.local} to {spec.remote}: {os.strerror(exc.code)} "
                "(is the local address on this host?)",
                field="local",
            ) from exc
        raise UserError(
            f"no route to {spec.remote}: {os.strerror(exc.code)}", field="remote"
        ) from exc
    oif = route.get_attr("RTA_OIF")
    mtu = 0
    metrics = route.get_attr("RTA_METRICS")
    if metrics is not None:
        mtu = metrics.get_attr("RTAX_MTU") or 0
    ifname = ""
    if oif:
        link = ipr.link("get", index=oif)[0]
        ifname = link.get_attr("IFLA_IFNAME") or ""
        if not mtu:
            mtu = link.get_attr("IFLA_MTU")
    if spec.local is not None:
        local: IPAddress = spec.local
    else:
        # The kernel's source choice for the route to the remote, fixed at start.
        with socket.socket(_af(spec.family), socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((str(spec.remote), spec.port))
            except OSError as exc:
                raise UserError(
                    f"no route to {spec.remote}: {exc.strerror}", field="remote"
                ) from exc
            local = ipaddress.ip_address(probe.getsockname()[0].split("%")[0])
    return int(mtu), local, ifname


def _probe_uso(fd: int) -> bool:
    """Whether this kernel's TAP/TUN knows UDP segmentation (Linux 6.2+), which is what
    lets the engine write a run of received datagrams as one UDP_L4 super-frame.

    The flags are set only to ask: they are put back at once, so reads never hand
    the engine UDP super-frames (its transmit side segments TCP only)."""
    base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, base | TUN_F_USO4 | TUN_F_USO6)
    except OSError:
        return False
    fcntl.ioctl(fd, TUNSETOFFLOAD, base)
    return True


def _open_device(
    ipr: IPRoute, spec: TunnelSpec, mtu: int, offload: bool, queues: int = 1
) -> Device:
    if ipr.link_lookup(ifname=spec.name):
        raise UserError(f"a device named {spec.name!r} already exists", field="name")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open /dev/net/tun: {exc.strerror}", field="name") from exc
    rx_uso = False
    queue_fds: list[int] = []
    try:
        flags = (IFF_TAP if spec.mode == "tap" else IFF_TUN) | IFF_NO_PI
        if offload:
            flags |= IFF_VNET_HDR
        if queues > 1:
            flags |= IFF_MULTI_QUEUE
        ifr = struct.pack("16sH22x", spec.name.encode(), flags)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            raise UserError(
                f"cannot create device {spec.name!r}: {exc.strerror}", field="name"
            ) from exc
        if offload:
            # The kernel may then hand over TCP super-frames with partial checksums;
            # the C engine segments them and completes the checksums (csrc/encap.c tx_vnet).
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                rx_uso = _probe_uso(fd)
                if not rx_uso:
                    log.info(
                        "%s: this kernel's TAP/TUN has no UDP segmentation (Linux 6.2+); "
                        "received UDP is written one datagram at a time",
                        spec.name,
                    )
            except OSError as exc:
                log.warning(
                    "%s: the kernel refuses TAP/TUN offloads (%s); running without them",
                    spec.name,
                    exc.strerror,
                )
                os.close(fd)  # the device is not persistent: it goes with its fd
                return _open_device(ipr, spec, mtu, False, queues)
        # Further queues attach to the device by name; the kernel steers each flow to
        # one of them (and to the one its reverse direction was last written on).
        for _ in range(queues - 1):
            qfd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            queue_fds.append(qfd)
            try:
                fcntl.ioctl(qfd, TUNSETIFF, ifr)
            except OSError as exc:
                raise UserError(
                    f"cannot attach queue {len(queue_fds) + 1} to {spec.name!r}: {exc.strerror}",
                    field="workers",
                ) from exc
        ifindex = ipr.link_lookup(ifname=spec.name)[0]
        try:
            if spec.mac is not None:
                ipr.link("set", index=ifindex, address=spec.mac)
            ipr.link("set", index=ifindex, mtu=mtu, txqlen=DEVICE_QUEUE_LEN)
        except NetlinkError as exc:
            raise UserError(
                f"cannot set MTU {mtu} on {spec.name}: {os.strerror(exc.code)}", field="mtu"
            ) from exc
        ipr.link("set", index=ifindex, state="up")
        link = ipr.link("get", index=ifindex)[0]
        mac = b""
        if spec.mode == "tap":
            mac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
        return Device(
            fd=fd,
            name=spec.name,
            ifindex=ifindex,
            mac=mac,
            mtu=mtu,
            vnet_hdr=offload,
            rx_uso=offload and rx_uso,
            queue_fds=queue_fds,
        )
    except BaseException:
        os.close(fd)
        for qfd in queue_fds:
            os.close(qfd)
        raise


def _udp_socket(
    family: int, port: int, specs: list[TunnelSpec], offload: bool, reuseport: bool
) -> tuple[socket.socket, bool]:
    """A bound, nonblocking receive socket for the port; and whether UDP_GRO took."""
    udp = socket.socket(_af(family), socket.SOCK_DGRAM)
    try:
        if family == 6:
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVTCLASS, 1)
            # The socket, not the tunnel, decides whether a zero UDP checksum over
            # IPv6 is accepted (as in the kernel, where the port's socket is shared):
            # any tunnel on the port asking for it turns it on for the port.
            if any(s.udp6_zero_csum_rx for s in specs):
                udp.setsockopt(socket.SOL_UDP, UDP_NO_CHECK6_RX, 1)
        else:
            udp.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
        # Reassembled datagrams are then marked: only a datagram that is none, and not
        # a UDP GRO batch, can be a super-packet of this host (csrc/seg.c super_plan).
        if family == 6:
            udp.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVFRAGSIZE, 1)
        else:
            udp.setsockopt(socket.IPPROTO_IP, IP_RECVFRAGSIZE, 1)
        udp.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        if reuseport:
            # One socket per worker, chosen by outer source port (spread.py), so a
            # flow (its outer source port follows the inner flow) stays on one.
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        udp_gro = False
        if offload:
            # Let UDP GSO super-packets from a peer arrive whole (split in C).
            try:
                udp.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                udp_gro = True
            except OSError as exc:
                log.warning("the kernel refuses UDP_GRO (%s); receiving without it", exc.strerror)
        with contextlib.suppress(OSError):
            udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
        try:
            udp.bind(("::" if family == 6 else "0.0.0.0", port))
        except OSError as exc:
            # A geneve-dp endpoint of this netns on the port would have taken the
            # tunnel (commands/live.py): whoever holds it is something else.
            hint = (
                f" by another program (`ss -ulpn 'sport = :{port}'` names it); accepted: "
                "a free --port"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise UserError(
                f"cannot bind UDP port {port} ({'IPv6' if family == 6 else 'IPv4'}): "
                f"{exc.strerror}{hint}",
                field="port",
            ) from exc
        udp.setblocking(False)
        return udp, udp_gro
    except BaseException:
        udp.close()
        raise


def _raw_socket(family: int, mark: int | None) -> socket.socket:
    try:
        raw = socket.socket(_af(family), socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as exc:
        raise UserError(f"cannot open a raw socket: {exc.strerror}", field="port") from exc
    try:
        if family == 4:
            raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        else:
            raw.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
        if mark:
            set_mark(raw, mark)
        raw.setblocking(False)
    except BaseException:
        raw.close()
        raise
    return raw


def set_mark(sock: socket.socket, mark: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise UserError(f"cannot set mark {mark:#x}: {exc.strerror}", field="mark") from exc


def _open_group(
    family: int, port: int, specs: list[TunnelSpec], offload: bool, workers: int = 1
) -> Group:
    udps: list[socket.socket] = []
    raw: socket.socket | None = None
    marked: dict[int, socket.socket] = {}
    try:
        if workers > 1:
            # A plain bind first: it fails while anyone holds the port, where a
            # SO_REUSEPORT bind would quietly join another root process's sockets.
            probe, _ = _udp_socket(family, port, specs, False, reuseport=False)
            probe.close()
        udp_gro = False
        for _ in range(workers):
            sock, udp_gro = _udp_socket(family, port, specs, offload, reuseport=workers > 1)
            udps.append(sock)
        if workers > 1:
            try:
                attach_source_port_spread(udps[0], family, workers)
            except OSError as exc:
                log.warning(
                    "port %d: the kernel refuses a reuseport program (%s); flows spread "
                    "over workers by its hash",
                    port,
                    exc.strerror,
                )
        raw = _raw_socket(family, None)
        for mark in sorted({s.mark for s in specs if s.mark}):
            marked[mark] = _raw_socket(family, mark)
        return Group(
            family=family,
            port=port,
            udp=udps[0],
            raw=raw,
            udp_gro=udp_gro,
            udp_extra=udps[1:],
            raw_marked=marked,
        )
    except BaseException:
        for sock in [*udps, *marked.values()]:
            sock.close()
        if raw is not None:
            raw.close()
        raise


def close_tunnel(tunnel: Tunnel) -> None:
    """Close the tunnel's device fds: a non-persistent device vanishes with them.
    Idempotent."""
    if tunnel.device.fd >= 0:
        with contextlib.suppress(OSError):
            os.close(tunnel.device.fd)
        tunnel.device.fd = -1
    for qfd in tunnel.device.queue_fds:
        with contextlib.suppress(OSError):
            os.close(qfd)
    tunnel.device.queue_fds = []


def close_resources(groups: list[Group]) -> None:
    """Close every fd of ``groups`` and their tunnels. Idempotent."""
    for group in groups:
        for tunnel in group.tunnels:
            close_tunnel(tunnel)
        for sock in [*group.udps, *group.raw_marked.values()]:
            sock.close()
        group.raw.close()


def open_tunnel(
    ipr: IPRoute, spec: TunnelSpec, offload: bool, workers: int, device: Device | None = None
) -> Tunnel:
    """``spec``'s tunnel: the route to its remote resolved now, and a new device (with
    ``workers`` queues), or ``device`` kept, its MTU set to what ``spec`` asks."""
    underlay_mtu, local, underlay_dev = _route(ipr, spec)
    mtu = spec.mtu if spec.mtu is not None else underlay_mtu - spec.overhead
    if mtu < 68:
        raise UserError(
            f"underlay MTU {underlay_mtu} leaves {mtu} for the tunnel; at least 68",
            field="mtu",
        )
    fits = underlay_mtu - spec.overhead
    if mtu > fits:
        # Allowed, as the kernel allows it: the outer packets are fragmented (DF
        # unset) or refused with "packet too big" (DF set).
        log.warning(
            "%s: mtu %d is above what the underlay %s (MTU %d) carries whole; the "
            "largest that fits is %d (--mtu %d), larger packets are fragmented "
            "or dropped",
            spec.name,
            mtu,
            underlay_dev,
            underlay_mtu,
            fits,
            fits,
            extra={"event": "mtu_above_underlay", "device": spec.name, "fits": fits},
        )
    if device is None:
        device = _open_device(ipr, spec, mtu, offload, workers)
    elif device.mtu != mtu:
        try:
            ipr.link("set", index=device.ifindex, mtu=mtu)
        except NetlinkError as exc:
            raise UserError(
                f"cannot set MTU {mtu} on {spec.name}: {os.strerror(exc.code)}", field="mtu"
            ) from exc
        device = dataclasses.replace(device, mtu=mtu)
    return Tunnel(
        spec,
        device,
        local,
        underlay_mtu,
        underlay_dev,
        default_hop_limit(spec.family, underlay_dev),
    )


def open_group(
    family: int, port: int, specs: list[TunnelSpec], offload: bool, workers: int = 1
) -> Group:
    """The receive sockets (one per worker) and raw transmit socket of a port."""
    try:
        return _open_group(family, port, specs, offload, workers)
    except NetlinkError as exc:
        raise UserError(f"netlink: {os.strerror(exc.code)}", field="name") from exc


def ephemeral_ports() -> tuple[int, int]:
    """The netns' ephemeral port range: where transmit source ports are drawn from."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999
