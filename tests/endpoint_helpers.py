"""Helpers for the endpoint tests.

Run inside a namespace as ``python -m tests.endpoint_helpers ENGINE SPECS_JSON``: starts
a Dataplane for the specs, puts spec addresses on the devices, prints one JSON line
``{"ready": status}``, then answers stdin lines: ``status`` prints the status JSON,
``quit`` stops and exits. Control messages handed to the hook are included in the
status as ``control_messages``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.netns import Netns, veth

ROOT = __file__.rsplit("/tests/", 1)[0]


def _main(engine: str, specs_json: str) -> int:
    import logging

    from geneve_dp.dataplane import Dataplane
    from geneve_dp.dataplane.spec import build_spec
    from geneve_dp.errors import UserError

    # The dataplane's log lines on stderr (Endpoint's ``stderr``).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    raw_specs = json.loads(specs_json)
    specs = [build_spec(r) for r in raw_specs]
    control: list[list[str]] = []
    lock = threading.Lock()

    def hook(name: str, packet: bytes) -> None:
        with lock:
            control.append([name, packet.hex()])

    # "c+offload": the C engine with IFF_VNET_HDR TSO/checksum offloads; "+wN": N
    # workers (default: one per two cores).
    parts = engine.split("+")
    offload = "offload" in parts
    workers = [int(p[1:]) for p in parts if p.startswith("w") and p[1:].isdigit()]
    # "+bpN": busy polling for N µs.
    busy = [int(p[2:]) for p in parts if p.startswith("bp") and p[2:].isdigit()]
    dp = Dataplane(
        specs,
        engine=parts[0],
        control_hook=hook,
        offload=offload,
        workers=workers[0] if workers else None,
        busy_poll_us=busy[0] if busy else 0,
    )
    try:
        dp.start()
    except UserError as exc:
        print(json.dumps({"error": str(exc), "field": exc.field}), flush=True)
        return 2
    for spec in specs:
        for addr in spec.addresses:
            argv = ["ip", "addr", "add", str(addr), "dev", spec.name]
            if addr.version == 6:
                argv.append("nodad")
            subprocess.run(argv, check=True)

    def dump() -> str:
        with lock:
            return json.dumps({"status": dp.status(), "control_messages": list(control)})

    print(json.dumps({"ready": dp.status()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "status":
            dp.check()
            print(dump(), flush=True)
        elif cmd == "quit":
            break
    dp.stop()
    dp.stop()  # idempotent
    print(json.dumps({"stopped": True}), flush=True)
    return 0


class Endpoint:
    """A Dataplane running in a helper process inside ``ns``."""

    def __init__(
        self, ns: Netns, engine: str, specs: list[dict[str, Any]], stderr: Any = None
    ) -> None:
        self.ns = ns
        self.proc = ns.popen(
            [sys.executable, "-m", "tests.endpoint_helpers", engine, json.dumps(specs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
        )
        first = self._line(timeout=20)
        if "error" in first:
            self.error: dict[str, Any] | None = first
        else:
            self.error = None
            self.ready = first["ready"]

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        result: list[str] = []
        th = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        th.start()
        th.join(timeout)
        if not result or not result[0]:
            self.proc.kill()
            raise RuntimeError(f"endpoint helper gave no answer (rc {self.proc.poll()})")
        return json.loads(result[0])  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        return self._line(timeout=10)

    def tunnel(self, name: str) -> dict[str, Any]:
        for t in self.status()["status"]:
            if t["name"] == name:
                return t  # type: ignore[no-any-return]
        raise KeyError(name)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


@contextmanager
def endpoint(
    ns: Netns, engine: str, specs: list[dict[str, Any]], stderr: Any = None
) -> Iterator[Endpoint]:
    """``stderr``: where the helper's log lines go (a file; default: inherited)."""
    ep = Endpoint(ns, engine, specs, stderr)
    try:
        yield ep
    finally:
        ep.close()


