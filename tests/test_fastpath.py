"""The C codec (through geneve_dp.fastpath) against the Python reference codec.

Differential: on every input, including every truncation of a valid packet, both
codecs return the same header and payload offset or name the same decode reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geneve_dp import codec, fastpath, wire
from geneve_dp.codec import DecodeError, EncodeError, Header, Option
from tests.test_codec import SETTINGS, VECTORS, any_packets, decode_json, headers, payloads
from tests.vectors import Vector

ffi: Any = fastpath.ffi
lib: Any = fastpath.lib


def both(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    return decode_json(codec.decode, data), decode_json(fastpath.decode, data)


def c_decode_prefix(data: bytes, n: int) -> dict[str, Any]:
    """gdp_decode on the first ``n`` bytes of a buffer that holds all of ``data``."""
    buf = ffi.new("uint8_t[]", data) if data else ffi.new("uint8_t[]", 1)
    out = ffi.new("struct gdp_header *")
    rc = lib.gdp_decode(buf, n, out)
    if rc < 0:
        return {"error": fastpath.decode_error(rc).reason}
    return codec.header_to_json(fastpath._header_from_c(data, out), rc)


# ---- build and error mapping -------------------------------------------------------------


def test_build_matches_checkout() -> None:
    # fastpath refuses a stale build at import; this pins that the digest is real.
    assert len(fastpath.BUILD_ID) == 16
    assert fastpath._checkout_digest() == fastpath.BUILD_ID


def test_error_codes_map_one_to_one_in_check_order() -> None:
    codes = [
        lib.GDP_E_TRUNCATED,
        lib.GDP_E_BAD_VERSION,
        lib.GDP_E_OPTIONS_TRUNCATED,
        lib.GDP_E_OPTION_OVERRUNS,
    ]
    assert [fastpath.decode_error(rc).reason for rc in codes] == list(codec.DECODE_REASONS)
    assert lib.GDP_MAX_HEADER_LEN == wire.MAX_HEADER_LEN
    assert lib.GDP_MAX_OPTIONS == wire.MAX_OPTIONS_LEN // 4


# ---- decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.name)
def test_golden_vector_decodes_in_c(vector: Vector) -> None:
    assert decode_json(fastpath.decode, vector.data) == vector.expect


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.name)
def test_golden_vector_every_truncation_agrees(vector: Vector) -> None:
    for cut in range(len(vector.data) + 1):
        py, c = both(vector.data[:cut])
        assert py == c, cut
        # The C decoder honours ``len`` even when more bytes sit behind it.
        assert c_decode_prefix(vector.data, cut) == py, cut


@SETTINGS
@given(any_packets)
def test_c_and_python_agree_on_arbitrary_bytes(data: bytes) -> None:
    py, c = both(data)
    assert py == c


@SETTINGS
@given(headers, payloads)
def test_c_and_python_agree_on_every_truncation(header: Header, payload: bytes) -> None:
    data = codec.encode(header) + payload
    for cut in range(len(data) + 1):
        py, c = both(data[:cut])
        assert py == c, cut
        assert c_decode_prefix(data, cut) == py, cut


@SETTINGS
@given(headers, payloads)
def test_c_decode_fields(header: Header, payload: bytes) -> None:
    data = codec.encode(header) + payload
    out = ffi.new("struct gdp_header *")
    rc = lib.gdp_decode(data, len(data), out)
    assert rc == out.payload_offset == header.header_len
    assert out.n_options == len(header.options)
    pos = 8
    for i, opt in enumerate(header.options):
        o = out.options[i]
        assert o.data_offset == pos + 4
        assert o.data_len == len(opt.data)
        pos += opt.wire_len
    assert pos == rc


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = next(v for v in VECTORS if v.name == "critical-option").data
    assert fastpath.decode(bytearray(data)) == codec.decode(data)
    assert fastpath.decode(memoryview(b"\x00" + data)[1:]) == codec.decode(data)


# ---- batches -----------------------------------------------------------------------------


# Per-packet agreement of C and Python is test_c_and_python_agree_on_arbitrary_bytes's
# (SETTINGS' examples, one packet each); this test keeps the batch's own contract (one
# result per slot, in order, errors in their slots), which needs fewer lists of up to
# 70 packets each.
@settings(SETTINGS, max_examples=100)
@given(st.lists(any_packets, max_size=70))
def test_decode_batch_equals_one_by_one(packets: list[bytes]) -> None:
    results = fastpath.decode_batch(packets)
    assert len(results) == len(packets)
    for pkt, got in zip(packets, results, strict=True):
        want: Any
        try:
            want = codec.decode(pkt)
        except DecodeError as exc:
            assert isinstance(got, DecodeError) and got.reason == exc.reason
        else:
            assert got == want


def test_decode_batch_is_reusable_and_bounded() -> None:
    good = [v.data for v in VECTORS if v.error is None]
    bad = [v.data for v in VECTORS if v.error is not None]
    batch = fastpath.DecodeBatch(64)
    batch.load(good)
    assert batch.run() == len(good)
    batch.load(bad)
    assert batch.run() == 0
    assert [r.reason for r in batch.results(bad)] == [v.error for v in VECTORS if v.error]  # type: ignore[union-attr]
    batch.load(good[:3])
    assert batch.run() == 3
    assert batch.results(good[:3]) == [codec.decode(p) for p in good[:3]]
    batch.load([])
    assert batch.run() == 0
    with pytest.raises(ValueError, match="at most 64"):
        batch.load([b""] * 65)
    assert fastpath.decode_batch([]) == []


# ---- encode ------------------------------------------------------------------------------


@SETTINGS
@given(headers)
def test_c_encode_equals_python_encode(header: Header) -> None:
    assert fastpath.encode(header) == codec.encode(header)


header_fields = st.fixed_dictionaries(
    {
        "vni": st.one_of(st.integers(0, wire.MAX_VNI), st.integers(-(2**33), 2**33)),
        "protocol": st.integers(-2, 0x10001),
        "options": st.lists(
            st.builds(
                Option,
                opt_class=st.integers(-1, 0x10000),
                type=st.integers(-1, 0x100),
                data=st.binary(max_size=130),
            ),
            max_size=4,
        ).map(tuple),
        "oam": st.booleans(),
    },
    optional={
        "critical": st.booleans(),
        "opt_len": st.integers(0, 70),
    },
)


@SETTINGS
@given(header_fields)
def test_c_and_python_encode_accept_and_refuse_the_same(fields: dict[str, Any]) -> None:
    header = Header(**fields)
    try:
        want = codec.encode(header)
    except EncodeError:
        with pytest.raises(EncodeError):
            fastpath.encode(header)
    else:
        assert fastpath.encode(header) == want


def test_c_encode_writes_only_version_0() -> None:
    assert codec.encode(Header(vni=1, version=1))[0] == 0x40
    with pytest.raises(EncodeError, match="version 0"):
        fastpath.encode(Header(vni=1, version=1))


@pytest.mark.parametrize(
    ("opts", "rc"),
    [
        (b"", 0),
        (bytes.fromhex("00010200"), 0),
        (bytes.fromhex("00018000"), 1),
        (bytes.fromhex("0001020000018100"), 1),
        (bytes.fromhex("000102"), lib.GDP_E_BAD_OPTIONS),  # not whole words
        (bytes.fromhex("00010220"), lib.GDP_E_BAD_OPTIONS),  # reserved bits set
        (bytes.fromhex("00010201"), lib.GDP_E_BAD_OPTIONS),  # data missing
        (bytes.fromhex("00010200") * 64, lib.GDP_E_BAD_OPTIONS),  # 256 bytes > 252
        (bytes.fromhex("00010200") * 63, 0),
    ],
)
def test_c_options_check(opts: bytes, rc: int) -> None:
    assert lib.gdp_options_check(opts, len(opts)) == rc


def test_c_encode_return_codes() -> None:
    out = ffi.new("uint8_t[]", 16)
    opt = bytes.fromhex("0001800100000000")
    assert lib.gdp_encode(1, 0x6558, 0, opt, len(opt), out, 16) == 16
    assert bytes(ffi.buffer(out, 16)) == bytes.fromhex("0240655800000100") + opt
    assert lib.gdp_encode(1, 0x6558, 0, opt, len(opt), out, 15) == lib.GDP_E_NO_SPACE
    assert lib.gdp_encode(wire.MAX_VNI + 1, 0x6558, 0, b"", 0, out, 16) == lib.GDP_E_BAD_VNI
    assert lib.gdp_encode(1, 0x6558, 0, b"\x00", 1, out, 16) == lib.GDP_E_BAD_OPTIONS


def test_c_encode_batch() -> None:
    n = 5
    vnis = ffi.new("uint32_t[]", [1, 2, wire.MAX_VNI + 1, 4, wire.MAX_VNI])
    bufs = [ffi.new("uint8_t[]", 8) for _ in range(n)]
    outs = ffi.new("uint8_t *[]", bufs)
    rcs = ffi.new("int[]", n)
    assert lib.gdp_encode_batch(vnis, 0x0800, 1, ffi.NULL, 0, outs, 8, n, rcs) == 4
    assert list(rcs) == [8, 8, lib.GDP_E_BAD_VNI, 8, 8]
    for i in (0, 1, 3, 4):
        want = codec.encode(Header(vni=vnis[i], protocol=0x0800, oam=True))
        assert bytes(ffi.buffer(bufs[i], 8)) == want


# ---- the benchmark runs (its figures are not asserted: it is not a test) -----------------


def test_codec_benchmark_smoke(tmp_path: Path) -> None:
    from bench import codec as bench_codec

    out = tmp_path / "bench.json"
    rc = bench_codec.main(["--quick", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert rc == (0 if doc["pass"] else 1)
    assert set(doc["results"]) == {"decode", "encode"}
    for op in ("decode", "encode"):
        assert set(doc["results"][op]) == set(bench_codec.IMPLS)
        for impl in bench_codec.IMPLS:
            figures = doc["results"][op][impl]
            assert set(figures) == {"0", "1", "4"}
            assert all(v > 0 for v in figures.values())
    assert "decode c-batch64 vs scapy" in doc["speedups"]


def test_decode_from_many_threads_at_once() -> None:
    # The C call runs without the GIL; each thread must decode into its own struct.
    from concurrent.futures import ThreadPoolExecutor

    packets = [v.data for v in VECTORS] * 40
    want = [decode_json(codec.decode, p) for p in packets]

    def work(offset: int) -> list[dict[str, Any]]:
        order = packets[offset:] + packets[:offset]
        got = [decode_json(fastpath.decode, p) for p in order]
        return got[len(packets) - offset :] + got[: len(packets) - offset]

    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(work, range(0, 200, 50)):
            assert got == want


def test_encode_from_many_threads_at_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    hs = [
        Header(
            vni=i, options=tuple(Option(i % 7, i % 256, bytes(4 * (i % 5))) for _ in range(i % 4))
        )
        for i in range(400)
    ]
    want = [codec.encode(h) for h in hs]

    def work(step: int) -> list[bytes]:
        order = list(range(len(hs)))[::step]
        got = {i: fastpath.encode(hs[i]) for i in order}
        return [got[i] for i in sorted(got)]

    with ThreadPoolExecutor(4) as pool:
        for step, got in zip((1, -1, 1, -1), pool.map(work, (1, -1, 1, -1)), strict=True):
            assert got == want, step


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_option_data_is_immutable_bytes_whatever_the_input(kind: Any) -> None:
    data = bytes.fromhex("0200655800000a00010203010000000a")
    (batched,) = fastpath.decode_batch([kind(bytearray(data))])
    assert not isinstance(batched, DecodeError)
    for header, _ in (batched, fastpath.decode(kind(bytearray(data))), codec.decode(kind(data))):
        assert type(header.options[0].data) is bytes
        assert hash(header) == hash(codec.decode(data)[0])
