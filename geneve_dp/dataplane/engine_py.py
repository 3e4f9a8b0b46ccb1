"""The pure-Python engine: the same endpoint semantics as the C engine (csrc/) with the
per-packet loop in Python (geneve_dp.codec). The baseline in benchmarks and the oracle
in tests; never the default (ARCHITECTURE rule 1)."""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import zlib
from dataclasses import dataclass, field

from .. import codec
from ..auth import option as auth_option
from ..auth.mac import PyAuth
from .endpoint import IP_RECVFRAGSIZE, IPV6_RECVFRAGSIZE, Group, Tunnel, ephemeral_ports
from .packet import (
    REFLECT_SLOTS,
    Control,
    Drop,
    RxTunnel,
    Send,
    TooBig,
    TxTunnel,
    decap,
    encap,
)
from .reasons import DROP_REASONS, SOCKET_DROP_REASONS, TUNNEL_COUNTERS

OPTSEEN_SLOTS = 32


_FRAGSIZE = {(socket.IPPROTO_IP, IP_RECVFRAGSIZE), (socket.IPPROTO_IPV6, IPV6_RECVFRAGSIZE)}


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
        self.rx = RxTunnel(
            spec.vni,
            self.remote,
            spec.mode,
            self.mac,
            self.max_inner,
            spec.reflect_options,
            auth=auth,
            auth_class=spec.auth_class,
        )
        self.tx = TxTunnel(
            mode=spec.mode,
            family=spec.family,
            hdr=bytes(self.hdr),
            opts=self.opts,
            local=self.local,
            remote=self.remote,
            port=spec.port,
            underlay_mtu=tun.underlay_mtu,
            max_inner=self.max_inner,
            df=spec.df,
            tos_inherit=spec.tos == "inherit",
            dscp=spec.dscp,
            ttl_inherit=spec.ttl == "inherit",
            ttl=tun.ttl,
            udp_csum=spec.tx_udp_csum,
            auth=auth,
            auth_off=self.auth_off,
        )


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
        self._rx_views = [t.rx for t in self.tunnels]
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
        src_packed = socket.inet_pton(
            socket.AF_INET if self.group.family == 4 else socket.AF_INET6, src.split("%")[0]
        )
        v = decap(pkt, src_packed, tos, self._rx_views, whole)
        if isinstance(v, Drop) and v.tunnel is None:
            self.sock_drops[v.reason] += 1
            return
        assert v.tunnel is not None
        t = self.tunnels[v.tunnel]
        c = t.c
        for seen_key in v.options:
            if seen_key in c.options_seen:
                c.options_seen[seen_key] += 1
            elif len(c.options_seen) < OPTSEEN_SLOTS:
                c.options_seen[seen_key] = 1
            else:
                c.options_other += 1
        if isinstance(v, Drop):
            c.drops[v.reason] += 1
        elif isinstance(v, Control):
            c.control += 1
            if self.control_fd >= 0:
                try:
                    os.write(self.control_fd, (self.tag | v.tunnel).to_bytes(4, "big") + v.packet)
                except OSError:
                    c.drops["control_queue_full"] += 1
        else:
            if v.reflect is not None and t.reflect is not None:
                key, opts = v.reflect
                t.reflect[zlib.crc32(key) % REFLECT_SLOTS] = (key, opts)
            try:
                os.write(t.fd, v.frame)
            except OSError:
                c.drops["dev_write"] += 1
                return
            c.rx_packets += 1
            c.rx_bytes += len(v.frame)

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
        raw = self.group.raw_for(t.spec.mark)
        for _ in range(10):
            try:
                raw.sendto(datagram, (dst, 0))
                return True
            except (BlockingIOError, InterruptedError):
                select.select([], [raw], [], 0.01)
            except OSError:
                return False
        return False

    def _tx_one(self, t: PyTunnel, frame: bytes) -> None:
        c = t.c
        r = encap(
            frame,
            t.tx,
            ip_id=self.ip_id,
            sport_range=(self.sport_min, self.sport_max),
            seed=self.seed,
            reflect=t.reflect,
        )
        if isinstance(r, Drop):
            c.drops[r.reason] += 1
            return
        if isinstance(r, TooBig):
            c.drops["too_big"] += 1
            if r.icmp is not None:
                try:
                    os.write(t.fd, r.icmp)
                except OSError:
                    c.drops["dev_write"] += 1
            return
        assert isinstance(r, Send)
        self.ip_id = r.ip_id
        ok = all(self._send(t, d) for d in r.datagrams)
        if ok:
            c.tx_fragmented += len(r.datagrams) > 1
            c.tx_packets += 1
            c.tx_bytes += r.inner_len
        else:
            c.drops["tx_error"] += 1

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
