"""The supervisor of a running dataplane: an asyncio program on a uvloop loop.

It owns everything that is not per-packet: starting the engines, putting addresses on
the devices (and back, if someone deletes them), serving `show`/`stats` over a unix
socket, watching the worker threads and tearing down on SIGINT/SIGTERM.
With a metrics address it also serves Prometheus ``/metrics`` (metrics.py), and once
per pass it checks drop rates against an alarm threshold (alarms.py).

Netlink goes through pyroute2's synchronous API in the default executor: uvloop
refuses AF_NETLINK endpoints, and ``uvloop.install()`` would make pyroute2 fail even
in threads, so the loop comes from ``asyncio.Runner(loop_factory=...)`` instead
(ARCHITECTURE rule 5).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import alarms
from .dataplane.spec import TunnelSpec
from .errors import UserError

if TYPE_CHECKING:  # imported when used: prometheus_client only for --metrics-addr
    from .metrics import MetricsServer

log = logging.getLogger("geneve_dp.daemon")

RUN_DIR_ENV = "GENEVE_DP_RUN_DIR"
DEFAULT_RUN_DIR = Path("/run/geneve-dp")
RECONCILE_INTERVAL = 1.0
CLIENT_TIMEOUT = 5.0

_CLONE_NEWNET = 0x40000000


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV, str(DEFAULT_RUN_DIR)))


def socket_path(pid: int) -> Path:
    return run_dir() / f"gdp-{pid}.sock"


def enter_netns(name: str) -> None:
    """Move this process into the named network namespace (`ip netns` naming).

    setns() changes only the calling thread, and threads inherit it when created, so
    this must run before any thread (executor, engine worker) exists.
    """
    path = Path("/run/netns") / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise UserError(
            f"no network namespace named {name!r} (see `ip netns list`)", "--netns"
        ) from exc
    except PermissionError as exc:
        raise UserError(f"cannot open {path}: permission denied (run as root)", "--netns") from exc
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise UserError(f"cannot enter {name!r}: {os.strerror(err)}", "--netns")
    finally:
        os.close(fd)


def netns_id(name: str | None = None) -> int:
    """Inode of a network namespace: ours, or the one `ip netns` calls ``name``."""
    path = Path("/run/netns") / name if name else Path("/proc/self/ns/net")
    try:
        return os.stat(path).st_ino
    except FileNotFoundError as exc:
        raise UserError(
            f"no network namespace named {name!r} (see `ip netns list`)", "--netns"
        ) from exc


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
        nice: int | None = None,
        metrics_addr: tuple[str, int] | None = None,
        drop_alarm: float = alarms.DEFAULT_THRESHOLD,
    ) -> None:
        self.specs = specs
        self.nice = nice
        self.engine = engine
        self.offload = offload
        self.workers = workers
        self.metrics_addr = metrics_addr
        self.alarm = alarms.DropAlarm(log, drop_alarm)
        self.pidfile = pidfile
        self.sock_path = socket_path(os.getpid())
        self.control_messages: list[dict[str, Any]] = []
        self._stop: asyncio.Event | None = None
        self._dataplane: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[str], None]) -> int:
        """Bring everything up, call ``on_ready`` with a summary, serve until stopped."""
        from .dataplane import Dataplane

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        check_names_free(self.specs)
        self._dataplane = Dataplane(
            self.specs,
            engine=self.engine,
            control_hook=self._on_control,
            offload=self.offload,
            workers=self.workers,
            **({} if self.nice is None else {"nice": self.nice}),
        )
        server: asyncio.base_events.Server | None = None
        # Listening first: a taken metrics port is refused before any device exists.
        metrics = self._start_metrics()
        started: list[dict[str, Any]] = []
        try:
            await loop.run_in_executor(None, self._dataplane.start)
            await loop.run_in_executor(None, self._apply_addresses, False)
            server = await self._serve()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
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

    def _start_metrics(self) -> MetricsServer | None:
        if self.metrics_addr is None:
            return None
        from . import metrics

        host, port = self.metrics_addr
        server = metrics.MetricsServer(host, port, self.status)
        if not metrics.is_loopback(host):
            log.warning(
                "metrics on %s are reachable from other hosts: counters and tunnel "
                "addresses are readable by anyone who can connect",
                server.url,
            )
        return server

    def status(self) -> dict[str, Any]:
        """What `show`/`stats` and /metrics read: the counters as of now."""
        return {
            "pid": os.getpid(),
            "engine": self.engine,
            "offload": self._dataplane.offload,
            "netns_id": netns_id(),
            "workers": self._dataplane.workers,
            "worker_threads": self._dataplane.worker_threads(),
            "tunnels": self._dataplane.status(),
            "control_messages": self.control_messages,
        }

    async def _supervise(self) -> int:
        assert self._stop is not None
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), RECONCILE_INTERVAL)
            except TimeoutError:
                pass
            try:
                self._dataplane.check()
            except RuntimeError as exc:
                log.error("a worker died: %s; shutting down", exc, extra={"event": "worker_died"})
                return 1
            self.alarm.update(time.monotonic(), self._dataplane.status())
            if not self._stop.is_set():
                await loop.run_in_executor(None, self._apply_addresses, True)
        return 0

    def _on_control(self, name: str, packet: bytes) -> None:
        # O-bit packets are control messages (RFC 8926 §3.4): never data. Keep the last
        # few for `show` and log them; there is no control protocol to speak yet.
        log.info("control message on %s: %d bytes", name, len(packet))
        self.control_messages.append(
            {"tunnel": name, "length": len(packet), "hex": packet[:64].hex()}
        )
        del self.control_messages[:-16]

    # -- netlink (runs in the executor) ------------------------------------------------------

    def _apply_addresses(self, reconcile: bool) -> None:
        """Put each spec's addresses on its device and the link up; on reconcile, put back
        whatever was removed since."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for spec in self.specs:
                links = ipr.link_lookup(ifname=spec.name)
                if not links:
                    continue  # the engine noticed, or will: not ours to recreate here
                index = links[0]
                link = ipr.get_links(index)[0]
                if not link["flags"] & 1:  # IFF_UP
                    if reconcile:
                        log.warning(
                            "%s was set down; setting it up again",
                            spec.name,
                            extra={"event": "repair", "device": spec.name},
                        )
                    ipr.link("set", index=index, state="up")
                present = {
                    (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)
                }
                for iface in spec.addresses:
                    if (str(iface.ip), iface.network.prefixlen) in present:
                        continue
                    if reconcile:
                        log.warning(
                            "%s lost %s; adding it back",
                            spec.name,
                            iface,
                            extra={"event": "repair", "device": spec.name, "address": str(iface)},
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

    # -- control socket --------------------------------------------------------------------

    async def _serve(self) -> asyncio.base_events.Server:
        self.sock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sock_path.unlink(missing_ok=True)
        old = os.umask(0o177)  # the socket is born 0600: counters and config are root's
        try:
            server = await asyncio.start_unix_server(self._handle, path=str(self.sock_path))
        finally:
            os.umask(old)
        os.chmod(self.sock_path, 0o600)
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT)
            try:
                request = json.loads(line or b"{}")
            except ValueError:
                request = {}
            if request.get("cmd") == "status":
                reply: Any = self.status()
            else:
                reply = {"error": 'unknown request; accepted: {"cmd": "status"}'}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def query_all(timeout: float = CLIENT_TIMEOUT) -> list[dict[str, Any]]:
    """Status of every running dataplane, found by its socket in the run directory.

    Sockets left by a dataplane that was killed are removed on the way.
    """
    replies = []
    directory = run_dir()
    if not directory.is_dir():
        return []
    for path in sorted(directory.glob("gdp-*.sock")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)
                continue
            except PermissionError as exc:
                raise UserError(f"cannot read {path}: permission denied (run as root)") from exc
            s.sendall(b'{"cmd": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        if data:
            replies.append(json.loads(data))
    return replies
