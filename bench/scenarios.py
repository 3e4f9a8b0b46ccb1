"""The paths under test. Each one builds its tunnel (or none) over a fresh underlay and
says where traffic goes in and out, and which processes do the forwarding.

All of them carry the same inner packets: the tunnels get an underlay MTU of 1600 and a
tunnel MTU of 1500, so a 1472-byte UDP payload or a 1448-byte TCP segment crosses every
path unfragmented, exactly as on the bare veth (MTU 1500 there).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from geneve_dp.dataplane.spec import DEFAULT_NICE

from . import ovs, pktgen
from .netenv import Underlay, sh

INNER_SUBNET = "10.202.0"
TUNNEL_MTU = 1500
TUNNEL_UNDERLAY_MTU = 1600
VNI = 42
# The busy-polling scenario's window: a remote's answer through two userspace hops each
# way takes 100-200 µs here.
BUSY_POLL_US = 200


@dataclass
class Path:
    """Where a scenario's traffic enters (namespace ``src_ns``) and whom it is for."""

    src_ns: str
    dst_ns: str
    src_ip: str
    dst_ip: str
    # Processes that forward the packets (their CPU time is the dataplane's cost);
    # empty for kernel paths, whose work is softirq time.
    dataplane_pids: list[int] = field(default_factory=list)
    # The devices the inner traffic leaves ``src_ns`` by and enters ``dst_ns`` by: the
    # raw-frame generator writes straight to the first, addressed to the second's MAC.
    src_dev: str = ""
    dst_dev: str = ""

    def dst_mac(self) -> str | None:
        """The receiving device's MAC, or None for a device without one (TUN)."""
        out = sh("ip", "-n", self.dst_ns, "-br", "link", "show", "dev", self.dst_dev).stdout
        fields = out.split()
        mac = fields[2] if len(fields) > 2 else ""
        return mac if mac.count(":") == 5 else None


class Scenario:
    id = ""
    label = ""
    description = ""
    kernel_path = True
    underlay_mtu = TUNNEL_UNDERLAY_MTU

    def __init__(self) -> None:
        self.underlay: Underlay | None = None

    def start(self) -> Path:
        """Build the namespaces and the path; on failure leave nothing behind."""
        self.underlay = Underlay(mtu=self.underlay_mtu).open()
        try:
            return self.build(self.underlay)
        except BaseException:
            self.stop()
            raise

    def build(self, u: Underlay) -> Path:
        raise NotImplementedError

    def missing(self) -> str | None:
        """What this machine lacks to run the scenario (None: nothing)."""
        return None

    def alive(self) -> str | None:
        """None while the path can still forward, else why not (a crashed process)."""
        return None

    def counters(self) -> dict[str, Any] | None:
        """The dataplane's own counters (packets, drops by reason), if it has any."""
        return None

    def stop(self) -> None:
        if self.underlay is not None:
            self.underlay.close()
            self.underlay = None


class BareVeth(Scenario):
    id = "veth"
    label = "bare veth"
    description = "no tunnel: the underlay veth itself, MTU 1500 (the ceiling)"
    underlay_mtu = 1500

    def build(self, u: Underlay) -> Path:
        return Path(u.a, u.b, u.a_ip, u.b_ip, src_dev=u.va, dst_dev=u.vb)


class KernelVxlan(Scenario):
    id = "vxlan"
    label = "kernel VXLAN"
    description = "kernel VXLAN (UDP 4789, VNI 42) over the veth: the in-kernel reference"

    def build(self, u: Underlay) -> Path:
        for n, (ns, dev, local, remote) in enumerate(
            ((u.a, u.va, u.a_ip, u.b_ip), (u.b, u.vb, u.b_ip, u.a_ip)), start=1
        ):
            sh(
                "ip", "-n", ns, "link", "add", "vx0", "mtu", str(TUNNEL_MTU), "type", "vxlan",
                "id", str(VNI), "remote", remote, "local", local, "dstport", "4789", "dev", dev,
            )  # fmt: skip
            sh("ip", "-n", ns, "addr", "add", f"{INNER_SUBNET}.{n}/24", "dev", "vx0")
            sh("ip", "-n", ns, "link", "set", "vx0", "up")
        return Path(
            u.a, u.b, f"{INNER_SUBNET}.1", f"{INNER_SUBNET}.2", src_dev="vx0", dst_dev="vx0"
        )


