"""The Python engine's packet core, sans I/O: what to do with one received GENEVE
datagram (``decap``) and with one frame read from a device (``encap``), as data.

``decap`` returns Deliver (the inner frame for the device), Drop (a reason) or Control
(an O-bit packet for the control queue); ``encap`` returns Send (the outer datagrams),
Drop or TooBig (with the ICMP error for the device, when one is due). They follow the C
engine's checks in the C engine's order (csrc/rx.c, csrc/encap.c): tests compare the two
packet by packet. Counting, reflection tables, sockets and devices are the caller's."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import codec
from ..auth import option as auth_option
from ..auth.mac import PyAuth

ETH_P_IPV4, ETH_P_IPV6, ETH_P_VLAN, ETH_P_TEB = 0x0800, 0x86DD, 0x8100, 0x6558
ECN_CE, ECN_ECT0 = 3, 2
REFLECT_SLOTS = 1024
PORT_PROTOS = (6, 17, 132, 136)  # TCP, UDP, SCTP, UDP-Lite: ports first

Options = tuple[tuple[int, int], ...]  # (class, type) of each option, in order


def inet_csum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """RFC 1071 checksum of ``data``, ``start`` added to the sum."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    s: int = start + sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def l4_csum(src: bytes, dst: bytes, proto: int, msg: bytes | bytearray) -> int:
    """Checksum of an upper-layer message with its IPv4 or IPv6 pseudo header."""
    pseudo = src + dst + struct.pack("!II", len(msg), proto)
    return inet_csum(pseudo + bytes(msg))


@dataclass
class Inner:
    ipver: int = 0
    ip_off: int = 0
    ip_len: int = 0
    ecn: int = 0
    dsfield: int = 0  # the whole TOS / traffic class byte
    ttl: int = 0  # TTL / hop limit
    df: bool = False
    proto: int = 0
    ports: tuple[int, int] | None = None


def parse_inner(f: bytes | bytearray, mode: str) -> Inner | None:
    """The inner frame's headers (csrc/inner.c parse_inner): None when it is not a
    frame of this mode; a TAP frame that claims IP but is not one is opaque (ipver 0)."""
    lenient = mode == "tap"
    off = 0
    if mode == "tap":
        if len(f) < 14:
            return None
        etype = int.from_bytes(f[12:14], "big")
        off = 14
        if etype == ETH_P_VLAN:
            if len(f) < 18:
                return Inner()
            etype, off = int.from_bytes(f[16:18], "big"), 18
        ver = {ETH_P_IPV4: 4, ETH_P_IPV6: 6}.get(etype, 0)
        if not ver or len(f) <= off or f[off] >> 4 != ver:
            return Inner()
    else:
        if not f:
            return None
        ver = f[0] >> 4
        if ver not in (4, 6):
            return None
    left = len(f) - off
    ip = off
    l4 = 0
    inn = Inner()
    if ver == 4:
        ihl = (f[ip] & 15) * 4 if left else 0
        if left < 20 or ihl < 20 or ihl > left:
            return Inner() if lenient else None
        frag = int.from_bytes(f[ip + 6 : ip + 8], "big")
        inn.ecn, inn.df, inn.proto = f[ip + 1] & 3, bool(frag & 0x4000), f[ip + 9]
        inn.dsfield, inn.ttl = f[ip + 1], f[ip + 8]
        if not frag & 0x3FFF:
            l4 = ihl
    else:
        if left < 40:
            return Inner() if lenient else None
        inn.dsfield = (int.from_bytes(f[ip : ip + 2], "big") >> 4) & 0xFF
        inn.ecn = inn.dsfield & 3
        inn.proto, inn.ttl = f[ip + 6], f[ip + 7]
        l4 = 40
    inn.ipver, inn.ip_off, inn.ip_len = ver, off, left
    if l4 and inn.proto in PORT_PROTOS and left >= l4 + 4:
        p = ip + l4
        inn.ports = (int.from_bytes(f[p : p + 2], "big"), int.from_bytes(f[p + 2 : p + 4], "big"))
    return inn


def addrs(f: bytes | bytearray, inn: Inner) -> tuple[bytes, bytes]:
    """The inner source and destination addresses."""
    ip = inn.ip_off
    if inn.ipver == 4:
        return bytes(f[ip + 12 : ip + 16]), bytes(f[ip + 16 : ip + 20])
    return bytes(f[ip + 8 : ip + 24]), bytes(f[ip + 24 : ip + 40])


def flow_hash(f: bytes | bytearray, inn: Inner, seed: int) -> int:
    if inn.ipver:
        src, dst = addrs(f, inn)
        key = src + dst + bytes([inn.proto]) + struct.pack("!HH", *(inn.ports or (0, 0)))
        if inn.ports is None:
            key = key[:-4]
    else:
        key = bytes(f[:14])
    return zlib.crc32(key, seed) & 0xFFFFFFFF


