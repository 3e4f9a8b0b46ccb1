"""The only importer of the compiled ``geneve_dp._fastpath`` module.

It maps the C codec's negative return codes to the same ``DecodeError`` reasons and
``EncodeError`` messages as the Python reference codec, and refuses a missing or stale
build with a message that says how to rebuild it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import codec, wire
from .codec import DecodeError, EncodeError, Header, Option
from .source_digest import source_digest

_REINSTALL = "reinstall with: pip install -e '.[test]' (from the geneve-dp checkout)"

try:
    from . import _fastpath  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(f"geneve_dp._fastpath is not built ({exc}); {_REINSTALL}") from exc

ffi: Any = _fastpath.ffi
lib: Any = _fastpath.lib


def _checkout_digest() -> str | None:
    """Digest of csrc/ when running from a checkout, as the build computed it."""
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if not (csrc / "build_fastpath.py").is_file():
        return None
    return source_digest(csrc)


BUILD_ID: str = ffi.string(lib.gdp_build_id()).decode()
_expected = _checkout_digest()
if _expected is not None and _expected != BUILD_ID:
    raise ImportError(
        f"geneve_dp._fastpath is stale: built from C sources {BUILD_ID}, "
        f"the checkout has {_expected}; {_REINSTALL}"
    )

_DECODE_RC = {
    lib.GDP_E_TRUNCATED: "truncated",
    lib.GDP_E_BAD_VERSION: "bad_version",
    lib.GDP_E_OPTIONS_TRUNCATED: "options_truncated",
    lib.GDP_E_OPTION_OVERRUNS: "option_overruns",
}
assert set(_DECODE_RC.values()) == set(codec.DECODE_REASONS)


def decode_error(rc: int) -> DecodeError:
    """The exception for a negative return code of gdp_decode."""
    return DecodeError(_DECODE_RC[rc])


def _header_from_c(buf: bytes, h: Any) -> Header:
    n = h.n_options
    options: tuple[Option, ...] = ()
    if n:
        opts = h.options
        options = tuple(
            Option(o.opt_class, o.type, buf[o.data_offset : o.data_offset + o.data_len])
            for o in (opts[i] for i in range(n))
        )
    return Header(
        vni=h.vni,
        protocol=h.protocol,
        options=options,
        oam=bool(h.oam),
        critical=bool(h.critical),
        opt_len=h.opt_len,
        version=h.version,
    )


_scratch = threading.local()


def _scratch_header() -> Any:
    """A per-thread struct for one decode (cffi releases the GIL during the C call)."""
    out = getattr(_scratch, "header", None)
    if out is None:
        out = _scratch.header = ffi.new("struct gdp_header *")
    return out


def decode(buf: bytes | bytearray | memoryview) -> tuple[Header, int]:
    """Same contract as ``codec.decode``, parsed by the C codec."""
    data = buf if type(buf) is bytes else bytes(buf)
    out = _scratch_header()
    rc = lib.gdp_decode(data, len(data), out)
    if rc < 0:
        raise decode_error(rc)
    return _header_from_c(data, out), rc


class DecodeBatch:
    """Reusable C arrays for decoding up to ``size`` buffers in one call."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._bufs = ffi.new("uint8_t *[]", size)
        self._lens = ffi.new("size_t[]", size)
        self._outs = ffi.new("struct gdp_header[]", size)
        self._rcs = ffi.new("int[]", size)
        self._keep: list[Any] = []

    def load(self, packets: Sequence[bytes]) -> None:
        """Point the batch at ``packets`` (kept alive until the next load)."""
        if len(packets) > self.size:
            raise ValueError(f"batch holds at most {self.size} packets")
        self._keep = [ffi.from_buffer(p) for p in packets]
        for i, cbuf in enumerate(self._keep):
            self._bufs[i] = cbuf
            self._lens[i] = len(packets[i])
        self._n = len(packets)

    def run(self) -> int:
        """Decode the loaded packets; returns how many decoded."""
        return int(lib.gdp_decode_batch(self._bufs, self._lens, self._n, self._outs, self._rcs))

    def results(self, packets: Sequence[bytes]) -> list[tuple[Header, int] | DecodeError]:
        """Per-packet results of the last run, as headers or errors."""
        out: list[tuple[Header, int] | DecodeError] = []
        for i, pkt in enumerate(packets):
            rc = self._rcs[i]
            if rc < 0:
                out.append(decode_error(rc))
            else:
                data = pkt if type(pkt) is bytes else bytes(pkt)
                out.append((_header_from_c(data, self._outs[i]), rc))
        return out


def decode_batch(packets: Sequence[bytes]) -> list[tuple[Header, int] | DecodeError]:
    """Decode many packets in one C call."""
    batch = DecodeBatch(max(1, len(packets)))
    batch.load(packets)
    batch.run()
    return batch.results(packets)


_ENCODE_RC = {
    lib.GDP_E_BAD_VNI: "VNI is out of range 0..16777215",
    lib.GDP_E_BAD_OPTIONS: "options do not form a valid option area",
    lib.GDP_E_NO_SPACE: "output buffer too small",
}


def encode(header: Header) -> bytes:
    """Same contract as ``codec.encode``, written by the C codec.

    Option checks with readable messages are shared with the reference codec; the C
    side re-validates the laid-out area and derives the C bit itself.
    """
    if header.version != wire.GENEVE_VERSION:
        raise EncodeError("the C codec writes only version 0")
    if not 0 <= header.vni <= 0xFFFFFFFF:  # larger would not even fit the C argument
        raise EncodeError(f"VNI {header.vni} is out of range 0..{wire.MAX_VNI}")
    if not 0 <= header.protocol <= 0xFFFF:
        raise EncodeError(f"protocol type {header.protocol} is out of range 0..65535")
    opts = codec.encode_options(header.options)
    if header.critical != any(o.critical for o in header.options):
        raise EncodeError("the C bit must be set exactly when some option is critical")
    if header.opt_len != len(opts) // 4:
        raise EncodeError(f"opt_len {header.opt_len} does not match options of {len(opts)} bytes")
    out = getattr(_scratch, "encode_out", None)
    if out is None:
        out = _scratch.encode_out = ffi.new("uint8_t[]", wire.MAX_HEADER_LEN)
    rc = lib.gdp_encode(
        header.vni, header.protocol, int(header.oam), opts, len(opts), out, len(out)
    )
    if rc < 0:
        raise EncodeError(_ENCODE_RC.get(rc, f"C encoder failed with {rc}"))
    return bytes(ffi.buffer(out, rc))
