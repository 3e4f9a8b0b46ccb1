"""libFuzzer + ASan/UBSan on the C decoder and its option walkers, and on the engine's
receive coalescing and TSO segmentation (csrc/fuzz/): bounded runs with zero findings.

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
    target: Path,
    seconds: int,
    corpora: list[Path],
    tmp_path: Path,
    min_cov: int,
    min_exec: int = 50_000,
    max_len: int = 300,
) -> tuple[int, int]:
    """A bounded libFuzzer run that must end clean: no crash artifact, no sanitizer
    report, at least ``min_exec`` executions and ``min_cov`` edges. Returns the
    executions and the highest cov."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    proc = run(
        [
            str(target),
            f"-max_total_time={seconds}",
            f"-max_len={max_len}",
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
    assert executed >= min_exec, tail
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


# ---- the engine's pure parts (fuzz_gro.c, fuzz_seg.c) --------------------------------

ENGINE_SECONDS = int(os.environ.get("GDP_FUZZ_ENGINE_SECONDS", "10"))


def _engine_seeds(tmp_path: Path) -> tuple[Path, Path]:
    """A few well-formed inputs for each harness: segments of a TCP and a UDP flow
    (fuzz_gro), TSO super-frames over IPv4 and IPv6 (fuzz_seg)."""
    from tests.packets import ACK, PSH, Flow, eth, tcp, tso_frame, udp

    gro, seg = tmp_path / "seeds-gro", tmp_path / "seeds-seg"
    gro.mkdir()
    seg.mkdir()
    v4, v6 = Flow(), Flow("fd00::1", "fd00::2")
    for k, (flow, tun) in enumerate([(v4, 0), (v6, 0), (v4, 1)]):
        frame, vh = tso_frame(flow, 1000, bytes(range(256)) * 12, 1000, mode=tun, flags=ACK | PSH)
        (seg / f"s{k}").write_bytes(bytes([tun | 2]) + vh[:10] + frame)
    for k, (flow, tun, is_udp) in enumerate([(v4, 0, 0), (v6, 0, 0), (v4, 1, 0), (v4, 0, 1)]):
        first = udp(flow, bytes(600), ip_id=5) if is_udp else tcp(flow, 1000, bytes(700), ip_id=5)
        frame = first if tun else eth(first)
        # selector (mode, UDP runs), one raw frame, then five derived segments
        body = bytes([tun | (2 if is_udp else 0), 0]) + len(frame).to_bytes(2, "big") + frame
        body += (bytes([1]) + (600 if is_udp else 700).to_bytes(2, "big")) * 5
        (gro / f"g{k}").write_bytes(body)
    return gro, seg


@pytest.mark.parametrize("target", ["fuzz_gro", "fuzz_seg"])
def test_engine_harness_planted_bug_is_caught(harness: Path, tmp_path: Path, target: str) -> None:
    _, seg_seeds = _engine_seeds(tmp_path)
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
    harness: Path, tmp_path: Path, target: str
) -> None:
    gro_seeds, seg_seeds = _engine_seeds(tmp_path)
    corpus = BUILD / f"corpus-{target}"  # kept between local runs (gitignored); fresh in CI
    corpus.mkdir(exist_ok=True)
    seeds = gro_seeds if target == "fuzz_gro" else seg_seeds
    executed, cov = fuzz_run(
        harness.with_name(target), ENGINE_SECONDS, [corpus, seeds], tmp_path,
        min_cov=100, min_exec=2_000, max_len=8192,
    )  # fmt: skip
    print(f"{target}: {executed} executions in {ENGINE_SECONDS} s, cov {cov}")
