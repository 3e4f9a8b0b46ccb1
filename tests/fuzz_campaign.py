"""The libFuzzer harnesses of csrc/fuzz for the tests: one build per session (build.sh:
one clang per core, skipped when its source digest is unchanged) and one bounded
campaign per session that runs every harness side by side, each for the same budget.
Each test then asserts on its own harness's result (check)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "csrc" / "fuzz"
BUILD = FUZZ / "build"
# Wall-clock budget of every harness in the session's campaign, all running at once;
# the 10-minute release campaigns are in csrc/fuzz/build.sh and bench/fuzz.py.
SECONDS = int(os.environ.get("GDP_FUZZ_SECONDS", "15"))


def build() -> Path:
    """Builds (or finds up to date) every harness; returns the build directory."""
    assert shutil.which("clang") or shutil.which("clang-14"), (
        "clang is required (apt install clang libclang-rt-14-dev)"
    )
    proc = subprocess.run(
        ["bash", str(FUZZ / "build.sh")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return BUILD


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=BUILD)


@dataclass(frozen=True)
class Spec:
    """One harness's run: its corpora (the first is kept between local runs) and
    the longest input it is given."""

    target: str
    corpora: tuple[Path, ...]
    max_len: int = 300


@dataclass(frozen=True)
class Result:
    target: str
    returncode: int
    stderr: str
    artifacts: list[Path]


def campaign(specs: list[Spec], seconds: int, work: Path) -> dict[str, Result]:
    """Runs every spec's harness at once for ``seconds`` and waits for all of them."""
    procs = []
    for spec in specs:
        artifacts = work / f"artifacts-{spec.target}"
        artifacts.mkdir()
        log = (work / f"{spec.target}.log").open("w")
        argv = [
            str(BUILD / spec.target),
            f"-max_total_time={seconds}",
            f"-max_len={spec.max_len}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            *map(str, spec.corpora),
        ]
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=log, cwd=BUILD, start_new_session=True
        )
        procs.append((spec, proc, log, artifacts))
    results: dict[str, Result] = {}
    for spec, proc, log, artifacts in procs:
        try:
            rc = proc.wait(timeout=seconds + 180)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        stderr = (work / f"{spec.target}.log").read_text(errors="replace")
        results[spec.target] = Result(spec.target, rc, stderr, sorted(artifacts.iterdir()))
    return results


def check(result: Result, min_cov: int, min_exec: int) -> tuple[int, int]:
    """A campaign run must have ended clean: exit 0, no crash artifact, no sanitizer
    report, at least ``min_exec`` executions and ``min_cov`` edges. Returns the
    executions and the highest cov."""
    tail = result.stderr[-4000:]
    assert result.returncode == 0, tail
    assert result.artifacts == [], tail
    assert "ERROR:" not in result.stderr and "runtime error" not in result.stderr, tail
    found = re.search(r"stat::number_of_executed_units:\s*(\d+)", result.stderr)
    assert found, tail
    executed = int(found[1])
    assert executed >= min_exec, tail
    cov = [int(c) for c in re.findall(r"\bcov: (\d+)", result.stderr)]
    assert cov and max(cov) >= min_cov, tail
    return executed, max(cov)


# ---- seeds: a few well-formed inputs per harness, one file each -----------------------


def decode_seeds(d: Path) -> Path:
    """Every golden vector of the codec tests (fuzz_decode)."""
    from tests.test_codec import VECTORS

    d.mkdir()
    for v in VECTORS:
        (d / v.name).write_bytes(v.data)
    return d


def engine_seeds(tmp_path: Path) -> tuple[Path, Path]:
    """Segments of a TCP and a UDP flow (fuzz_gro), TSO super-frames over IPv4 and
    IPv6 (fuzz_seg)."""
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


AUTH_HEADER = bytes([10 + 1, 0x40, 0x65, 0x58, 0, 0, 77, 0])


def auth_seed(frame: bytes, key_id: int = 1) -> bytes:
    """A header with a 4-byte plain option and the integrity option, then ``frame``."""
    from geneve_dp.auth import option

    opt = option.AuthOption(key_id, 5, 5).encode(0xFFF0)
    return AUTH_HEADER + bytes([1, 2, 3, 0]) + opt + frame


def auth_seeds(d: Path) -> Path:
    from geneve_dp.auth import option

    d.mkdir()
    # The last one: an integrity option with no data, ending the packet (its key ID
    # would lie past the end: found by this fuzzer once).
    empty_opt = bytes([1, 0x40, 0x65, 0x58, 0, 0, 77, 0, 0xFF, 0xF0, option.OPT_TYPE, 0])
    seeds = [auth_seed(b"x" * 60), auth_seed(b"", 7), auth_seed(b"y" * 4, 3)]
    for i, s in enumerate([*seeds, AUTH_HEADER[:8], empty_opt]):
        (d / f"s{i}").write_bytes(s)
    return d


def session_campaign(work: Path) -> dict[str, Result]:
    """Every harness on its kept corpus (gitignored; fresh in CI) and its seeds."""

    def kept(target: str) -> Path:
        # Kept between local runs (the tests' fuzz_decode corpus is plain "corpus").
        corpus = BUILD / ("corpus" if target == "fuzz_decode" else f"corpus-{target}")
        corpus.mkdir(exist_ok=True)
        return corpus

    gro, seg = engine_seeds(work)
    specs = [
        Spec("fuzz_decode", (kept("fuzz_decode"), decode_seeds(work / "seeds-decode"))),
        Spec("fuzz_options", (kept("fuzz_options"),)),
        Spec("fuzz_gro", (kept("fuzz_gro"), gro), max_len=8192),
        Spec("fuzz_seg", (kept("fuzz_seg"), seg), max_len=8192),
        Spec("fuzz_auth", (kept("fuzz_auth"), auth_seeds(work / "seeds-auth"))),
    ]
    return campaign(specs, SECONDS, work)
