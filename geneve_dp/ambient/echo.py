"""Echo servers and clients for the demo and the e2e tests.

The servers answer with what they saw: ``<name> saw <peer> -> <local>: <data>``, so
the client can tell whether the far end saw its real address (ztunnel passthrough
keeps the original source) and which address it spoke to. Run inside a namespace:
``python -m geneve_dp.ambient.echo serve NAME --tcp 8080 --udp 9000`` or
``python -m geneve_dp.ambient.echo tcp|udp HOST PORT DATA``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from .sockets import accept_loop

TIMEOUT = 5.0


def _reply(name: str, peer: tuple[str, int], local: tuple[str, int], data: bytes) -> bytes:
    text = data.decode(errors="replace").strip()
    return f"{name} saw {peer[0]}:{peer[1]} -> {local[0]}:{local[1]}: {text}\n".encode()


def _tcp_conn(name: str, conn: socket.socket) -> None:
    with conn:
        conn.settimeout(TIMEOUT)
        try:
            data = conn.recv(4096)
            conn.sendall(_reply(name, conn.getpeername(), conn.getsockname(), data))
        except OSError:
            pass


def serve(name: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    socks: list[socket.socket] = []

    def tcp_conn(conn: socket.socket) -> None:
        _tcp_conn(name, conn)

    def udp_loop(s: socket.socket) -> None:
        while not stop.is_set():
            try:
                data, peer = s.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            # A wildcard-bound UDP socket does not know the address it was reached on.
            s.sendto(_reply(name, peer, ("*", s.getsockname()[1]), data), peer)

    threads = []
    for port in tcp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(64)
        socks.append(s)
        threads.append(threading.Thread(target=accept_loop, args=(s, stop, tcp_conn), daemon=True))
    for port in udp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.settimeout(0.2)
        socks.append(s)
        threads.append(threading.Thread(target=udp_loop, args=(s,), daemon=True))
    for t in threads:
        t.start()
    print(f"{name} ready", flush=True)
    stop.wait()
    for s in socks:
        s.close()


def tcp_request(host: str, port: int, data: str, timeout: float = TIMEOUT) -> str:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data.encode())
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").strip()


def udp_request(host: str, port: int, data: str, timeout: float = TIMEOUT) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(3):  # UDP may lose the first datagram while ARP resolves
            s.sendto(data.encode(), (host, port))
            try:
                reply, _ = s.recvfrom(4096)
                return reply.decode(errors="replace").strip()
            except TimeoutError:
                continue
    raise TimeoutError(f"no UDP reply from {host}:{port}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m geneve_dp.ambient.echo")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("name")
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--udp", type=int, action="append", default=[])
    for proto in ("tcp", "udp"):
        c = sub.add_parser(proto)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("data")
        c.add_argument("--timeout", type=float, default=TIMEOUT)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.name, args.tcp, args.udp)
        return 0
    fn = tcp_request if args.cmd == "tcp" else udp_request
    try:
        print(fn(args.host, args.port, args.data, args.timeout))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