def underlay(a: Netns, b: Netns, mtu: int = 1500) -> None:
    """veth ua (10.0.0.1, fd00::1) in a to ub (10.0.0.2, fd00::2) in b."""
    veth(a, "ua", b, "ub")
    for ns, ifname, v4, v6 in (
        (a, "ua", "10.0.0.1/24", "fd00::1/64"),
        (b, "ub", "10.0.0.2/24", "fd00::2/64"),
    ):
        ns.run("ip", "link", "set", ifname, "mtu", str(mtu))
        ns.run("ip", "addr", "add", v4, "dev", ifname)
        ns.run("ip", "addr", "add", v6, "dev", ifname, "nodad")


def wait_for(pred: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def perf(
    engines: list[str],
    mode: str = "tap",
    seconds: float = 5.0,
    family: int = 4,
    repeat: int = 1,
) -> None:
    """Ad-hoc throughput check: kernel VXLAN and each engine over the same veth, in
    one run (the machines are noisy: compare within a run only). Prints one line per
    path: single-stream iperf3 TCP, and 64-byte UDP payloads from bench/pktgen.

    ``python -m tests.endpoint_helpers perf [-6] [-rN] [--tun] c c+offload python`` (-6:
    the geneve-dp tunnels run over the IPv6 underlay; VXLAN stays on IPv4; -rN: the
    whole sequence N times, VXLAN and engines interleaved, for a loaded machine;
    "+csum" after an engine: outer UDP checksums).
    """
    from bench import pktgen

    a, b = Netns("pfa"), Netns("pfb")

    def tcp(addr: str) -> str:
        srv = b.popen(["iperf3", "-s", "-1", "-B", addr], stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            out = json.loads(
                a.run("iperf3", "-c", addr, "-t", str(seconds), "-J", timeout=seconds + 30).stdout
            )
            return f"{out['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s"
        finally:
            srv.kill()
            srv.wait(5)

    def udp(addr: str) -> str:
        r = pktgen.udp_stream(a.name, b.name, addr, payload=64, duration=seconds, flows=4)
        el = r["send"]["elapsed_s"]
        return (
            f"{r['sink']['valid_packets'] / el / 1e3:.0f} kpps delivered "
            f"of {r['send']['pps'] / 1e3:.0f} kpps sent"
        )

    try:
        underlay(a, b)
        for ns, me, peer, host in ((a, "10.0.0.1", "10.0.0.2", 1), (b, "10.0.0.2", "10.0.0.1", 2)):
            ns.run(
                "ip",
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "42",
                "remote",
                peer,
                "local",
                me,
                "dstport",
                "4789",
            )
            ns.run("ip", "addr", "add", f"192.168.50.{host}/24", "dev", "vx0")
            ns.run("ip", "link", "set", "vx0", "up")
        a.run("ping", "-c", "1", "-W", "2", "192.168.50.2")
        for _ in range(repeat):
            vx = "192.168.50.2"
            print(f"kernel vxlan: TCP {tcp(vx)}, UDP64 {udp(vx)}", flush=True)
            _perf_engines(a, b, engines, mode, family, tcp, udp)
    finally:
        a.delete()
        b.delete()


def _perf_engines(
    a: Netns, b: Netns, engines: list[str], mode: str, family: int, tcp: Any, udp: Any
) -> None:
    for engine in engines:
        # "+csum": outer UDP checksums (on IPv4 that is what lets UDP GSO run).
        csum = engine.endswith("+csum")
        engine = engine.removesuffix("+csum")
        ra, rb = ("10.0.0.2", "10.0.0.1") if family == 4 else ("fd00::2", "fd00::1")

        def spec(remote: str, host: int, csum: bool = csum) -> list[dict[str, Any]]:
            return [
                {
                    "name": "gt0",
                    "vni": 100,
                    "remote": remote,
                    "mode": mode,
                    "udp_csum": True if csum else None,
                    "addresses": [f"192.168.100.{host}/24"],
                }
            ]

        sa, sb = spec(ra, 1), spec(rb, 2)
        with endpoint(a, engine, sa), endpoint(b, engine, sb):
            a.run("ping", "-c", "1", "-W", "2", "192.168.100.2")
            label = f"{engine}{'+csum' if csum else ''} {mode} ipv{family} underlay"
            print(
                f"geneve-dp {label}: TCP {tcp('192.168.100.2')}, UDP64 {udp('192.168.100.2')}",
                flush=True,
            )


if __name__ == "__main__":
    if sys.argv[1] == "perf":
        args = sys.argv[2:]
        v6 = "-6" in args
        reps = [int(x[2:]) for x in args if x.startswith("-r")]
        perf(
            [x for x in args if not x.startswith("-")],
            mode="tun" if "--tun" in args else "tap",
            family=6 if v6 else 4,
            repeat=reps[0] if reps else 1,
        )
        sys.exit(0)
    sys.exit(_main(sys.argv[1], sys.argv[2]))


# ---------------------------------------------------------------- crafted packets


def ip_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_udp(src: str, dst: str, payload: bytes, tos: int = 0, df: bool = False) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0) built from raw bytes."""
    import ipaddress
    import struct

    udp = struct.pack("!HHHH", 40000, 9999, 8 + len(payload), 0) + payload
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        tos,
        20 + len(udp),
        1,
        0x4000 if df else 0,
        64,
        17,
        0,
        ipaddress.ip_address(src).packed,
        ipaddress.ip_address(dst).packed,
    )
    hdr = hdr[:10] + ip_checksum(hdr).to_bytes(2, "big") + hdr[12:]
    return hdr + udp


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def geneve(
    vni: int,
    protocol: int,
    payload: bytes,
    options: bytes = b"",
    oam: bool = False,
    critical: bool = False,
    version: int = 0,
    opt_len: int | None = None,
) -> bytes:
    """A GENEVE header from raw fields: nothing is fixed up, so it can be wrong."""
    words = len(options) // 4 if opt_len is None else opt_len
    b0 = (version << 6) | (words & 0x3F)
    b1 = (0x80 if oam else 0) | (0x40 if critical else 0)
    return (
        bytes([b0, b1])
        + protocol.to_bytes(2, "big")
        + (vni << 8).to_bytes(4, "big")
        + options
        + payload
    )


def option(opt_class: int, opt_type: int, data: bytes = b"") -> bytes:
    return opt_class.to_bytes(2, "big") + bytes([opt_type, len(data) // 4]) + data


SNIFF_SCRIPT = r"""
import socket, sys, time, json
dev, seconds, marker = sys.argv[1], float(sys.argv[2]), bytes.fromhex(sys.argv[3])
sentinel = bytes.fromhex(sys.argv[4]) if len(sys.argv) > 4 else None
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((dev, 0))
s.settimeout(0.1)
print("sniffing", flush=True)
out = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(70000)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    if marker in data:
        out.append(data.hex())
    if sentinel is not None and sentinel in data:
        break
print(json.dumps(out), flush=True)
"""


class Sniffer:
    """Frames containing ``marker`` received on ``dev`` in ``ns`` for ``seconds``."""

    def __init__(
        self, ns: Netns, dev: str, seconds: float, marker: bytes, sentinel: bytes | None = None
    ) -> None:
        extra = [sentinel.hex()] if sentinel is not None else []
        self.proc = ns.popen(
            [sys.executable, "-c", SNIFF_SCRIPT, dev, str(seconds), marker.hex(), *extra],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "sniffing"

    def frames(self) -> list[bytes]:
        out, _ = self.proc.communicate(timeout=30)
        return [bytes.fromhex(h) for h in json.loads(out)]


# One socket (so one source port) per source address: a GENEVE peer sends a flow from
# one port, and the endpoint's workers are chosen by the outer 4-tuple, so packets
# from one port arrive in the order sent.
SEND_SCRIPT = r"""
import json, socket, sys
socks = {}
for src, dst, port, tos, hexdata in json.loads(sys.argv[1]):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socks.get((src, fam))
    if s is None:
        s = socks[(src, fam)] = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((src, 0))
    if fam == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
    s.sendto(bytes.fromhex(hexdata), (dst, port))
"""


def send_udp(ns: Netns, packets: list[tuple[str, str, int, int, bytes]]) -> None:
    """Send UDP payloads (src, dst, port, tos, payload) from a plain socket in ``ns``."""
    arg = json.dumps([[s, d, p, t, b.hex()] for s, d, p, t, b in packets])
    ns.run(sys.executable, "-c", SEND_SCRIPT, arg, timeout=20)
