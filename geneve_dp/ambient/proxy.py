"""A small transparent stand-in for ztunnel: TPROXY listeners and plain TCP passthrough.

Listeners on 15001 (outbound), 15006 (inbound plaintext) and 15008 (inbound; real
ztunnel speaks HBONE there) carry IP_TRANSPARENT, which TPROXY needs to hand them
connections for addresses that are not ours. For each accepted connection the local
address *is* the original destination. We log one JSON line (listener, client,
original destination) and connect to that destination from the client's own address
(IP_TRANSPARENT + IP_FREEBIND, bind before connect), so the far end sees the real
client, then copy bytes both ways. No mTLS, no HBONE, no policy: honest passthrough.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from .sockets import accept_loop, is_local

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 30.0


class Logger:
    """JSON lines to a stream, one write per record (readers may tail it)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, **record: Any) -> None:
        record.setdefault("ts", round(time.time(), 3))
        line = json.dumps(record, sort_keys=True)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    return s


def upstream(client_ip: str, dst: tuple[str, int], spoof: bool) -> socket.socket:
    """Connect to ``dst``, from ``client_ip`` when spoofing (ztunnel's original source)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if spoof and client_ip != dst[0]:
            # Not ours to bind without these: the kernel must accept a foreign source.
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            s.bind((client_ip, 0))
        s.settimeout(CONNECT_TIMEOUT)
        s.connect(dst)
        s.settimeout(IDLE_TIMEOUT)
    except BaseException:
        s.close()
        raise
    return s


def _pump(src: socket.socket, dst: socket.socket, counter: list[int]) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
            counter[0] += len(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def handle(conn: socket.socket, port: int, log: Callable[..., None], spoof: bool) -> None:
    client = conn.getpeername()
    orig = conn.getsockname()  # TPROXY: the accepted socket's local address
    record: dict[str, Any] = {
        "event": "accept",
        "listener": port,
        "client": f"{client[0]}:{client[1]}",
        "orig_dst": f"{orig[0]}:{orig[1]}",
    }
    if orig[1] == port and is_local(orig[0]):
        # Addressed to the listener itself, not redirected: forwarding would loop.
        log(**record, upstream="refused: addressed to the proxy itself")
        conn.close()
        return
    conn.settimeout(IDLE_TIMEOUT)
    try:
        up = upstream(client[0], (orig[0], orig[1]), spoof)
    except OSError as exc:
        log(**record, upstream=f"error: {exc.strerror or exc}")
        conn.close()
        return
    src = up.getsockname()
    log(**record, upstream="connected", upstream_src=f"{src[0]}:{src[1]}")
    sent, received = [0], [0]
    t = threading.Thread(target=_pump, args=(up, conn, received), daemon=True)
    t.start()
    _pump(conn, up, sent)
    t.join(IDLE_TIMEOUT)
    log(
        event="close",
        listener=port,
        client=record["client"],
        orig_dst=record["orig_dst"],
        bytes_up=sent[0],
        bytes_down=received[0],
    )
    for s in (conn, up):
        s.close()


def serve(ports: list[int], log: Callable[..., None], spoof: bool, stop: threading.Event) -> None:
    socks = [listener(p) for p in ports]
    log(event="listening", ports=ports, transparent=True, spoof=spoof)

    def handler(port: int) -> Callable[[socket.socket], None]:
        return lambda conn: handle(conn, port, log, spoof)

    threads = [
        threading.Thread(target=accept_loop, args=(s, stop, handler(p)), daemon=True)
        for s, p in zip(socks, ports, strict=True)
    ]
    for t in threads:
        t.start()
    try:
        stop.wait()
    finally:
        for s in socks:
            s.close()
        for t in threads:
            t.join(1.0)


def main(ports: list[int], log_path: str | None, spoof: bool = True) -> int:
    from ..errors import UserError

    stream: IO[str] = open(log_path, "a") if log_path else sys.stdout
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve(ports, Logger(stream), spoof, stop)
    except PermissionError as exc:
        raise UserError("IP_TRANSPARENT needs CAP_NET_ADMIN: run as root", "proxy") from exc
    except OSError as exc:
        raise UserError(f"cannot listen: {exc.strerror or exc}", "--ports") from exc
    finally:
        if log_path:
            stream.close()
    return 0
