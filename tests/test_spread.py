"""spread.py without devices: the reuseport program's instructions and the port block."""

from __future__ import annotations

import socket
import struct

import pytest

from geneve_dp.dataplane import spread


def _insns(prog: bytes) -> list[tuple[int, int]]:
    return [(c, k) for c, _jt, _jf, k in struct.iter_unpack("HBBI", prog)]


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_program_ends_in_source_port_modulo_sockets(n: int) -> None:
    v4 = _insns(spread.source_port_program(4, n))
    v6 = _insns(spread.source_port_program(6, n))
    net = spread.SKF_NET_OFF & 0xFFFFFFFF
    # IPv4: X = header length, then the half-word at X from the network header.
    assert v4[:2] == [(spread._LDX_MSH_B, net), (spread._LD_H_IND, net)]
    assert v6[0] == (spread._LD_H_ABS, net + spread.IP6_HLEN)
    for prog in (v4, v6):
        assert prog[-2:] == [(spread._ALU_MOD_K, n), (spread._RET_A, 0)]


def test_program_refuses_no_sockets() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        spread.source_port_program(4, 0)


def _udp() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def test_block_is_consecutive_and_skips_a_taken_block() -> None:
    holder = _udp()
    holder.bind(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    bases = iter([taken - 1, taken + 1])  # the first block holds the taken port
    try:
        socks = spread.bind_port_block(
            _udp, 4, "127.0.0.1", (1024, 65535), lambda a, b: next(bases)
        )
        assert socks is not None
        ports = [s.getsockname()[1] for s in socks]
        assert ports == list(range(taken + 1, taken + 5))
        for s in socks:
            s.close()
    finally:
        holder.close()


def test_no_free_block_leaves_nothing_open() -> None:
    holder = _udp()
    holder.bind(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    made: list[socket.socket] = []

    def make() -> socket.socket:
        made.append(_udp())
        return made[-1]

    try:
        assert spread.bind_port_block(make, 2, "127.0.0.1", (taken, taken + 1)) is None
        assert made and all(s.fileno() == -1 for s in made)
        assert spread.bind_port_block(make, 3, "127.0.0.1", (taken, taken + 1)) is None
    finally:
        holder.close()
