"""Prometheus metrics of a running dataplane, read from its counters at scrape time.

The daemon hands ``serve`` a function returning its status (the reply of the control
socket's ``{"cmd": "status"}``); every scrape of ``/metrics`` calls it once, so there
is no second copy of the counters to keep in step and nothing runs between scrapes.

Names follow the Prometheus conventions: ``geneve_dp_`` prefix, base units (bytes),
``_total`` on counters. Per tunnel device (labels ``device`` and ``vni``)::

    geneve_dp_rx_packets_total, geneve_dp_rx_bytes_total,
    geneve_dp_tx_packets_total, geneve_dp_tx_bytes_total,
    geneve_dp_control_packets_total, geneve_dp_tx_fragmented_total,
    geneve_dp_tx_gso_frames_total, geneve_dp_rx_gro_frames_total,
    geneve_dp_tx_injected_total,
    geneve_dp_drops_total{reason}, geneve_dp_options_total{class,type},
    geneve_dp_options_other_total, geneve_dp_offload_enabled,
    geneve_dp_tx_inject, geneve_dp_inject_probes_total{outcome},
    geneve_dp_tunnel_info{remote,local,port,mode,mtu}

Per receive socket (labels ``family``, ``port``): the packets no tunnel could be named
for are counted there, not on a device::

    geneve_dp_socket_rx_packets_total, geneve_dp_socket_rx_queue_overflow_total,
    geneve_dp_socket_drops_total{reason}, geneve_dp_socket_worker_rx_packets_total{worker}

And once per process: ``geneve_dp_workers`` (forwarding workers),
``geneve_dp_worker_threads`` (forwarding threads alive),
``geneve_dp_tunnels``, ``geneve_dp_build_info{version,engine,python}``, plus the
client library's process_* metrics.

The HTTP side runs on the daemon's event loop, not in threads: one request and one
response per connection (``Connection: close``), at most ``max_clients`` connections
at once (an eighth of the fd limit, at most 64, so fds stay in reserve for repairs),
``CLIENT_TIMEOUT`` seconds for a client to send its request and take the answer. A new
connection beyond the bound closes the one that has waited longest without sending a
request, so idle clients cannot keep a scrape out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import platform
import resource
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .dataplane.reasons import SOCKET_DROP_REASONS, TUNNEL_DROP_REASONS
from .errors import UserError

DEFAULT_HOST = "127.0.0.1"
CLIENT_TIMEOUT = 5.0  # seconds to send the request head, and again to read the reply
HEAD_LIMIT = 8192  # bytes of a request head (request line and headers)
MAX_CLIENTS = 64

Snapshot = Callable[[], Mapping[str, Any]]

# (metric name without _total, counter key in the status, help text)
_TUNNEL_COUNTERS = (
    ("rx_packets", "rx_packets", "Packets received from the underlay and written to the device."),
    ("rx_bytes", "rx_bytes", "Bytes of the packets counted in rx_packets."),
    ("tx_packets", "tx_packets", "Packets read from the device and sent on the underlay."),
    ("tx_bytes", "tx_bytes", "Bytes of the packets counted in tx_packets."),
    ("control_packets", "control", "O-bit (control) packets received (RFC 8926 3.4)."),
    ("tx_fragmented", "tx_fragmented", "Outer packets the engine fragmented itself."),
    ("tx_gso_frames", "tx_gso_frames", "TSO super-frames segmented on transmit (offload)."),
    ("rx_gro_frames", "rx_gro_frames", "Coalesced super-frames written to the device (offload)."),
    (
        "tx_injected",
        "tx_injected",
        "Super-frames sent whole through the inject device (gdpxN) instead of the sockets.",
    ),
)


ADDR_ACCEPTED = (
    "accepted: PORT, IPV4:PORT, [IPV4]:PORT or [IPV6]:PORT with PORT 1..65535, e.g. "
    "127.0.0.1:9464 or [fd00::1]:9464"
)


def parse_addr(value: str, field: str = "--metrics-addr") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT`` (on 127.0.0.1) -> (host, port)."""
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    elif host.startswith("[") and host.endswith("]"):
        # Brackets around either family, so one template, `[$(NODE_IP)]:PORT`, fits
        # IPv4 and IPv6 nodes alike.
        host = host[1:-1]
    elif ":" in host:
        raise UserError(f"{value!r} has an IPv6 host without brackets; {ADDR_ACCEPTED}", field)
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise UserError(f"{value!r} has no port in 1..65535; {ADDR_ACCEPTED}", field)
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise UserError(
            f"{value!r} has a host that is not an IP address; {ADDR_ACCEPTED}", field
        ) from exc
    return host, port


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The metric families of one status reply (pure: the tests feed it fixtures)."""
    tunnels: list[Mapping[str, Any]] = list(status.get("tunnels", []))
    dev = ["device", "vni"]
    for name, key, doc in _TUNNEL_COUNTERS:
        fam = CounterMetricFamily(f"geneve_dp_{name}", doc, labels=dev)
        for t in tunnels:
            fam.add_metric([t["name"], str(t["vni"])], int(t["counters"].get(key, 0)))
        yield fam

    drops = CounterMetricFamily(
        "geneve_dp_drops", "Packets dropped on a tunnel, by reason.", labels=[*dev, "reason"]
    )
    opts = CounterMetricFamily(
        "geneve_dp_options",
        "Received TLV options by class and type (the first few kinds seen).",
        labels=[*dev, "class", "type"],
    )
    other = CounterMetricFamily(
        "geneve_dp_options_other",
        "Received TLV options of kinds beyond those counted one by one.",
        labels=dev,
    )
    offload = GaugeMetricFamily(
        "geneve_dp_offload_enabled",
        "1 if the device runs with TAP/TUN offloads (IFF_VNET_HDR), else 0.",
        labels=dev,
    )
    inject = GaugeMetricFamily(
        "geneve_dp_tx_inject",
        "1 while the tunnel sends TCP super-frames and UDP runs whole through the inject "
        "device, else 0 (segmented here).",
        labels=dev,
    )
    probes = CounterMetricFamily(
        "geneve_dp_inject_probes",
        "Probes of the inject device's way to the underlay, by outcome (left, late: "
        "found after the wait; stopped: entered, did not leave; unseen: not taken in).",
        labels=[*dev, "outcome"],
    )
    info = InfoMetricFamily(
        "geneve_dp_tunnel", "Configuration of a tunnel device.", labels=[*dev, "remote"]
    )
    for t in tunnels:
        labels = [t["name"], str(t["vni"])]
        c = t["counters"]
        for reason in TUNNEL_DROP_REASONS:
            drops.add_metric([*labels, reason], int(c.get("drops", {}).get(reason, 0)))
        for kind, n in sorted(c.get("options_seen", {}).items()):
            opt_class, _, opt_type = kind.partition(":")
            opts.add_metric([*labels, opt_class, opt_type], int(n))
        other.add_metric(labels, int(c.get("options_other", 0)))
        offload.add_metric(labels, 1 if t.get("offloads", {}).get("tso") else 0)
        inject.add_metric(labels, 1 if t.get("offloads", {}).get("tx_inject") else 0)
        for outcome, n in sorted((t.get("inject_probes") or {}).items()):
            probes.add_metric([*labels, outcome], int(n))
        info.add_metric(
            [*labels, str(t["remote"])],
            {
                "local": str(t.get("local")),
                "port": str(t["port"]),
                "mode": str(t["mode"]),
                "mtu": str(t["mtu"]),
            },
        )
    yield from (drops, opts, other, offload, inject, probes, info)

    sockets: dict[tuple[str, str], Mapping[str, Any]] = {}
    for t in tunnels:
        s = t.get("socket")
        if s is not None:  # tunnels on one port share its socket: count it once
            sockets[(f"ipv{s['family']}", str(s["port"]))] = s
    sock = ["family", "port"]
    rx = CounterMetricFamily(
        "geneve_dp_socket_rx_packets", "Datagrams read from a receive socket.", labels=sock
    )
    ovfl = CounterMetricFamily(
        "geneve_dp_socket_rx_queue_overflow",
        "Datagrams the kernel dropped because the receive socket's queue was full.",
        labels=sock,
    )
    sdrops = CounterMetricFamily(
        "geneve_dp_socket_drops",
        "Packets dropped before a tunnel could be named for them, by reason.",
        labels=[*sock, "reason"],
    )
    per_worker = CounterMetricFamily(
        "geneve_dp_socket_worker_rx_packets",
        "Datagrams read from a receive socket, by worker (SO_REUSEPORT spreads flows).",
        labels=[*sock, "worker"],
    )
    for where, counts in sorted(sockets.items()):
        for k, n in enumerate(counts.get("rx_packets_per_worker", [])):
            per_worker.add_metric([*where, str(k)], int(n))
        rx.add_metric(list(where), int(counts.get("rx_packets", 0)))
        ovfl.add_metric(list(where), int(counts.get("rx_queue_overflow", 0)))
        for reason in SOCKET_DROP_REASONS:
            sdrops.add_metric([*where, reason], int(counts.get("drops", {}).get(reason, 0)))
    yield from (rx, ovfl, sdrops, per_worker)

    yield GaugeMetricFamily(
        "geneve_dp_workers",
        "Forwarding workers (a device queue and a receive socket each).",
        value=int(status.get("workers", 0)),
    )
    yield GaugeMetricFamily(
        "geneve_dp_worker_threads",
        "Forwarding threads alive (receive and transmit, per worker and port).",
        value=int(status.get("worker_threads", 0)),
    )
    yield GaugeMetricFamily("geneve_dp_tunnels", "Tunnel devices served.", value=len(tunnels))
    build = InfoMetricFamily("geneve_dp_build", "Version of geneve-dp and what it runs on.")
    build.add_metric(
        [],
        {
            "version": __version__,
            "engine": str(status.get("engine", "")),
            "python": platform.python_version(),
        },
    )
    yield build


class DataplaneCollector(Collector):
    """Reads the dataplane's counters when Prometheus scrapes, not before."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return families(self._snapshot())


