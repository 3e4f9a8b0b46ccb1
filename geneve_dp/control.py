"""The control socket: one unix socket per running dataplane in the run directory.

The daemon serves its status on ``gdp-<pid>.sock`` (one JSON request line in, one
JSON reply line out); `show`, `stats` and the ambient tools find every running
dataplane by globbing the run directory and asking each socket (``query_all``).

Whoever can write to the run directory can stand in for a dataplane, so it is trusted
only as a real directory (not a symlink) owned by root or by us and writable by its
owner alone (``check_run_dir``); a client also believes only a socket whose listener
runs as root or as itself (SO_PEERCRED, read after connecting, so no swap between a
look and the use), and the daemon's files are created in it without following links.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import selectors
import socket
import stat
import struct
import sys
import time
from collections.abc import Awaitable, Callable
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
# A change request (any "cmd" but "status") -> its reply.
Command = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
ACCEPTED = (
    'accepted: {"cmd": "status"}, {"cmd": "add", "tunnels": [SPEC]}, '
    '{"cmd": "down", "names": [NAME]}, {"cmd": "set", "name": NAME, "changes": {KEY: VALUE}}, '
    '{"cmd": "reload"[, "tunnels": [SPEC]]}, {"cmd": "reload-keys"}'
)
# How long a change may take to answer (devices, routes, an engine swap per port).
CHANGE_TIMEOUT = 30.0


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV, str(DEFAULT_RUN_DIR)))


def _trusted_uid(uid: int) -> bool:
    return uid in (0, os.geteuid())


def check_run_dir(path: Path) -> None:
    """Refuse (UserError) a run directory someone else could write to."""
    accepted = "accepted: a directory (not a symlink) owned by root or you, mode 0700 or 0755"
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path} is a symbolic link; {accepted}", RUN_DIR_ENV)
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path} is not a directory; {accepted}", RUN_DIR_ENV)
    if not _trusted_uid(st.st_uid):
        raise UserError(f"{path} is owned by uid {st.st_uid}; {accepted}", RUN_DIR_ENV)
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise UserError(f"{path} is writable by others (mode {mode:04o}); {accepted}", RUN_DIR_ENV)


def prepare_run_dir() -> Path:
    """The run directory, created 0700 if missing, and checked (``check_run_dir``)."""
    path = run_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # something that is not a directory: check_run_dir names it
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror}", RUN_DIR_ENV) from exc
    check_run_dir(path)
    return path


def open_log(pid: int) -> int:
    """The detached daemon's log file ``gdp-<pid>.log``, opened for appending without
    following a symlink (a planted link must not point root's writes elsewhere)."""
    path = prepare_run_dir() / f"gdp-{pid}.log"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        raise UserError(f"cannot open {path}: {exc.strerror}", RUN_DIR_ENV) from exc


def socket_path(pid: int) -> Path:
    return run_dir() / f"gdp-{pid}.sock"


# -- server (the daemon's side) ------------------------------------------------------------


async def serve(
    path: Path, status: Status, command: Command | None = None
) -> asyncio.base_events.Server:
    """Listen on ``path``; answer a status request with ``status()`` and any other
    request with ``command(request)``."""
    prepare_run_dir()
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise UserError(
                f"{path} exists and is not a socket; accepted: nothing there (remove it)",
                RUN_DIR_ENV,
            )
        path.unlink()  # a socket left by a dataplane with our pid: a dead one
    except FileNotFoundError:
        pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(reader, writer, status, command)

    # The socket is born 0600 (counters and config are root's): no chmod after bind,
    # so there is no moment in which it is open to others.
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(handle, path=str(path), limit=REQUEST_LIMIT)
    finally:
        os.umask(old)
    return server


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    status: Status,
    command: Command | None = None,
) -> None:
    try:
        try:
            line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT)
        except ValueError:  # asyncio's limit: the line is longer than REQUEST_LIMIT
            reply: Any = {"error": f"request longer than {REQUEST_LIMIT} bytes; refused"}
        else:
            try:
                reply = answer(line, status)
                request = reply.pop("_request", None)
                if request is not None:
                    reply = await command(request) if command is not None else {"error": "refused"}
            except (TimeoutError, ConnectionError):
                raise
            except Exception as exc:  # one bad request must never take the daemon down
                log.exception("control request failed")
                reply = {"error": f"request failed: {type(exc).__name__}: {exc}"}
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    except Exception:  # nor one bad client
        log.exception("control request failed")
    finally:
        writer.close()