def flow_key(f: bytes | bytearray, inn: Inner) -> bytes:
    """The same key for both directions of a flow (lower endpoint first)."""
    src, dst = addrs(f, inn)
    sp, dp = inn.ports or (0, 0)
    a, b = src + sp.to_bytes(2, "big"), dst + dp.to_bytes(2, "big")
    return bytes([inn.proto]) + min(a, b) + max(a, b)


def complete_super_checksum(f: bytearray, inn: Inner) -> None:
    """A TCP super-frame whose checksum holds only the pseudo-header sum (a super-packet
    of a peer's inject device, through a veth) gets its checksum completed, so the frame
    goes to a device without a virtio header as one large packet, which the kernel's TCP
    takes (csrc/rx.c rx_super). Anything else is left as it is."""
    if inn.proto != 6 or inn.ports is None:
        return
    ip = inn.ip_off
    if inn.ipver == 4:
        l4, iplen = ip + (f[ip] & 15) * 4, int.from_bytes(f[ip + 2 : ip + 4], "big")
    else:
        l4, iplen = ip + 40, 40 + int.from_bytes(f[ip + 4 : ip + 6], "big")
    if ip + iplen != len(f) or l4 + 20 > len(f):
        return
    src, dst = addrs(f, inn)
    partial = ~inet_csum(src + dst + struct.pack("!II", len(f) - l4, 6)) & 0xFFFF
    field = int.from_bytes(f[l4 + 16 : l4 + 18], "big")
    if field != partial and not ({field, partial} <= {0, 0xFFFF}):
        return
    f[l4 + 16 : l4 + 18] = b"\0\0"
    cs = l4_csum(src, dst, 6, f[l4:])
    f[l4 + 16 : l4 + 18] = (cs or 0xFFFF).to_bytes(2, "big")


def walk_options(opts: bytes) -> list[int]:
    """Offsets of the options in a well-formed option area."""
    out, pos = [], 0
    while pos + 4 <= len(opts):
        out.append(pos)
        pos += 4 + 4 * (opts[pos + 3] & 0x1F)
    return out


# ---------------------------------------------------------------- receive


@dataclass(frozen=True)
class RxTunnel:
    """What decap needs to know of a tunnel."""

    vni: int
    remote: bytes  # packed outer address
    mode: str  # "tap" or "tun"
    mac: bytes  # the device's (TAP loop guard)
    max_inner: int  # largest inner frame of one underlay packet
    reflect: bool = False
    auth: PyAuth | None = None  # verifies (and keeps the replay window): the caller's
    auth_class: int | None = None


@dataclass(frozen=True)
class Deliver:
    tunnel: int
    frame: bytes
    options: Options = ()
    reflect: tuple[bytes, bytes] | None = None  # (flow key, options) to remember


@dataclass(frozen=True)
class Drop:
    reason: str
    tunnel: int | None = None  # None: counted on the socket
    options: Options = ()


@dataclass(frozen=True)
class Control:
    tunnel: int
    packet: bytes
    options: Options = ()


