"""Network namespaces: entering one by name, and telling them apart.

Named namespaces are those of `ip netns` (files under /run/netns). A namespace is
identified by its nsfs inode (and device, to compare across processes).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from . import clib
from .errors import UserError

NAMED_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


NAME_MAX = 255  # bytes of one file name, as under /run/netns
ACCEPTED = f"a name from `ip netns list` (1..{NAME_MAX} bytes, no '/' or NUL)"


def _missing(name: str, field: str) -> UserError:
    return UserError(f"no network namespace named {name!r}; accepted: {ACCEPTED}", field)


def named_path(name: str, field: str = "--netns") -> Path:
    """Where `ip netns` keeps the namespace ``name``; a name that cannot be one is a
    UserError naming ``field``."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        size = -1
    if not 0 < size <= NAME_MAX or "/" in name or "\0" in name or name in (".", ".."):
        raise UserError(f"{name!r} is not a namespace name; accepted: {ACCEPTED}", field)
    return NAMED_DIR / name


def enter_netns(name: str, field: str = "--netns") -> None:
    """Move this process into the named network namespace (`ip netns` naming).

    setns() changes only the calling thread, and threads inherit it when created, so
    this must run before any thread (executor, engine worker) exists.
    """
    path = named_path(name, field)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise _missing(name, field) from exc
    except PermissionError as exc:
        raise UserError(f"cannot open {path}: permission denied (run as root)", field) from exc
    except OSError as exc:
        raise UserError(f"cannot open {path}: {exc.strerror}; accepted: {ACCEPTED}", field) from exc
    try:
        if clib.libc().setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise UserError(f"cannot enter {name!r}: {os.strerror(err)}", field)
    finally:
        os.close(fd)


def netns_inode(name: str | None = None, field: str = "--netns") -> int:
    """Inode of a network namespace: ours, or the one `ip netns` calls ``name`` (what a
    daemon's status reports as ``netns_id``)."""
    path = named_path(name, field) if name else Path("/proc/self/ns/net")
    try:
        return os.stat(path).st_ino
    except FileNotFoundError as exc:
        raise _missing(str(name), field) from exc
    except OSError as exc:
        raise UserError(f"cannot look at {path}: {exc.strerror}", field) from exc


def netns_id(pid: int | str = "self") -> tuple[int, int] | None:
    """Identity of a process's network namespace (None if the process is gone)."""
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def current_netns_name() -> str:
    """The name under /run/netns of this process's network namespace, or "host"."""
    try:
        me = os.stat("/proc/self/ns/net")
    except OSError:
        return "host"
    try:
        init = os.stat("/proc/1/ns/net")
        if (init.st_dev, init.st_ino) == (me.st_dev, me.st_ino):
            return "host"
    except OSError:
        pass
    if NAMED_DIR.is_dir():
        for entry in sorted(NAMED_DIR.iterdir()):
            try:
                st = entry.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                return entry.name
    return f"netns-{me.st_ino}"


def netns_names() -> dict[int, str]:
    """Names of network namespaces by nsfs inode (what a daemon's status reports as
    ``netns_id``): those of `ip netns`, and "host" for init's."""
    out: dict[int, str] = {}
    if NAMED_DIR.is_dir():
        for entry in sorted(NAMED_DIR.iterdir()):
            try:
                out[entry.stat().st_ino] = entry.name
            except OSError:
                continue
    try:
        out[os.stat("/proc/1/ns/net").st_ino] = "host"
    except OSError:
        pass
    return out
