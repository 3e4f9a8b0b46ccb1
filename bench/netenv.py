"""The benchmark's own world: two network namespaces joined by a veth "underlay".

Every name carries the process id and a counter (gdpb-<pid>-<n>-a/-b), so concurrent
runs and leftovers of a crashed run never collide, and ``close()`` removes the
namespaces (killing whatever still runs inside) whatever happened before. Also the CPU
accounting helpers: per-process time from /proc/PID/stat and system-wide softirq, busy
and steal time from /proc/stat.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from dataclasses import dataclass, field

_counter = itertools.count()
CLK_TCK = os.sysconf("SC_CLK_TCK")


class NetenvError(RuntimeError):
    """A setup command failed; the message names the command and its stderr."""


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetenvError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Underlay:
    """Namespaces ``a`` (sender side) and ``b`` (receiver side) with veth ``va``/``vb``.

    ``a_ip``/``b_ip`` are the underlay addresses (the tunnel endpoints' outer addresses);
    the veth MTU is chosen by the scenario.
    """

    mtu: int = 1500
    subnet: str = "10.201.0"
    a: str = ""
    b: str = ""
    va: str = "gdpb-ua"
    vb: str = "gdpb-ub"
    made: list[str] = field(default_factory=list)

    @property
    def a_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def b_ip(self) -> str:
        return f"{self.subnet}.2"

    def open(self) -> Underlay:
        base = f"gdpb-{os.getpid()}-{next(_counter)}"
        self.a, self.b = f"{base}-a", f"{base}-b"
        try:
            for ns in (self.a, self.b):
                sh("ip", "netns", "add", ns)
                self.made.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            # Create the pair inside namespace a directly, so no device ever appears in
            # the caller's namespace (nothing to clean up there if we die midway).
            sh(
                "ip", "-n", self.a, "link", "add", self.va, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", self.vb, "mtu", str(self.mtu), "netns", self.b,
            )  # fmt: skip
            for ns, dev, ip in ((self.a, self.va, self.a_ip), (self.b, self.vb, self.b_ip)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def exec_a(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.a, *cmd, check=check)

    def close(self) -> None:
        for ns in reversed(self.made):
            kill_netns_processes(ns)
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()

    def __enter__(self) -> Underlay:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale() -> list[str]:
    """Delete namespaces left by earlier runs that died without cleaning up (SIGKILL):
    ours are named gdpb-<pid>-..., so any whose pid no longer runs is an orphan."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "gdpb" or not parts[1].isdigit():
            continue
        if int(parts[1]) == os.getpid() or os.path.exists(f"/proc/{parts[1]}"):
            continue
        kill_netns_processes(name)
        sh("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


def kill_netns_processes(ns: str) -> None:
    """SIGKILL whatever still runs in ``ns`` (only processes started for this run live
    there), so that deleting the namespace really frees it."""
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a dataplane may run helper processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes, all their threads included
    (the kernel sums threads into the group leader's /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited: its time is lost to us, which the caller avoids by
            # reading before stopping it
        # The command name may contain spaces and parentheses; fields after the last
        # ')' are fixed: utime and stime are the 12th and 13th of them.
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_kib(pids: list[int], field: str = "VmRSS") -> int:
    """Resident memory of the largest of these processes, in KiB: ``VmRSS`` now, or
    ``VmHWM`` (the peak it reached), from /proc/PID/status. Per process, because
    that is what a node runs: one dataplane (the two here are the two ends)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total = max(total, int(line.split()[1]))
                        break
        except (OSError, ValueError):
            continue
    return total


def _cpu_line() -> list[int]:
    """The aggregate cpu line of /proc/stat, in ticks: user nice system idle iowait irq
    softirq steal ... (guest time is inside user)."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def busy_seconds() -> float:
    """System-wide non-idle CPU seconds since boot: everything the run cost the machine
    (generator, sink, daemons, kernel), so paths compare on total work too."""
    fields = _cpu_line()
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def steal_seconds() -> float:
    """System-wide steal CPU seconds since boot: time a virtual CPU wanted to run but
    the hypervisor ran someone else. busy_seconds() counts it, so a cost per unit of
    work subtracts it to charge only what this machine's CPUs actually did."""
    return _cpu_line()[7] / CLK_TCK


def softirq_seconds() -> float:
    """System-wide softirq CPU seconds since boot. Kernel paths (veth, VXLAN) do their
    work there, not in any process."""
    return _cpu_line()[6] / CLK_TCK


class BlackholeNetns:
    """One namespace whose only route leads into a veth whose peer throws everything
    away: the neighbour entry gives a MAC that is not the peer's, so the peer receives
    each frame as "for another host" and IP drops it on arrival. Sending there costs the
    whole send path and almost nothing after it, so it measures the generator alone:
    the ceiling every real path is compared with. (A peer that is down would do for
    sockets, but AF_PACKET's direct transmit refuses a device without carrier.)"""

    dst_ip = "10.203.0.2"
    dst_mac = "02:00:00:00:00:02"
    src_ip = "10.203.0.1"
    ifname = "gdpb-ca"

    def __init__(self) -> None:
        self.name = f"gdpb-{os.getpid()}-{next(_counter)}-gen"

    def __enter__(self) -> BlackholeNetns:
        sh("ip", "netns", "add", self.name)
        try:
            ns = ("ip", "-n", self.name)
            sh(*ns, "link", "set", "lo", "up")
            # A permanent neighbour entry means no ARP attempt; the peer has no
            # address, and its MAC is random, never dst_mac.
            sh(*ns, "link", "add", self.ifname, "type", "veth", "peer", "name", "gdpb-cb")
            sh(*ns, "addr", "add", f"{self.src_ip}/24", "dev", self.ifname)
            sh(*ns, "link", "set", self.ifname, "up")
            sh(*ns, "link", "set", "gdpb-cb", "up")
            sh(*ns, "neigh", "add", self.dst_ip, "lladdr", self.dst_mac, "dev", self.ifname,
               "nud", "permanent")  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        kill_netns_processes(self.name)
        sh("ip", "netns", "del", self.name, check=False)


def drop_counters(ns: str) -> dict[str, int]:
    """Kernel counters in ``ns`` that say where packets were dropped: UDP sockets whose
    receive buffer was full, and per device rx/tx drops (a TAP/TUN queue nobody read
    fast enough shows as tx drops of that device)."""
    out: dict[str, int] = {}
    snmp = sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp", check=False).stdout
    udp = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Udp:")]
    if len(udp) == 2:
        fields = dict(zip(udp[0], udp[1], strict=False))
        for key in ("RcvbufErrors", "InErrors", "NoPorts"):
            if key in fields:
                out[f"udp.{key}"] = int(fields[key])
    links = sh("ip", "-n", ns, "-s", "-j", "link", "show", check=False).stdout
    try:
        for link in json.loads(links or "[]"):
            stats = link.get("stats64") or {}
            for direction in ("rx", "tx"):
                dropped = stats.get(direction, {}).get("dropped")
                if dropped is not None and link["ifname"] != "lo":
                    out[f"{link['ifname']}.{direction}_dropped"] = int(dropped)
    except (ValueError, KeyError, TypeError):
        pass
    return out