def decap(
    pkt: bytes | bytearray, src: bytes, tos: int, tunnels: Sequence[RxTunnel], whole: bool = False
) -> Deliver | Drop | Control:
    """One received datagram from outer source ``src`` with outer TOS ``tos``: the
    socket-level checks (a GENEVE header, a tunnel for its VNI and source), the
    tunnel-level ones (C bit, critical options, OAM, protocol type) and the delivery
    ones (inner headers, loop guard, RFC 6040 ECN). ``whole``: not reassembled, so a
    TCP super-packet's checksum is completed."""
    try:
        h, off = codec.decode(pkt)
    except codec.DecodeError as exc:
        return Drop(exc.reason)
    idx = -1
    vni_seen = False
    for i, t in enumerate(tunnels):
        if t.vni != h.vni:
            continue
        vni_seen = True
        if t.remote == src:
            idx = i
            break
    if idx < 0:
        return Drop("wrong_remote" if vni_seen else "unknown_vni")
    t = tunnels[idx]
    seen: Options = tuple((o.opt_class, o.type) for o in h.options)
    # The integrity check comes first: nothing else acts on a packet before it is
    # known to come from the peer (README "Authenticated tunnels").
    auth_off = -1
    if t.auth is not None:
        reason, auth_off = t.auth.verify(pkt)
        if reason is not None:
            return Drop(reason, idx, seen)
    critical = any(o.critical for o in h.options)
    if critical != h.critical:
        return Drop("c_bit_mismatch", idx, seen)
    # Critical options other than the verified integrity option: unknown to us.
    verified = (t.auth_class, auth_option.OPT_TYPE) if auth_off >= 0 else None
    unknown = False
    for o in h.options:
        if o.critical and (o.opt_class, o.type) == verified:
            verified = None  # the first one, which gdp_auth_find found
        elif o.critical:
            unknown = True
    if unknown:
        return Drop("critical_option", idx, seen)
    if h.oam:
        return Control(idx, bytes(pkt), seen)
    ok = h.protocol == ETH_P_TEB if t.mode == "tap" else h.protocol in (ETH_P_IPV4, ETH_P_IPV6)
    if not ok:
        return Drop("wrong_protocol", idx, seen)
    f = bytearray(pkt[off:])
    inn = parse_inner(f, t.mode)
    if inn is None:
        return Drop("inner_truncated", idx, seen)
    if t.mode == "tun" and inn.ipver != (4 if h.protocol == ETH_P_IPV4 else 6):
        return Drop("wrong_protocol", idx, seen)
    if t.mode == "tap" and f[6:12] == t.mac:
        return Drop("own_mac", idx, seen)
    if tos & 3 == ECN_CE and inn.ipver:
        if inn.ecn == 0:
            return Drop("ecn_not_ect", idx, seen)
        ip = inn.ip_off
        if inn.ecn != ECN_CE:
            if inn.ipver == 4:
                f[ip + 1] |= ECN_CE
                f[ip + 10 : ip + 12] = b"\0\0"
                ihl = (f[ip] & 15) * 4
                f[ip + 10 : ip + 12] = inet_csum(f[ip : ip + ihl]).to_bytes(2, "big")
            else:
                f[ip + 1] |= ECN_CE << 4
    reflect = None
    if t.reflect and h.opt_len and inn.ipver:
        opts = bytes(pkt[8 : 8 + 4 * h.opt_len])
        if auth_off >= 0:  # the peer's integrity option is not reflected
            opts = opts[: auth_off - 8] + opts[auth_off - 8 + auth_option.OPT_LEN :]
        if opts:
            reflect = (flow_key(f, inn), opts)
    if whole and len(f) > t.max_inner:
        complete_super_checksum(f, inn)
    return Deliver(idx, bytes(f), seen, reflect)


# ---------------------------------------------------------------- transmit


@dataclass(frozen=True)
class TxTunnel:
    """What encap needs to know of a tunnel."""

    mode: str
    family: int  # 4 or 6
    hdr: bytes  # the GENEVE header with the configured options
    opts: bytes  # those options
    local: bytes
    remote: bytes
    port: int
    underlay_mtu: int
    max_inner: int
    df: str  # "set", "unset" or "inherit"
    tos_inherit: bool
    dscp: int
    ttl_inherit: bool
    ttl: int
    udp_csum: bool
    auth: PyAuth | None = None  # signs (and numbers): the caller's
    auth_off: int = 0  # where the integrity option starts in the GENEVE header


@dataclass(frozen=True)
class Send:
    datagrams: tuple[bytes, ...]  # outer IP packets (several: fragments)
    ip_id: int  # the IPv4 ID (fragment ID) used; the next packet's is one on
    inner_len: int


@dataclass(frozen=True)
class TooBig:
    icmp: bytes | None  # for the device, to the sender (None: no error is due)


def too_big_icmp(f: bytes | bytearray, inn: Inner, mode: str, max_inner: int) -> bytes | None:
    """ICMP frag-needed / ICMPv6 packet-too-big for the device, from the inner
    destination to the inner source (csrc/seg.c icmp_too_big); None when none is due."""
    l2 = 14 if mode == "tap" else 0
    mtu = max_inner - l2
    ip = f[inn.ip_off :]
    src, dst = addrs(f, inn)
    if inn.ipver == 4:
        ihl = (ip[0] & 15) * 4
        if not inn.df or mtu < 576:
            return None
        if ip[9] == 1 and len(ip) > ihl and ip[ihl] in (3, 4, 5, 11, 12):
            return None
        quote = ip[:548]
        icmp = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu)) + quote
        icmp[2:4] = inet_csum(icmp).to_bytes(2, "big")
        hdr = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, dst, src)
        )
        hdr[10:12] = inet_csum(hdr).to_bytes(2, "big")
        out = bytes(hdr) + bytes(icmp)
    else:
        if mtu < 1280:
            return None
        if ip[6] == 58 and len(ip) > 40 and ip[40] < 128:
            return None
        quote = ip[:1232]
        icmp = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu)) + quote
        icmp[2:4] = l4_csum(dst, src, 58, icmp).to_bytes(2, "big")
        out = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), 58, 64, dst, src) + bytes(icmp)
    if l2:
        etype = ETH_P_IPV4 if inn.ipver == 4 else ETH_P_IPV6
        out = bytes(f[6:12]) + bytes(f[0:6]) + etype.to_bytes(2, "big") + out
    return out


