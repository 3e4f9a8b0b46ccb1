"""The pure-Python engine: the same endpoint semantics as the C engine (csrc/) with the
per-packet loop in Python (geneve_dp.codec). The baseline in benchmarks and the oracle
in tests; never the default (ARCHITECTURE rule 1)."""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, field

from .. import codec
from ..auth import option as auth_option
from ..auth.mac import PyAuth
from .endpoint import IP_RECVFRAGSIZE, IPV6_RECVFRAGSIZE, Group, Tunnel, ephemeral_ports
from .reasons import DROP_REASONS, SOCKET_DROP_REASONS, TUNNEL_COUNTERS

ETH_P_IPV4, ETH_P_IPV6, ETH_P_VLAN, ETH_P_TEB = 0x0800, 0x86DD, 0x8100, 0x6558
ECN_CE, ECN_ECT0 = 3, 2
OPTSEEN_SLOTS = 32
REFLECT_SLOTS = 1024
_PORT_PROTOS = (6, 17, 132, 136)


_FRAGSIZE = {(socket.IPPROTO_IP, IP_RECVFRAGSIZE), (socket.IPPROTO_IPV6, IPV6_RECVFRAGSIZE)}


def inet_csum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    s: int = start + sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def l4_csum(src: bytes, dst: bytes, proto: int, msg: bytes | bytearray) -> int:
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
    """Mirror of parse_inner in csrc/inner.c: None when not a frame of this mode."""
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
    if l4 and inn.proto in _PORT_PROTOS and left >= l4 + 4:
        p = ip + l4
        inn.ports = (int.from_bytes(f[p : p + 2], "big"), int.from_bytes(f[p + 2 : p + 4], "big"))
    return inn


def complete_super_checksum(f: bytearray, inn: Inner) -> None:
    """csrc/rx.c rx_super for a device without a virtio header: a TCP super-frame from
    a super-packet of this host's stack (a peer's inject device, through a veth) holds
    only the pseudo-header sum in its checksum; completed here, the frame goes as one
    large packet, which the kernel's TCP takes. Anything else is left as it is."""
    if inn.proto != 6 or inn.ports is None:
        return
    ip = inn.ip_off
    if inn.ipver == 4:
        l4, iplen = ip + (f[ip] & 15) * 4, int.from_bytes(f[ip + 2 : ip + 4], "big")
    else:
        l4, iplen = ip + 40, 40 + int.from_bytes(f[ip + 4 : ip + 6], "big")
    if ip + iplen != len(f) or l4 + 20 > len(f):
        return
    src, dst = _addrs(f, inn)
    partial = ~inet_csum(src + dst + struct.pack("!II", len(f) - l4, 6)) & 0xFFFF
    field = int.from_bytes(f[l4 + 16 : l4 + 18], "big")
    if field != partial and not ({field, partial} <= {0, 0xFFFF}):
        return
    f[l4 + 16 : l4 + 18] = b"\0\0"
    cs = l4_csum(src, dst, 6, f[l4:])
    f[l4 + 16 : l4 + 18] = (cs or 0xFFFF).to_bytes(2, "big")


def _addrs(f: bytes | bytearray, inn: Inner) -> tuple[bytes, bytes]:
    ip = inn.ip_off
    if inn.ipver == 4:
        return bytes(f[ip + 12 : ip + 16]), bytes(f[ip + 16 : ip + 20])
    return bytes(f[ip + 8 : ip + 24]), bytes(f[ip + 24 : ip + 40])


def flow_hash(f: bytes | bytearray, inn: Inner, seed: int) -> int:
    if inn.ipver:
        src, dst = _addrs(f, inn)
        key = src + dst + bytes([inn.proto]) + struct.pack("!HH", *(inn.ports or (0, 0)))
        if inn.ports is None:
            key = key[:-4]
    else:
        key = bytes(f[:14])
    return zlib.crc32(key, seed) & 0xFFFFFFFF


def flow_key(f: bytes | bytearray, inn: Inner) -> bytes:
    """The same key for both directions of a flow (lower endpoint first)."""
    src, dst = _addrs(f, inn)
    sp, dp = inn.ports or (0, 0)
    a, b = src + sp.to_bytes(2, "big"), dst + dp.to_bytes(2, "big")
    return bytes([inn.proto]) + min(a, b) + max(a, b)


