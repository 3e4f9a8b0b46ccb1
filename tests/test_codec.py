"""The pure-Python reference codec: golden vectors, edge cases, properties.

The hypothesis strategies here are shared with the differential tests
(test_fastpath.py, test_codec_scapy.py).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geneve_dp import codec, wire
from geneve_dp.codec import DecodeError, EncodeError, Header, Option
from tests.vectors import Vector, all_vectors, load

# Bounded in CI; a little deeper on a developer's machine.
EXAMPLES = 300 if os.environ.get("CI") else 600
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

VECTORS = all_vectors()


# ---- strategies -------------------------------------------------------------------------


@st.composite
def option_lists(draw: st.DrawFn, max_words: int = wire.MAX_OPT_LEN_WORDS) -> tuple[Option, ...]:
    """Options whose area fits ``max_words`` words; sizes span 0..124 bytes of data."""
    budget = max_words
    out: list[Option] = []
    for _ in range(draw(st.integers(0, 8))):
        if budget == 0:
            break
        words = draw(st.integers(0, min(wire.MAX_OPTION_DATA_WORDS, budget - 1)))
        budget -= words + 1
        out.append(
            Option(
                opt_class=draw(st.integers(0, 0xFFFF)),
                type=draw(st.integers(0, 0xFF)),
                data=draw(st.binary(min_size=4 * words, max_size=4 * words)),
            )
        )
    return tuple(out)


protocols = st.one_of(st.sampled_from(list(wire.Protocol)), st.integers(0, 0xFFFF))

headers = st.builds(
    Header,
    vni=st.integers(0, wire.MAX_VNI),
    protocol=protocols,
    options=option_lists(),
    oam=st.booleans(),
)

payloads = st.binary(max_size=64)


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    """A valid packet with a few bytes overwritten and maybe cut short: reaches deep checks."""
    buf = bytearray(codec.encode(draw(headers)) + draw(payloads))
    for _ in range(draw(st.integers(0, 4))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(buf)))
    return bytes(buf[:cut])


any_packets = st.one_of(st.binary(max_size=300), mutated_packets())


def decode_json(decode: Any, data: bytes) -> dict[str, Any]:
    """A decode result in the vectors' form: header_to_json, or {"error": reason}."""
    try:
        header, offset = decode(data)
    except DecodeError as exc:
        return {"error": exc.reason}
    return codec.header_to_json(header, offset)


# ---- golden vectors ---------------------------------------------------------------------


def test_vectors_have_provenance_and_unique_names() -> None:
    names = [v.name for v in VECTORS]
    assert len(names) == len(set(names))
    assert all(v.provenance.strip() for v in VECTORS)
    hand, scapy = load("hand"), load("scapy")
    assert hand and scapy
    assert all("RFC 8926" in v.provenance for v in hand)
    assert all("scapy" in v.provenance and v.scapy is not None for v in scapy)
    # Every decode reason has at least one golden vector.
    reasons = {v.error for v in VECTORS if v.error}
    assert reasons == set(codec.DECODE_REASONS)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.name)
def test_golden_vector_decodes(vector: Vector) -> None:
    assert decode_json(codec.decode, vector.data) == vector.expect


# Vectors whose bytes carry something encode never writes: set reserved bits, or a C bit
# that disagrees with the options.
NON_CANONICAL = {
    "reserved-bits-ignored",
    "c-bit-without-critical-option",
    "critical-option-c-bit-clear",
}


@pytest.mark.parametrize("vector", [v for v in VECTORS if v.error is None], ids=lambda v: v.name)
def test_golden_vector_reencodes(vector: Vector) -> None:
    header, offset = codec.decode(vector.data)
    if vector.name in NON_CANONICAL:
        if header.critical != any(o.critical for o in header.options):
            with pytest.raises(EncodeError, match="C bit"):
                codec.encode(header)
        else:
            assert codec.encode(header) != vector.data[:offset]
    else:
        assert codec.encode(header) == vector.data[:offset]


# ---- decode edge cases ------------------------------------------------------------------


def test_decode_accepts_bytes_bytearray_memoryview() -> None:
    data = next(v for v in VECTORS if v.name == "critical-option").data
    expect = codec.decode(data)
    assert codec.decode(bytearray(data)) == expect
    assert codec.decode(memoryview(data)) == expect
    # A view into a larger buffer sees only its own bytes.
    assert codec.decode(memoryview(b"\xff" + data)[1:]) == expect


def test_decode_option_data_is_bytes_copy() -> None:
    buf = bytearray.fromhex("0200655800000a00010203010000000a")
    header, _ = codec.decode(buf)
    buf[12:16] = b"\xff\xff\xff\xff"
    assert header.options[0].data == b"\x00\x00\x00\x0a"
    assert type(header.options[0].data) is bytes


def test_decode_does_not_read_options_from_payload() -> None:
    # Opt Len 0, but the payload happens to look like an option.
    header, offset = codec.decode(bytes.fromhex("0000655800000100") + bytes.fromhex("01020301"))
    assert header.options == () and offset == 8


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_nonzero_version_is_rejected(version: int) -> None:
    data = bytes([version << 6]) + bytes.fromhex("00655800000100")
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    assert info.value.reason == "bad_version"


