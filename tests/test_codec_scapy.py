"""Both codecs against scapy's GENEVE layer (scapy.contrib.geneve), an independent parser.

scapy models every header field, including the reserved ones we ignore, and repairs
some malformed fields when it builds; so malformed inputs are given to it as raw bytes
and only dissected, never built.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.contrib.geneve import GENEVE, GeneveOptions
from scapy.packet import NoPayload, Packet

from geneve_dp import codec, fastpath, wire
from geneve_dp.codec import DecodeError, Header, Option
from tests.test_codec import SETTINGS, any_packets, headers, option_lists, payloads
from tests.vectors import Vector, load

DECODERS = [codec.decode, fastpath.decode]
ENCODERS = [codec.encode, fastpath.encode]


def scapy_fields(pkt: Packet) -> dict[str, Any]:
    """The fields of a dissected scapy GENEVE packet, in our codec's terms."""
    payload = b"" if isinstance(pkt.payload, NoPayload) else bytes(pkt.payload.original)
    return {
        "version": pkt.version,
        "opt_len": pkt.optionlen,
        "oam": bool(pkt.oam),
        "critical": bool(pkt.critical),
        "protocol": pkt.proto,
        "vni": pkt.vni,
        "options": [(o.classid, o.type, o.length, bytes(o.data)) for o in pkt.options],
        "payload": payload,
    }


def our_fields(header: Header, data: bytes, offset: int) -> dict[str, Any]:
    return {
        "version": header.version,
        "opt_len": header.opt_len,
        "oam": header.oam,
        "critical": header.critical,
        "protocol": header.protocol,
        "vni": header.vni,
        "options": [(o.opt_class, o.type, len(o.data) // 4, o.data) for o in header.options],
        "payload": data[offset:],
    }


def scapy_build(header: Header, payload: bytes = b"") -> bytes:
    """``header`` as scapy builds it (scapy does not derive the C bit: we pass it)."""
    pkt = GENEVE(
        version=header.version,
        oam=int(header.oam),
        critical=int(header.critical),
        proto=header.protocol,
        vni=header.vni,
        options=[
            GeneveOptions(classid=o.opt_class, type=o.type, data=o.data) for o in header.options
        ],
    )
    return bytes(pkt) + payload


# ---- the recorded scapy vectors -----------------------------------------------------------


@pytest.mark.parametrize("vector", load("scapy"), ids=lambda v: v.name)
def test_scapy_still_builds_the_recorded_vector(vector: Vector) -> None:
    assert vector.scapy is not None
    spec = vector.scapy
    pkt = GENEVE(
        **spec["fields"],
        options=[
            GeneveOptions(classid=c, type=t, data=bytes.fromhex(d)) for c, t, d in spec["options"]
        ],
    )
    inner = bytes.fromhex(spec["inner_hex"]) if spec["inner_hex"] else b""
    assert bytes(pkt) + inner == vector.data


@pytest.mark.parametrize("decode", DECODERS, ids=["python", "c"])
@pytest.mark.parametrize("vector", load("scapy") + load("hand"), ids=lambda v: v.name)
def test_vectors_agree_with_scapy_dissection(vector: Vector, decode: Any) -> None:
    if vector.error is not None:
        # scapy dissects malformed headers without complaint; only the valid ones compare.
        with pytest.raises(DecodeError):
            decode(vector.data)
        return
    header, offset = decode(vector.data)
    assert our_fields(header, vector.data, offset) == scapy_fields(GENEVE(vector.data))


# ---- properties ---------------------------------------------------------------------------


@SETTINGS
@given(headers, payloads)
def test_scapy_dissects_what_we_encode(header: Header, payload: bytes) -> None:
    for encode in ENCODERS:
        data = encode(header) + payload
        assert scapy_fields(GENEVE(data)) == our_fields(header, data, header.header_len)


@SETTINGS
@given(
    vni=st.integers(0, wire.MAX_VNI),
    protocol=st.integers(0, 0xFFFF),
    oam=st.booleans(),
    options=option_lists(),
    payload=payloads,
)
def test_we_decode_what_scapy_builds(
    vni: int, protocol: int, oam: bool, options: tuple[Option, ...], payload: bytes
) -> None:
    header = Header(vni=vni, protocol=protocol, oam=oam, options=options)
    data = scapy_build(header, payload)
    for decode in DECODERS:
        got, offset = decode(data)
        assert (got, offset) == (header, header.header_len)
        assert data[offset:] == payload


@SETTINGS
@given(any_packets)
def test_where_we_decode_scapy_sees_the_same_fields(data: bytes) -> None:
    try:
        header, offset = codec.decode(data)
    except DecodeError:
        return
    assert fastpath.decode(data) == (header, offset)
    assert scapy_fields(GENEVE(data)) == our_fields(header, data, offset)


@SETTINGS
@given(headers, st.integers(0, 0x3F), st.integers(0, 0xFF))
def test_reserved_bits_scapy_models_and_we_ignore(
    header: Header, flag_bits: int, reserved2: int
) -> None:
    raw = bytearray(codec.encode(header))
    raw[1] |= flag_bits
    raw[7] = reserved2
    pkt = GENEVE(bytes(raw))
    assert (pkt.reserved, pkt.reserved2) == (flag_bits, reserved2)
    for decode in DECODERS:
        assert decode(bytes(raw)) == (header, header.header_len)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_scapy_builds_other_versions_and_we_refuse_them(version: int) -> None:
    data = bytes(GENEVE(version=version, vni=7, proto=0x6558))
    assert GENEVE(data).version == version
    for decode in DECODERS:
        with pytest.raises(DecodeError, match="bad_version"):
            decode(data)
