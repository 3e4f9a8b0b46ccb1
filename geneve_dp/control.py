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
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger("geneve_dp.daemon")

RUN_DIR_ENV = "GENEVE_DP_RUN_DIR"
DEFAULT_RUN_DIR = Path("/run/geneve-dp")
CLIENT_TIMEOUT = 5.0
REQUEST_LIMIT = 64 * 1024  # bytes of one control request line

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


def query_all(timeout: float = CLIENT_TIMEOUT) -> list[dict[str, Any]]:
    """Status of every running dataplane, found by its socket in the run directory.

    Sockets left by a dataplane that was killed are removed on the way.
    """
    replies = []
    directory = run_dir()
    if not directory.is_dir():
        return []
    for path in sorted(directory.glob("gdp-*.sock")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)
                continue
            except PermissionError as exc:
                raise UserError(f"cannot read {path}: permission denied (run as root)") from exc
            s.sendall(b'{"cmd": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
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
