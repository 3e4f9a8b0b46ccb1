"""libbpf (``libbpf.so.1``) through ctypes: open and load BPF objects, reach their maps
and programs by name or by kernel ID, and read or write map elements.

Only what the eBPF redirect mode needs. libbpf 1.x returns negative errno values, which
become ``BpfError``; its own messages (the verifier log above all) are collected
instead of printed, so a failed load is one line for people and the log is kept for
whoever asks (``BpfError.log``).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import os
import threading
from pathlib import Path
from typing import Any

from ... import clib

LIBRARY = "libbpf.so.1"
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_FUNC_SK_ASSIGN = 124  # bpf_sk_assign: tc programs since Linux 5.7
BPF_ANY = 0
LOG_LINES = 400  # libbpf messages kept from the latest load (the verifier log is long)

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class BpfError(OSError):
    """A libbpf call failed; ``log`` holds what libbpf said meanwhile."""

    def __init__(self, code: int, what: str, log: str = "") -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.what = what
        self.log = log

    def reason(self) -> str:
        """The most telling line of libbpf's log (the verifier's last word), if any."""
        lines = [ln.strip() for ln in self.log.splitlines() if ln.strip()]
        for ln in reversed(lines):
            if "unknown func" in ln or "invalid func" in ln or "program of this type" in ln:
                return ln
        return lines[-1] if lines else ""


class _Lib:
    """The shared library with argument types declared, loaded on first use."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("bpf") or LIBRARY
        try:
            lib = ctypes.CDLL(LIBRARY if Path(f"/usr/lib/{LIBRARY}").exists() else path)
        except OSError:
            lib = ctypes.CDLL(path)
        vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (i, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__find_program_by_name": (vp, [vp, cp]),
            "bpf_object__find_map_by_name": (vp, [vp, cp]),
            "bpf_program__fd": (i, [vp]),
            "bpf_program__set_autoload": (i, [vp, ctypes.c_bool]),
            "bpf_map__fd": (i, [vp]),
            "bpf_map__reuse_fd": (i, [vp, i]),
            "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (i, [i, vp, vp]),
            "bpf_map_delete_elem": (i, [i, vp]),
            "bpf_map_get_next_key": (i, [i, vp, vp]),
            "bpf_map_get_fd_by_id": (i, [u32]),
            "bpf_prog_get_fd_by_id": (i, [u32]),
            "bpf_obj_get_info_by_fd": (i, [i, vp, ctypes.POINTER(u32)]),
            "libbpf_probe_bpf_helper": (i, [i, i, vp]),
            "libbpf_set_print": (vp, [_PRINT_FN]),
            "libbpf_num_possible_cpus": (i, []),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.lib = lib
        self.lock = threading.Lock()  # one load at a time: the log is per load
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        vsnprintf = clib.libc().vsnprintf
        vsnprintf.restype = ctypes.c_int
        vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

        def printer(_level: int, fmt: bytes, args: int) -> int:
            buf = ctypes.create_string_buffer(1024)
            vsnprintf(buf, len(buf), fmt, args)
            self.log.extend(buf.value.decode(errors="replace").splitlines())
            return 0

        self._printer = _PRINT_FN(printer)  # kept alive: libbpf holds the pointer
        lib.libbpf_set_print(self._printer)


_lib: _Lib | None = None


def lib() -> _Lib:
    """The library, or BpfError(ENOENT) naming the package that brings it."""
    global _lib
    if _lib is None:
        try:
            _lib = _Lib()
        except (OSError, AttributeError) as exc:
            raise BpfError(errno.ENOENT, f"cannot use {LIBRARY} ({exc}); install libbpf1") from exc
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise BpfError(-rc, what)
    return rc


def helper_supported(helper_id: int, prog_type: int = BPF_PROG_TYPE_SCHED_CLS) -> bool:
    """Whether this kernel lets programs of ``prog_type`` call ``helper_id``."""
    return bool(lib().lib.libbpf_probe_bpf_helper(prog_type, helper_id, None) == 1)


class BpfObject:
    """An opened BPF object file, loaded by ``load``; ``close`` drops our fds (programs
    attached somewhere and maps they use stay in the kernel)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        L = lib()
        with L.lock:
            L.log.clear()
            ctypes.set_errno(0)
            obj = L.lib.bpf_object__open_file(str(path).encode(), None)
            if not obj:
                code = ctypes.get_errno() or errno.EINVAL
                raise BpfError(code, f"opening {path.name}", "\n".join(L.log))
        self._obj: int | None = obj

    def _handle(self) -> int:
        if self._obj is None:
            raise BpfError(errno.EBADF, f"{self.path.name} is closed")
        return self._obj

    def _program(self, name: str) -> int:
        prog = lib().lib.bpf_object__find_program_by_name(self._handle(), name.encode())
        if not prog:
            raise BpfError(errno.ENOENT, f"{self.path.name} has no program {name}")
        return int(prog)

    def _map(self, name: str) -> int:
        m = lib().lib.bpf_object__find_map_by_name(self._handle(), name.encode())
        if not m:
            raise BpfError(errno.ENOENT, f"{self.path.name} has no map {name}")
        return int(m)

    def skip(self, program: str) -> None:
        """Do not load ``program`` (one that this kernel could not verify)."""
        _check(lib().lib.bpf_program__set_autoload(self._program(program), False), program)

    def reuse_map(self, name: str, fd: int) -> None:
        """Load the programs against an existing map instead of creating one."""
        _check(lib().lib.bpf_map__reuse_fd(self._map(name), fd), f"reusing map {name}")

    def load(self) -> None:
        L = lib()
        with L.lock:
            L.log.clear()
            rc = L.lib.bpf_object__load(self._handle())
            if rc < 0:
                raise BpfError(-rc, f"loading {self.path.name}", "\n".join(L.log))

    def program_fd(self, name: str) -> int:
        return _check(lib().lib.bpf_program__fd(self._program(name)), f"program {name}")

    def map_fd(self, name: str) -> int:
        return _check(lib().lib.bpf_map__fd(self._map(name)), f"map {name}")

    def close(self) -> None:
        if self._obj is not None:
            lib().lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# --- maps and programs by kernel ID ----------------------------------------------------


# struct bpf_map_info / bpf_prog_info (linux/bpf.h): the leading fields we read.
class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def _info(fd: int, info: ctypes.Structure) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "info")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info)
    return info


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    _info(fd, info)
    return info


def map_fd_by_id(map_id: int, name: str) -> int | None:
    """An fd of map ``map_id`` if it still exists and is called ``name``; else None."""
    fd = int(lib().lib.bpf_map_get_fd_by_id(map_id))
    if fd < 0:
        return None
    if map_info(fd).name.decode() != name:
        os.close(fd)
        return None
    return fd


def prog_fd_by_id(prog_id: int, name: str) -> int | None:
    fd = int(lib().lib.bpf_prog_get_fd_by_id(prog_id))
    if fd < 0:
        return None
    if prog_info(fd).name.decode() != name[:15]:
        os.close(fd)
        return None
    return fd


def map_id(fd: int) -> int:
    return int(map_info(fd).id)


def prog_id(fd: int) -> int:
    return int(prog_info(fd).id)


def map_exists(map_id_: int) -> bool:
    fd = lib().lib.bpf_map_get_fd_by_id(map_id_)
    if fd < 0:
        return False
    os.close(fd)
    return True


def prog_exists(prog_id_: int) -> bool:
    fd = lib().lib.bpf_prog_get_fd_by_id(prog_id_)
    if fd < 0:
        return False
    os.close(fd)
    return True


# --- map elements ----------------------------------------------------------------------


def update(fd: int, key: bytes, value: bytes) -> None:
    _check(lib().lib.bpf_map_update_elem(fd, key, value, BPF_ANY), "map update")


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = bytearray(value_size)
    rc = lib().lib.bpf_map_lookup_elem(fd, key, clib.writable_address(buf))
    if rc == -errno.ENOENT:
        return None
    _check(rc, "map lookup")
    return bytes(buf)


def delete(fd: int, key: bytes) -> bool:
    rc = lib().lib.bpf_map_delete_elem(fd, key)
    if rc == -errno.ENOENT:
        return False
    _check(rc, "map delete")
    return True


def possible_cpus() -> int:
    return _check(lib().lib.libbpf_num_possible_cpus(), "possible CPUs")


def keys(fd: int, key_size: int) -> list[bytes]:
    out: list[bytes] = []
    cur: bytes | None = None
    nxt = bytearray(key_size)
    while True:
        rc = lib().lib.bpf_map_get_next_key(fd, cur, clib.writable_address(nxt))
        if rc == -errno.ENOENT:
            return out
        _check(rc, "map keys")
        cur = bytes(nxt)
        out.append(cur)