def test_decode_error_carries_reason_and_detail() -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\x00" * 5)
    assert info.value.reason == "truncated"
    assert "5 bytes" in str(info.value)
    assert isinstance(info.value, codec.GeneveError)
    with pytest.raises(AssertionError):
        DecodeError("not-a-reason")


# ---- encode edge cases ------------------------------------------------------------------


def test_header_defaults_derive_c_bit_and_opt_len() -> None:
    h = Header(vni=1, options=(Option(1, 0x80, b"abcd"), Option(2, 1)))
    assert h.protocol == wire.Protocol.ETHERNET
    assert h.critical is True
    assert h.opt_len == 3
    assert h.header_len == 20
    assert Header(vni=1, options=(Option(2, 0x7F),)).critical is False
    assert Header(vni=1, options=[Option(2, 1)]).options == (Option(2, 1),)  # type: ignore[arg-type]


def test_encode_writes_reserved_as_zero_and_c_bit_from_options() -> None:
    out = codec.encode(Header(vni=0xABCDEF, protocol=0x0800, oam=True, options=(Option(7, 0xFF),)))
    assert out == bytes.fromhex("01c00800abcdef000007ff00")


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (Header(vni=-1), "VNI"),
        (Header(vni=wire.MAX_VNI + 1), "VNI"),
        (Header(vni=1, protocol=-1), "protocol"),
        (Header(vni=1, protocol=0x10000), "protocol"),
        (Header(vni=1, version=4), "version"),
        (Header(vni=1, options=(Option(0x10000, 1),)), "class"),
        (Header(vni=1, options=(Option(-1, 1),)), "class"),
        (Header(vni=1, options=(Option(1, 256),)), "type"),
        (Header(vni=1, options=(Option(1, 1, b"abc"),)), "multiple of 4"),
        (Header(vni=1, options=(Option(1, 1, bytes(128)),)), "124"),
        (Header(vni=1, options=(Option(1, 1, bytes(124)),) * 2), "252"),
        (Header(vni=1, options=(Option(1, 1),), opt_len=2), "opt_len"),
        (Header(vni=1, options=(), opt_len=1), "opt_len"),
        (Header(vni=1, options=(Option(1, 0x80),), critical=False), "C bit"),
        (Header(vni=1, options=(Option(1, 1),), critical=True), "C bit"),
    ],
)
def test_encode_rejects(header: Header, match: str) -> None:
    with pytest.raises(EncodeError, match=match):
        codec.encode(header)


def test_encode_error_is_a_value_error() -> None:
    assert issubclass(EncodeError, ValueError)


def test_largest_header_is_260_bytes() -> None:
    h = Header(vni=1, options=(Option(1, 1, bytes(124)), Option(1, 2, bytes(120))))
    assert len(codec.encode(h)) == wire.MAX_HEADER_LEN == 260
    assert h.opt_len == wire.MAX_OPT_LEN_WORDS


@pytest.mark.parametrize("version", [1, 2, 3])
def test_encoded_nonzero_version_does_not_decode(version: int) -> None:
    data = codec.encode(Header(vni=9, version=version))
    assert data[0] >> 6 == version
    with pytest.raises(DecodeError, match="bad_version"):
        codec.decode(data)


def test_header_to_json_shape() -> None:
    h, off = codec.decode(bytes.fromhex("0240123400000a00ffff8001deadbeef"))
    assert codec.header_to_json(h, off) == {
        "vni": 10,
        "protocol": "0x1234",
        "oam": False,
        "critical": True,
        "opt_len": 2,
        "options": [{"class": 0xFFFF, "type": 0x80, "critical": True, "data": "deadbeef"}],
        "payload_offset": 16,
    }


# ---- properties -------------------------------------------------------------------------


@SETTINGS
@given(headers, payloads)
def test_encode_then_decode_is_identity(header: Header, payload: bytes) -> None:
    data = codec.encode(header)
    assert len(data) == header.header_len == 8 + 4 * header.opt_len
    assert bool(data[1] & wire.FLAG_CRITICAL) == any(o.critical for o in header.options)
    assert codec.decode(data + payload) == (header, len(data))


@SETTINGS
@given(headers)
def test_every_truncation_names_the_right_reason(header: Header) -> None:
    data = codec.encode(header)
    for cut in range(len(data)):
        with pytest.raises(DecodeError) as info:
            codec.decode(data[:cut])
        assert info.value.reason == ("truncated" if cut < 8 else "options_truncated")


@SETTINGS
@given(any_packets)
def test_decode_of_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    try:
        header, offset = codec.decode(data)
    except DecodeError as exc:
        assert exc.reason in codec.DECODE_REASONS
        return
    # Success means a consistent header that lies inside the buffer.
    assert 8 <= offset == header.header_len <= len(data)
    assert data[0] >> 6 == 0
    assert sum(o.wire_len for o in header.options) == offset - 8
    assert header.vni == int.from_bytes(data[4:7], "big")
