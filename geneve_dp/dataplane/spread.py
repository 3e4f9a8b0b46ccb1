"""How tunnel flows are spread over the workers of one port, on both ends.

Receive: a port's SO_REUSEPORT sockets (one per worker) choose among themselves by a
classic BPF program, the outer UDP source port modulo the number of sockets, so that
flows whose source ports differ in their low bits land on different workers for
certain (the kernel's default, a hash of the 4-tuple, may put a handful of ports all on
one socket for as long as they live).

Send: a tunnel's transmit sockets take consecutive source ports (one block), so the
flows a peer of ours sends spread over every worker the receiving end has, up to the
block's size. The flow hash picks among them (csrc/encap.c).
"""

from __future__ import annotations

import errno
import random
import socket
import struct
from collections.abc import Callable

from .. import clib

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h

# linux/filter.h: packet loads relative to the network header take this base.
SKF_NET_OFF = -0x100000
_LDX_MSH_B = 0xB1  # X = 4 * (byte[k] & 0xf): the IPv4 header length
_LD_H_IND = 0x48  # A = half[X + k]
_LD_H_ABS = 0x28  # A = half[k]
_ALU_MOD_K = 0x94  # A %= k
_RET_A = 0x16  # return A: the socket's index in bind order
IP6_HLEN = 40

# Tried random blocks before a tunnel's transmit sockets fall back to any free ports.
BLOCK_TRIES = 64


def _insn(code: int, k: int) -> bytes:
    return struct.pack("HBBI", code, 0, 0, k & 0xFFFFFFFF)


def source_port_program(family: int, sockets: int) -> bytes:
    """The classic BPF program choosing socket ``sport % sockets`` (sock_filter array)."""
    if sockets < 1:
        raise ValueError(f"sockets must be at least 1, not {sockets}")
    if family == 4:
        load = _insn(_LDX_MSH_B, SKF_NET_OFF) + _insn(_LD_H_IND, SKF_NET_OFF)
    else:
        load = _insn(_LD_H_ABS, SKF_NET_OFF + IP6_HLEN)  # no extension headers read
    return load + _insn(_ALU_MOD_K, sockets) + _insn(_RET_A, 0)


def attach_source_port_spread(sock: socket.socket, family: int, sockets: int) -> None:
    """Make the reuseport group of ``sock`` choose by outer source port (OSError if the
    kernel refuses; the group then keeps the kernel's hash)."""
    prog = source_port_program(family, sockets)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, clib.sock_fprog(prog))


def bind_port_block(
    make: Callable[[], socket.socket],
    n: int,
    address: str,
    port_range: tuple[int, int],
    rng: Callable[[int, int], int] = random.randint,
) -> list[socket.socket] | None:
    """``n`` sockets from ``make`` bound to consecutive ports of ``port_range`` (a
    random block, tried BLOCK_TRIES times); None, with nothing left open, when no free
    block was found."""
    lo, hi = port_range
    if n < 1 or hi - lo + 1 < n:
        return None
    for _ in range(BLOCK_TRIES):
        base = rng(lo, hi - n + 1)
        socks: list[socket.socket] = []
        try:
            for k in range(n):
                socks.append(make())
                socks[-1].bind((address, base + k))
            return socks
        except OSError as exc:
            for s in socks:
                s.close()
            if exc.errno != errno.EADDRINUSE:
                raise
        except BaseException:
            for s in socks:
                s.close()
            raise
    return None
