"""clib.py: pointers to bytes that read back what they point at, a sock_fprog the
kernel takes, and neither (nor loading libc again) leaves garbage in cycles."""

from __future__ import annotations

import ctypes
import gc
import socket
import struct

from geneve_dp import clib
from geneve_dp.capture import attach_filter


def test_address_of_points_at_the_bytes() -> None:
    data = bytes(range(256)) * 3
    assert ctypes.string_at(clib.address_of(data), len(data)) == data


def test_sock_fprog_is_length_and_pointer() -> None:
    prog = bytes(range(8)) * 4  # four instructions
    length, addr = struct.unpack("@HP", clib.sock_fprog(prog))
    assert length == 4 and ctypes.string_at(addr, len(prog)) == prog


def test_kernel_takes_the_filter_and_nothing_is_left_in_cycles() -> None:
    ret_all = struct.pack("HBBI", 0x06, 0, 0, 0xFFFF)  # BPF_RET|BPF_K: accept
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                attach_filter(s, ret_all)
            clib.libc().getpid()
        gc.collect()
        left = len(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == 0