class HelperScenario(Scenario):
    """A scenario whose dataplane is one of bench's C helpers (``binary_name``), one
    process or more: started by _start_helper, watched and stopped together."""

    binary_name = ""

    def __init__(self) -> None:
        super().__init__()
        self.procs: list[subprocess.Popen[bytes]] = []

    def alive(self) -> str | None:
        for proc in self.procs:
            if proc.poll() is not None:
                return f"{self.binary_name} exited ({proc.returncode})"
        return None

    def stop(self) -> None:
        for proc in self.procs:
            _stop_helper(proc)
        self.procs.clear()
        super().stop()


class TapWire(HelperScenario):
    """Two TAP devices, one per namespace, joined by gdp-tapwire (bench/tapwire.c): one
    read and one write per frame, with the offloads geneve-dp asks for. Every userspace
    dataplane over TAP does at least that on each end, and geneve-dp does it twice per
    direction plus the encapsulation and the UDP sockets. Where the CPU is the limit
    (several TCP streams) this path is therefore a ceiling for all of them on this
    machine, measured in the same run as the rest. With one stream the limit is
    latency, and a two-hop pipeline can overlap its work on two cores, so a one-stream
    figure may come out on either side of it."""

    id = "tap-wire"
    label = "userspace TAP wire (no tunnel)"
    description = (
        "no tunnel: a TAP device in each namespace, joined by `gdp-tapwire`, one thread per "
        "direction reading a frame from one and writing it to the other (TSO super-frames "
        "whole): the least a userspace dataplane over TAP does, hence its ceiling where "
        "the CPU is the limit"
    )
    kernel_path = False
    ready_timeout = 10.0
    binary_name = "gdp-tapwire"

    def build(self, u: Underlay) -> Path:
        binary = pktgen.build(pktgen.HERE / "tapwire.c", self.binary_name, ("-pthread",))
        # At the priority geneve-dp's workers run at, so the two compare on their work
        # and not on who wins the CPU from iperf3.
        self.procs.append(_start_helper(u.a, [str(binary), "tw0", "tw1"], self.ready_timeout))
        # The open file keeps tw1 attached wherever it is moved.
        sh("ip", "-n", u.a, "link", "set", "tw1", "netns", u.b)
        for n, (ns, dev) in enumerate(((u.a, "tw0"), (u.b, "tw1")), 1):
            sh("ip", "-n", ns, "link", "set", dev, "mtu", str(TUNNEL_MTU))
            sh("ip", "-n", ns, "addr", "add", f"{INNER_SUBNET}.{n}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        return Path(
            u.a,
            u.b,
            f"{INNER_SUBNET}.1",
            f"{INNER_SUBNET}.2",
            dataplane_pids=[p.pid for p in self.procs],
            src_dev="tw0",
            dst_dev="tw1",
        )


class OnePacketForwarder(HelperScenario):
    """The simplest userspace GENEVE forwarder (bench/tunfwd.c), one per namespace: a
    TUN device, a UDP socket, one thread per direction, one read and one send (or one
    receive and one write) per packet, no batching, no offloads. It pays the same
    wake-ups as any userspace dataplane and nothing else, so its sparse-traffic latency
    is the floor geneve-dp must not be worse than."""

    id = "tun-fwd"
    label = "one-packet-per-syscall forwarder (TUN)"
    description = (
        f"`gdp-tunfwd` in each namespace: a TUN device and a UDP socket (GENEVE, VNI {VNI}, "
        "UDP 6081), one thread per direction, one packet per system call, no batching and "
        "no offloads: the simplest userspace tunnel"
    )
    kernel_path = False
    ready_timeout = 10.0
    binary_name = "gdp-tunfwd"

    def build(self, u: Underlay) -> Path:
        binary = pktgen.build(pktgen.HERE / "tunfwd.c", self.binary_name, ("-pthread",))
        ends = ((u.a, u.a_ip, u.b_ip), (u.b, u.b_ip, u.a_ip))
        for n, (ns, local, remote) in enumerate(ends, 1):
            # At geneve-dp's worker priority, as the TAP wire.
            argv = [str(binary), "tf0", local, remote, str(VNI)]
            self.procs.append(_start_helper(ns, argv, self.ready_timeout))
            sh("ip", "-n", ns, "link", "set", "tf0", "mtu", str(TUNNEL_MTU))
            sh("ip", "-n", ns, "addr", "add", f"{INNER_SUBNET}.{n}/24", "dev", "tf0")
            sh("ip", "-n", ns, "link", "set", "tf0", "up")
        return Path(
            u.a,
            u.b,
            f"{INNER_SUBNET}.1",
            f"{INNER_SUBNET}.2",
            dataplane_pids=[p.pid for p in self.procs],
            src_dev="tf0",
            dst_dev="tf0",
        )


