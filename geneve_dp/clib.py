"""The C library through ctypes, loaded once per process, and pointers to bytes for
the structures that socket options take.

Every ctypes.CDLL made defines a function-pointer class of its own, and ctypes.cast
and a string buffer's array type end in reference cycles: garbage that only the cycle
collector's rare full pass frees, which in a long-running process (a daemon's probe
socket every few seconds) is memory that creeps up. Nothing here makes any.
"""

from __future__ import annotations

import ctypes
import functools
import struct


@functools.cache
def libc() -> ctypes.CDLL:
    """The process's C library, with errno kept for ctypes.get_errno()."""
    return ctypes.CDLL(None, use_errno=True)


def address_of(data: bytes) -> int:
    """The address of ``data``'s contents, valid for as long as ``data`` lives (bytes
    never move); for a pointer the kernel only reads during the call."""
    return ctypes.c_void_p.from_buffer(ctypes.c_char_p(data)).value or 0


def writable_address(buf: bytearray) -> int:
    """The address of ``buf``'s contents, valid while it lives and keeps its size; for
    a call that writes into it (no ctypes array type made)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def sock_fprog(prog: bytes) -> bytes:
    """struct sock_fprog for a classic BPF program (8 bytes an instruction), for
    SO_ATTACH_FILTER and SO_ATTACH_REUSEPORT_CBPF, which copy the program: ``prog`` must
    be alive during the setsockopt call only."""
    return struct.pack("@HP", len(prog) // 8, address_of(prog))
