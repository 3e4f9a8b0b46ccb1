"""The control socket: one unix socket per running dataplane in the run directory.

The daemon serves its status on ``gdp-<pid>.sock`` (one JSON request line in, one
JSON reply line out); `show`, `stats` and the ambient tools find every running
dataplane by globbing the run directory and asking each socket (``query_all``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger("geneve_dp.daemon")

RUN_DIR_ENV = "GENEVE_DP_RUN_DIR"
DEFAULT_RUN_DIR = Path("/run/geneve-dp")
CLIENT_TIMEOUT = 5.0  # the server's: seconds a client has to send its request
REQUEST_LIMIT = 64 * 1024  # bytes of one control request line
# The clients': seconds a dataplane has to answer (all are asked at once), and the
# bytes of a reply at most.
QUERY_TIMEOUT = 2.0
REPLY_LIMIT = 16 * 1024 * 1024
STATUS_REQUEST = b'{"cmd": "status"}\n'

Status = Callable[[], dict[str, Any]]


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV, str(DEFAULT_RUN_DIR)))


def socket_path(pid: int) -> Path:
    return run_dir() / f"gdp-{pid}.sock"


# -- server (the daemon's side) ------------------------------------------------------------


async def serve(path: Path, status: Status) -> asyncio.base_events.Server:
    """Listen on ``path`` and answer each request with ``status()``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(reader, writer, status)

    old = os.umask(0o177)  # the socket is born 0600: counters and config are root's
    try:
        server = await asyncio.start_unix_server(handle, path=str(path), limit=REQUEST_LIMIT)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: Status
) -> None:
    try:
        try:
            line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT)
        except ValueError:  # asyncio's limit: the line is longer than REQUEST_LIMIT
            reply: Any = {"error": f"request longer than {REQUEST_LIMIT} bytes; refused"}
        else:
            reply = answer(line, status)
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    except Exception:  # one bad client must never take the daemon down
        log.exception("control request failed")
    finally:
        writer.close()


def answer(line: bytes, status: Status) -> dict[str, Any]:
    """The reply to one request line."""
    accepted = 'accepted: {"cmd": "status"}'
    try:
        request = json.loads(line or b"{}")
    except ValueError:
        return {"error": f"request is not a JSON object; {accepted}"}
    if not isinstance(request, dict):
        return {"error": f"request is not a JSON object; {accepted}"}
    if request.get("cmd") != "status":
        return {"error": f"unknown request; {accepted}"}
    return status()


# -- client (show, stats, ambient) ---------------------------------------------------------


def query_all(timeout: float = QUERY_TIMEOUT) -> list[dict[str, Any]]:
    """Status of every running dataplane, found by its socket in the run directory.

    All are asked at once, and one that has not answered within ``timeout`` seconds
    (stopped, or stuck) is named on stderr and left out: the others are still shown.
    Sockets left by a dataplane that was killed are removed on the way.
    """
    directory = run_dir()
    if not directory.is_dir():
        return []
    pending: dict[socket.socket, tuple[Path, bytearray]] = {}
    try:
        for path in sorted(directory.glob("gdp-*.sock")):
            s = _ask(path)
            if s is not None:
                pending[s] = (path, bytearray())
        done = _collect(pending, timeout)
    finally:
        for s in pending:
            s.close()
    replies = []
    for path, data in done:
        if data is None:
            print(
                f"geneve-dp: the dataplane of {path} (pid {_pid_of(path)}) did not answer "
                f"within {timeout:g} s (stopped or stuck?); skipped",
                file=sys.stderr,
            )
            continue
        if not data:
            continue
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            # Not one of ours (or a broken one): name it and go on with the others.
            print(
                f"geneve-dp: {path} answered something that is not a status; skipped",
                file=sys.stderr,
            )
            continue
        replies.append(reply)
    return replies


def _pid_of(path: Path) -> str:
    return path.name.removeprefix("gdp-").removesuffix(".sock")


def _ask(path: Path) -> socket.socket | None:
    """A socket connected to ``path`` with the status request sent, or None for a
    stale socket (removed). A listener that cannot take the connection (its backlog
    is full: it has not been accepting) gets a socket that will never answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(str(path))
        s.send(STATUS_REQUEST)  # far less than a socket buffer: never partial
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        path.unlink(missing_ok=True)
        return None
    except PermissionError as exc:
        s.close()
        raise UserError(f"cannot read {path}: permission denied (run as root)") from exc
    except BlockingIOError:
        pass  # backlog full: it is not accepting, _collect times it out
    return s


def _collect(
    pending: dict[socket.socket, tuple[Path, bytearray]], timeout: float
) -> list[tuple[Path, bytes | None]]:
    """Read every reply line until it ends, the peer closes, or ``timeout`` passes;
    in the order of ``pending``, None for those that did not finish in time."""
    results: dict[socket.socket, bytes | None] = {}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for s in pending:
            sel.register(s, selectors.EVENT_READ, s)
        while len(results) < len(pending):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(left):
                s = key.data
                buf = pending[s][1]
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                buf += chunk
                if not chunk or buf.endswith(b"\n") or len(buf) > REPLY_LIMIT:
                    # An oversized reply is cut short: no status, so it is named and skipped.
                    results[s] = bytes(buf[:REPLY_LIMIT])
                    sel.unregister(s)
    return [(path, results.get(s)) for s, (path, _) in pending.items()]
