"""`geneve-dp capture`: what a tunnel endpoint sends and receives, into a pcap file.

Nothing here touches the fast path. The capture opens its own AF_PACKET socket while
it runs and closes it when done, so a dataplane nobody captures from pays nothing:

- inner frames: the socket is bound to the tunnel device itself. It sees the frames
  the kernel hands the device (which the endpoint encapsulates and sends) and the
  frames the endpoint writes into it (decapsulated from the wire). TAP devices give
  Ethernet frames, TUN devices raw IP (LINKTYPE_RAW).
- outer frames: the socket is bound to the underlay interface the route to the remote
  leaves by, and a classic BPF program attached with SO_ATTACH_FILTER lets the kernel
  keep only this tunnel's packets: UDP to the tunnel's port, this VNI, and the remote
  as source or destination. Later fragments of an outer packet the engine fragmented
  carry no UDP header and are not captured (the first fragment is).

The socket is created with protocol 0 (it receives nothing), the filter attached, and
only then bound with ETH_P_ALL: no unfiltered packet can be queued before the filter.
"""

from __future__ import annotations

import fcntl
import ipaddress
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import clib, pcap
from .errors import UserError

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SIOCGIFHWADDR = 0x8927
SO_TIMESTAMP = 29  # struct timeval in a control message with every packet
PACKET_OUTGOING = 4
SNAPLEN = 262144  # a 64 KB TSO/GRO super-frame with headers fits
ETH_HLEN = 14
ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE = 1, 772, 65534

# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_W_IND, _LD_H_IND, _LDX_B_MSH = 0x40, 0x48, 0xB1
_JEQ, _JSET, _AND, _RET = 0x15, 0x45, 0x54, 0x06


@dataclass(frozen=True)
class Target:
    """Where to listen and what the frames there are."""

    ifname: str
    linktype: int
    filter: bytes | None  # assembled sock_filter array, None: every frame
    what: str  # for the "listening on" line


# ---- the BPF program --------------------------------------------------------------------

# An instruction: (code, jump-if-true, jump-if-false, k); a jump is 0 (next) or a label.
Insn = tuple[int, int | str, int | str, int]


def assemble(prog: list[Insn | str]) -> bytes:
    """sock_filter structs from instructions and label strings placed between them."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for pc, (code, jt, jf, k) in enumerate(insns):

        def rel(target: int | str, pc: int = pc) -> int:
            return labels[target] - pc - 1 if isinstance(target, str) else target

        out += struct.pack("=HBBI", code, rel(jt), rel(jf), k & 0xFFFFFFFF)
    return bytes(out)


def outer_filter(link_len: int, remote: str, port: int, vni: int) -> bytes:
    """Accept IPv4/IPv6 UDP to ``port`` carrying ``vni`` from or to ``remote``."""
    addr = ipaddress.ip_address(remote)
    words = [int.from_bytes(addr.packed[i : i + 4], "big") for i in range(0, len(addr.packed), 4)]
    L = link_len
    prog: list[Insn | str] = []
    if L == ETH_HLEN:
        prog.append((_LD_H_ABS, 0, 0, 12))
        prog.append((_JEQ, 0, "drop", 0x0800 if addr.version == 4 else 0x86DD))
    else:  # raw IP: the version nibble says which
        prog += [(_LD_B_ABS, 0, 0, 0), (_AND, 0, 0, 0xF0)]
        prog.append((_JEQ, 0, "drop", 0x40 if addr.version == 4 else 0x60))
    if addr.version == 4:
        prog += [
            (_LD_B_ABS, 0, 0, L + 9),
            (_JEQ, 0, "drop", socket.IPPROTO_UDP),
            (_LD_H_ABS, 0, 0, L + 6),
            (_JSET, "drop", 0, 0x1FFF),  # a later fragment: no UDP header to match
            (_LDX_B_MSH, 0, 0, L),
            (_LD_H_IND, 0, 0, L + 2),
            (_JEQ, 0, "drop", port),
            (_LD_W_IND, 0, 0, L + 8 + 4),
        ]
        src, dst = [L + 12], [L + 16]
    else:  # no extension headers: the engines send none
        prog += [
            (_LD_B_ABS, 0, 0, L + 6),
            (_JEQ, 0, "drop", socket.IPPROTO_UDP),
            (_LD_H_ABS, 0, 0, L + 40 + 2),
            (_JEQ, 0, "drop", port),
            (_LD_W_ABS, 0, 0, L + 40 + 8 + 4),
        ]
        src, dst = [L + 8 + 4 * i for i in range(4)], [L + 24 + 4 * i for i in range(4)]
    prog += [(_AND, 0, 0, 0xFFFFFF00), (_JEQ, 0, "drop", vni << 8)]
    for offsets, miss in ((src, "try_dst"), (dst, "drop")):
        if miss == "drop":
            prog.append("try_dst")
        for i, (off, word) in enumerate(zip(offsets, words, strict=True)):
            last = i == len(offsets) - 1
            prog += [(_LD_W_ABS, 0, 0, off), (_JEQ, "accept" if last else 0, miss, word)]
    prog += ["accept", (_RET, 0, 0, SNAPLEN), "drop", (_RET, 0, 0, 0)]
    return assemble(prog)


# ---- what to listen on ------------------------------------------------------------------


def _arphrd(ifname: str) -> int:
    """The device's hardware type, asked of the kernel (/sys may show another netns)."""
    ifreq = struct.pack("16s16x", ifname.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            reply = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, ifreq)
        except OSError as exc:
            raise UserError(
                f"{ifname!r} is not a device here; accepted: a tunnel `geneve-dp show` lists",
                "NAME",
            ) from exc
    family: int = struct.unpack_from("H", reply, 16)[0]
    return family