class GeneveDp(Scenario):
    """Two `geneve-dp up` endpoints, one per namespace, as the CLI runs them."""

    kernel_path = False
    ready_timeout = 30.0

    def __init__(
        self,
        mode: str,
        engine: str,
        udp_csum: bool = False,
        inject: bool = True,
        auth: bool = False,
        busy_poll_us: int = 0,
    ) -> None:
        super().__init__()
        self.mode, self.engine, self.udp_csum, self.auth = mode, engine, udp_csum, auth
        self.extra = ["--udp-csum"] if udp_csum else []
        # --auth-key-file: every packet signed and checked (geneve_dp/auth); the key
        # file is made at build time, root's and mode 0600 as `up` requires.
        self.key_dir: tempfile.TemporaryDirectory[str] | None = None
        if busy_poll_us:
            self.extra += ["--busy-poll", str(busy_poll_us)]
        # GDP_INJECT=0: without the inject device (dataplane/inject.py), for comparison.
        self.env = None if inject else {**os.environ, "GDP_INJECT": "0"}
        self.id = (
            f"geneve-dp-{engine}-{mode}"
            + ("-csum" if udp_csum else "")
            + ("" if inject else "-noinject")
            + ("-auth" if auth else "")
            + ("-busypoll" if busy_poll_us else "")
        )
        self.label = (
            f"geneve-dp {'C' if engine == 'c' else 'Python'} engine, {mode.upper()}"
            + (", --udp-csum" if udp_csum else "")
            + ("" if inject else ", GDP_INJECT=0")
            + (", authenticated" if auth else "")
            + (f", --busy-poll {busy_poll_us}" if busy_poll_us else "")
        )
        self.description = (
            f"two `geneve-dp up --mode {mode} --engine {engine}{' '.join(['', *self.extra])}` "
            f"endpoints (VNI {VNI}, UDP 6081) over the veth"
            + (
                ": outer UDP checksums on, which is what lets UDP GSO carry TSO super-frames "
                "(the kernel refuses UDP_SEGMENT without a checksum)"
                if udp_csum
                else ""
            )
            + (
                "; the inject device off (GDP_INJECT=0): TSO segments and UDP datagrams "
                "leave one by one through sockets, as before it"
                if not inject
                else ""
            )
            + (
                "; --auth-key-file: every packet carries the integrity option (AES-GMAC, "
                "anti-replay), super-frames are segmented and signed per segment"
                if auth
                else ""
            )
            + (
                f"; busy polling: after one direction forwards, the other polls for the "
                f"answer for up to {busy_poll_us} µs before it sleeps"
                if busy_poll_us
                else ""
            )
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[deque[str]] = []

    def build(self, u: Underlay) -> Path:
        extra = list(self.extra)
        if self.auth:
            self.key_dir = tempfile.TemporaryDirectory(prefix="gdpb-key-")
            key = os.path.join(self.key_dir.name, "key")
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, os.urandom(32))
            os.close(fd)
            extra += ["--auth-key-file", key]
        for n, (ns, local, remote) in enumerate(((u.a, u.a_ip, u.b_ip), (u.b, u.b_ip, u.a_ip)), 1):
            cmd = [
                sys.executable, "-m", "geneve_dp", "up", "gdp0",
                "--vni", str(VNI), "--remote", remote, "--local", local,
                "--mode", self.mode, "--engine", self.engine, "--netns", ns,
                "--mtu", str(TUNNEL_MTU), "--address", f"{INNER_SUBNET}.{n}/24",
                *extra,
            ]  # fmt: skip
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
            self.procs.append(proc)
            log: deque[str] = deque(maxlen=20)
            self.logs.append(log)
            self._wait_ready(proc, log)
        return Path(
            u.a,
            u.b,
            f"{INNER_SUBNET}.1",
            f"{INNER_SUBNET}.2",
            dataplane_pids=[p.pid for p in self.procs],
            src_dev="gdp0",
            dst_dev="gdp0",
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], log: deque[str]) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"geneve-dp up printed no 'ready' within {self.ready_timeout:.0f} s: "
                    + _tail(log)
                )
            readable, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
            if not readable:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"geneve-dp up exited ({proc.returncode}) before ready: " + _tail(log)
                    )
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait(timeout=5)
                raise RuntimeError(
                    f"geneve-dp up exited ({proc.returncode}) before ready: " + _tail(log)
                )
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                log.append(text)
                # A word match: "already exists" in an error must not count.
                if re.search(r"\bready\b", text):
                    # Keep reading its output in the background so a chatty daemon can
                    # never block on a full pipe while we measure it.
                    threading.Thread(target=self._drain, args=(proc, log), daemon=True).start()
                    return

    @staticmethod
    def _drain(proc: subprocess.Popen[bytes], log: deque[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line.decode(errors="replace").strip())

    def counters(self) -> dict[str, Any] | None:
        # `geneve-dp stats --json --pid P` per endpoint: sender side "a", receiver "b".
        out: dict[str, Any] = {}
        for side, proc in zip("ab", self.procs, strict=False):
            r = subprocess.run(
                [sys.executable, "-m", "geneve_dp", "stats", "--json", "--pid", str(proc.pid)],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if r.returncode != 0:
                raise RuntimeError(f"geneve-dp stats failed: {r.stderr.strip()[-300:]}")
            out[side] = json.loads(r.stdout)
        return out

    def alive(self) -> str | None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                return f"geneve-dp up exited ({proc.returncode}): " + _tail(log)
        return None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.key_dir is not None:
            self.key_dir.cleanup()
            self.key_dir = None
        super().stop()


class OvsUserspace(Scenario):
    """Two Open vSwitch userspace (netdev datapath) bridges joined by GENEVE ports, one
    ovs-vswitchd per namespace (bench/ovs.py): the userspace GENEVE deployed today.
    Its bridges read and write the veth by AF_PACKET, so nothing bigger than the
    underlay MTU crosses it; its internal ports are TAP devices without offloads."""

    id = "ovs-netdev"
    label = "Open vSwitch userspace (netdev)"
    description = (
        f"two Open vSwitch userspace bridges (datapath_type=netdev), GENEVE ports (VNI "
        f"{VNI}, UDP 6081) over the veth, one ovs-vswitchd per namespace: br-phy holds the "
        "veth and the underlay address, br-int the GENEVE port and the inner address"
    )
    kernel_path = False

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[ovs.OvsNode] = []

    def missing(self) -> str | None:
        return ovs.missing()

    def build(self, u: Underlay) -> Path:
        ends = ((u.a, u.va, u.a_ip, u.b_ip), (u.b, u.vb, u.b_ip, u.a_ip))
        for n, (ns, dev, local, remote) in enumerate(ends, 1):
            node = ovs.OvsNode(ns)
            self.nodes.append(node)
            node.start()
            node.geneve(dev, f"{local}/24", remote, VNI, f"{INNER_SUBNET}.{n}/24", TUNNEL_MTU)
        return Path(
            u.a,
            u.b,
            f"{INNER_SUBNET}.1",
            f"{INNER_SUBNET}.2",
            dataplane_pids=[n.pids[-1] for n in self.nodes],  # the ovs-vswitchd
            src_dev=ovs.INT,
            dst_dev=ovs.INT,
        )

    def alive(self) -> str | None:
        for node in self.nodes:
            for pid in node.pids:
                if not ovs.running(pid):
                    return f"Open vSwitch daemon {pid} in {node.ns} exited"
        return None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        super().stop()


def _start_helper(ns: str, argv: list[str], timeout: float) -> subprocess.Popen[bytes]:
    """A bench C helper started in namespace ``ns`` at geneve-dp's worker priority (so
    the two compare on their work, not on who wins the CPU from the traffic programs),
    once it has printed "ready" on stderr."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "nice", "-n", str(DEFAULT_NICE), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    readable, _, _ = select.select([proc.stderr], [], [], timeout)
    line = proc.stderr.readline().decode(errors="replace").strip() if readable else ""
    if line != "ready":
        _stop_helper(proc)
        name = os.path.basename(argv[0])
        raise RuntimeError(f"{name} did not start: {line or 'no output'}")
    return proc


def _stop_helper(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def _tail(log: deque[str], n: int = 3) -> str:
    """The last lines a failed daemon printed (a traceback's last line names the error)."""
    return " | ".join(list(log)[-n:]) or "(no output)"


def all_scenarios() -> list[Scenario]:
    return [
        BareVeth(),
        KernelVxlan(),
        TapWire(),
        OnePacketForwarder(),
        GeneveDp("tap", "c"),
        GeneveDp("tap", "c", inject=False),
        GeneveDp("tap", "c", busy_poll_us=BUSY_POLL_US),
        GeneveDp("tap", "c", udp_csum=True),
        GeneveDp("tun", "c"),
        GeneveDp("tap", "c", auth=True),
        GeneveDp("tap", "python"),
        OvsUserspace(),
    ]


SCENARIO_IDS = [s.id for s in all_scenarios()]
