"""The tunnel devices of the profiles, as geneve-dp endpoints run by the daemon.

`geneve-dp up --config FILE --detach --pidfile FILE` creates TAP devices that behave
like kernel geneve devices and keeps them alive until SIGTERM. The profiles write the
config, start it, and stop it by pid on `down`; after a crash the devices are deleted
by name.
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import wire
from ..errors import UserError
from ..netconf import links
from ..netns import netns_id
from . import procs

START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Endpoint:
    name: str
    vni: int
    remote: str
    port: int
    address: str  # "a.b.c.d/len"
    mark: int | None = None  # the outer packets' mark (the one every inner packet has)
    # Authenticated tunnels (geneve_dp/auth): the key file and option class, or None.
    auth_key_file: str | None = None
    auth_option_class: int | None = None


def render_config(endpoints: list[Endpoint]) -> str:
    """The daemon's TOML config for ``endpoints`` (TAP, Ethernet payload, like the kernel)."""
    out = []
    authed = next((ep for ep in endpoints if ep.auth_key_file), None)
    if authed is not None:
        out += [
            f"auth_key_file = {json.dumps(authed.auth_key_file)}",
            f"auth_option_class = {authed.auth_option_class}",
            "",
        ]
    for ep in endpoints:
        out += [
            "[[tunnel]]",
            f'name = "{ep.name}"',
            f"vni = {ep.vni}",
            f'remote = "{ep.remote}"',
            f"port = {ep.port}",
            'mode = "tap"',
            f'addresses = ["{ep.address}"]',
            *([f"mark = {ep.mark}"] if ep.mark else []),
            "",
        ]
    return "\n".join(out)


def start(endpoints: list[Endpoint], state_dir: Path, role: str) -> Path:
    """Start the daemon for ``endpoints``; returns its pidfile once the devices are up."""
    state_dir.mkdir(parents=True, exist_ok=True)
    config = state_dir / f"{role}-endpoints.toml"
    pidfile = state_dir / f"{role}-endpoints.pid"
    config.write_text(render_config(endpoints))
    cmd = [sys.executable, "-m", "geneve_dp", "up", "--config", str(config)]
    cmd += ["--detach", "--pidfile", str(pidfile)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=START_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise UserError(
            f"the tunnel endpoints did not come up within {START_TIMEOUT:.0f}s", field="endpoints"
        ) from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit code {proc.returncode}"
        raise UserError(f"starting the tunnel endpoints failed: {detail}", field="endpoints")
    for ep in endpoints:
        if links.link(ep.name) is None:
            raise UserError(f"the endpoint daemon did not create {ep.name}", field="endpoints")
    return pidfile


def _config_name(pidfile: Path) -> str:
    """The daemon's config file beside its pidfile, as a string (the watcher asks
    every pass; see procs.py on pathlib)."""
    return str(pidfile).removesuffix(".pid") + ".toml"


def _config_of(pidfile: Path) -> Path:
    return Path(_config_name(pidfile))


def _words(pidfile: Path) -> list[str]:
    """How the daemon of ``pidfile`` is recognised: `geneve_dp up --config <its file>`."""
    return ["geneve_dp", "up", "--config", _config_name(pidfile)]


def running(pidfile: Path) -> int | None:
    """The pid of the daemon of ``pidfile`` if it is alive (not a recycled pid)."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if procs.alive(pid) and procs.matches(pid, _words(pidfile)) else None


def stop(pidfile: Path | None, devices: list[str]) -> None:
    """SIGTERM the daemon (which removes its devices), then delete whatever is left."""
    if pidfile is not None:
        # Also one that lost its pidfile (a crash, a removed state directory).
        procs.terminate(procs.find(_words(pidfile), pidfile))
        pidfile.unlink(missing_ok=True)
        _config_of(pidfile).unlink(missing_ok=True)
    # Devices of a daemon that was SIGKILLed (TAP devices vanish with their fd unless
    # persistent, but a stand-in or a stuck daemon may leave them).
    deadline = time.monotonic() + STOP_TIMEOUT
    for name in devices:
        while links.link(name) is not None and time.monotonic() < deadline:
            if links.delete_link(name):
                break
            time.sleep(0.05)


# --- the GENEVE port (Istio 1.19+ determineDstPortForGeneveLink, reference §0, §2.3) -----


def port_taken(port: int, remote: str, vnis: Iterable[int]) -> str | None:
    """Why ``port`` cannot carry our tunnels in this namespace, or None if it can.

    Istio skips a port whose geneve devices would clash with its own: an "external"
    device, or one with VNI 1000/1001 to the same remote. Here a port is a UDP socket of
    one endpoint process, and two processes cannot share one, so any socket bound to
    it (a geneve-dp endpoint or anything else) makes it taken; a geneve-dp endpoint of
    this namespace is named in the reason.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise UserError(f"cannot probe UDP port {port}: {exc.strerror}", "--port") from exc
        else:
            return None
    vni_set = set(vnis)
    for pid, name, vni, their_remote in _geneve_dp_tunnels(port):
        same = vni in vni_set and their_remote == remote
        clash = "the same VNI and remote" if same else "a socket of another process"
        return f"geneve-dp pid {pid} runs {name} (VNI {vni} to {their_remote}) on it: {clash}"
    return "a UDP socket of another program is bound to it"


def _geneve_dp_tunnels(port: int) -> list[tuple[int, str, int, str]]:
    """(pid, device, VNI, remote) of running geneve-dp tunnels on ``port`` in this netns."""
    from ..control import query_all

    here = netns_id()
    try:
        replies = query_all(timeout=2.0)
    except Exception:  # only used to word a message; the bind test decided already
        return []
    out = []
    for reply in replies:
        pid = int(reply.get("pid", 0))
        if netns_id(pid) != here:
            continue
        for t in reply.get("tunnels", []):
            if int(t.get("port", 0)) == port:
                out.append((pid, str(t.get("name")), int(t.get("vni", -1)), str(t.get("remote"))))
    return out


def choose_port(remote: str, vnis: Iterable[int], say: Callable[[str], None]) -> int:
    """The first port from 6081 upward that is not taken (see ``port_taken``)."""
    wanted = tuple(vnis)
    for port in range(wire.GENEVE_PORT, 65536):
        why = port_taken(port, remote, wanted)
        if why is None:
            return port
        say(f"GENEVE port {port} is taken: {why}")
    raise UserError(f"every UDP port from {wire.GENEVE_PORT} up is taken", "--port")