def _link(ifname: str) -> tuple[int, int]:
    """(pcap link type, link header length) of a device."""
    hw = _arphrd(ifname)
    if hw in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        return pcap.LINKTYPE_ETHERNET, ETH_HLEN
    if hw == ARPHRD_NONE:
        return pcap.LINKTYPE_RAW, 0
    raise UserError(f"{ifname} has link type {hw}; accepted: an Ethernet or raw IP device", "NAME")


def underlay_of(remote: str) -> str:
    """The interface the route to ``remote`` leaves by (as `ip route get`)."""
    from .netconf import links

    with links.iproute() as ipr:
        try:
            msg = ipr.route("get", dst=remote)[0]
        except Exception as exc:  # pyroute2's NetlinkError
            raise UserError(f"no route to the tunnel's remote {remote}: {exc}", "--outer") from exc
    return socket.if_indextoname(int(msg.get_attr("RTA_OIF")))


def inner_target(tunnel: Mapping[str, Any]) -> Target:
    name = str(tunnel["name"])
    linktype, _ = _link(name)
    kind = "Ethernet" if linktype == pcap.LINKTYPE_ETHERNET else "raw IP"
    return Target(name, linktype, None, f"{name} (inner {kind} frames)")


def outer_target(tunnel: Mapping[str, Any], ifname: str | None = None) -> Target:
    remote, port, vni = str(tunnel["remote"]), int(tunnel["port"]), int(tunnel["vni"])
    dev = ifname or underlay_of(remote)
    linktype, link_len = _link(dev)
    prog = outer_filter(link_len, remote, port, vni)
    what = f"{dev} (outer frames of {tunnel['name']}: UDP port {port}, VNI {vni}, peer {remote})"
    return Target(dev, linktype, prog, what)


# ---- the capture loop -------------------------------------------------------------------


def attach_filter(sock: socket.socket, prog: bytes) -> None:
    """Attach an assembled classic BPF program (SO_ATTACH_FILTER copies it)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, clib.sock_fprog(prog))


def open_socket(target: Target) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        if target.filter is not None:
            attach_filter(sock, target.filter)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((target.ifname, ETH_P_ALL))  # Python applies htons itself
    except PermissionError as exc:
        sock.close()
        raise UserError("is run without CAP_NET_RAW; accepted: root", "capture") from exc
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot capture on {target.ifname}: {exc.strerror}", "capture") from exc
    return sock


def _timestamp(ancdata: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP and len(data) >= 16:
            sec, usec = struct.unpack_from("@qq", data)
            return float(sec) + float(usec) / 1e6
    return time.time()


def run(
    sock: socket.socket,
    writer: Callable[[bytes, float], None],
    count: int = 0,
    duration: float = 0.0,
    stopped: Callable[[], bool] = lambda: False,
    on_idle: Callable[[], None] = lambda: None,
) -> int:
    """Hand frames of ``sock`` (from ``open_socket``, closed here) to ``writer`` until
    ``count`` (0: no limit), ``duration`` seconds (0: none) or ``stopped()``; returns the
    number of frames written. ``on_idle`` runs when nothing came for a while."""
    deadline = time.monotonic() + duration if duration > 0 else None
    written = 0
    # Loopback shows every packet twice, once outgoing and once incoming.
    skip_outgoing = sock.getsockname()[3] == ARPHRD_LOOPBACK
    cmsg_space = socket.CMSG_SPACE(16)
    try:
        while (count == 0 or written < count) and not stopped():
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            ready, _, _ = select.select([sock], [], [], wait)
            if not ready:
                on_idle()
                continue
            # Drain what is queued before the next select: one syscall per frame.
            for _ in range(256):
                if count and written >= count:
                    break
                try:
                    data, ancdata, _flags, addr = sock.recvmsg(
                        SNAPLEN, cmsg_space, socket.MSG_DONTWAIT
                    )
                except BlockingIOError:
                    break
                if skip_outgoing and addr[2] == PACKET_OUTGOING:
                    continue
                writer(data, _timestamp(ancdata))
                written += 1
    finally:
        sock.close()
    return written
