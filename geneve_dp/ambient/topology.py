"""A small ambient cluster in network namespaces, for `geneve-dp demo` and the e2e tests.

```
   pod-a 10.244.1.10 (ambient) ─┐
   pod-b 10.244.1.11 (ambient) ─┤ veth, /32 routes, gateway 10.244.1.1 on each host veth
   pod-p 10.244.1.20 (plain)   ─┤ ("ptp" CNI style, so the ztunnel pod hangs off a veth)
   ztunnel 10.244.1.3          ─┘
                              node ── eth0 10.0.0.1/24 ── 10.0.0.2/24 server
```

Names are unique per process (``gdpd-<pid>-<role>``); everything is removed by
``destroy()``, which kills whatever still runs inside. Commands run through
``ip netns exec`` so each one acts on exactly one namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODE_UNDERLAY_IP = "10.0.0.1"
SERVER_IP = "10.0.0.2"
GATEWAY_IP = "10.244.1.1"  # the node's address on every pod link (HOST_IP)
POD_CIDR = "10.244.1.0/24"
ZTUNNEL_IP = "10.244.1.3"
ZTUNNEL_VETH = "veth-zt"
TCP_PORT = 8080
UDP_PORT = 9000
DNS_PORT = 53  # the server answers UDP here too: traffic Istio never captures


@dataclass(frozen=True)
class Pod:
    role: str
    ip: str
    veth: str  # the node-side end
    ambient: bool
    uid: str


PODS = (
    Pod("pod-a", "10.244.1.10", "veth-a", True, "2c6d3e1a-0000-4000-8000-00000000000a"),
    Pod("pod-b", "10.244.1.11", "veth-b", True, "2c6d3e1a-0000-4000-8000-00000000000b"),
    Pod("pod-p", "10.244.1.20", "veth-p", False, "2c6d3e1a-0000-4000-8000-000000000020"),
)


class CommandError(RuntimeError):
    pass


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise CommandError(f"{' '.join(cmd)}: exit {proc.returncode}: {' / '.join(msg[-3:])}")
    return proc


@dataclass
class World:
    tag: str = field(default_factory=lambda: f"gdpd-{os.getpid()}")
    workdir: Path = field(default_factory=lambda: Path(f"/tmp/geneve-dp-demo-{os.getpid()}"))
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    # Written as net.ipv4.conf.{all,default}.rp_filter in every namespace before its
    # devices exist; None keeps the kernel's. 1 (strict, as many distributions ship) by
    # default: the profiles must turn it off where Istio does, not rely on a fresh
    # namespace's 0.
    rp_filter: int | None = 1

    # --- names ------------------------------------------------------------------------
    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    @property
    def node(self) -> str:
        return self.ns("node")

    @property
    def zt(self) -> str:
        return self.ns("ztunnel")

    @property
    def server(self) -> str:
        return self.ns("server")

    @property
    def proxy_log(self) -> Path:
        return self.workdir / "proxy.jsonl"

    @property
    def state_root(self) -> Path:
        return self.workdir / "state"

    # --- running things ----------------------------------------------------------------
    def run(
        self, ns: str, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["GENEVE_DP_AMBIENT_STATE"] = str(self.state_root)
        return env

    def gdp(
        self, ns: str, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`geneve-dp ARGS` inside ``ns``, with the demo's private state directory."""
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "geneve_dp", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise CommandError(
                f"geneve-dp {' '.join(args)} in {ns}: exit {proc.returncode}: "
                f"{proc.stderr.strip().splitlines()[-1:] or ''}"
            )
        return proc

    def spawn(self, ns: str, args: Sequence[str], log: Path) -> subprocess.Popen[str]:
        out = open(log, "a")  # the child keeps it open
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=self.env(),
            start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        return proc

    # --- building ----------------------------------------------------------------------
    def _add_ns(self, role: str) -> str:
        name = self.ns(role)
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.run(name, "ip", "link", "set", "lo", "up")
        # No IPv6: router solicitations and DAD on the tunnel devices would be counted as
        # GENEVE traffic and blur the "no packet through the tunnel" checks.
        for key in ("all", "default"):
            self.run(name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            if self.rp_filter is not None:
                self.run(name, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter={self.rp_filter}")
        return name

    def hold_neighbours(self, ns: str, devices: Sequence[str]) -> None:
        """Keep neighbour entries on ``devices`` reachable for the demo's lifetime.

        ARP runs through the tunnels (the /30 next hops). An entry that went stale and
        is used again is re-confirmed by a unicast probe some seconds later, which could
        land inside a "no GENEVE packet" check. (Per device: this kernel has no
        net.ipv4.neigh.default in a new namespace.)
        """
        for dev in devices:
            self.run(ns, "sysctl", "-qw", f"net.ipv4.neigh.{dev}.base_reachable_time_ms=600000")

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        tmp = f"gdt{os.getpid() % 100000}{len(self.namespaces)}{a_if[-2:]}"[:15]
        sh("ip", "link", "add", tmp, "type", "veth", "peer", "name", b_if, "netns", b)
        sh("ip", "link", "set", tmp, "netns", a)
        self.run(a, "ip", "link", "set", tmp, "name", a_if)
        self.run(a, "ip", "link", "set", a_if, "up")
        self.run(b, "ip", "link", "set", b_if, "up")

    def _pod_link(self, role: str, ip: str, host_veth: str) -> str:
        ns = self._add_ns(role)
        self._veth(self.node, host_veth, ns, "eth0")
        self.run(ns, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
        self.run(ns, "ip", "route", "add", GATEWAY_IP, "dev", "eth0", "scope", "link")
        self.run(ns, "ip", "route", "add", "default", "via", GATEWAY_IP, "dev", "eth0")
        self.run(self.node, "ip", "addr", "add", f"{GATEWAY_IP}/32", "dev", host_veth)
        self.run(self.node, "ip", "route", "add", f"{ip}/32", "dev", host_veth, "scope", "link")
        return ns

    def build(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._add_ns("node")
        self.run(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._add_ns("server")
        self._veth(self.node, "eth0", self.server, "eth0")
        self.run(self.node, "ip", "addr", "add", f"{NODE_UNDERLAY_IP}/24", "dev", "eth0")
        self.run(self.server, "ip", "addr", "add", f"{SERVER_IP}/24", "dev", "eth0")
        self.run(self.server, "ip", "route", "add", POD_CIDR, "via", NODE_UNDERLAY_IP)
        self._pod_link("ztunnel", ZTUNNEL_IP, ZTUNNEL_VETH)
        for pod in PODS:
            self._pod_link(pod.role, pod.ip, pod.veth)

    def start_servers(self) -> None:
        echo = ["-m", "geneve_dp.ambient.echo", "serve"]
        udp = ["--udp", str(UDP_PORT), "--udp", str(DNS_PORT)]
        self.spawn(
            self.server,
            [*echo, "server", "--tcp", str(TCP_PORT), *udp],
            self.workdir / "server.log",
        )
        # The node answers on its own address (kubelet, node-local services).
        self.spawn(self.node, [*echo, "node", "--tcp", str(TCP_PORT)], self.workdir / "node.log")
        for pod in PODS:
            self.spawn(
                self.ns(pod.role),
                [*echo, pod.role, "--tcp", str(TCP_PORT), "--tcp", "15008"],
                self.workdir / f"{pod.role}.log",
            )
        self._wait_ready([self.workdir / "server.log", self.workdir / "node.log"] + [
            self.workdir / f"{p.role}.log" for p in PODS
        ])  # fmt: skip

    def start_proxy(self) -> None:
        self.proxy_log.unlink(missing_ok=True)
        self.spawn(
            self.zt,
            ["-m", "geneve_dp", "proxy", "--log", str(self.proxy_log)],
            self.workdir / "proxy.out",
        )
        self._wait_for(lambda: '"listening"' in _read(self.proxy_log), "the proxy's listeners")

    def _wait_ready(self, logs: list[Path]) -> None:
        self._wait_for(lambda: all("ready" in _read(p) for p in logs), "the echo servers")

    def _wait_for(self, cond: object, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(cond) and cond():
                return
            time.sleep(0.05)
        raise CommandError(f"{what} did not start within {timeout:.0f}s")

    # --- observing ---------------------------------------------------------------------
    def proxy_records(self) -> list[dict[str, Any]]:
        import json

        out = []
        for line in _read(self.proxy_log).splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def snapshot(self, ns: str) -> dict[str, str]:
        """The network state `down` must give back: iptables, rules, routes, ipsets, links."""
        from ..netconf.iptables import normalize_save

        def out(*cmd: str) -> str:
            return self.run(ns, *cmd, check=False).stdout

        links = "\n".join(
            line.split(" link/")[0].split(": <")[0] + " <" + line.split(": <", 1)[1].split(">")[0]
            for line in out("ip", "-o", "link").splitlines()
            if ": <" in line
        )
        tc = out("tc", "qdisc", "show")
        for line in out("ip", "-o", "link").splitlines():
            dev = line.split(": ")[1].split("@")[0] if ": " in line else ""
            for hook in ("ingress", "egress"):
                shown = out("tc", "filter", "show", "dev", dev, hook) if dev else ""
                tc += f"{dev} {hook}: {shown.strip()}\n" if shown.strip() else ""
        return {
            "tc": tc,
            "bpf mounts": out("findmnt", "-n", "-t", "bpf"),
            "iptables-save": normalize_save(out("iptables-save")),
            # The other backend too: where kubelet uses it, so do the profiles.
            "iptables-legacy-save": normalize_save(out("iptables-legacy-save")),
            "ip rule": out("ip", "rule"),
            "ip route show table all": out("ip", "route", "show", "table", "all"),
            "ipset list": out("ipset", "list"),
            "ip link": links,
        }

    # --- teardown ----------------------------------------------------------------------
    def stop_procs(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(2)
        self.procs.clear()

    def destroy(self) -> None:
        self.stop_procs()
        for ns in reversed(self.namespaces):
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        subprocess.run(["rm", "-rf", str(self.workdir)], check=False)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