def client_bound(nofile: int | None = None) -> int:
    """Connections served at once: an eighth of the fd limit, 4..MAX_CLIENTS."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            return MAX_CLIENTS
    return max(4, min(MAX_CLIENTS, nofile // 8))


def respond(head: bytes, registry: CollectorRegistry) -> bytes:
    """The whole HTTP response to one request head (pure but for the scrape itself)."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response(400, "Bad Request", b"bad request line\n")
    method, target, _version = parts
    if method not in ("GET", "HEAD"):
        return _response(405, "Method Not Allowed", b"GET /metrics\n", allow="GET, HEAD")
    if target.split("?", 1)[0] not in ("/metrics", "/"):
        return _response(404, "Not Found", b"GET /metrics\n")
    body = generate_latest(registry)
    return _response(200, "OK", body, content_type=CONTENT_TYPE_LATEST, head=method == "HEAD")


def _response(
    code: int,
    reason: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
    allow: str | None = None,
) -> bytes:
    lines = [
        f"HTTP/1.1 {code} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow is not None:
        lines.append(f"Allow: {allow}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)


class MetricsServer:
    """``/metrics`` over HTTP on one address, served on the running event loop."""

    def __init__(self, registry: CollectorRegistry, max_clients: int) -> None:
        self._registry = registry
        self.max_clients = max_clients
        self._server: asyncio.base_events.Server | None = None
        # Connections by state; dicts keep arrival order, so the first one waiting is
        # the one that has waited longest.
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._answering: set[asyncio.StreamWriter] = set()
        self.url = ""

    @classmethod
    async def start(cls, host: str, port: int, snapshot: Snapshot) -> MetricsServer:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DataplaneCollector(snapshot))
        ProcessCollector(registry=registry)
        self = cls(registry, client_bound())
        try:
            self._server = await asyncio.start_server(
                self._client, host, port, limit=HEAD_LIMIT, reuse_address=True
            )
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UserError(
                f"cannot listen on {where_of(host, port)}: {why}", "--metrics-addr"
            ) from exc
        bound = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{where_of(host, bound)}/metrics"
        return self

    @property
    def clients(self) -> int:
        return len(self._waiting) + len(self._answering)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= self.max_clients:
            if not self._waiting:  # all busy taking their answers: this one waits outside
                writer.close()
                return
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.close()
        self._waiting[writer] = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_TIMEOUT)
            finally:
                self._waiting.pop(writer, None)
            self._answering.add(writer)
            writer.write(respond(head, self._registry))
            await asyncio.wait_for(writer.drain(), CLIENT_TIMEOUT)
        except asyncio.LimitOverrunError:
            writer.write(_response(431, "Request Header Fields Too Large", b""))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # gone, closed to make room, or too slow: nothing to answer
        finally:
            self._answering.discard(writer)
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in [*self._waiting, *self._answering]:
            writer.close()


def where_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
