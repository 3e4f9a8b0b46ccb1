"""The C engine: fills the C structs from open resources and runs gdp_engine_run in
two threads per receive socket (one per direction), with the GIL released by cffi."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from typing import Any

from .. import clib
from ..auth import option as auth_option
from ..codec import encode_options
from ..errors import UserError
from ..fastpath import ffi, lib
from .endpoint import Group, Tunnel, ephemeral_ports, set_mark
from .inject import Injector, injectable
from .reasons import DROP_REASONS, SOCKET_DROP_REASONS, TUNNEL_COUNTERS
from .spread import bind_port_block

REFLECT_SLOTS = 1024
GSO_SOCKETS = 8  # struct gdp_tunnel.gso_fds

# linux/in.h, in6.h, udp.h, socket.h values the socket module does not name
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2
SO_NO_CHECK = 11
UDP_SEGMENT = 103

log = logging.getLogger("geneve_dp.dataplane")

_SETUP_RC = {
    lib.GDP_E_ENGINE_TOO_MANY: f"at most {lib.GDP_MAX_TUNNELS} tunnels share one port",
    lib.GDP_E_ENGINE_BUFFER: "engine buffers too small",
    lib.GDP_E_ENGINE_CONFIG: "engine configuration rejected (family, mode or MTU)",
    lib.GDP_E_ENGINE_HEADER: "GENEVE header template could not be encoded",
}


class EngineSetupError(UserError):
    """A negative return code of gdp_tunnel_prepare or gdp_engine_init: a set of
    tunnels the engine cannot take, said in one line like any bad input."""

    def __init__(self, rc: int) -> None:
        self.rc = rc
        super().__init__(_SETUP_RC.get(rc, f"engine setup failed with {rc}"), "tunnel")


def _check(rc: int) -> None:
    if rc < 0:
        raise EngineSetupError(rc)


_DF = {"unset": lib.GDP_DF_UNSET, "set": lib.GDP_DF_SET, "inherit": lib.GDP_DF_INHERIT}


_PR_SET_NAME = 15


def _name_thread(name: str) -> None:
    """The thread's name as the kernel shows it (top -H, ps -L, /proc/PID/task/*/comm):
    at most 15 bytes."""
    clib.libc().prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


_nice_refused = threading.Event()


def _set_thread_nice(nice: int) -> None:
    """Run the calling thread at ``nice``: forwarding then wins the CPU from the
    programs whose packets it forwards, as the kernel's own softirq processing does
    (a sender that outruns its tunnel otherwise fills the device queue with packets
    that are dropped, on CPU time the forwarding needed)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        if not _nice_refused.is_set():
            _nice_refused.set()
            log.warning(
                "cannot run the workers at nice %d (%s; needs CAP_SYS_NICE); "
                "they run at the normal priority",
                nice,
                exc.strerror,
            )


class _Worker:
    """One C engine's memory: its tunnel structs, socket counters and buffers."""

    def __init__(self, tunnels: Any, stats: Any) -> None:
        self.tunnels = tunnels
        self.stats = stats
        self._mem = ffi.new("uint8_t[]", lib.gdp_engine_size())
        self.engine = ffi.cast("struct gdp_engine *", self._mem)
        self.bufs = ffi.new("uint8_t[]", lib.gdp_engine_buffers_size())