@dataclass
class PyCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    control: int = 0
    tx_fragmented: int = 0
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    options_seen: dict[tuple[int, int], int] = field(default_factory=dict)
    options_other: int = 0


class PyTunnel:
    def __init__(self, tun: Tunnel, auth: PyAuth | None = None) -> None:
        spec = tun.spec
        self.t = tun
        self.spec = spec
        self.fd = tun.device.fd
        self.mode = spec.mode
        self.mac = tun.device.mac
        self.remote = spec.remote.packed
        self.local = tun.local.packed
        # With authentication the integrity option ends the configured options (the
        # header template carries it unsigned); reflected options go after it.
        self.auth = auth
        options = spec.options
        if spec.auth_class is not None:
            if auth is None:
                raise ValueError(f"{spec.name}: authenticated tunnel without auth state")
            placeholder = auth_option.placeholder(spec.auth_class)
            options += (codec.Option(spec.auth_class, placeholder[2], placeholder[4:]),)
        self.opts = codec.encode_options(options)
        self.auth_off = 8 + len(self.opts) - auth_option.OPT_LEN
        self.hdr = bytearray(codec.encode(codec.Header(vni=spec.vni, options=options)))
        self.iplen = 20 if spec.family == 4 else 40
        self.max_inner = tun.underlay_mtu - (self.iplen + 8 + len(self.hdr))
        self.c = PyCounters()
        # reflect_options: a fixed table of REFLECT_SLOTS flows, as in C; a dict
        # assignment is atomic under the GIL, so readers see old or new entries.
        self.reflect: dict[int, tuple[bytes, bytes]] | None = {} if spec.reflect_options else None


