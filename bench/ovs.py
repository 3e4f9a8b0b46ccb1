"""Open vSwitch's userspace datapath (``datapath_type=netdev``) as a GENEVE endpoint
inside a network namespace: the userspace GENEVE that users deploy today.

Each namespace runs its own ovsdb-server and ovs-vswitchd, whose database, sockets,
pid files and logs live in a private directory: a system-wide Open vSwitch, if any, is
neither used nor touched, and no kernel module is needed. The layout is the one Open
vSwitch documents for userspace tunnelling:

- ``br-phy``: the underlay device is its port (read and written raw, by AF_PACKET)
  and the underlay address sits on br-phy's own internal port, so Open vSwitch's
  route and neighbour tables (learnt from the kernel's) find the remote;
- ``br-int``: the GENEVE port (``remote_ip``, ``key`` = VNI) and the inner address on
  br-int's internal port, a TAP device the traffic enters and leaves by.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
BINARIES = ("ovsdb-tool", "ovsdb-server", "ovs-vsctl", "ovs-vswitchd", "ovs-appctl")
PHY, INT, PORT = "br-phy", "br-int", "gnv0"
TIMEOUT = 20  # seconds any one ovs-vsctl/ovs-appctl call may take


def missing() -> str | None:
    """What is missing to run Open vSwitch here (``.ci/setup`` installs
    openvswitch-switch), or None."""
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return f"{', '.join(absent)} not found (apt package openvswitch-switch)"
    if not SCHEMA.exists():
        return f"{SCHEMA} not found (apt package openvswitch-common)"
    return None


class OvsError(RuntimeError):
    """An Open vSwitch command failed; the message names it and its stderr."""


@dataclass
class OvsNode:
    """ovsdb-server and ovs-vswitchd running in namespace ``ns``."""

    ns: str
    rundir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gdp-ovs-")))
    pids: list[int] = field(default_factory=list)

    def _run(self, *cmd: str, timeout: float = TIMEOUT) -> str:
        env = {**os.environ, **{k: str(self.rundir) for k in _DIRS}}
        proc = subprocess.run(
            ["ip", "netns", "exec", self.ns, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            env=env,
        )
        if proc.returncode != 0:
            raise OvsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def vsctl(self, *args: str) -> str:
        return self._run("ovs-vsctl", f"--db=unix:{self.rundir}/db.sock", f"--timeout={TIMEOUT}",
                         *args)  # fmt: skip

    def appctl(self, *args: str) -> str:
        return self._run("ovs-appctl", "-t", f"{self.rundir}/ovs-vswitchd.ctl",
                         f"--timeout={TIMEOUT}", *args)  # fmt: skip

    def start(self) -> OvsNode:
        """Both daemons, detached, with their files in ``rundir``; on failure nothing
        is left running."""
        d = self.rundir
        try:
            self._run("ovsdb-tool", "create", f"{d}/conf.db", str(SCHEMA))
            self._run(
                "ovsdb-server", f"{d}/conf.db", f"--remote=punix:{d}/db.sock",
                f"--pidfile={d}/ovsdb-server.pid", f"--unixctl={d}/ovsdb-server.ctl",
                f"--log-file={d}/ovsdb-server.log", "--detach",
            )  # fmt: skip
            self.pids.append(_pid(d / "ovsdb-server.pid"))
            self._run("ovs-vsctl", f"--db=unix:{d}/db.sock", "--no-wait", "init")
            self._run(
                "ovs-vswitchd", f"unix:{d}/db.sock", f"--pidfile={d}/ovs-vswitchd.pid",
                f"--unixctl={d}/ovs-vswitchd.ctl", f"--log-file={d}/ovs-vswitchd.log",
                "--detach",
            )  # fmt: skip
            self.pids.append(_pid(d / "ovs-vswitchd.pid"))
        except BaseException:
            self.stop()
            raise
        return self

    def geneve(
        self,
        underlay_dev: str,
        underlay_cidr: str,
        remote: str,
        vni: int,
        inner_cidr: str,
        inner_mtu: int,
    ) -> None:
        """The userspace tunnelling layout (module doc): ``underlay_dev``'s address
        moves to br-phy, and br-int carries ``inner_cidr`` through GENEVE to
        ``remote``."""
        self.vsctl(
            "add-br", PHY, "--", "set", "bridge", PHY, "datapath_type=netdev",
            "--", "add-port", PHY, underlay_dev,
        )  # fmt: skip
        self.vsctl(
            "add-br", INT, "--", "set", "bridge", INT, "datapath_type=netdev",
            "--", "add-port", INT, PORT, "--", "set", "interface", PORT, "type=geneve",
            f"options:remote_ip={remote}", f"options:key={vni}",
        )  # fmt: skip
        mtu = _sh_out("ip", "-n", self.ns, "-o", "link", "show", "dev", underlay_dev).split()
        underlay_mtu = mtu[mtu.index("mtu") + 1]
        _sh("ip", "-n", self.ns, "addr", "flush", "dev", underlay_dev)
        _sh("ip", "-n", self.ns, "link", "set", PHY, "mtu", underlay_mtu, "up")
        _sh("ip", "-n", self.ns, "addr", "add", underlay_cidr, "dev", PHY)
        _sh("ip", "-n", self.ns, "link", "set", INT, "mtu", str(inner_mtu), "up")
        _sh("ip", "-n", self.ns, "addr", "add", inner_cidr, "dev", INT)

    def stop(self) -> None:
        """Ask both daemons to exit, kill what is left of them (by pid), remove the
        directory."""
        for ctl in ("ovs-vswitchd.ctl", "ovsdb-server.ctl"):
            if (self.rundir / ctl).exists():
                with contextlib.suppress(OvsError, subprocess.TimeoutExpired):
                    self._run("ovs-appctl", "-t", str(self.rundir / ctl), "exit", timeout=5)
        deadline = time.monotonic() + 5
        for pid in self.pids:
            while running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        shutil.rmtree(self.rundir, ignore_errors=True)


# Where the Open vSwitch tools look for their files, all pointed at the run directory.
_DIRS = ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR")


def _pid(path: Path) -> int:
    return int(path.read_text().strip())


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (the detached daemons are not our children).
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _sh(*cmd: str) -> None:
    _sh_out(*cmd)


def _sh_out(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise OvsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout
