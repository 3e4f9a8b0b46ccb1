"""libFuzzer + ASan/UBSan on the C decoder and its option walkers, and on the engine's
receive coalescing and TSO segmentation (csrc/fuzz/): bounded runs with zero findings.

The harness cross-checks gdp_decode against an independent walk, checks invariants,
truncations, the batch entry point and re-encoding. A self-test build proves that the
sanitizers and the cross-check really abort on a planted bug, so a quiet run means
something.

The bounded runs are one session campaign (tests/fuzz_campaign.py): every harness side
by side for GDP_FUZZ_SECONDS (15 s) of wall time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz_campaign import Result, check, decode_seeds, engine_seeds, run


@pytest.fixture
def harness(fuzz_build: Path) -> Path:
    return fuzz_build / "fuzz_decode"


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """Every golden vector, one file each."""
    return decode_seeds(tmp_path / "seeds")


def test_every_seed_passes_the_harness(harness: Path, seeds: Path) -> None:
    files = sorted(str(p) for p in seeds.iterdir())
    proc = run([str(harness), *files], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Executed ") == len(files)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"OOB!xxxx", "AddressSanitizer: heap-buffer-overflow"),
        (b"OVF!", "runtime error: signed integer overflow"),
        (b"\0\0DIF!\0\0", "check failed"),
    ],
    ids=["asan", "ubsan", "cross-check"],
)
def test_planted_bugs_are_caught(harness: Path, tmp_path: Path, data: bytes, needle: str) -> None:
    selftest = harness.with_name("fuzz_decode_selftest")
    planted = tmp_path / "planted"
    planted.write_bytes(data)
    proc = run([str(selftest), str(planted)], timeout=60)
    assert proc.returncode != 0
    assert needle in proc.stderr
    # The real harness has no such bug: the same input passes.
    assert run([str(harness), str(planted)], timeout=60).returncode == 0


def test_bounded_fuzz_run_finds_nothing(fuzz_results: dict[str, Result]) -> None:
    executed, cov = check(fuzz_results["fuzz_decode"], min_cov=40, min_exec=50_000)
    print(f"fuzz: {executed} executions, cov {cov}")


# ---- the option walkers (fuzz_options.c): every input is an option area ----------------


def test_option_walker_planted_bug_is_caught(harness: Path, tmp_path: Path) -> None:
    target = harness.with_name("fuzz_options")
    planted = tmp_path / "planted"
    planted.write_bytes(b"AWLK!\0\0\0")  # selector byte, then an option area
    proc = run([str(target.with_name("fuzz_options_selftest")), str(planted)], timeout=60)
    assert proc.returncode != 0 and "check failed" in proc.stderr, proc.stderr[-2000:]
    assert run([str(target), str(planted)], timeout=60).returncode == 0


def test_option_walker_bounded_fuzz_run_finds_nothing(fuzz_results: dict[str, Result]) -> None:
    # The walk is reached: its loop, the overrun exit and the encoder's checks are
    # more edges than the entry checks alone.
    executed, cov = check(fuzz_results["fuzz_options"], min_cov=40, min_exec=50_000)
    print(f"fuzz_options: {executed} executions, cov {cov}")


# ---- the engine's pure parts (fuzz_gro.c, fuzz_seg.c) --------------------------------


@pytest.mark.parametrize("target", ["fuzz_gro", "fuzz_seg"])
def test_engine_harness_planted_bug_is_caught(harness: Path, tmp_path: Path, target: str) -> None:
    _, seg_seeds = engine_seeds(tmp_path)
    if target == "fuzz_gro":
        data = b"GRO!" + bytes(40)  # any frame: the planted miscount breaks the accounting
    else:  # a super-frame the harness cuts, its destination MAC spelling the magic
        seed = (seg_seeds / "s0").read_bytes()
        data = seed[:11] + b"SEG!" + seed[15:]
    path = tmp_path / "planted"
    path.write_bytes(data)
    selftest = harness.with_name(f"{target}_selftest")
    proc = run([str(selftest), str(path)], timeout=60)
    assert proc.returncode != 0 and "check failed" in proc.stderr, proc.stderr[-2000:]
    assert run([str(harness.with_name(target)), str(path)], timeout=60).returncode == 0


@pytest.mark.parametrize("target", ["fuzz_gro", "fuzz_seg"])
def test_engine_harness_bounded_run_finds_nothing(
    fuzz_results: dict[str, Result], target: str
) -> None:
    executed, cov = check(fuzz_results[target], min_cov=100, min_exec=2_000)
    print(f"{target}: {executed} executions, cov {cov}")
