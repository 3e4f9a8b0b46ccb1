"""Codec benchmark: nanoseconds per GENEVE header, and ratios measured in the same run.

    python -m bench.codec [--quick] [--repeat N] [--json FILE]

Decode and encode headers with 0, 1 and 4 options through:

* ``python``    the pure-Python reference codec (geneve_dp.codec), one call per header;
* ``c-call``    the C codec through geneve_dp.fastpath, one cffi call per header (this
                includes building the Header dataclass, as the Python API must);
* ``c-batch64`` the C codec on batches of 64 already-received headers, one cffi call per
                batch, results left in C structs: what the dataplane's loops do with
                packets received into preallocated buffers;
* ``scapy``     scapy's GENEVE layer (dissecting bytes, or building a prebuilt packet).

Each figure is the best of ``--repeat`` timed rounds. The machines are shared and noisy,
so read the ratios, not the absolute numbers. Targets (issue 2): batched C decode at least
50x faster than the Python reference and 500x faster than scapy, for every option count.
Exit code 0 when the targets are met, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from geneve_dp import codec, fastpath, wire
from geneve_dp.codec import Header, Option

BATCH = 64
OPTION_COUNTS = (0, 1, 4)
IMPLS = ("python", "c-call", "c-batch64", "scapy")
TARGETS = {"python": 50.0, "scapy": 500.0}
"""Minimum speed-up of batched C decode over each of these, for every option count."""


def sample_header(n_options: int, vni: int = 1000) -> Header:
    """A header like the dataplane sees: Ethernet payload, ``n_options`` options."""
    pool = (
        Option(0x0102, 0x80, b"\x00\x00\x00\x2a"),
        Option(0x0104, 0x01, bytes(range(8))),
        Option(0xFFFF, 0x02),
        Option(0x0100, 0x03, bytes(range(12))),
    )
    return Header(vni=vni, protocol=wire.Protocol.ETHERNET, options=pool[:n_options])


def time_ns(fn: Callable[[], object], per_call: int, repeat: int, min_round_s: float) -> float:
    """Best ns per item over ``repeat`` rounds of ``fn``, which handles ``per_call`` items."""
    loops = 1
    while True:  # calibrate: one round lasts at least min_round_s
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter_ns() - start
        if elapsed >= min_round_s * 1e9:
            break
        loops *= 2 if elapsed < min_round_s * 1e8 else 1 + int(min_round_s * 1e9 / max(elapsed, 1))
    best = elapsed / loops
    for _ in range(repeat - 1):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / loops)
    return best / per_call


class Case:
    """Everything one option count needs, prepared outside the timed loops."""

    def __init__(self, n_options: int) -> None:
        from scapy.contrib.geneve import GENEVE, GeneveOptions

        self.n_options = n_options
        self.headers = [sample_header(n_options, vni=1000 + i) for i in range(BATCH)]
        self.header = self.headers[0]
        self.packets = [codec.encode(h) for h in self.headers]
        self.packet = self.packets[0]
        self.scapy_cls = GENEVE
        self.scapy_pkt = GENEVE(
            vni=self.header.vni,
            proto=self.header.protocol,
            critical=int(self.header.critical),
            options=[
                GeneveOptions(classid=o.opt_class, type=o.type, data=o.data)
                for o in self.header.options
            ],
        )
        # Batched decode: 64 received buffers, pointed at once (as a receive ring is).
        self.dbatch = fastpath.DecodeBatch(BATCH)
        self.dbatch.load(self.packets)
        # Batched encode: VNIs, one laid-out option area, 64 preallocated outputs.
        ffi, lib = fastpath.ffi, fastpath.lib
        self.lib = lib
        self.opts = codec.encode_options(self.header.options)
        self.vnis = ffi.new("uint32_t[]", [h.vni for h in self.headers])
        self.out_bufs = [ffi.new("uint8_t[]", wire.MAX_HEADER_LEN) for _ in range(BATCH)]
        self.outs = ffi.new("uint8_t *[]", self.out_bufs)
        self.rcs = ffi.new("int[]", BATCH)
        self.ffi = ffi
        self.verify()

    # decode ---------------------------------------------------------------------------
    def decode_python(self) -> object:
        return codec.decode(self.packet)

    def decode_c_call(self) -> object:
        return fastpath.decode(self.packet)

    def decode_c_batch(self) -> object:
        return self.dbatch.run()

    def decode_scapy(self) -> object:
        return self.scapy_cls(self.packet)

    # encode ---------------------------------------------------------------------------
    def encode_python(self) -> object:
        return codec.encode(self.header)

    def encode_c_call(self) -> object:
        return fastpath.encode(self.header)

    def encode_c_batch(self) -> object:
        return self.lib.gdp_encode_batch(
            self.vnis,
            self.header.protocol,
            0,
            self.opts,
            len(self.opts),
            self.outs,
            wire.MAX_HEADER_LEN,
            BATCH,
            self.rcs,
        )

    def encode_scapy(self) -> object:
        return bytes(self.scapy_pkt)

    def verify(self) -> None:
        """Every implementation computes the same thing before any of them is timed."""
        want = (self.header, self.header.header_len)
        assert self.decode_python() == want
        assert self.decode_c_call() == want
        assert self.decode_c_batch() == BATCH
        assert self.dbatch.results(self.packets) == [(h, h.header_len) for h in self.headers]
        dissected: Any = self.decode_scapy()
        assert (dissected.vni, len(dissected.options)) == (self.header.vni, self.n_options)
        assert self.encode_python() == self.encode_c_call() == self.encode_scapy() == self.packet
        assert self.encode_c_batch() == BATCH
        for buf, pkt in zip(self.out_bufs, self.packets, strict=True):
            assert bytes(self.ffi.buffer(buf, len(pkt))) == pkt

    def functions(self) -> dict[tuple[str, str], tuple[Callable[[], object], int]]:
        return {
            ("decode", "python"): (self.decode_python, 1),
            ("decode", "c-call"): (self.decode_c_call, 1),
            ("decode", "c-batch64"): (self.decode_c_batch, BATCH),
            ("decode", "scapy"): (self.decode_scapy, 1),
            ("encode", "python"): (self.encode_python, 1),
            ("encode", "c-call"): (self.encode_c_call, 1),
            ("encode", "c-batch64"): (self.encode_c_batch, BATCH),
            ("encode", "scapy"): (self.encode_scapy, 1),
        }


Results = dict[str, dict[str, dict[int, float]]]


def measure(repeat: int, min_round_s: float) -> Results:
    results: Results = {"decode": {i: {} for i in IMPLS}, "encode": {i: {} for i in IMPLS}}
    for n in OPTION_COUNTS:
        case = Case(n)
        for (op, impl), (fn, per_call) in case.functions().items():
            results[op][impl][n] = time_ns(fn, per_call, repeat, min_round_s)
    return results


def ratios(results: Results) -> dict[str, dict[int, float]]:
    """Speed-ups (how many times faster), named "<op> <fast> vs <slow>"."""
    out: dict[str, dict[int, float]] = {}
    for op in ("decode", "encode"):
        for fast, slow in (
            ("c-batch64", "python"),
            ("c-batch64", "scapy"),
            ("c-call", "python"),
            ("python", "scapy"),
        ):
            out[f"{op} {fast} vs {slow}"] = {
                n: results[op][slow][n] / results[op][fast][n] for n in OPTION_COUNTS
            }
    return out


def verdict(speedups: dict[str, dict[int, float]]) -> tuple[bool, list[str]]:
    lines, ok = [], True
    for slow, target in TARGETS.items():
        got = speedups[f"decode c-batch64 vs {slow}"]
        worst = min(got.values())
        met = worst >= target
        ok &= met
        lines.append(
            f"{'PASS' if met else 'FAIL'}: batched C decode vs {slow}: "
            f"{worst:,.0f}x at worst (target >= {target:,.0f}x, options {list(OPTION_COUNTS)})"
        )
    return ok, lines


def render(results: Results, speedups: dict[str, dict[int, float]]) -> str:
    cols = "".join(f"{f'{n} opt' + ('s' if n != 1 else ''):>12}" for n in OPTION_COUNTS)
    rows = [f"{'ns/header':<28}{cols}"]
    for op in ("decode", "encode"):
        for impl in IMPLS:
            cells = "".join(f"{results[op][impl][n]:>12,.1f}" for n in OPTION_COUNTS)
            rows.append(f"{op + ' ' + impl:<28}{cells}")
    rows.append("")
    rows.append(f"{'speed-up (x)':<28}{cols}")
    for name, by_n in speedups.items():
        cells = "".join(f"{by_n[n]:>12,.1f}" for n in OPTION_COUNTS)
        rows.append(f"{name:<28}{cells}")
    return "\n".join(rows)


def meta() -> dict[str, Any]:
    import scapy

    return {
        "python": platform.python_version(),
        "scapy": scapy.__version__,
        "fastpath_build": fastpath.BUILD_ID,
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "batch": BATCH,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.codec",
        description="GENEVE codec benchmark: ns per header for the Python reference, the C "
        "codec (per call and in batches of 64) and scapy; prints ratios and PASS/FAIL "
        "against the targets (batched C decode >= 50x Python, >= 500x scapy).",
    )
    p.add_argument("--repeat", type=int, default=5, help="timed rounds per figure (best kept)")
    p.add_argument(
        "--min-round", type=float, default=0.05, metavar="SECONDS", help="length of a round"
    )
    p.add_argument("--quick", action="store_true", help="3 short rounds (for smoke tests)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repeat, min_round = (3, 0.01) if args.quick else (max(1, args.repeat), args.min_round)
    results = measure(repeat, min_round)
    speedups = ratios(results)
    ok, lines = verdict(speedups)
    print(f"geneve-dp codec benchmark (best of {repeat} rounds; batch = {BATCH})")
    print(render(results, speedups))
    print()
    for line in lines:
        print(line)
    if args.json is not None:
        doc = {
            "unit": "ns/header",
            "meta": meta(),
            "results": results,
            "speedups": speedups,
            "targets": {f"decode c-batch64 vs {k}": v for k, v in TARGETS.items()},
            "pass": ok,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
