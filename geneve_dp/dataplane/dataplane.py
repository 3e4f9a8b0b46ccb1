"""Dataplane: the object the daemon drives (start, stop, status, check).

Status layout (one dict per tunnel)::

    name, ifindex, vni, remote, local, port, mode, mtu, ttl, tos, df,
    options ("0xCLASS:0xTYPE:HEX" sent), mac (TAP; else None), engine,
    wire_sized (no packet leaves bigger than the underlay MTU; spec.py),
    offloads: {tso, rx_coalesce_tcp, rx_coalesce_udp, udp_gso, udp_gro, tx_inject}
              (what the kernel accepted; tso: the device runs with IFF_VNET_HDR;
              tx_inject: TCP super-frames and UDP runs leave whole through the
              inject device),
    inject_device (its name while tx_inject, else None),
    inject_probes ({left, late, stopped, unseen}: the inject device's probes by outcome,
                   inject.py; None for a tunnel that never injects),
    tx_path: {via: "inject" or "sockets", device (the inject device's name), why},
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
  refuses UDP GSO there) one datagram each by sendmmsg; an authenticated tunnel's
  sockets checksum whatever udp_csum says, for UDP GSO sends of its signed segments
  (each with its own header and MAC). The receive socket gets
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
- Tunnels are added, removed and changed while the others forward (``apply``):
  everything new (devices, sockets, the engines of the ports concerned) is made
  first, and only then each port concerned has its engine swapped. The swap stops
  the old engine's threads at the end of their round (nothing is held inside them
  then) and starts the new ones on the same sockets and device queues, so what
  arrives meanwhile waits in the kernel's queues and nothing is lost; a port no
  tunnel changed is not touched. Counters carry over (``counters`` never go back),
  as does the flow hash seed (a flow keeps its outer source port).
- Marks: the kernel routes the outer packet with the inner skb's mark and keeps
  skb->mark across encapsulation; a TAP/TUN read carries no mark, and frames written
  to the device start with mark 0. A tunnel's ``mark`` (spec) is put on every outer
  packet it sends (SO_MARK on its UDP sockets and its own raw socket; a marked tunnel
  does not inject): for a profile whose tunnel carries inner packets of one mark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import random
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

from pyroute2 import IPRoute

from ..auth.keys import KeyRing
from ..errors import UserError
from . import inject as _inject
from .counters import add_counters
from .endpoint import Group, Tunnel, close_resources, close_tunnel, open_group, open_tunnel
from .inject import PROBE_TRIES, Injector, injectable, open_injector
from .spec import (
    DEFAULT_NICE,
    MAX_BUSY_POLL_US,
    MAX_NICE,
    MAX_WORKERS,
    MIN_BUSY_POLL_US,
    MIN_NICE,
    MIN_WORKERS,
    TunnelSpec,
    check_together,
    spec_to_raw,
    with_auth,
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
        busy_poll_us: int = 0,
        auth_keys: KeyRing | None = None,
        auth_class: int | None = None,
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
        # Authentication (geneve_dp/auth) is for every tunnel of the dataplane or none:
        # each spec given here or to apply() gets the integrity option class. One state
        # per authenticated tunnel, by name (sequence counter, keys, replay windows),
        # lives as long as the tunnel; a supervisor that replaces this dataplane hands
        # them on (auth_states), so windows and sequence numbers carry on.
        if auth_class is not None and auth_keys is None:
            raise UserError("authentication needs a key file", "auth_key_file")
        self.auth_keys = auth_keys
        self.auth_class = auth_class
        self.auth_states: dict[str, Any] = auth_states if auth_states is not None else {}
        specs = with_auth(list(specs), auth_class)
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
        if not MIN_BUSY_POLL_US <= busy_poll_us <= MAX_BUSY_POLL_US:
            raise UserError(
                f"busy poll {busy_poll_us} µs is out of range; accepted: "
                f"{MIN_BUSY_POLL_US}..{MAX_BUSY_POLL_US}",
                field="busy_poll_us",
            )
        # After forwarding, a worker's partner polls for the answer this long before it
        # sleeps (engine.c; C engine only).
        self.busy_poll_us = busy_poll_us if engine == "c" else 0
        # TCP super-frames sent whole through the inject device (inject.py): with the
        # offloads, unless GDP_INJECT=0.
        self.inject = self.offload and os.environ.get("GDP_INJECT", "1") != "0"
        self._injector: Injector | None = None
        self._injecting = False  # what the engines were last told (inject.py)
        # One port's sockets, tunnels and running engine, by (family, port).
        self._ports: dict[tuple[int, int], _Port] = {}
        # Counters of the engines that swaps replaced: by tunnel, and by port.
        self._base: dict[str, dict[str, object]] = {}
        self._sock_base: dict[tuple[int, int], dict[str, object]] = {}
        # Flow hash seed of every engine: a flow keeps its source port across swaps.
        self._seed = random.getrandbits(32)
        # Control-message tags: an engine's id (8 bits) -> its tunnels' names.
        self._tags: dict[int, tuple[str, ...]] = {}
        self._next_tag = itertools.count()
        self._lock = threading.Lock()  # status() against a swap in progress
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
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            if self.control_hook is not None:
                # Bounded queue of O-bit packets: the C side writes without waiting,
                # counting control_queue_full when the buffer is full.
                self._ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._ctl[1].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
                self._ctl[1].setblocking(False)
            specs, self.specs = self.specs, []
            self._apply(specs, renew=())
        except BaseException:
            self._teardown()
            raise
        if self._ctl is not None:
            self._ctl_thread = threading.Thread(
                target=self._control_loop, name="gdp-control", daemon=True
            )
            self._ctl_thread.start()
        self._started = True

    def stop(self) -> None:
        for port in self._ports.values():
            os.eventfd_write(port.stop_fd, 1)
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        for port in self._ports.values():
            port.engine.join(5.0)
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
        for port in self._ports.values():
            port.close()
        close_resources([p.group for p in self._ports.values()])
        self._ports = {}
        if self._injector is not None:
            self._injector.close()
            self._injector = None
        if self._ctl is not None:
            for s in self._ctl:
                s.close()
            self._ctl = None
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    # ------------------------------------------------------------- live changes

    def apply(self, specs: list[TunnelSpec], renew: tuple[str, ...] = ()) -> dict[str, object]:
        """Make the running tunnels ``specs``: add, remove and change tunnels without
        touching the ports nothing changed on (see the module notes). ``renew`` names
        tunnels whose device was deleted: they get a new one (same name and MAC).

        Either all of it is done or, with UserError, none of it. A tunnel's mode
        cannot change (a TAP is not a TUN): remove it and add it again. Returns the
        final counters of the tunnels removed, by name.
        """
        if not self._started:
            raise RuntimeError("the dataplane is not running")
        return self._apply(specs, renew)

    def _apply(self, specs: list[TunnelSpec], renew: tuple[str, ...]) -> dict[str, object]:
        specs = with_auth(specs, self.auth_class)
        if specs:  # none: a reload's moment between removing and adding (live.py)
            check_together(specs)
        old = {s.name: s for s in self.specs}
        for spec in specs:
            was = old.get(spec.name)
            if was is not None and was.mode != spec.mode:
                raise UserError(
                    f"{spec.name}: a {was.mode.upper()} device cannot become a "
                    f"{spec.mode.upper()} one; remove the tunnel and add it again",
                    field="mode",
                )
        live = {t.spec.name: t for p in self._ports.values() for t in p.group.tunnels}
        new = {s.name: s for s in specs}
        keys = {(s.family, s.port) for s in specs}
        # The ports whose engine is swapped: those of a tunnel added, renewed, changed
        # or removed (a changed one's old port too, if it moves).
        touched = {
            (s.family, s.port)
            for s in specs
            if s.name in renew or old.get(s.name) != s or (s.family, s.port) not in self._ports
        }
        touched |= {(s.family, s.port) for n, s in old.items() if new.get(n) != s}
        made_groups: list[Group] = []
        made_tunnels: list[Tunnel] = []
        made_ports: dict[tuple[int, int], _Port] = {}
        injector: Injector | None = None
        mtus: list[tuple[int, int]] = []  # MTUs changed, to put back on failure
        try:
            if self.inject and self._injector is None and any(injectable(s) for s in specs):
                injector = self._injector = open_injector()
                if injector is not None:
                    # A shared device keeps its state: the engines start as it says.
                    self._injecting = injector.on
            with IPRoute() as ipr:
                groups: dict[tuple[int, int], Group] = {}
                for key in sorted(touched & keys):
                    port = self._ports.get(key)
                    if port is None:
                        members = [s for s in specs if (s.family, s.port) == key]
                        group = open_group(key[0], key[1], members, self.offload, self.workers)
                        made_groups.append(group)
                    else:
                        group = port.group
                    groups[key] = dataclasses.replace(group, tunnels=[])
                for spec in specs:
                    key = (spec.family, spec.port)
                    if key not in groups:
                        continue
                    have = live.get(spec.name)
                    if have is None or spec.name in renew:
                        mac = spec.mac
                        if mac is None and have is not None and have.device.mac:
                            mac = ":".join(f"{b:02x}" for b in have.device.mac)
                        tun = open_tunnel(
                            ipr, dataclasses.replace(spec, mac=mac), self.offload, self.workers
                        )
                        tun = dataclasses.replace(tun, spec=spec)
                        made_tunnels.append(tun)
                    elif have.spec == spec:
                        tun = have
                    else:
                        tun = open_tunnel(ipr, spec, self.offload, self.workers, device=have.device)
                        if tun.device.mtu != have.device.mtu:
                            mtus.append((have.device.ifindex, have.device.mtu))
                    groups[key].tunnels.append(tun)
            for key, group in groups.items():
                made_ports[key] = self._make_port(group)
        except BaseException:
            for port in made_ports.values():
                port.close()
            for tun in made_tunnels:
                close_tunnel(tun)
            close_resources(made_groups)
            _put_back_mtus(mtus)
            if injector is not None:
                injector.close()
                self._injector = None
            raise
        return self._swap(specs, made_ports, touched - keys, old, renew)

    def _swap(
        self,
        specs: list[TunnelSpec],
        made: dict[tuple[int, int], _Port],
        gone_ports: set[tuple[int, int]],
        old: dict[str, TunnelSpec],
        renew: tuple[str, ...],
    ) -> dict[str, object]:
        """Stop the engines of the ports concerned and start their successors; then
        carry counters and close what no tunnel uses any more."""
        retired: list[_Port] = []
        final: dict[str, object] = {}
        # Under the lock: status() and check() never see an engine between its
        # pause and its successor's start.
        with self._lock:
            for key in [*made, *gone_ports]:
                was = self._ports.get(key)
                if was is not None:
                    was.pause()
                    retired.append(was)
                if key in made:
                    made[key].engine.start()
            for was in retired:
                key = (was.group.family, was.group.port)
                sock = dict(was.engine.socket_counters())
                self._sock_base[key] = add_counters(self._sock_base.get(key, {}), sock)
                for i, tun in enumerate(was.group.tunnels):
                    name = tun.spec.name
                    self._base[name] = add_counters(
                        self._base.get(name, {}), was.engine.counters(i)
                    )
            for key in gone_ports:
                self._ports.pop(key, None)
                self._sock_base.pop(key, None)
            self._ports.update(made)
            self.specs = list(specs)
            wanted = {s.name for s in specs}
            for name in [n for n in self._base if n not in wanted]:
                final[name] = self._base.pop(name)
        in_use = {t.device.fd for p in self._ports.values() for t in p.group.tunnels}
        for was in retired:
            was.close()
            for tun in was.group.tunnels:
                if tun.device.fd not in in_use:
                    close_tunnel(tun)
            if (was.group.family, was.group.port) in gone_ports:
                close_resources([dataclasses.replace(was.group, tunnels=[])])
        with self._lock:
            given = any(
                p.engine.injectable(i)
                for p in self._ports.values()
                for i in range(len(p.group.tunnels))
            )
            if self._injector is not None and not given:
                # No tunnel writes to the inject device any more: it goes (until one
                # that may is added), so `ip link` keeps nothing unused.
                self._injector.close()
                self._injector = None
        return final

    def _make_port(self, group: Group) -> _Port:
        """A port's engine, built (not started) with its own stop fd and tag."""
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        tag = next(self._next_tag) % 256
        self._tags[tag] = tuple(t.spec.name for t in group.tunnels)
        control_fd = self._ctl[1].fileno() if self._ctl is not None else -1
        try:
            self._make_auth_states(group)
            injector = self._injector
            if self.engine == "c":
                from .engine_c import CGroupEngine

                engine: GroupEngine = CGroupEngine(
                    group,
                    stop_fd,
                    control_fd,
                    tag,
                    nice=self.nice,
                    injector=injector,
                    seed=self._seed,
                    busy_poll_us=self.busy_poll_us,
                    auth=self.auth_states,
                )
            else:
                from .engine_py import PyGroupEngine

                engine = PyGroupEngine(
                    group, stop_fd, control_fd, tag, seed=self._seed, auth=self.auth_states
                )
            if injector is not None:
                engine.set_injecting(self._injecting)
        except BaseException:
            os.close(stop_fd)
            raise
        return _Port(group, engine, stop_fd)

    def _make_auth_states(self, group: Group) -> None:
        """A state for each authenticated tunnel of ``group`` that has none yet."""
        for tun in group.tunnels:
            spec = tun.spec
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
        with self._lock:
            self.auth_keys = ring
            for state in self.auth_states.values():
                state.set_keys(ring)

    def _auth_status(self, spec: TunnelSpec) -> dict[str, object] | None:
        if spec.auth_class is None or self.auth_keys is None:
            return None
        return {
            "option_class": f"0x{spec.auth_class:04x}",
            "key_ids": [i for i, _ in self.auth_keys.keys],
            "send_key_id": self.auth_keys.send_id,
        }

    def check(self) -> None:
        """Raise RuntimeError if a worker thread died."""
        if not self._started:
            return
        with self._lock:
            for port in self._ports.values():
                why = port.engine.dead()
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
        tuns = [t for p in self._ports.values() for t in p.group.tunnels if injectable(t.spec)]
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
        for port in self._ports.values():
            port.engine.set_injecting(on)

    # ------------------------------------------------------------- control messages

    def _control_loop(self) -> None:
        assert self._ctl is not None and self.control_hook is not None
        reader = self._ctl[0]
        # Each message starts with a 4-byte tag: engine tag << 24 | tunnel index.
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
            names = self._tags.get(tag >> 24, ())
            index = tag & 0xFFFFFF
            if index >= len(names):
                continue
            with contextlib.suppress(Exception):  # a failing hook must not stop the reader
                self.control_hook(names[index], msg[4:])

    # ------------------------------------------------------------- status

    def status(self) -> list[dict[str, object]]:
        """One dict per tunnel, in the order of ``specs`` (module notes)."""
        with self._lock:
            return self._status()

    def _status(self) -> list[dict[str, object]]:
        rows: dict[str, dict[str, object]] = {}
        inj = self._injector
        inject = inj.name if inj is not None else None
        for key, port in self._ports.items():
            eng = port.engine
            live_sock = dict(eng.socket_counters())
            sock = add_counters(live_sock, self._sock_base.get(key, {}))
            # The kernel's overflow count is the socket's running total, not a delta.
            sock["rx_queue_overflow"] = max(
                int(live_sock.get("rx_queue_overflow", 0)),  # type: ignore[call-overload]
                int(self._sock_base.get(key, {}).get("rx_queue_overflow", 0)),  # type: ignore[call-overload]
            )
            sock = {"family": key[0], "port": key[1], **sock}
            for i, tun in enumerate(port.group.tunnels):
                spec = tun.spec
                offloads = eng.offloads(i)
                rows[spec.name] = {
                    "name": spec.name,
                    "ifindex": tun.device.ifindex,
                    "vni": spec.vni,
                    "remote": str(spec.remote),
                    "local": str(tun.local),
                    "port": spec.port,
                    "mode": spec.mode,
                    "mtu": tun.device.mtu,
                    "ttl": spec.ttl,
                    "tos": spec.tos,
                    "df": spec.df,
                    "options": spec_to_raw(spec)["options"],
                    "mac": ":".join(f"{b:02x}" for b in tun.device.mac) or None,
                    "engine": eng.name,
                    "wire_sized": spec.wire_sized,
                    "offloads": offloads,
                    "inject_device": inject if offloads["tx_inject"] else None,
                    "inject_probes": (
                        dict(inj.probes) if inj is not None and eng.injectable(i) else None
                    ),
                    "tx_path": self._tx_path(spec, offloads, eng.injectable(i)),
                    "counters": add_counters(eng.counters(i), self._base.get(spec.name, {})),
                    "auth": self._auth_status(spec),
                    "socket": sock,
                }
        return [rows[s.name] for s in self.specs if s.name in rows]

    def _tx_path(
        self, spec: TunnelSpec, offloads: dict[str, bool], given: bool
    ) -> dict[str, str | None]:
        """How the tunnel's packets leave, and why that way: ``via`` "inject" (the
        inject device, named in ``device``) or "sockets"."""
        inj = self._injector
        if offloads["tx_inject"] and inj is not None:
            return {
                "via": "inject",
                "device": inj.name,
                "why": "IPv4 without UDP checksums: TCP super-frames and UDP runs are written "
                f"whole to {inj.name}, which the kernel forwards to the underlay",
            }
        how = (
            "one UDP GSO send per super-frame"
            if offloads["udp_gso"]
            else "one datagram per packet or segment"
        )
        if self.engine != "c":
            why = "the Python engine sends packet by packet"
        elif not self.offload:
            why = "offloads are off (--no-offload or GDP_OFFLOAD=0)"
        elif not offloads["tso"]:
            why = "the kernel refused the device's offloads"
        elif not self.inject:
            why = "GDP_INJECT=0"
        elif spec.family == 6:
            why = "IPv6 underlay: UDP checksums are on, and the sockets' UDP GSO serves"
        elif spec.tx_udp_csum:
            why = "--udp-csum: the sockets' UDP GSO serves"
        elif spec.auth_class is not None:
            why = (
                "authenticated: one MAC per wire packet, so segments are signed here and "
                "the sockets (with UDP checksums) send them by UDP GSO"
            )
        elif spec.ttl == "inherit":
            why = "--ttl inherit: each packet's TTL is its own, written by the raw socket"
        elif isinstance(spec.ttl, int) and spec.ttl >= 255:
            why = "TTL 255: forwarding through the inject device would take one off"
        elif inj is None:
            why = f"no inject device: {inject_refusal() or 'not made'}"
        elif given and not self._injecting:
            why = (
                f"probes written to {inj.name} did not leave by the underlay (a FORWARD "
                "rule or policy, no route, no neighbour?); injecting again once one leaves"
            )
        else:
            why = "not injecting"
        return {"via": "sockets", "device": None, "why": f"{why}; {how}"}

    def worker_threads(self) -> int:
        """Forwarding threads alive (a receive and a transmit thread per worker and
        receive socket while all is well)."""
        return sum(
            th.is_alive()
            for port in list(self._ports.values())
            for th in getattr(port.engine, "_threads", ())
        )


@dataclasses.dataclass
class _Port:
    """One (family, port): its sockets and tunnels (``group``) and the engine running
    them, stopped by ``stop_fd`` alone."""

    group: Group
    engine: GroupEngine
    stop_fd: int

    def pause(self) -> None:
        """Stop the engine's threads (each at the end of its round)."""
        os.eventfd_write(self.stop_fd, 1)
        self.engine.join(5.0)

    def close(self) -> None:
        self.engine.close()
        if self.stop_fd >= 0:
            os.close(self.stop_fd)
            self.stop_fd = -1


def _put_back_mtus(mtus: list[tuple[int, int]]) -> None:
    """Undo the MTU changes of an apply that failed."""
    if not mtus:
        return
    with contextlib.suppress(Exception), IPRoute() as ipr:
        for index, mtu in mtus:
            ipr.link("set", index=index, mtu=mtu)


def inject_refusal() -> str:
    """Why open_injector() last made no device (inject.py logs it too)."""
    return _inject.refusal
