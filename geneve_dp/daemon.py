"""The supervisor of a running dataplane: an asyncio program on a uvloop loop.

It owns everything that is not per-packet: starting the engines, putting addresses on
the devices (and back, if someone deletes them), opening a device again when someone
deletes it, serving `show`/`stats` on its control socket (control.py), watching the
worker threads and tearing down on SIGINT/SIGTERM.

A deleted TAP/TUN device cannot be given back to the engine that had it (its fd is dead
for good), so the whole dataplane is started again; counters carry on from where the old
one stopped, so they never go backwards.

With a metrics address it also serves Prometheus ``/metrics`` (metrics.py), and once
per pass it checks drop rates against an alarm threshold (alarms.py).

Netlink goes through pyroute2's synchronous API in the default executor: uvloop
refuses AF_NETLINK endpoints, and ``uvloop.install()`` would make pyroute2 fail even
in threads, so the loop comes from ``asyncio.Runner(loop_factory=...)`` instead
(ARCHITECTURE rule 5).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import alarms, control, logs
from .auth.keys import load_key_file
from .auth.settings import AuthSettings
from .dataplane.spec import DEFAULT_NICE, TunnelSpec
from .errors import UserError
from .netns import netns_inode

if TYPE_CHECKING:  # imported when used: prometheus_client only for --metrics-addr
    from .metrics import MetricsServer

log = logging.getLogger("geneve_dp.daemon")

RECONCILE_INTERVAL = 1.0
ALARM_INTERVAL = 1.0
# How often the devices' presence is checked: an ioctl per device (no netlink), cheap
# enough to do often, so a deleted device is back well within 2 seconds.
DEVICE_CHECK_INTERVAL = 0.2
REPAIR_LOG = 16  # repairs kept for `show`


def check_names_free(specs: list[TunnelSpec]) -> None:
    """Refuse a device name that is already taken, before creating anything."""
    for spec in specs:
        try:
            socket.if_nametoindex(spec.name)
        except OSError:
            continue
        raise UserError(
            f"a device named {spec.name!r} already exists (another `geneve-dp up`, or "
            f"remove it with `ip link del {spec.name}`)",
            field="name",
        )


class Daemon:
    """Runs one Dataplane until told to stop."""

    def __init__(
        self,
        specs: list[TunnelSpec],
        engine: str,
        pidfile: Path | None = None,
        offload: bool | None = None,
        workers: int | None = None,
        nice: int = DEFAULT_NICE,
        metrics_addr: tuple[str, int] | None = None,
        drop_alarm: float = alarms.DEFAULT_THRESHOLD,
        auth: AuthSettings | None = None,
    ) -> None:
        self.specs = specs
        self.auth = auth
        # Per authenticated tunnel: sequence counter, keys and replay windows, kept
        # over dataplane restarts (Dataplane auth_states).
        self._auth_states: dict[str, Any] = {}
        self.nice = nice
        self.engine = engine
        self.offload = offload
        self.workers = workers
        self.metrics_addr = metrics_addr
        self.alarm = alarms.DropAlarm(log, drop_alarm)
        self.pidfile = pidfile
        self.sock_path = control.socket_path(os.getpid())
        self.control_messages: list[dict[str, Any]] = []
        self._control_log = logs.Throttle(log, "control_message", "control messages")
        self.repairs: list[str] = []
        self.restarts = 0
        self._stop: asyncio.Event | None = None
        self._dataplane: Any = None
        # Counters of dataplanes replaced by a restart, per tunnel name and for the
        # sockets by (family, port): added to the live ones in status.
        self._carried: dict[str, dict[str, Any]] = {}
        self._carried_sock: dict[tuple[Any, Any], dict[str, Any]] = {}
        self._retry_at = 0.0
        self._ipr: Any = None  # pyroute2 IPRoute, used from the executor only
        self._prober: Any = None  # netconf.probe.Prober, opened on first use

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[str], None]) -> int:
        """Bring everything up, call ``on_ready`` with a summary, serve until stopped."""

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        check_names_free(self.specs)
        self._dataplane = self._new_dataplane()
        server: asyncio.base_events.Server | None = None
        # Listening first: a taken metrics port is refused before any device exists.
        metrics = await self._start_metrics()
        started: list[dict[str, Any]] = []
        try:
            await loop.run_in_executor(None, self._dataplane.start)
            await loop.run_in_executor(None, self._apply_addresses, False)
            await loop.run_in_executor(None, self._announce)
            server = await control.serve(self.sock_path, self.status)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self.reload_keys)
            if self.pidfile is not None:
                self.pidfile.write_text(f"{os.getpid()}\n")
            names = ", ".join(s.name for s in self.specs)
            started = self._dataplane.status()
            for t in started:
                log.info(
                    "tunnel %s up: VNI %s to %s port %s, %s, MTU %s",
                    t["name"],
                    t["vni"],
                    t["remote"],
                    t["port"],
                    t["mode"],
                    t["mtu"],
                    extra={"event": "tunnel_up", "device": t["name"], "vni": t["vni"]},
                )
            extra = f", metrics {metrics.url}" if metrics is not None else ""
            on_ready(f"ready: {names} (pid {os.getpid()}, control {self.sock_path}{extra})")
            rc = await self._supervise()
        finally:
            if server is not None:
                server.close()
            if metrics is not None:
                metrics.close()
            await loop.run_in_executor(None, self._dataplane.stop)
            self._control_log.close()
            await loop.run_in_executor(None, self._close_netlink)
            if self._prober is not None:
                self._prober.close()
            for path in (self.sock_path, self.pidfile):
                if path is not None:
                    path.unlink(missing_ok=True)
        for t in started:
            log.info(
                "tunnel %s down",
                t["name"],
                extra={"event": "tunnel_down", "device": t["name"], "vni": t["vni"]},
            )
        log.info("stopped; devices removed")
        return rc

    async def _start_metrics(self) -> MetricsServer | None:
        if self.metrics_addr is None:
            return None
        from . import metrics

        host, port = self.metrics_addr
        server = await metrics.MetricsServer.start(host, port, self.status)
        if not metrics.is_loopback(host):
            log.warning(
                "metrics on %s are reachable from other hosts: counters and tunnel "
                "addresses are readable by anyone who can connect",
                server.url,
            )
        return server

    def status(self) -> dict[str, Any]:
        """What `show`/`stats` and /metrics read: the counters as of now (with those of
        dataplanes replaced after a device was deleted added in)."""
        return {
            "pid": os.getpid(),
            "engine": self.engine,
            "offload": self._dataplane.offload,
            "netns_id": netns_inode(),
            "workers": self._dataplane.workers,
            "worker_threads": self._dataplane.worker_threads(),
            "tunnels": self._status(),
            "control_messages": self.control_messages,
            "restarts": self.restarts,
            "repairs": self.repairs,
        }

    async def _supervise(self) -> int:
        assert self._stop is not None
        loop = asyncio.get_running_loop()
        next_reconcile = next_alarm = loop.time() + RECONCILE_INTERVAL
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), DEVICE_CHECK_INTERVAL)
            except TimeoutError:
                pass
            if self._stop.is_set():
                break
            self._control_log.flush()
            try:
                self._dataplane.check()
            except RuntimeError as exc:
                log.error("a worker died: %s; shutting down", exc, extra={"event": "worker_died"})
                return 1
            if loop.time() >= next_alarm:  # rates over whole seconds, as the alarm states
                next_alarm = loop.time() + ALARM_INTERVAL
                self.alarm.update(time.monotonic(), self._status())
            gone = [s.name for s in self.specs if self._probe().link_up(s.name) is None]
            if gone:
                await self._restart(gone)
                next_reconcile = loop.time() + RECONCILE_INTERVAL
            elif loop.time() >= next_reconcile:
                next_reconcile = loop.time() + RECONCILE_INTERVAL
                if not self._devices_as_specified():
                    try:
                        await loop.run_in_executor(None, self._apply_addresses, True)
                    except Exception as exc:  # keep forwarding; the next pass tries again
                        log.error("reconcile pass failed: %s", exc)
        return 0

    async def _restart(self, gone: list[str]) -> None:
        """Open the devices again after someone deleted ``gone``: a new dataplane."""

        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            return
        old = self._dataplane
        await loop.run_in_executor(None, old.stop)
        # The same MAC as before: the peers' neighbour caches stay right.
        macs = {str(t["name"]): t.get("mac") for t in old.final_status}
        self._carry(old.final_status)
        old.final_status = []  # carried once, even if the next start fails
        self.specs = [
            dataclasses.replace(s, mac=macs[s.name]) if s.mac is None and macs.get(s.name) else s
            for s in self.specs
        ]
        new = self._new_dataplane()
        try:
            await loop.run_in_executor(None, new.start)
            await loop.run_in_executor(None, self._apply_addresses, False)
            await loop.run_in_executor(None, self._announce)
        except (UserError, OSError) as exc:
            # Say so and try again on the next check (a name taken by someone else
            # may be freed); status shows no tunnels meanwhile.
            self._dataplane = new
            self._retry_at = loop.time() + RECONCILE_INTERVAL
            log.error("device %s was deleted; opening it again failed: %s", ", ".join(gone), exc)
            return
        self._dataplane = new
        self.restarts += 1
        self._repaired(
            f"device {', '.join(gone)} was deleted; opened again (dataplane restarted)",
            ", ".join(gone),
        )

    def _new_dataplane(self) -> Any:
        """A Dataplane for the specs with this daemon's settings (at start, and again
        when a deleted device is opened anew)."""
        from .dataplane import Dataplane

        return Dataplane(
            self.specs,
            engine=self.engine,
            control_hook=self._on_control,
            offload=self.offload,
            workers=self.workers,
            nice=self.nice,
            auth_keys=self.auth.keys if self.auth is not None else None,
            auth_states=self._auth_states,
        )

    def reload_keys(self) -> bool:
        """Read the auth key file again and put it in force (SIGHUP). A file that does
        not pass the checks changes nothing: the keys in force stay, with a log line."""
        if self.auth is None:
            log.warning("SIGHUP: no auth key file to reload", extra={"event": "auth_reload"})
            return False
        try:
            keys = load_key_file(self.auth.key_file, "auth_key_file")
        except UserError as exc:
            log.error(
                "auth keys not reloaded, the ones in force stay: %s",
                exc,
                extra={"event": "auth_reload_failed"},
            )
            return False
        self.auth = dataclasses.replace(self.auth, keys=keys)
        self._dataplane.set_auth_keys(keys)
        ids = [i for i, _ in keys.keys]
        log.info(
            "auth keys reloaded from %s: key IDs %s, signing with %d",
            self.auth.key_file,
            ids,
            keys.send_id,
            extra={"event": "auth_reload", "key_ids": ids, "send_key_id": keys.send_id},
        )
        return True

    def _repaired(self, message: str, device: str, **extra: str) -> None:
        log.warning("%s", message, extra={"event": "repair", "device": device, **extra})
        self.repairs.append(message)
        del self.repairs[:-REPAIR_LOG]

    def _carry(self, status: list[dict[str, Any]]) -> None:
        for t in status:
            name = str(t["name"])
            self._carried[name] = add_counters(self._carried.get(name, {}), t["counters"])
        for key, sock in _sockets(status).items():
            self._carried_sock[key] = add_counters(self._carried_sock.get(key, {}), sock)

    def _status(self) -> list[dict[str, Any]]:
        """The live dataplane's status with the counters of replaced ones added."""
        out = []
        for t in self._dataplane.status():
            t = dict(t)
            t["counters"] = add_counters(t["counters"], self._carried.get(str(t["name"]), {}))
            key = (t["socket"]["family"], t["socket"]["port"])
            sock = {k: v for k, v in t["socket"].items() if k not in ("family", "port")}
            carried = self._carried_sock.get(key, {})
            t["socket"] = {"family": key[0], "port": key[1], **add_counters(sock, carried)}
            out.append(t)
        return out

    def _on_control(self, name: str, packet: bytes) -> None:
        # O-bit packets are control messages (RFC 8926 §3.4): never data. Keep the last
        # few for `show` and log them, rate-limited (a flood is counted, not logged one
        # by one); there is no control protocol to speak yet.
        self._control_log.info("control message on %s: %d bytes", name, len(packet), device=name)
        self.control_messages.append(
            {"tunnel": name, "length": len(packet), "hex": packet[:64].hex()}
        )
        del self.control_messages[:-16]

    # -- netlink (runs in the executor) ------------------------------------------------------

    def _probe(self) -> Any:
        """The daemon's Prober (netconf/probe.py): one socket and file for its life, so
        the looks every DEVICE_CHECK_INTERVAL open no file descriptor."""
        from .netconf.probe import Prober

        if self._prober is None:
            self._prober = Prober()
        return self._prober

    def _devices_as_specified(self) -> bool:
        """Every device up with its addresses, by ioctl and /proc (probe.py): the
        periodic look costs no netlink, so pyroute2 runs only to repair."""
        probe = self._probe()
        v4 = probe.ipv4_addresses()
        v6 = probe.ipv6_addresses()
        for spec in self.specs:
            if probe.link_up(spec.name) is False:
                return False
            for iface in spec.addresses:
                if iface.version == 4 and str(iface.ip) not in v4.get(spec.name, set()):
                    return False
                if iface.version == 6 and (str(iface.ip), iface.network.prefixlen) not in v6.get(
                    spec.name, set()
                ):
                    return False
        return True

    def _apply_addresses(self, reconcile: bool) -> None:
        """Put each spec's addresses on its device and the link up; on reconcile, put back
        whatever was removed since."""
        from pyroute2 import IPRoute

        # One netlink socket, kept: repairs are rare (probe.py decides when), and a
        # failed call closes it so the next repair opens a fresh one.
        if self._ipr is None:
            self._ipr = IPRoute()
        try:
            self._apply_with(self._ipr, reconcile)
        except BaseException:
            self._close_netlink()
            raise

    def _close_netlink(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _apply_with(self, ipr: Any, reconcile: bool) -> None:
        for spec in self.specs:
            links = ipr.link_lookup(ifname=spec.name)
            if not links:
                continue  # the engine noticed, or will: not ours to recreate here
            index = links[0]
            link = ipr.get_links(index)[0]
            if not link["flags"] & 1:  # IFF_UP
                if reconcile:
                    self._repaired(f"{spec.name} was set down; set up again", spec.name)
                ipr.link("set", index=index, state="up")
            present = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)
            }
            for iface in spec.addresses:
                if (str(iface.ip), iface.network.prefixlen) in present:
                    continue
                if reconcile:
                    self._repaired(
                        f"{spec.name} lost address {iface}; added back",
                        spec.name,
                        address=str(iface),
                    )
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                    )
                except Exception as exc:  # pyroute2 raises NetlinkError
                    if getattr(exc, "code", None) == errno.EEXIST:
                        continue
                    raise UserError(
                        f"cannot add {iface} to {spec.name}: {exc}", "addresses"
                    ) from exc

    def _announce(self) -> None:
        """Gratuitous ARP for the IPv4 addresses of each TAP device (announce.py)."""
        from .dataplane.announce import announce

        macs = {str(t["name"]): t.get("mac") for t in self._dataplane.status()}
        for spec in self.specs:
            mac = macs.get(spec.name)
            ips = [i.ip for i in spec.addresses if i.version == 4]
            if spec.mode == "tap" and mac and ips:
                announce(spec.name, bytes.fromhex(str(mac).replace(":", "")), ips)


def add_counters(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` + ``b`` key by key, into nested dicts; keys of either are kept."""
    out: dict[str, Any] = dict(a)
    for key, value in b.items():
        mine = out.get(key)
        if isinstance(value, dict):
            out[key] = add_counters(mine if isinstance(mine, dict) else {}, value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = (mine if isinstance(mine, int) else 0) + value
        else:
            out.setdefault(key, value)
    return out


def _sockets(status: list[dict[str, Any]]) -> dict[tuple[Any, Any], dict[str, Any]]:
    """Each receive socket's counters once (tunnels on one port share them)."""
    out = {}
    for t in status:
        sock = t["socket"]
        out[(sock["family"], sock["port"])] = {
            k: v for k, v in sock.items() if k not in ("family", "port")
        }
    return out
