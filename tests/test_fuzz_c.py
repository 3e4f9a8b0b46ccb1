"""libFuzzer + ASan/UBSan on the C decoder and its option walkers (csrc/fuzz/): bounded
runs with zero findings.

The harness cross-checks gdp_decode against an independent walk, checks invariants,
truncations, the batch entry point and re-encoding. A self-test build proves that the
sanitizers and the cross-check really abort on a planted bug, so a quiet run means
something.

GDP_FUZZ_SECONDS sets the run length (45 s in CI, 60 s otherwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_codec import VECTORS

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "csrc" / "fuzz"
BUILD = FUZZ / "build"
SECONDS = int(os.environ.get("GDP_FUZZ_SECONDS", "45" if os.environ.get("CI") else "60"))


@pytest.fixture(scope="module")
def harness() -> Path:
    assert shutil.which("clang") or shutil.which("clang-14"), (
        "clang is required (apt install clang libclang-rt-14-dev)"
    )
    proc = subprocess.run(
        ["bash", str(FUZZ / "build.sh")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return BUILD / "fuzz_decode"


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """Every golden vector and a few structured headers, one file each."""
    d = tmp_path / "seeds"
    d.mkdir()
    for v in VECTORS:
        (d / v.name).write_bytes(v.data)
    return d


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=BUILD)


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


def fuzz_run(
    target: Path, seconds: int, corpora: list[Path], tmp_path: Path, min_cov: int
) -> tuple[int, int]:
    """A bounded libFuzzer run that must end clean: no crash artifact, no sanitizer
    report, at least 50,000 executions and ``min_cov`` edges. Returns the executions and
    the highest cov."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    proc = run(
        [
            str(target),
            f"-max_total_time={seconds}",
            "-max_len=300",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            *map(str, corpora),
        ],
        timeout=seconds + 180,
    )
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, tail
    assert list(artifacts.iterdir()) == [], tail
    assert "ERROR:" not in proc.stderr and "runtime error" not in proc.stderr, tail
    executed = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)[1])  # type: ignore[index]
    assert executed >= 50_000, tail
    cov = [int(c) for c in re.findall(r"\bcov: (\d+)", proc.stderr)]
    assert cov and max(cov) >= min_cov, tail
    return executed, max(cov)


def test_bounded_fuzz_run_finds_nothing(harness: Path, seeds: Path, tmp_path: Path) -> None:
    corpus = BUILD / "corpus"  # kept between local runs (gitignored); fresh in CI
    corpus.mkdir(exist_ok=True)
    executed, cov = fuzz_run(harness, SECONDS, [corpus, seeds], tmp_path, min_cov=40)
    print(f"fuzz: {executed} executions in {SECONDS} s, cov {cov}")


# ---- the option walkers (fuzz_options.c): every input is an option area ----------------

OPTION_SECONDS = int(os.environ.get("GDP_FUZZ_OPTION_SECONDS", "15"))


def test_option_walker_planted_bug_is_caught(harness: Path, tmp_path: Path) -> None:
    target = harness.with_name("fuzz_options")
    planted = tmp_path / "planted"
    planted.write_bytes(b"AWLK!\0\0\0")  # selector byte, then an option area
    proc = run([str(target.with_name("fuzz_options_selftest")), str(planted)], timeout=60)
    assert proc.returncode != 0 and "check failed" in proc.stderr, proc.stderr[-2000:]
    assert run([str(target), str(planted)], timeout=60).returncode == 0


def test_option_walker_bounded_fuzz_run_finds_nothing(harness: Path, tmp_path: Path) -> None:
    target = harness.with_name("fuzz_options")
    corpus = BUILD / "corpus-fuzz_options"  # shared with bench.fuzz; fresh in CI
    corpus.mkdir(exist_ok=True)
    # The walk is reached: its loop, the overrun exit and the encoder's checks are
    # more edges than the entry checks alone.
    executed, cov = fuzz_run(target, OPTION_SECONDS, [corpus], tmp_path, min_cov=40)
    print(f"fuzz_options: {executed} executions in {OPTION_SECONDS} s, cov {cov}")
