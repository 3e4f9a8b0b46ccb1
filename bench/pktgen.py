"""Python driver for the C generator, sink and request/response probe (bench/pktgen.c).

The binary is built on first use with the system C compiler into bench/build/ (git
ignores it) and rebuilt whenever pktgen.c is newer, so there is no separate build step.
Every function takes an optional network namespace and runs the binary inside it with
`ip netns exec`; results come back as the JSON object the binary prints.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "pktgen.c"
BUILD_DIR = HERE / "build"
BINARY = BUILD_DIR / "gdp-pktgen"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")

# The payload header the C code writes and checks: magic, flow, sequence, send time in
# CLOCK_MONOTONIC ns, all big-endian. Tests craft packets with it to drive the sink.
HEADER = struct.Struct("!HHIQ")
MAGIC = 0x6744

# Outer sizes, to turn a whole Ethernet frame size (RFC 2544 style: header, payload
# and the 4-byte FCS) into a UDP payload size, and back.
ETH_OVERHEAD = 14 + 4
IPV4_UDP = 20 + 8
MIN_PAYLOAD = 18  # a 64-byte frame
MAX_PAYLOAD = 1472  # a 1500-byte IPv4 packet
MIN_FRAME = MIN_PAYLOAD + ETH_OVERHEAD + IPV4_UDP
MAX_FRAME = MAX_PAYLOAD + ETH_OVERHEAD + IPV4_UDP

_build_lock = threading.Lock()

Json = dict[str, Any]


@dataclass(frozen=True)
class RawFrames:
    """Send whole frames with AF_PACKET + PACKET_QDISC_BYPASS on ``ifname`` (in the
    sender's namespace), IPv4 from ``src``, to ``dst_mac`` (None: broadcast, or no
    Ethernet header at all on a device without one, such as TUN)."""

    ifname: str
    src: str
    dst_mac: str | None = None


class PktgenError(RuntimeError):
    """The binary could not be built, failed, or printed something other than JSON."""


def payload_for_frame(frame_size: int) -> int:
    """UDP payload bytes that make an IPv4 Ethernet frame of ``frame_size`` (with FCS)."""
    return frame_size - ETH_OVERHEAD - IPV4_UDP


def frame_for_payload(payload: int) -> int:
    return payload + ETH_OVERHEAD + IPV4_UDP


def _binary_path(name: str) -> Path:
    # Beside the source in a checkout; in a per-user cache when the package directory
    # is read-only (installed into site-packages).
    if os.access(HERE, os.W_OK):
        return BUILD_DIR / name
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "geneve-dp" / name


def build(source: Path, name: str, extra: tuple[str, ...] = ()) -> Path:
    """A bench helper built from one C file (again whenever the file changes)."""
    target = _binary_path(name)
    with _build_lock:
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            return target
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise PktgenError(f"no C compiler (gcc or cc) to build bench/{source.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build to a temporary name and rename, so a concurrent user never runs a
        # half-written binary.
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        proc = subprocess.run(
            [cc, *CFLAGS, *extra, "-o", str(tmp), str(source)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise PktgenError(f"building {source.name} failed:\n{proc.stderr.strip()}")
        tmp.replace(target)
        return target


def binary() -> Path:
    """The generator binary, built (or rebuilt after an edit of pktgen.c) on demand."""
    return build(SOURCE, BINARY.name)


def _argv(mode: str, netns: str | None, options: dict[str, object]) -> list[str]:
    cmd = [str(binary()), mode]
    for key, value in options.items():
        if value is None:
            continue
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


def _parse(stdout: str, what: str, stderr: str) -> Json:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise PktgenError(f"{what} printed no JSON (stderr: {stderr.strip()[-500:]!r})")


def run(mode: str, netns: str | None = None, timeout: float = 60, **options: object) -> Json:
    """Run a foreground mode (``send`` or ``rr``) to completion and return its JSON."""
    cmd = _argv(mode, netns, options)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise PktgenError(f"{mode} did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise PktgenError(f"{mode} failed ({proc.returncode}): {proc.stderr.strip()}")
    return _parse(proc.stdout, mode, proc.stderr)


class Server:
    """A background ``sink`` or ``rr-server``: started, waited for, stopped, read.

    Use as a context manager so the process is gone even when the step fails.
    """

    def __init__(self, mode: str, netns: str | None = None, **options: object) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            _argv(mode, netns, options),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._wait_ready(10.0)

    def _wait_ready(self, timeout: float) -> None:
        # The binary writes "ready" on stderr after bind(); anything else there before
        # it is an error message worth showing.
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        seen = b""
        deadline = time.monotonic() + timeout
        while b"ready\n" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.kill()
                why = seen.decode(errors="replace").strip()
                raise PktgenError(f"{self.mode} did not start: {why}")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    continue
                seen += chunk

    def stop(self, timeout: float = 10.0) -> Json:
        """SIGTERM, then the JSON summary the process prints as it exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.result(timeout)

    def result(self, timeout: float = 30.0) -> Json:
        """Wait for the process to end by itself (idle or timeout) and return its JSON."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise PktgenError(f"{self.mode} did not exit within {timeout:.0f} s") from exc
        return _parse(out.decode(), self.mode, err.decode(errors="replace"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()


def udp_stream(
    src_ns: str | None,
    dst_ns: str | None,
    dst: str,
    *,
    port: int = 9000,
    payload: int = MIN_PAYLOAD,
    flows: int = 4,
    rate: float = 0,
    duration: float = 1.0,
    count: int | None = None,
    burst: int = 32,
    sport: int | None = 20000,
    raw: RawFrames | None = None,
) -> Json:
    """One generator run into one sink; returns both reports and the combined figures.

    ``lost`` is sent minus received (the sink alone cannot see a lost tail), as a count
    and a fraction of what was sent. With ``raw`` the generator writes whole frames to a
    device (AF_PACKET) instead of sending through a UDP socket.
    """
    # The sink ends on its own 0.5 s after the last packet; the hard timeout only
    # bounds a run where nothing arrives at all.
    with Server("sink", dst_ns, bind=dst, port=port, idle=0.5, timeout=duration + 15) as sink:
        sent = run(
            "send",
            src_ns,
            timeout=duration + 30,
            dst=dst,
            port=port,
            size=payload,
            flows=flows,
            rate=rate,
            duration=duration if count is None else None,
            count=count,
            burst=burst,
            sport=sport,
            ifname=raw.ifname if raw else None,
            src=raw.src if raw else None,
            dst_mac=raw.dst_mac if raw else None,
        )
        # Give packets still in flight time to land (the sink quits 0.5 s after the
        # last one), but don't wait out its hard timeout when nothing came through.
        try:
            sink.proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            pass
        received = sink.stop()
    lost = max(0, int(sent["sent_packets"]) - int(received["valid_packets"]))
    return {
        "send": sent,
        "sink": received,
        "lost": lost,
        "loss": lost / sent["sent_packets"] if sent["sent_packets"] else 0.0,
    }


def send_frames(
    netns: str | None,
    ifname: str,
    frames: list[bytes],
    *,
    duration: float = 1.0,
    count: int | None = None,
    rate: float = 0,
    burst: int = 32,
) -> Json:
    """Write ``frames`` (whole link-layer frames, sent as they are) round robin to
    ``ifname`` with AF_PACKET; the report's ``per_template`` counts each one sent."""
    import tempfile

    if not frames or len(frames) > 4096 or any(not 0 < len(f) <= 9216 for f in frames):
        raise PktgenError("send_frames: 1..4096 frames of 1..9216 bytes each")
    with tempfile.NamedTemporaryFile(prefix="gdp-frames-", suffix=".bin") as f:
        for frame in frames:
            f.write(struct.pack("!H", len(frame)) + frame)
        f.flush()
        return run(
            "send-frames",
            netns,
            timeout=duration + 30,
            ifname=ifname,
            templates=f.name,
            duration=duration if count is None else None,
            count=count,
            rate=rate,
            burst=burst,
        )


def request_response(
    client_ns: str | None,
    server_ns: str | None,
    dst: str,
    *,
    port: int = 9001,
    payload: int = 64,
    duration: float = 1.0,
    count: int | None = None,
    wait_ms: int = 200,
    rate: float | None = None,
) -> Json:
    """Ping-pong round trips from client to an echo server; latency percentiles in ns.
    ``rate``: requests start that many times a second (still one at a time), so the
    path idles between them; None: each starts as soon as the last was answered."""
    with Server("rr-server", server_ns, bind=dst, port=port, timeout=duration + 30) as server:
        result = run(
            "rr",
            client_ns,
            timeout=duration + 30,
            dst=dst,
            port=port,
            size=payload,
            duration=duration if count is None else None,
            count=count,
            wait_ms=wait_ms,
            rate=rate,
        )
        result["server"] = server.stop()
    return result
