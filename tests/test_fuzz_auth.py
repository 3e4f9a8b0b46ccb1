"""libFuzzer + ASan/UBSan on the authenticated-tunnel receive check (csrc/fuzz/fuzz_auth.c):
a planted bug is caught, and a bounded run from seeds that carry the option ends clean."""

from __future__ import annotations

import os
from pathlib import Path

from geneve_dp.auth import option
from tests.test_fuzz_c import fuzz_run, run
from tests.test_fuzz_c import harness as harness  # the fixture: builds every harness

SECONDS = int(os.environ.get("GDP_FUZZ_AUTH_SECONDS", "15"))
HEADER = bytes([10 + 1, 0x40, 0x65, 0x58, 0, 0, 77, 0])


def seed(frame: bytes, key_id: int = 1) -> bytes:
    """A header with a 4-byte plain option and the integrity option, then ``frame``."""
    return HEADER + bytes([1, 2, 3, 0]) + option.AuthOption(key_id, 5, 5).encode(0xFFF0) + frame


def test_planted_acceptance_of_a_flipped_packet_is_caught(harness: Path, tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.write_bytes(seed(b"frameAUTH!"))
    target = harness.with_name("fuzz_auth")
    proc = run([str(target.with_name("fuzz_auth_selftest")), str(planted)], timeout=60)
    assert proc.returncode != 0 and "check failed" in proc.stderr, proc.stderr[-2000:]
    assert run([str(target), str(planted)], timeout=60).returncode == 0


def test_bounded_fuzz_run_of_the_receive_check_finds_nothing(harness: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    # The last one: an integrity option with no data, ending the packet (its key ID
    # would lie past the end: found by this fuzzer once).
    empty_opt = bytes([1, 0x40, 0x65, 0x58, 0, 0, 77, 0, 0xFF, 0xF0, option.OPT_TYPE, 0])
    seeds_ = [seed(b"x" * 60), seed(b"", 7), seed(b"y" * 4, 3), HEADER[:8], empty_opt]
    for i, s in enumerate(seeds_):
        (seeds / f"s{i}").write_bytes(s)
    executed, cov = fuzz_run(harness.with_name("fuzz_auth"), SECONDS, [seeds], tmp_path, 50)
    print(f"fuzz_auth: {executed} executions in {SECONDS} s, cov {cov}")