class PyGroupEngine:
    """One receive socket's tunnels driven by Python threads."""

    name = "python"

    def __init__(
        self,
        group: Group,
        stop_fd: int,
        control_fd: int,
        group_index: int,
        seed: int | None = None,
        auth: dict[str, PyAuth] | None = None,
    ) -> None:
        self.group = group
        self.stop_fd = stop_fd
        self.control_fd = control_fd
        self.tag = group_index << 24
        auth = auth or {}
        self.tunnels = [PyTunnel(t, auth.get(t.spec.name)) for t in group.tunnels]
        self.sport_min, self.sport_max = ephemeral_ports()
        self.seed = random.getrandbits(32) if seed is None else seed
        self.ip_id = self.seed & 0xFFFF
        self.sock_drops = dict.fromkeys(SOCKET_DROP_REASONS, 0)
        self.sock_rx = 0
        self.rx_ovfl = 0
        self._threads: list[threading.Thread] = []
        self.results: dict[str, str] = {}
        self._dev_to_idx = {t.fd: i for i, t in enumerate(self.tunnels)}

    # ------------------------------------------------------------- threads

    def start(self) -> None:
        for label, target in (("rx", self._rx_loop), ("tx", self._tx_loop)):
            th = threading.Thread(
                target=self._guard,
                args=(label, target),
                name=f"gdp-{label}-py-v{self.group.family}-{self.group.port}",
                daemon=True,
            )
            th.start()
            self._threads.append(th)

    def _guard(self, label: str, target: object) -> None:
        try:
            target()  # type: ignore[operator]
            self.results[label] = "stopped"
        except Exception as exc:
            self.results[label] = repr(exc)

    def join(self, timeout: float) -> None:
        for th in self._threads:
            th.join(timeout)

    def dead(self) -> str | None:
        for th in self._threads:
            if not th.is_alive():
                return f"{th.name} ended ({self.results.get(th.name.split('-')[1])})"
        return None

    # ------------------------------------------------------------- receive

    def _rx_loop(self) -> None:
        udp = self.group.udp
        cmsg_space = socket.CMSG_SPACE(4) * 3
        while True:
            ready, _, _ = select.select([udp.fileno(), self.stop_fd], [], [])
            if self.stop_fd in ready:
                return
            for _ in range(64):
                try:
                    data, anc, _flags, addr = udp.recvmsg(65536, cmsg_space)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue
                self.sock_rx += 1
                tos = 0
                whole = True  # not reassembled from fragments (IP_RECVFRAGSIZE says so)
                for level, ctype, cdata in anc:
                    if (level, ctype) in _FRAGSIZE:
                        whole = False
                    elif (level, ctype) == (socket.IPPROTO_IP, socket.IP_TOS) and cdata:
                        tos = cdata[0]
                    elif (level, ctype) == (socket.IPPROTO_IPV6, socket.IPV6_TCLASS):
                        tos = int.from_bytes(cdata[:4], "little") & 0xFF
                    elif level == socket.SOL_SOCKET and len(cdata) >= 4:
                        self.rx_ovfl = int.from_bytes(cdata[:4], "little")
                self._rx_one(bytearray(data), addr[0], tos, whole)

    def _rx_one(self, pkt: bytearray, src: str, tos: int, whole: bool = False) -> None:
        try:
            h, off = codec.decode(pkt)
        except codec.DecodeError as exc:
            self.sock_drops[exc.reason] += 1
            return
        src_packed = socket.inet_pton(
            socket.AF_INET if self.group.family == 4 else socket.AF_INET6, src.split("%")[0]
        )
        idx = -1
        vni_seen = False
        for i, t in enumerate(self.tunnels):
            if t.spec.vni != h.vni:
                continue
            vni_seen = True
            if t.remote == src_packed:
                idx = i
                break
        if idx < 0:
            self.sock_drops["wrong_remote" if vni_seen else "unknown_vni"] += 1
            return
        t = self.tunnels[idx]
        c = t.c
        for o in h.options:
            seen_key = (o.opt_class, o.type)
            if seen_key in c.options_seen:
                c.options_seen[seen_key] += 1
            elif len(c.options_seen) < OPTSEEN_SLOTS:
                c.options_seen[seen_key] = 1
            else:
                c.options_other += 1
        # The integrity check comes first: nothing else acts on a packet before it
        # is known to come from the peer (README "Authenticated tunnels").
        auth_off = -1
        if t.auth is not None:
            reason, auth_off = t.auth.verify(pkt)
            if reason is not None:
                c.drops[reason] += 1
                return
        critical = any(o.critical for o in h.options)
        if critical != h.critical:
            c.drops["c_bit_mismatch"] += 1
            return
        # Critical options other than the verified integrity option: unknown to us.
        verified = (t.spec.auth_class, auth_option.OPT_TYPE) if auth_off >= 0 else None
        unknown = False
        for o in h.options:
            if o.critical and (o.opt_class, o.type) == verified:
                verified = None  # the first one, which gdp_auth_find found
            elif o.critical:
                unknown = True
        if unknown:
            c.drops["critical_option"] += 1
            return
        if h.oam:
            c.control += 1
            if self.control_fd >= 0:
                try:
                    os.write(self.control_fd, (self.tag | idx).to_bytes(4, "big") + bytes(pkt))
                except OSError:
                    c.drops["control_queue_full"] += 1
            return
        ok = h.protocol == ETH_P_TEB if t.mode == "tap" else h.protocol in (ETH_P_IPV4, ETH_P_IPV6)
        if not ok:
            c.drops["wrong_protocol"] += 1
            return
        f = pkt[off:]
        inn = parse_inner(f, t.mode)
        if inn is None:
            c.drops["inner_truncated"] += 1
            return
        if t.mode == "tun" and inn.ipver != (4 if h.protocol == ETH_P_IPV4 else 6):
            c.drops["wrong_protocol"] += 1
            return
        if t.mode == "tap" and f[6:12] == t.mac:
            c.drops["own_mac"] += 1
            return
        if tos & 3 == ECN_CE and inn.ipver:
            if inn.ecn == 0:
                c.drops["ecn_not_ect"] += 1
                return
            ip = inn.ip_off
            if inn.ecn != ECN_CE:
                if inn.ipver == 4:
                    f[ip + 1] |= ECN_CE
                    f[ip + 10 : ip + 12] = b"\0\0"
                    ihl = (f[ip] & 15) * 4
                    f[ip + 10 : ip + 12] = inet_csum(f[ip : ip + ihl]).to_bytes(2, "big")
                else:
                    f[ip + 1] |= ECN_CE << 4
        if t.reflect is not None and h.opt_len and inn.ipver:
            key = flow_key(f, inn)
            opts = bytes(pkt[8 : 8 + 4 * h.opt_len])
            if auth_off >= 0:  # the peer's integrity option is not reflected
                opts = opts[: auth_off - 8] + opts[auth_off - 8 + auth_option.OPT_LEN :]
            if opts:
                t.reflect[zlib.crc32(key) % REFLECT_SLOTS] = (key, opts)
        if whole and len(f) > t.max_inner:
            complete_super_checksum(f, inn)
        try:
            os.write(t.fd, f)
        except OSError:
            c.drops["dev_write"] += 1
            return
        c.rx_packets += 1
        c.rx_bytes += len(f)

    # ------------------------------------------------------------- transmit

    def _tx_loop(self) -> None:
        fds = [t.fd for t in self.tunnels]
        while True:
            ready, _, _ = select.select([*fds, self.stop_fd], [], [])
            if self.stop_fd in ready:
                return
            for fd in ready:
                t = self.tunnels[self._dev_to_idx[fd]]
                for _ in range(64):
                    try:
                        frame = os.read(fd, 65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if not frame:
                        break
                    self._tx_one(t, frame)

    def _send(self, t: PyTunnel, datagram: bytes | bytearray) -> bool:
        dst = str(t.spec.remote)
        for _ in range(10):
            try:
                self.group.raw.sendto(datagram, (dst, 0))
                return True
            except (BlockingIOError, InterruptedError):
                select.select([], [self.group.raw], [], 0.01)
            except OSError:
                return False
        return False

    def _tx_one(self, t: PyTunnel, frame: bytes) -> None:
        c = t.c
        inn = parse_inner(frame, t.mode)
        if inn is None:
            c.drops["tx_bad_frame"] += 1
            return
        hdr = t.hdr
        if t.reflect is not None and inn.ipver and len(frame) <= t.max_inner:
            key = flow_key(frame, inn)
            hit = t.reflect.get(zlib.crc32(key) % REFLECT_SLOTS)
            if hit is not None and hit[0] == key:
                olen = len(t.opts) + len(hit[1])
                if olen <= 252 and len(frame) + len(hit[1]) <= t.max_inner:
                    opts = t.opts + hit[1]
                    crit = 0x40 if any(opts[i + 2] & 0x80 for i in _walk(opts)) else 0
                    hdr = bytearray(hdr[:8] + opts)
                    hdr[0] = olen // 4
                    hdr[1] = crit
        hdr = bytearray(hdr)
        proto = ETH_P_TEB if t.mode == "tap" else (ETH_P_IPV4 if inn.ipver == 4 else ETH_P_IPV6)
        hdr[2:4] = proto.to_bytes(2, "big")
        fam = t.spec.family
        udplen = 8 + len(hdr) + len(frame)
        total = t.iplen + udplen
        df = {"set": True, "unset": False}.get(
            t.spec.df, inn.ipver == 6 or (inn.ipver == 4 and inn.df)
        )
        frags = total > t.t.underlay_mtu
        if frags:
            if len(frame) > t.max_inner and inn.ipver and self._too_big(t, frame, inn):
                c.drops["too_big"] += 1
                return
            if df or (total > 65535 if fam == 4 else udplen > 65535):
                c.drops["too_big"] += 1
                return
        span = self.sport_max - self.sport_min + 1
        sport = self.sport_min + ((flow_hash(frame, inn, self.seed) * span) >> 32)
        geneve = hdr + frame
        if t.auth is not None:
            t.auth.sign(geneve, t.auth_off)
        udp = bytearray(struct.pack("!HHHH", sport, t.spec.port, udplen, 0)) + geneve
        if t.spec.tx_udp_csum:
            cs = l4_csum(t.local, t.remote, 17, udp)
            udp[6:8] = (cs or 0xFFFF).to_bytes(2, "big")
        ecn = ECN_ECT0 if inn.ecn == ECN_CE else inn.ecn
        dscp = (inn.dsfield & 0xFC if inn.ipver else 0) if t.spec.tos == "inherit" else t.spec.dscp
        tos = dscp | ecn
        ttl = inn.ttl if t.spec.ttl == "inherit" and inn.ipver else t.t.ttl
        self.ip_id = (self.ip_id + 1) & 0xFFFF or 1
        if fam == 4:
            ip = struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                tos,
                total,
                self.ip_id,
                0x4000 if df else 0,
                ttl,
                17,
                0,
                t.local,
                t.remote,
            )
        else:
            ip = struct.pack(
                "!IHBB16s16s", 0x60000000 | tos << 20, udplen, 17, ttl, t.local, t.remote
            )
        if not frags:
            ok = self._send(t, ip + udp)
        else:
            ok = self._fragment(t, ip, udp)
            c.tx_fragmented += ok
        if ok:
            c.tx_packets += 1
            c.tx_bytes += len(frame)
        else:
            c.drops["tx_error"] += 1

    def _fragment(self, t: PyTunnel, ip: bytes, payload: bytearray) -> bool:
        fam = t.spec.family
        fh = 20 if fam == 4 else 48
        chunk = (t.t.underlay_mtu - fh) & ~7
        off = 0
        while off < len(payload):
            part = payload[off : off + chunk]
            more = off + len(part) < len(payload)
            if fam == 4:
                h = bytearray(ip)
                h[2:4] = (20 + len(part)).to_bytes(2, "big")
                h[6:8] = ((off // 8) | (0x2000 if more else 0)).to_bytes(2, "big")
            else:
                h = bytearray(ip)
                h[6] = 44
                h[4:6] = (8 + len(part)).to_bytes(2, "big")
                h += bytes([17, 0]) + (off | int(more)).to_bytes(2, "big")
                h += self.ip_id.to_bytes(4, "big")
            if not self._send(t, h + part):
                return False
            off += len(part)
        return True

    def _too_big(self, t: PyTunnel, f: bytes, inn: Inner) -> bool:
        """ICMP frag-needed / ICMPv6 packet-too-big into the device (see send_too_big)."""
        l2 = 14 if t.mode == "tap" else 0
        mtu = t.max_inner - l2
        ip = f[inn.ip_off :]
        src, dst = _addrs(f, inn)
        if inn.ipver == 4:
            ihl = (ip[0] & 15) * 4
            if not inn.df or mtu < 576:
                return False
            if ip[9] == 1 and len(ip) > ihl and ip[ihl] in (3, 4, 5, 11, 12):
                return False
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
                return False
            if ip[6] == 58 and len(ip) > 40 and ip[40] < 128:
                return False
            quote = ip[:1232]
            icmp = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu)) + quote
            icmp[2:4] = l4_csum(dst, src, 58, icmp).to_bytes(2, "big")
            out = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), 58, 64, dst, src) + bytes(icmp)
        if l2:
            etype = ETH_P_IPV4 if inn.ipver == 4 else ETH_P_IPV6
            out = f[6:12] + f[0:6] + etype.to_bytes(2, "big") + out
        try:
            os.write(t.fd, out)
        except OSError:
            t.c.drops["dev_write"] += 1
        return True

    # ------------------------------------------------------------- counters

    def counters(self, i: int) -> dict[str, object]:
        c = self.tunnels[i].c
        return {
            **dict.fromkeys(TUNNEL_COUNTERS, 0),  # the offload counters stay 0 here
            "rx_packets": c.rx_packets,
            "rx_bytes": c.rx_bytes,
            "tx_packets": c.tx_packets,
            "tx_bytes": c.tx_bytes,
            "control": c.control,
            "tx_fragmented": c.tx_fragmented,
            "drops": dict(c.drops),
            "options_seen": {
                f"0x{k[0]:04x}:0x{k[1]:02x}": n for k, n in list(c.options_seen.items())
            },
            "options_other": c.options_other,
        }

    def offloads(self, i: int) -> dict[str, bool]:
        """None: the Python engine handles every packet as it is."""
        return dict.fromkeys(
            ("tso", "rx_coalesce_tcp", "rx_coalesce_udp", "udp_gso", "udp_gro", "tx_inject"),
            False,
        )

    def injectable(self, i: int) -> bool:
        """Never injects."""
        return False

    def set_injecting(self, on: bool) -> None:
        """Never injects."""

    def close(self) -> None:
        """Nothing of its own to close: the devices and sockets belong to the group."""

    def socket_counters(self) -> dict[str, object]:
        return {
            "rx_packets": self.sock_rx,
            "rx_packets_per_worker": [self.sock_rx],
            "rx_queue_overflow": self.rx_ovfl,
            "busy_poll_hits": 0,
            "drops": dict(self.sock_drops),
        }


def _walk(opts: bytes) -> list[int]:
    """Offsets of the options in a well-formed option area."""
    out, pos = [], 0
    while pos + 4 <= len(opts):
        out.append(pos)
        pos += 4 + 4 * (opts[pos + 3] & 0x1F)
    return out
