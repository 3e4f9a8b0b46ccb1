"""The supervisor of a running dataplane: an asyncio program on a uvloop loop.

It owns everything that is not per-packet: starting the engines, putting addresses on
the devices (and back, if someone deletes them), opening a device again when someone
deletes it, serving `show`/`stats` and the live changes (`up` of another tunnel,
`down`, `set`, a config reload) on its control socket (control.py), watching the
worker threads and tearing down on SIGINT/SIGTERM or when its last tunnel is removed.

A live change is worked out first (live.py: refused whole, with the field named, or
done whole), then applied by the dataplane, which touches only the ports concerned.
A deleted TAP/TUN device cannot be given back to the engine that had it (its fd is dead
for good): while its tunnel is configured, a new device of the same name and MAC is
opened and only its port's engine is swapped; counters carry on, never backwards.
`down` is how a tunnel is removed for good.

With a metrics address it also serves Prometheus ``/metrics`` (metrics.py), and once
per pass it checks drop rates against an alarm threshold (alarms.py).

Netlink goes through pyroute2's synchronous API in the default executor: uvloop
refuses AF_NETLINK endpoints, and ``uvloop.install()`` would make pyroute2 fail even
in threads, so the loop comes from ``asyncio.Runner(loop_factory=...)`` instead
(ARCHITECTURE rule 5).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from . import alarms, control, live, logs
from .auth.keys import load_key_file
from .auth.settings import AuthSettings
from .dataplane.spec import DEFAULT_NICE, TunnelSpec, build_spec, load_config
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
CHANGE_WAIT = 10.0  # seconds a stop waits for a live change in progress


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
        busy_poll_us: int = 0,
        metrics_addr: tuple[str, int] | None = None,
        drop_alarm: float = alarms.DEFAULT_THRESHOLD,
        config: Path | None = None,
        auth: AuthSettings | None = None,
    ) -> None:
        self.specs = specs
        # Authenticated tunnels (geneve_dp/auth): the key file and option class for
        # every tunnel of this process, and per tunnel its sequence counter, keys and
        # replay windows, kept over dataplane restarts.
        self.auth = auth
        self._auth_states: dict[str, Any] = {}
        # The file the tunnels came from: SIGHUP (or `up --config` of the same file)
        # makes the running tunnels those it then lists.
        self.config = config.resolve() if config is not None else None
        self.drop_alarm = drop_alarm
        self.nice = nice
        self.busy_poll_us = busy_poll_us
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
        # Held while the tunnels change (a request, a reload, a repair): one at a time,
        # and the device checks wait, so a device removed on purpose is not put back.
        self._changing: asyncio.Lock | None = None
        self._retry_at = 0.0
        self._ipr: Any = None  # pyroute2 IPRoute, used from the executor only
        self._prober: Any = None  # netconf.probe.Prober, opened on first use

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[str], None]) -> int:
        """Bring everything up, call ``on_ready`` with a summary, serve until stopped."""

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._changing = asyncio.Lock()
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
            server = await control.serve(self.sock_path, self.status, self._command)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
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
            # A change in progress (its netlink calls in the executor) finishes first:
            # the dataplane is never stopped under it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changing.acquire(), CHANGE_WAIT)
            await loop.run_in_executor(None, self._dataplane.stop)
            self._control_log.close()
            await loop.run_in_executor(None, self._close_netlink)
            if self._prober is not None:
                self._prober.close()
            if server is not None:  # ours: whatever else was at its path stays
                self.sock_path.unlink(missing_ok=True)
            if self.pidfile is not None:
                self.pidfile.unlink(missing_ok=True)
        for t in self._dataplane.final_status:
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
        """What `show`/`stats` and /metrics read: the counters as of now (carried over
        every engine swap, so they never go back)."""
        return {
            "pid": os.getpid(),
            "engine": self.engine,
            "offload": self._dataplane.offload,
            "netns_id": netns_inode(),
            "workers": self._dataplane.workers,
            "worker_threads": self._dataplane.worker_threads(),
            "nice": self.nice,
            "busy_poll_us": self.busy_poll_us,
            "metrics_addr": list(self.metrics_addr) if self.metrics_addr else None,
            "drop_alarm": self.drop_alarm,
            "config": str(self.config) if self.config is not None else None,
            "auth_key_file": str(self.auth.key_file) if self.auth is not None else None,
            "auth_option_class": self.auth.option_class if self.auth is not None else None,
            "tunnels": self._dataplane.status(),
            "control_messages": self.control_messages,
            "restarts": self.restarts,
            "repairs": self.repairs,
        }

    async def _supervise(self) -> int:
        assert self._stop is not None
        loop = asyncio.get_running_loop()
        next_reconcile = next_alarm = loop.time() + RECONCILE_INTERVAL
        assert self._changing is not None
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), DEVICE_CHECK_INTERVAL)
            except TimeoutError:
                pass
            if self._stop.is_set():
                break
            self._control_log.flush()
            if self._changing.locked():
                continue  # devices come and go on purpose meanwhile
            try:
                self._dataplane.check()
            except RuntimeError as exc:
                log.error("a worker died: %s; shutting down", exc, extra={"event": "worker_died"})
                return 1
            if loop.time() >= next_alarm:  # rates over whole seconds, as the alarm states
                next_alarm = loop.time() + ALARM_INTERVAL
                self.alarm.update(time.monotonic(), self._dataplane.status())
            gone = [s.name for s in self.specs if self._probe().link_up(s.name) is None]
            if gone:
                async with self._changing:
                    await self._renew(gone)
                next_reconcile = loop.time() + RECONCILE_INTERVAL
            elif loop.time() >= next_reconcile:
                next_reconcile = loop.time() + RECONCILE_INTERVAL
                if not self._devices_as_specified():
                    try:
                        await loop.run_in_executor(None, self._apply_addresses, True)
                    except Exception as exc:  # keep forwarding; the next pass tries again
                        log.error("reconcile pass failed: %s", exc)
        return 0

    async def _renew(self, gone: list[str]) -> None:
        """Open the devices ``gone`` again (someone deleted them): same name and MAC,
        a new engine on their ports only (dataplane.apply)."""

        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            return
        try:
            await loop.run_in_executor(None, self._dataplane.apply, self.specs, tuple(gone))
        except (UserError, OSError) as exc:
            # Say so and try again later (a name taken by someone else may be freed).
            self._retry_at = loop.time() + RECONCILE_INTERVAL
            log.error("device %s was deleted; opening it again failed: %s", ", ".join(gone), exc)
            return
        # Counted and said once the device is back, before its addresses: whoever sees
        # them also sees the repair.
        self.restarts += 1
        self._repaired(
            f"device {', '.join(gone)} was deleted; opened again (`geneve-dp down` removes "
            "a tunnel for good)",
            ", ".join(gone),
        )
        try:
            await loop.run_in_executor(None, self._apply_addresses, False)
            await loop.run_in_executor(None, self._announce)
        except (UserError, OSError) as exc:  # the reconcile pass puts them back later
            log.error("device %s is back; its addresses failed: %s", ", ".join(gone), exc)

    # -- live changes (requests on the control socket, SIGHUP) ---------------------------

    async def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        """A change request (control.py passes all but status here): the reply, with
        ``error`` and ``field`` when it was refused (and nothing changed)."""
        assert self._changing is not None
        cmd = request.get("cmd")
        try:
            async with self._changing:
                if cmd == "add":
                    return await self._add(list(request.get("tunnels") or []))
                if cmd == "down":
                    return await self._down([str(n) for n in request.get("names") or []])
                if cmd == "set":
                    return await self._set(str(request.get("name")), request.get("changes") or {})
                if cmd == "reload":
                    return await self._reload(request.get("tunnels"))
                if cmd == "reload-keys":
                    return self._reload_keys_reply()
        except UserError as exc:
            return {"error": str(exc), "field": exc.field}
        return {"error": f"unknown request {cmd!r}; {control.ACCEPTED}"}

    async def _apply(self, specs: list[TunnelSpec]) -> dict[str, Any]:
        """Apply ``specs`` (dataplane.apply) and set up their devices' addresses."""
        loop = asyncio.get_running_loop()
        before = {s.name: s for s in self.specs}
        final: dict[str, Any] = await loop.run_in_executor(None, self._dataplane.apply, specs)
        self.specs = list(specs)
        dropped = {
            s.name: [a for a in before[s.name].addresses if a not in s.addresses]
            for s in specs
            if s.name in before
        }
        await loop.run_in_executor(None, self._drop_addresses, dropped)
        await loop.run_in_executor(None, self._apply_addresses, False)
        await loop.run_in_executor(None, self._announce)
        return final

    def _row(self, name: str) -> dict[str, Any]:
        return next(t for t in self._dataplane.status() if t["name"] == name)

    def _log_up(self, name: str, how: str = "up") -> None:
        t = self._row(name)
        log.info(
            "tunnel %s %s: VNI %s to %s port %s, %s, MTU %s",
            name,
            how,
            t["vni"],
            t["remote"],
            t["port"],
            t["mode"],
            t["mtu"],
            extra={"event": f"tunnel_{how}", "device": name, "vni": t["vni"]},
        )

    def _log_down(self, name: str, counters: Any) -> None:
        c = counters if isinstance(counters, dict) else {}
        log.info(
            "tunnel %s down: rx %s packets, tx %s packets",
            name,
            c.get("rx_packets", 0),
            c.get("tx_packets", 0),
            extra={"event": "tunnel_down", "device": name},
        )

    async def _add(self, raws: list[Any]) -> dict[str, Any]:
        if not all(isinstance(r, dict) for r in raws):
            raise UserError("each tunnel must be an object of spec keys", "tunnels")
        specs = live.added(self.specs, raws)
        new = specs[len(self.specs) :]
        check_names_free(new)
        await self._apply(specs)
        for spec in new:
            self._log_up(spec.name)
        return {"pid": os.getpid(), "added": [self._row(s.name) for s in new]}

    async def _down(self, names: list[str]) -> dict[str, Any]:
        if not names:
            raise UserError("no tunnel named", "NAME")
        remaining = live.removed(self.specs, names)
        if not remaining:
            # The last tunnel: the process ends, and its teardown removes the devices.
            final = {t["name"]: t["counters"] for t in self._dataplane.status()}
            assert self._stop is not None
            asyncio.get_running_loop().call_soon(self._stop.set)
            return {"pid": os.getpid(), "removed": final, "exiting": True}
        final = await self._apply(remaining)
        for name in names:
            self._log_down(name, final.get(name))
        return {"pid": os.getpid(), "removed": final, "exiting": False}

    async def _set(self, name: str, changes: Any) -> dict[str, Any]:
        current = next((s for s in self.specs if s.name == name), None)
        if current is None:
            raise UserError(f"no tunnel named {name!r} runs in this endpoint", "NAME")
        if not isinstance(changes, dict):
            raise UserError("changes must be an object of spec keys", "changes")
        spec = live.changed(current, changes)
        await self._apply(live.replaced(self.specs, spec))
        self._log_up(name, "changed")
        return {"pid": os.getpid(), "changed": self._row(name)}

    async def _reload(self, raws: Any) -> dict[str, Any]:
        """The tunnels of ``raws`` or, without, of the config file read again."""
        if raws is None:
            if self.config is None:
                raise UserError("this endpoint was not started from a config file", "--config")
            wanted, _settings = load_config(self.config)
        else:
            if not isinstance(raws, list) or not all(isinstance(r, dict) for r in raws):
                raise UserError("tunnels must be a list of objects of spec keys", "tunnels")
            wanted = [build_spec(r, where=f"tunnel[{i}].") for i, r in enumerate(raws)]
        before = list(self.specs)
        diff = live.difference(before, wanted)
        check_names_free([s for s in wanted if s.name in diff["added"]])
        final: dict[str, Any] = {}
        for step in live.reload_steps(before, wanted):
            final.update(await self._apply(step))
        for name in diff["removed"]:
            self._log_down(name, final.get(name))
        for name in diff["added"]:
            self._log_up(name)
        for name in diff["changed"]:
            self._log_up(name, "changed")
        return {"pid": os.getpid(), **diff}

    def reload_keys(self) -> None:
        """Read the auth key file again and put it in force, without a stop. A file that
        does not pass the checks changes nothing: the keys in force stay (UserError)."""
        if self.auth is None:
            raise UserError("this endpoint does not authenticate", "--auth-key-file")
        keys = load_key_file(self.auth.key_file, "auth_key_file")
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

    def _reload_keys_reply(self) -> dict[str, Any]:
        self.reload_keys()
        assert self.auth is not None
        ids = [i for i, _ in self.auth.keys.keys]
        return {"pid": os.getpid(), "key_ids": ids, "send_key_id": self.auth.keys.send_id}

    def _on_sighup(self) -> None:
        if self.auth is not None:
            try:
                self.reload_keys()
            except UserError as exc:
                log.error(
                    "auth keys not reloaded, the ones in force stay: %s",
                    exc,
                    extra={"event": "auth_reload_failed"},
                )
            if self.config is None:
                return

        async def reload() -> None:
            assert self._changing is not None
            try:
                async with self._changing:
                    diff = await self._reload(None)
            except UserError as exc:
                log.error("reload of %s refused, nothing changed: %s", self.config, exc)
                return
            log.info(
                "reloaded %s: added %s, removed %s, changed %s",
                self.config,
                ", ".join(diff["added"]) or "none",
                ", ".join(diff["removed"]) or "none",
                ", ".join(diff["changed"]) or "none",
                extra={"event": "reload"},
            )

        asyncio.get_running_loop().create_task(reload())

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
            busy_poll_us=self.busy_poll_us,
            auth_keys=self.auth.keys if self.auth is not None else None,
            auth_class=self.auth.option_class if self.auth is not None else None,
            auth_states=self._auth_states,
        )

    def _repaired(self, message: str, device: str, **extra: str) -> None:
        log.warning("%s", message, extra={"event": "repair", "device": device, **extra})
        self.repairs.append(message)
        del self.repairs[:-REPAIR_LOG]

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

    def _drop_addresses(self, dropped: dict[str, list[Any]]) -> None:
        """Take off the addresses a changed tunnel no longer lists."""
        from pyroute2 import IPRoute

        if not any(dropped.values()):
            return
        with IPRoute() as ipr:
            for name, ifaces in dropped.items():
                links = ipr.link_lookup(ifname=name)
                for iface in ifaces if links else []:
                    with contextlib.suppress(Exception):  # gone already: as wanted
                        ipr.addr(
                            "del",
                            index=links[0],
                            address=str(iface.ip),
                            prefixlen=iface.network.prefixlen,
                        )

    def _announce(self) -> None:
        """Gratuitous ARP for the IPv4 addresses of each TAP device (announce.py)."""
        from .dataplane.announce import announce

        macs = {str(t["name"]): t.get("mac") for t in self._dataplane.status()}
        for spec in self.specs:
            mac = macs.get(spec.name)
            ips = [i.ip for i in spec.addresses if i.version == 4]
            if spec.mode == "tap" and mac and ips:
                announce(spec.name, bytes.fromhex(str(mac).replace(":", "")), ips)