def answer(line: bytes, status: Status) -> dict[str, Any]:
    """The reply to one request line; a change request comes back as ``_request``
    for the command handler."""
    try:
        request = json.loads(line or b"{}")
    except ValueError:
        return {"error": f"request is not a JSON object; {ACCEPTED}"}
    except RecursionError:
        return {"error": f"request is nested too deeply to read; {ACCEPTED}"}
    if not isinstance(request, dict):
        return {"error": f"request is not a JSON object; {ACCEPTED}"}
    cmd = request.get("cmd")
    if cmd == "status":
        return status()
    if cmd in ("add", "down", "set", "reload", "reload-keys"):
        return {"_request": request}
    return {"error": f"unknown request; {ACCEPTED}"}


# -- client (show, stats, ambient) ---------------------------------------------------------


def sockets() -> list[Path]:
    """The control sockets in the run directory. One that cannot be listed (it is
    root's, 0700) is an error saying so, never an empty list: "no tunnels" would be
    a lie to a user who may not look."""
    directory = run_dir()
    try:
        check_run_dir(directory)
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except PermissionError as exc:
        raise UserError(
            f"cannot read the control sockets in {directory}: permission denied (EACCES; "
            "they are root's: run as root)",
            "run dir",
        ) from exc
    return [directory / n for n in names if n.startswith("gdp-") and n.endswith(".sock")]


def request(path: Path, body: dict[str, Any], timeout: float = CHANGE_TIMEOUT) -> dict[str, Any]:
    """Send one request to a daemon's socket; its reply. A refusal (``error``) is
    raised as the UserError it was, field and all."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except PermissionError as exc:
            raise UserError(f"cannot use {path}: permission denied (run as root)") from exc
        except OSError as exc:
            raise UserError(f"the endpoint at {path} is gone ({exc.strerror})") from exc
        uid = _peer_uid(s)
        if not _trusted_uid(uid):
            raise UserError(f"{path} is served by uid {uid}, neither root nor you; refused")
        data = b""
        try:
            s.sendall(json.dumps(body).encode() + b"\n")
            while not data.endswith(b"\n") and len(data) <= REPLY_LIMIT:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise UserError(
                f"the endpoint at {path} did not answer within {timeout:g} s (stopped or stuck?)"
            ) from None
        except OSError as exc:
            raise UserError(f"the endpoint at {path} is gone ({exc.strerror})") from exc
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise UserError(f"the endpoint at {path} did not answer")
    if "error" in reply:
        field = reply.get("field")
        message = str(reply["error"])
        if field and message.startswith(f"{field}: "):
            message = message[len(field) + 2 :]
        raise UserError(message, str(field) if field else None)
    return reply


def query_all(timeout: float = QUERY_TIMEOUT) -> list[dict[str, Any]]:
    """Status of every running dataplane, found by its socket in the run directory.

    All are asked at once, and one that has not answered within ``timeout`` seconds
    (stopped, or stuck) is named on stderr and left out: the others are still shown.
    Sockets left by a dataplane that was killed are removed on the way.
    """
    pending: dict[socket.socket, tuple[Path, bytearray]] = {}
    try:
        for path in sockets():
            s = _ask(path, timeout)
            if s is not None:
                pending[s] = (path, bytearray())
        done = _collect(pending, timeout)
    finally:
        for s in pending:
            s.close()
    replies = []
    for path, data in done:
        if data is None:
            _unanswered(path, timeout)
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


def _ask(path: Path, timeout: float) -> socket.socket | None:
    """A socket connected to ``path`` with the status request sent; None for a stale
    socket (removed), a listener that is not root's or ours, or one that cannot take
    a connection (its backlog is full: it has not been accepting), each named."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        _remove_stale(path)
        return None
    except PermissionError as exc:
        s.close()
        raise UserError(f"cannot read {path}: permission denied (run as root)") from exc
    except BlockingIOError:
        s.close()
        _unanswered(path, timeout)
        return None
    uid = _peer_uid(s)
    if not _trusted_uid(uid):
        s.close()
        print(
            f"geneve-dp: {path} is served by uid {uid}, neither root nor you; skipped",
            file=sys.stderr,
        )
        return None
    s.send(STATUS_REQUEST)  # far less than a socket buffer: never partial
    return s


def _remove_stale(path: Path) -> None:
    """Remove the socket of a dataplane that was killed; name anything else there."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
            return
    except FileNotFoundError:
        return
    print(f"geneve-dp: {path} is not a socket; skipped", file=sys.stderr)


def _unanswered(path: Path, timeout: float) -> None:
    print(
        f"geneve-dp: the dataplane of {path} (pid {_pid_of(path)}) did not answer "
        f"within {timeout:g} s (stopped or stuck?); skipped",
        file=sys.stderr,
    )


_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def _peer_uid(s: socket.socket) -> int:
    """The uid of the process listening on the other end (-1 if unknown)."""
    try:
        _pid, uid, _gid = _UCRED.unpack(
            s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return -1
    return int(uid)


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
