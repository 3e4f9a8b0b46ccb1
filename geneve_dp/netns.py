"""Network namespaces: entering one by name, and telling them apart.

Named namespaces are those of `ip netns` (files under /run/netns). A namespace is
identified by its nsfs inode (and device, to compare across processes).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .errors import UserError

NAMED_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


def _missing(name: str) -> UserError:
    return UserError(f"no network namespace named {name!r} (see `ip netns list`)", "--netns")


def enter_netns(name: str) -> None:
    """Move this process into the named network namespace (`ip netns` naming).

    setns() changes only the calling thread, and threads inherit it when created, so
    this must run before any thread (executor, engine worker) exists.
    """
    path = NAMED_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise _missing(name) from exc
    except PermissionError as exc:
        raise UserError(f"cannot open {path}: permission denied (run as root)", "--netns") from exc
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise UserError(f"cannot enter {name!r}: {os.strerror(err)}", "--netns")
    finally:
        os.close(fd)


def netns_inode(name: str | None = None) -> int:
    """Inode of a network namespace: ours, or the one `ip netns` calls ``name`` (what a
    daemon's status reports as ``netns_id``)."""
    path = NAMED_DIR / name if name else Path("/proc/self/ns/net")
    try:
        return os.stat(path).st_ino
    except FileNotFoundError as exc:
        raise _missing(str(name)) from exc


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
