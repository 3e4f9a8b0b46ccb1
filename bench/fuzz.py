"""Long libFuzzer runs (ASan/UBSan) of the C decoder and the option walkers.

    python -m bench.fuzz --minutes 10            # both targets, one after the other
    python -m bench.fuzz --minutes 1 --target fuzz_options

Builds csrc/fuzz (build.sh), runs each target for the given time on its corpus under
csrc/fuzz/build (kept between runs), and prints one JSON object per target: executions,
final coverage (libFuzzer's ``cov:`` edges and ``ft:`` features), corpus size, peak RSS
and findings (crash/leak/timeout artifacts written, sanitizer reports), and the line
coverage of csrc/codec.c that the corpus reaches (a -fprofile-instr-generate build of
the same harness replayed over it, llvm-cov report). Exit status 1 if any target had a
finding. CI runs short versions of every harness in tests/test_fuzz_c.py (all at once).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "csrc" / "fuzz"
BUILD = FUZZ / "build"
TARGETS = ("fuzz_decode", "fuzz_options")
MAX_LEN = {"fuzz_decode": 300, "fuzz_options": 300}


def build() -> None:
    proc = subprocess.run(["bash", str(FUZZ / "build.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench.fuzz: build failed: {proc.stderr.strip()}")


def run(target: str, seconds: int) -> dict[str, Any]:
    corpus = BUILD / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp)
        argv = [
            str(BUILD / target),
            f"-max_total_time={seconds}",
            f"-max_len={MAX_LEN[target]}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            str(corpus),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 300)
        found = sorted(p.name for p in artifacts.iterdir())
    err = proc.stderr
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", err)
    cov = [int(c) for c in re.findall(r"\bcov: (\d+)", err)]
    ft = [int(c) for c in re.findall(r"\bft: (\d+)", err)]
    rss = re.search(r"stat::peak_rss_mb:\s*(\d+)", err)
    reports = [ln for ln in err.splitlines() if "ERROR:" in ln or "runtime error" in ln]
    return {
        "target": target,
        "seconds": seconds,
        "command": " ".join([*argv[:-2], "-artifact_prefix=TMP/", argv[-1]]),
        "exit_code": proc.returncode,
        "executions": int(executed[1]) if executed else 0,
        "cov": max(cov) if cov else 0,
        "ft": max(ft) if ft else 0,
        "corpus_files": sum(1 for _ in corpus.iterdir()),
        "peak_rss_mb": int(rss[1]) if rss else 0,
        "findings": found + reports,
    }


def _tool(name: str) -> str:
    """An LLVM tool by its plain name, else the clang-14 one (Debian names both)."""
    return shutil.which(name) or shutil.which(f"{name}-14") or name


def line_coverage(target: str, corpus: Path) -> dict[str, Any]:
    """Lines of csrc/codec.c executed by replaying ``corpus`` (llvm-cov's figures)."""
    if not (shutil.which("llvm-cov") or shutil.which("llvm-cov-14")):
        return {"error": "llvm-cov not found (apt install llvm-14)"}
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / f"{target}_cov"
        build = subprocess.run(
            ["clang", "-fsanitize=fuzzer", "-fprofile-instr-generate", "-fcoverage-mapping",
             "-O0", "-I", str(ROOT / "csrc"), str(FUZZ / f"{target}.c"),
             str(ROOT / "csrc" / "codec.c"), "-o", str(binary)],
            capture_output=True, text=True,
        )  # fmt: skip
        if build.returncode != 0:
            return {"error": build.stderr.strip()[-300:]}
        raw, data = Path(tmp) / "cov.profraw", Path(tmp) / "cov.profdata"
        subprocess.run(
            [str(binary), "-runs=0", str(corpus)],
            env={"LLVM_PROFILE_FILE": str(raw)}, capture_output=True, timeout=600,
        )  # fmt: skip
        subprocess.run([_tool("llvm-profdata"), "merge", "-sparse", str(raw), "-o", str(data)],
                       check=True, capture_output=True)  # fmt: skip
        report = subprocess.run(
            [_tool("llvm-cov"), "report", str(binary), "-instr-profile", str(data),
             str(ROOT / "csrc" / "codec.c")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    for line in report.splitlines():
        if line.split() and line.split()[0].endswith("codec.c"):
            f = line.split()
            # Regions, missed, cover, functions, missed, executed, lines, missed, cover...
            lines, missed = int(f[7]), int(f[8])
            return {"file": "csrc/codec.c", "lines": lines, "lines_covered": lines - missed,
                    "line_cover": f[9], "branch_cover": f[12]}  # fmt: skip
    return {"error": "codec.c not in the llvm-cov report"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="per target (default 10)")
    ap.add_argument("--target", choices=TARGETS, action="append", help="default: both")
    args = ap.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        ap.error(f"--minutes: {args.minutes} is out of range (0, 1440]")
    build()
    bad = False
    for target in args.target or TARGETS:
        result = run(target, max(1, round(args.minutes * 60)))
        result["line_coverage"] = line_coverage(target, BUILD / f"corpus-{target}")
        print(json.dumps(result), flush=True)
        bad |= bool(result["findings"]) or result["exit_code"] != 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
