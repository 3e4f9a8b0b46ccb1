"""libFuzzer + ASan/UBSan on the authenticated-tunnel receive check (csrc/fuzz/fuzz_auth.c):
a planted bug is caught, and a bounded run from seeds that carry the option ends clean
(its seeds: tests.fuzz_campaign.auth_seeds; the run: the session campaign)."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz_campaign import Result, auth_seed, check, run


def test_planted_acceptance_of_a_flipped_packet_is_caught(fuzz_build: Path, tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.write_bytes(auth_seed(b"frameAUTH!"))
    target = fuzz_build / "fuzz_auth"
    proc = run([str(target.with_name("fuzz_auth_selftest")), str(planted)], timeout=60)
    assert proc.returncode != 0 and "check failed" in proc.stderr, proc.stderr[-2000:]
    assert run([str(target), str(planted)], timeout=60).returncode == 0


def test_bounded_fuzz_run_of_the_receive_check_finds_nothing(
    fuzz_results: dict[str, Result],
) -> None:
    executed, cov = check(fuzz_results["fuzz_auth"], min_cov=50, min_exec=50_000)
    print(f"fuzz_auth: {executed} executions, cov {cov}")
