"""Dataplane: the object the daemon drives (start, stop, status, check).

Status layout (one dict per tunnel)::

    name, ifindex, vni, remote, local, port, mode, mtu, mac (TAP; else None), engine,
    wire_sized (no packet leaves bigger than the underlay MTU; spec.py),
    offloads: {tso, rx_coalesce_tcp, rx_coalesce_udp, udp_gso, udp_gro, tx_inject}
              (what the kernel accepted; tso: the device runs with IFF_VNET_HDR;
              tx_inject: TCP super-frames and UDP runs leave whole through the
              inject device),
    inject_device (its name while tx_inject, else None),
    inject_probes ({left, late, stopped, unseen}: the inject device's probes by outcome,
                   inject.py; None for a tunnel that never injects),
    counters: {rx_packets, rx_bytes, tx_packets, tx_bytes, control, tx_fragmented,
               tx_gso_frames (TSO super-frames segmented; offload only),
               rx_gro_frames (super-frames written to the device; offload only),
               tx_injected (super-frames sent whole through the inject device),
               drops: {reason: n for every name in DROP_REASONS},
               options_seen: {"0xCLASS:0xTYPE": n}, options_other},
    socket:   {family, port, rx_packets, rx_packets_per_worker, rx_queue_overflow,
               drops: {reason: n for every name in SOCKET_DROP_REASONS}}

Drops that cannot be attributed to a tunnel (bad header, unknown VNI, wrong outer
source) are counted on the receive socket; ``socket`` is that socket's counters, so
tunnels sharing a port show the same ``socket`` numbers (sum them once per port). The
socket-level names stay at zero in ``counters.drops``.

Design notes (the kernel geneve contract, and where this differs):

- One UDP socket per (family, port) and worker receives for every tunnel on it;
  tunnels are found by VNI and outer source address. Transmit goes through a raw
  IPPROTO_RAW socket with header inclusion, so the UDP source port can follow the
  inner flow hash (drawn from the netns' ephemeral port range). The kernel does not
  fragment such packets (EMSGSIZE above the device MTU), so the engines fragment the
  outer packet themselves when an inner IPv4 packet without DF does not fit (DF
  unset, as the kernel).
- Outer source address and underlay MTU are resolved once, at start.
- A zero UDP checksum over IPv6 is accepted per socket, not per tunnel: any tunnel on
  the port with udp6_zero_csum_rx turns UDP_NO_CHECK6_RX on for the port (as the
  kernel's shared socket). Refused packets are dropped by the kernel's UDP layer
  (Udp6 InCsumErrors), so they appear in no counter here.
- O-bit packets go to ``control_hook(name, geneve_packet)`` through a bounded datagram
  socket pair; when it is full they are counted as control_queue_full.
- Offload (C engine only; the default, ``offload=False`` or GDP_OFFLOAD=0 turns it
  off; the Python engine ignores it) opens the devices with IFF_VNET_HDR and
  TSO/checksum offloads: TCP super-frames are segmented in C on transmit, and received
  in-order TCP segments are coalesced into GSO super-frames. When df is not
  "inherit", the segments leave through 8 per-tunnel connected UDP sockets whose ports
  are then the flows' source ports: with UDP checksums (IPv6 by default, IPv4 with
  udp_csum) as one UDP GSO send per super-frame, without (the IPv4 default; the kernel
  refuses UDP GSO there) one datagram each by sendmmsg. The receive socket gets
  UDP_GRO and C splits what it returns. A refused offload (TUNSETOFFLOAD, UDP_GRO,
  UDP_SEGMENT) is left off with a log line.
- Without UDP checksums (the IPv4 default) a TCP super-frame goes whole instead, when
  the kernel has UDP tunnel GSO on TAP (Linux 6.17+): written with its outer headers
  to one inject device per process (inject.py), which the kernel forwards to the
  underlay and segments only where a device must; through a veth the peer receives
  the super-packet itself and writes it to its device as one GSO frame. Runs of one
  UDP flow go the same way (UDP_L4 super-frames). A probe every 5 s turns it off (log
  line) once what is written there enters and no longer leaves, and on again (log
  line) once a probe leaves; a supervisor scheduled late counts for nothing
  (inject.py).
- Workers (C engine; default one per two cores): every device gets one queue per worker
  (IFF_MULTI_QUEUE) and every port one SO_REUSEPORT receive socket per worker. The
  kernel keeps a flow on one queue and one socket, so a flow's packets stay in order;
  each worker is a receive and a transmit thread. Counters are summed over workers.
  The workers run at nice -10 (``nice``; 0 leaves them alone): the kernel's tunnels
  forward in softirq, ahead of every task, and a userspace one that shares the CPU
  evenly with a sender who outruns it spends that sender's surplus on packets the
  device queue then drops.
- Not reproduced: the kernel routes the outer packet with the inner skb's mark and
  keeps skb->mark across encapsulation; a TAP/TUN read carries no mark, and frames
  written to the device start with mark 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..auth.keys import KeyRing
from ..errors import UserError
from .endpoint import Group, close_resources, open_resources
from .inject import PROBE_TRIES, Injector, injectable, open_injector
from .spec import (
    DEFAULT_NICE,
    MAX_NICE,
    MAX_WORKERS,
    MIN_NICE,
    MIN_WORKERS,
    TunnelSpec,
    check_together,
)

ControlHook = Callable[[str, bytes], None]

log = logging.getLogger("geneve_dp.dataplane")


def default_workers() -> int:
    """One worker per two cores this process may run on (GDP_WORKERS overrides).

    A worker is two threads (receive and transmit), so this is one forwarding thread
    per core. Measured here (2 cores, `python -m tests.endpoint_helpers perf -r3
    c+offload+w1 c+offload+w2`): one worker per endpoint delivered 190-224 kpps of
    64-byte UDP where two delivered 91-152 kpps, the machine then idling a fifth of
    the time in cross-CPU wakeups; single-stream TCP was the same.
    """
    env = os.environ.get("GDP_WORKERS")
    if env:
        try:
            return int(env)
        except ValueError:
            raise UserError(f"GDP_WORKERS={env!r} is not a number", field="workers") from None
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) // 2))


class GroupEngine(Protocol):
    name: str

    def start(self) -> None: ...
    def join(self, timeout: float) -> None: ...
    def dead(self) -> str | None: ...
    def counters(self, i: int) -> dict[str, object]: ...
    def offloads(self, i: int) -> dict[str, bool]: ...
    def socket_counters(self) -> dict[str, object]: ...
    def injectable(self, i: int) -> bool: ...
    def set_injecting(self, on: bool) -> None: ...
    def close(self) -> None: ...


class Dataplane:
    """Tunnel endpoints for ``specs`` run by the ``engine`` ("c" or "python")."""

    def __init__(
        self,
        specs: list[TunnelSpec],
        engine: str = "c",
        control_hook: ControlHook | None = None,
        offload: bool | None = None,
        workers: int | None = None,
        nice: int = DEFAULT_NICE,
        auth_keys: KeyRing | None = None,
        auth_states: dict[str, Any] | None = None,
    ) -> None:
        if engine not in ("c", "python"):
            raise UserError(f"{engine!r} is not one of c, python", field="engine")
        if workers is None:
            workers = default_workers()
        if not MIN_WORKERS <= workers <= MAX_WORKERS:
            raise UserError(
                f"{workers} workers is out of range; accepted: {MIN_WORKERS}..{MAX_WORKERS}",
                field="workers",
            )
        check_together(specs)
        self.specs = list(specs)
        self.engine = engine
        self.control_hook = control_hook
        # TSO/checksum offload through IFF_VNET_HDR (C engine only): on unless turned
        # off, here or with GDP_OFFLOAD=0 in the environment. Where the kernel refuses
        # an offload, that one is left off with a log line (endpoint.py, engine_c.py).
        if offload is None:
            offload = os.environ.get("GDP_OFFLOAD", "1") != "0"
        self.offload = offload and engine == "c"
        # The Python engine is a baseline and an oracle: one worker, always.
        self.workers = workers if engine == "c" else 1
        if not MIN_NICE <= nice <= MAX_NICE:
            raise UserError(
                f"nice {nice} is out of range; accepted: {MIN_NICE}..{MAX_NICE}", field="nice"
            )
        self.nice = nice
        # Authentication (geneve_dp/auth): one state per authenticated tunnel, by
        # name: sequence counter, key ring, replay windows. A supervisor that
        # replaces this dataplane hands them on (auth_states), so the windows and the
        # sequence numbers carry on over the restart.
        authed = [s.name for s in specs if s.auth_class is not None]
        if authed and auth_keys is None:
            raise UserError(f"{authed[0]} authenticates but no key was given", "auth_key_file")
        self.auth_keys = auth_keys
        self.auth_states: dict[str, Any] = auth_states if auth_states is not None else {}
        # TCP super-frames sent whole through the inject device (inject.py): with the
        # offloads, unless GDP_INJECT=0.
        self.inject = self.offload and os.environ.get("GDP_INJECT", "1") != "0"
        self._injector: Injector | None = None
        self._injecting = False  # what the engines were last told (inject.py)
        self._groups: list[Group] = []
        self._engines: list[GroupEngine] = []
        self._stop_fd = -1
        self._ctl: tuple[socket.socket, socket.socket] | None = None
        self._ctl_thread: threading.Thread | None = None
        self._started = False
        self.final_status: list[dict[str, object]] = []

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._started:
            return
        try:
            self._make_auth_states()
            self._groups = open_resources(self.specs, offload=self.offload, workers=self.workers)
            if self.inject and any(injectable(s) for s in self.specs):
                self._injector = open_injector()
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            control_fd = -1
            if self.control_hook is not None:
                # Bounded queue of O-bit packets: the C side writes without waiting,
                # counting control_queue_full when the buffer is full.
                self._ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._ctl[1].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
                self._ctl[1].setblocking(False)
                control_fd = self._ctl[1].fileno()
            for gi, group in enumerate(self._groups):
                self._engines.append(self._make_engine(group, control_fd, gi))
        except BaseException:
            self._teardown()
            raise
        if self._injector is not None:
            # A shared device keeps its state: the engines start as it says.
            self._set_injecting(self._injector.on)
        for eng in self._engines:
            eng.start()
        if self._ctl is not None:
            self._ctl_thread = threading.Thread(
                target=self._control_loop, name="gdp-control", daemon=True
            )
            self._ctl_thread.start()
        self._started = True

    def _make_auth_states(self) -> None:
        for spec in self.specs:
            if spec.auth_class is None or spec.name in self.auth_states:
                continue
            assert self.auth_keys is not None
            if self.engine == "c":
                from ..auth.cauth import CAuth

                self.auth_states[spec.name] = CAuth(self.auth_keys, spec.auth_class)
            else:
                from ..auth.mac import PyAuth

                self.auth_states[spec.name] = PyAuth(self.auth_keys, spec.auth_class)

    def set_auth_keys(self, ring: KeyRing) -> None:
        """Put a new key ring in force on every authenticated tunnel, without a stop."""
        self.auth_keys = ring
        for state in self.auth_states.values():
            state.set_keys(ring)

    def _make_engine(self, group: Group, control_fd: int, gi: int) -> GroupEngine:
        if self.engine == "c":
            from .engine_c import CGroupEngine

            return CGroupEngine(
                group,
                self._stop_fd,
                control_fd,
                gi,
                nice=self.nice,
                injector=self._injector,
                auth=self.auth_states,
            )
        from .engine_py import PyGroupEngine

        return PyGroupEngine(group, self._stop_fd, control_fd, gi, auth=self.auth_states)

    def stop(self) -> None:
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        for eng in self._engines:
            eng.join(5.0)
        if self._ctl_thread is not None:
            self._ctl_thread.join(5.0)
            self._ctl_thread = None
        # The counters once the workers are done: a supervisor that replaces this
        # dataplane carries them on (nothing counts between this and the teardown).
        if self._started:
            self.final_status = self.status()
        self._teardown()
        self._started = False

    def _teardown(self) -> None:
        for eng in self._engines:
            eng.close()
        close_resources(self._groups)
        if self._injector is not None:
            self._injector.close()
            self._injector = None
        self._groups = []
        self._engines = []
        if self._ctl is not None:
            for s in self._ctl:
                s.close()
            self._ctl = None
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    def check(self) -> None:
        """Raise RuntimeError if a worker thread died."""
        if not self._started:
            return
        for eng in self._engines:
            why = eng.dead()
            if why is not None:
                raise RuntimeError(f"dataplane worker died: {why}")
        if self._ctl_thread is not None and not self._ctl_thread.is_alive():
            raise RuntimeError("dataplane control reader died")
        self._check_inject()

    def _check_inject(self) -> None:
        """Probe the inject device's way out now and then (inject.py) and have the
        engines inject or segment as the probes say, with one log line per change."""
        inj = self._injector
        if inj is None:
            return
        tuns = [t for g in self._groups for t in g.tunnels if injectable(t.spec)]
        if not tuns:
            return
        on = inj.check(str(tuns[0].local), str(tuns[0].spec.remote))
        if on == self._injecting:
            return
        self._set_injecting(on)
        names = ", ".join(t.spec.name for t in tuns)
        if on:
            log.info(
                "%s: a probe written to %s left by the underlay again: TCP super-frames "
                "and UDP runs leave whole again",
                names,
                inj.name,
                extra={"event": "inject_on", "device": inj.name},
            )
        else:
            log.warning(
                "%s: %d probes in a row entered %s and did not leave by the underlay (a "
                "FORWARD rule or policy, no route, no neighbour?): TCP super-frames are "
                "segmented here until a probe leaves again (next in %.0f s, then less often)",
                names,
                PROBE_TRIES,
                inj.name,
                inj.retry,
                extra={"event": "inject_off", "device": inj.name},
            )

    def _set_injecting(self, on: bool) -> None:
        self._injecting = on
        for eng in self._engines:
            eng.set_injecting(on)

    # ------------------------------------------------------------- control messages

    def _control_loop(self) -> None:
        assert self._ctl is not None and self.control_hook is not None
        reader = self._ctl[0]
        names = {
            (gi, ti): t.spec.name
            for gi, g in enumerate(self._groups)
            for ti, t in enumerate(g.tunnels)
        }
        # Each message starts with a 4-byte tag: group index << 24 | tunnel index.
        while True:
            ready, _, _ = select.select([reader.fileno(), self._stop_fd], [], [], 1.0)
            if self._stop_fd in ready:
                return
            if reader.fileno() not in ready:
                continue
            try:
                msg = reader.recv(70000)
            except OSError:
                return
            if len(msg) < 4:
                continue
            tag = int.from_bytes(msg[:4], "big")
            name = names.get((tag >> 24, tag & 0xFFFFFF))
            if name is None:
                continue
            with contextlib.suppress(Exception):  # a failing hook must not stop the reader
                self.control_hook(name, msg[4:])

    # ------------------------------------------------------------- status

    def status(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        inj = self._injector
        inject = inj.name if inj is not None else None
        for group, eng in zip(self._groups, self._engines, strict=False):
            sock = {"family": group.family, "port": group.port, **eng.socket_counters()}
            for i, tun in enumerate(group.tunnels):
                spec = tun.spec
                offloads = eng.offloads(i)
                out.append(
                    {
                        "name": spec.name,
                        "ifindex": tun.device.ifindex,
                        "vni": spec.vni,
                        "remote": str(spec.remote),
                        "local": str(tun.local),
                        "port": spec.port,
                        "mode": spec.mode,
                        "mtu": tun.device.mtu,
                        "mac": ":".join(f"{b:02x}" for b in tun.device.mac) or None,
                        "engine": eng.name,
                        "wire_sized": spec.wire_sized,
                        "offloads": offloads,
                        "inject_device": inject if offloads["tx_inject"] else None,
                        "inject_probes": (
                            dict(inj.probes) if inj is not None and eng.injectable(i) else None
                        ),
                        "counters": eng.counters(i),
                        "auth": self._auth_status(spec),
                        "socket": sock,
                    }
                )
        return out

    def _auth_status(self, spec: TunnelSpec) -> dict[str, object] | None:
        if spec.auth_class is None or self.auth_keys is None:
            return None
        return {
            "option_class": f"0x{spec.auth_class:04x}",
            "key_ids": [i for i, _ in self.auth_keys.keys],
            "send_key_id": self.auth_keys.send_id,
        }

    def worker_threads(self) -> int:
        """Forwarding threads alive (a receive and a transmit thread per worker and
        receive socket while all is well)."""
        return sum(th.is_alive() for eng in self._engines for th in getattr(eng, "_threads", ()))