def _fragments(t: TxTunnel, ip: bytes, payload: bytes, ip_id: int) -> tuple[bytes, ...]:
    fh = 20 if t.family == 4 else 48
    chunk = (t.underlay_mtu - fh) & ~7
    out = []
    off = 0
    while off < len(payload):
        part = payload[off : off + chunk]
        more = off + len(part) < len(payload)
        h = bytearray(ip)
        if t.family == 4:
            h[2:4] = (20 + len(part)).to_bytes(2, "big")
            h[6:8] = ((off // 8) | (0x2000 if more else 0)).to_bytes(2, "big")
        else:
            h[6] = 44
            h[4:6] = (8 + len(part)).to_bytes(2, "big")
            h += bytes([17, 0]) + (off | int(more)).to_bytes(2, "big")
            h += ip_id.to_bytes(4, "big")
        out.append(bytes(h) + part)
        off += len(part)
    return tuple(out)


def encap(
    frame: bytes,
    t: TxTunnel,
    *,
    ip_id: int,
    sport_range: tuple[int, int],
    seed: int,
    reflect: Mapping[int, tuple[bytes, bytes]] | None = None,
) -> Send | Drop | TooBig:
    """One frame read from the device: GENEVE (with the reverse flow's options when
    reflecting), UDP and outer IP headers, fragments when it does not fit and DF is
    clear. ``ip_id``: the previous packet's IPv4 ID."""
    inn = parse_inner(frame, t.mode)
    if inn is None:
        return Drop("tx_bad_frame")
    hdr = bytearray(t.hdr)
    if reflect is not None and inn.ipver and len(frame) <= t.max_inner:
        key = flow_key(frame, inn)
        hit = reflect.get(zlib.crc32(key) % REFLECT_SLOTS)
        if hit is not None and hit[0] == key:
            olen = len(t.opts) + len(hit[1])
            if olen <= 252 and len(frame) + len(hit[1]) <= t.max_inner:
                opts = t.opts + hit[1]
                crit = 0x40 if any(opts[i + 2] & 0x80 for i in walk_options(opts)) else 0
                hdr = bytearray(t.hdr[:8] + opts)
                hdr[0] = olen // 4
                hdr[1] = crit
    proto = ETH_P_TEB if t.mode == "tap" else (ETH_P_IPV4 if inn.ipver == 4 else ETH_P_IPV6)
    hdr[2:4] = proto.to_bytes(2, "big")
    iplen = 20 if t.family == 4 else 40
    udplen = 8 + len(hdr) + len(frame)
    total = iplen + udplen
    df = {"set": True, "unset": False}.get(t.df, inn.ipver == 6 or (inn.ipver == 4 and inn.df))
    frags = total > t.underlay_mtu
    if frags:
        if len(frame) > t.max_inner and inn.ipver:
            icmp = too_big_icmp(frame, inn, t.mode, t.max_inner)
            if icmp is not None:
                return TooBig(icmp)
        if df or (total > 65535 if t.family == 4 else udplen > 65535):
            return TooBig(None)
    lo, hi = sport_range
    sport = lo + ((flow_hash(frame, inn, seed) * (hi - lo + 1)) >> 32)
    geneve = hdr + frame
    if t.auth is not None:
        t.auth.sign(geneve, t.auth_off)
    udp = bytearray(struct.pack("!HHHH", sport, t.port, udplen, 0)) + geneve
    if t.udp_csum:
        cs = l4_csum(t.local, t.remote, 17, udp)
        udp[6:8] = (cs or 0xFFFF).to_bytes(2, "big")
    ecn = ECN_ECT0 if inn.ecn == ECN_CE else inn.ecn
    dscp = (inn.dsfield & 0xFC if inn.ipver else 0) if t.tos_inherit else t.dscp
    tos = dscp | ecn
    ttl = inn.ttl if t.ttl_inherit and inn.ipver else t.ttl
    ip_id = (ip_id + 1) & 0xFFFF or 1
    if t.family == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            tos,
            total,
            ip_id,
            0x4000 if df else 0,
            ttl,
            17,
            0,
            t.local,
            t.remote,
        )
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000 | tos << 20, udplen, 17, ttl, t.local, t.remote)
    if not frags:
        return Send((ip + bytes(udp),), ip_id, len(frame))
    return Send(_fragments(t, ip, bytes(udp), ip_id), ip_id, len(frame))