class CGroupEngine:
    """One port's tunnels driven by the C loop: per worker (one receive socket and one
    queue of each device) a receive and a transmit thread."""

    name = "c"

    def __init__(
        self,
        group: Group,
        stop_fd: int,
        control_fd: int,
        group_index: int,
        nice: int = 0,
        injector: Injector | None = None,
        seed: int | None = None,
        busy_poll_us: int = 0,
        auth: dict[str, Any] | None = None,
    ) -> None:
        self.group = group
        self.nice = nice
        n = len(group.tunnels)
        self._keep: list[Any] = []
        self._inject_ok: set[int] = set()  # tunnels given the inject device
        self._fds: list[int] = []  # busy polling's eventfds
        self.sockets: list[socket.socket] = []
        self.tunnels = ffi.new("struct gdp_tunnel[]", n)
        for i, tun in enumerate(group.tunnels):
            spec, t = tun.spec, self.tunnels[i]
            t.dev_fd = tun.device.fd
            t.raw_fd = group.raw_for(spec.mark).fileno()
            t.mode = lib.GDP_MODE_TAP if spec.mode == "tap" else lib.GDP_MODE_TUN
            t.family = spec.family
            t.vni = spec.vni
            t.port = spec.port
            ffi.memmove(t.remote, spec.remote.packed, len(spec.remote.packed))
            ffi.memmove(t.local, tun.local.packed, len(tun.local.packed))
            if tun.device.mac:
                ffi.memmove(t.mac, tun.device.mac, 6)
            t.ttl = 0 if spec.ttl == "inherit" else tun.ttl  # engine.h: 0 is inherit
            t.tos = spec.dscp
            t.tos_set = (
                lib.GDP_TOS_INHERIT
                if spec.tos == "inherit"
                else lib.GDP_TOS_FIXED
                if spec.tos is not None
                else lib.GDP_TOS_UNSET
            )
            t.df = _DF[spec.df]
            t.udp_csum = spec.tx_udp_csum
            t.underlay_mtu = tun.underlay_mtu
            t.vnet_hdr = tun.device.vnet_hdr
            t.rx_uso = tun.device.rx_uso
            t.dev_mtu = tun.device.mtu
            name = tun.underlay_dev.encode()[:15]
            ffi.memmove(t.underlay_ifname, name, len(name))
            if injector and tun.device.vnet_hdr and injectable(spec) and 0 < t.ttl < 255:
                self._inject_ok.add(i)
                t.inject = 1
                t.inj_fd = injector.fd
                ffi.memmove(t.inj_mac, injector.mac, 6)
            if tun.device.vnet_hdr and spec.df != "inherit" and spec.ttl != "inherit":
                # TSO segments leave through UDP sockets with UDP GSO (one send per
                # super-frame). Per-packet DF and TTL cannot be set there, so df and
                # ttl inherit keep the raw socket. The kernel refuses UDP GSO without a
                # checksum (EINVAL with SO_NO_CHECK): with the IPv4 default of checksum 0
                # the segments go one datagram each by sendmmsg on these connected
                # sockets (their cached route saves the raw socket's route lookup per
                # packet).
                # wire_sized: one datagram per segment even with checksums, so no
                # UDP GSO super-packet crosses the underlay whole.
                # Authenticated: these sockets checksum whatever --udp-csum says, so
                # that UDP GSO takes each super-frame's signed segments in one send
                # (the kernel cuts at the segment size and leaves the payloads, MACs
                # included, untouched); the MAC already guards the bytes, the outer
                # checksum is the kernel's or the NIC's work.
                gso = (spec.tx_udp_csum or spec.auth_class is not None) and not spec.wire_sized
                t.gso_nocsum = not gso
                for k, sock in enumerate(self._gso_sockets(tun, gso)):
                    t.gso_fds[k] = sock.fileno()
                    t.gso_ports[k] = sock.getsockname()[1]
                    t.n_gso = k + 1
            opts = encode_options(spec.options)
            if spec.auth_class is not None:
                # The integrity option ends the configured options, signed per packet.
                opts += auth_option.placeholder(spec.auth_class)
                state = (auth or {})[spec.name]
                self._keep.append(state)
                t.auth = state.ptr
            ffi.memmove(t.opts, opts, len(opts))
            t.opts_len = len(opts)
            if spec.reflect_options:
                table = ffi.new("struct gdp_reflect_entry[]", REFLECT_SLOTS)
                self._keep.append(table)
                t.reflect = table
                t.reflect_slots = REFLECT_SLOTS
            _check(lib.gdp_tunnel_prepare(self.tunnels + i))
        # One C engine per worker: its own receive socket and device queues, copies of
        # the tunnel structs (counters apart, summed when read), the same flow hash
        # seed (a flow's source port must not depend on the worker) and the same
        # reflection tables and transmit sockets.
        sport_min, sport_max = ephemeral_ports()
        hash_seed = random.getrandbits(32) if seed is None else seed
        ip_id = random.getrandbits(16)
        self.workers: list[_Worker] = []
        nworkers = len(group.udps)
        for k, udp in enumerate(group.udps):
            if k == 0:
                tunnels = self.tunnels
            else:
                tunnels = ffi.new("struct gdp_tunnel[]", n)
                ffi.memmove(tunnels, self.tunnels, ffi.sizeof("struct gdp_tunnel") * n)
                for i, tun in enumerate(group.tunnels):
                    tunnels[i].dev_fd = tun.device.fds[k]
            cfg = ffi.new("struct gdp_engine_config *")
            cfg.family = group.family
            cfg.udp_fd = udp.fileno()
            cfg.raw_fd = group.raw.fileno()
            cfg.stop_fd = stop_fd
            cfg.control_fd = control_fd
            cfg.sport_min, cfg.sport_max = sport_min, sport_max
            cfg.hash_seed = hash_seed
            cfg.ip_id_start = (ip_id + k * (65536 // nworkers)) & 0xFFFF
            cfg.control_tag = group_index << 24
            cfg.kick_rx_fd = cfg.kick_tx_fd = -1
            if busy_poll_us:
                # One eventfd per direction: the other side kicks it (engine.h).
                cfg.busy_poll_ns = busy_poll_us * 1000
                cfg.kick_rx_fd, cfg.kick_tx_fd = self._kick_fds()
            w = _Worker(tunnels, ffi.new("struct gdp_sock_stats *"))
            _check(lib.gdp_engine_init(w.engine, cfg, tunnels, n, w.bufs, len(w.bufs), w.stats))
            self.workers.append(w)
        self._threads: list[threading.Thread] = []
        self.results: dict[str, int] = {}

    def _gso_sockets(self, tun: Tunnel, gso: bool) -> list[socket.socket]:
        """Connected UDP sockets for TSO segments, on consecutive source ports
        (spread.py); none when ``gso`` (UDP GSO sends wanted) and the kernel refuses
        UDP_SEGMENT: the raw socket then sends them."""
        spec = tun.spec
        af = socket.AF_INET if spec.family == 4 else socket.AF_INET6
        if gso:
            s = socket.socket(af, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 1400)
            except OSError as exc:
                log.warning(
                    "%s: the kernel refuses UDP GSO (%s); TSO segments go one by one",
                    spec.name,
                    exc.strerror,
                )
                return []
            finally:
                s.close()

        def make() -> socket.socket:
            s = socket.socket(af, socket.SOCK_DGRAM)
            try:
                # The TOS without ECN bits: sends whose TOS is this one carry no IP
                # cmsg and so keep the socket's cached route (csrc/txq.c gso_send).
                tos = spec.dscp
                if spec.family == 4:
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, tun.ttl)
                    pmtu = IP_PMTUDISC_DO if spec.df == "set" else IP_PMTUDISC_DONT
                    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, pmtu)
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, tun.ttl)
                if not (spec.tx_udp_csum or gso):
                    s.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read
                if spec.mark:
                    set_mark(s, spec.mark)
            except BaseException:
                s.close()
                raise
            return s

        local = str(tun.local)
        out = bind_port_block(make, GSO_SOCKETS, local, ephemeral_ports())
        if out is None:  # no free block: any ports, spread as the hash falls
            out = []
            try:
                for _ in range(GSO_SOCKETS):
                    out.append(make())
                    out[-1].bind((local, 0))
            except BaseException:
                for s in out:
                    s.close()
                raise
        self.sockets.extend(out)
        for s in out:
            s.connect((str(spec.remote), spec.port))
            s.setblocking(False)
        return out

    def _kick_fds(self) -> tuple[int, int]:
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self._fds.extend(fds)
        return fds[0], fds[1]

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets = []
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def start(self) -> None:
        for k, w in enumerate(self.workers):
            for label, dirs in (("rx", lib.GDP_DIR_RX), ("tx", lib.GDP_DIR_TX)):
                th = threading.Thread(
                    target=self._run,
                    args=(w, f"{label}{k}", dirs),
                    name=f"gdp-{label}{k}-v{self.group.family}-{self.group.port}",
                    daemon=True,
                )
                th.start()
                self._threads.append(th)

    def _run(self, w: _Worker, label: str, dirs: int) -> None:
        _name_thread(threading.current_thread().name)
        if self.nice:
            _set_thread_nice(self.nice)
        self.results[label] = lib.gdp_engine_run(w.engine, dirs)

    def join(self, timeout: float) -> None:
        for th in self._threads:
            th.join(timeout)

    def dead(self) -> str | None:
        """Why a worker ended, if one did."""
        for th in self._threads:
            if not th.is_alive():
                label = th.name.split("-")[1]
                rc = self.results.get(label)
                return f"{th.name} ended (rc {rc})"
        return None

    def counters(self, i: int) -> dict[str, object]:
        """Tunnel i's counters, summed over the workers."""
        seen: dict[str, int] = {}
        drops = dict.fromkeys(DROP_REASONS, 0)
        totals = dict.fromkeys(TUNNEL_COUNTERS, 0)
        other = 0
        for w in self.workers:
            c = w.tunnels[i].counters
            for s in range(lib.GDP_OPTSEEN_SLOTS):
                q = c.options_seen[s]
                if not q.used:
                    break
                key = f"0x{q.opt_class:04x}:0x{q.type:02x}"
                seen[key] = seen.get(key, 0) + int(q.count)
            for k, name in enumerate(DROP_REASONS):
                drops[name] += int(c.drops[k])
            for k, name in enumerate(TUNNEL_COUNTERS):
                totals[name] += int(lib.gdp_counter_get(ffi.addressof(c), k))
            other += int(c.options_other)
        return {**totals, "drops": drops, "options_seen": seen, "options_other": other}

    def offloads(self, i: int) -> dict[str, bool]:
        """Which offloads tunnel i runs with (what the kernel accepted at start)."""
        t = self.tunnels[i]
        return {
            "tso": bool(t.vnet_hdr),  # TCP super-frames read, segmented here
            "rx_coalesce_tcp": bool(t.vnet_hdr),  # TCP segments written as super-frames
            "rx_coalesce_udp": bool(t.rx_uso),  # UDP runs written as UDP_L4 super-frames
            "udp_gso": bool(t.n_gso and not t.gso_nocsum),  # one sendmsg per super-frame
            "udp_gro": self.group.udp_gro,
            "tx_inject": bool(t.inject),  # super-frames whole through the inject device
        }

    def injectable(self, i: int) -> bool:
        """Whether tunnel i was given the inject device (it injects while that is on)."""
        return i in self._inject_ok

    def set_injecting(self, on: bool) -> None:
        """Inject (or segment here) from the next frame on; the engine reads the flag
        per frame."""
        for w in self.workers:
            for i in self._inject_ok:
                w.tunnels[i].inject = int(on)

    def socket_counters(self) -> dict[str, object]:
        """The port's receive counters, summed over the workers' sockets."""
        stats = [w.stats for w in self.workers]
        return {
            "rx_packets": sum(int(s.rx_packets) for s in stats),
            "rx_packets_per_worker": [int(s.rx_packets) for s in stats],
            "rx_queue_overflow": sum(int(s.rx_queue_overflow) for s in stats),
            # Rounds of busy polling that found packets (engine.h; 0 while it is off).
            "busy_poll_hits": sum(int(s.busy_poll_hits_rx + s.busy_poll_hits_tx) for s in stats),
            "drops": {
                name: sum(int(s.drops[k]) for s in stats)
                for k, name in enumerate(DROP_REASONS)
                if name in SOCKET_DROP_REASONS
            },
        }
