"""`geneve-dp demo` as a person reads it: the labels explained once before the steps, a
line as each step and each setup action starts (no silence while namespaces, rules and
daemons are made), and JSON only when asked for with --json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from geneve_dp.ambient import demo

ROOT = Path(__file__).resolve().parent.parent


def test_summary_is_a_sentence_unless_json_is_asked_for() -> None:
    ok = demo.Step(1, demo.TITLES[1], "x")
    bad = demo.Step(2, demo.TITLES[2], "y")
    bad.failures.append("it broke")
    assert demo.summary([ok, bad], 7, as_json=False) == "1/7 steps passed; failed: 2"
    assert json.loads(demo.summary([ok, bad], 7, as_json=True)) == {
        "passed": 1,
        "total": 7,
        "failed": [2],
    }
    text = demo.report_step(bad)
    assert "step 2: FAIL" in text and "FAILED:   it broke" in text


@pytest.mark.root
def test_demo_explains_labels_once_announces_each_action_and_prints_no_json(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "GENEVE_DP_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run(
        [sys.executable, "-m", "geneve_dp", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    lines = out.splitlines()
    # JSON only with --json: not one line of it here; the end is a sentence.
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    assert lines[-1] == "8/8 steps passed"
    # The labels the steps use are explained once, before the first step.
    for label in ("P10 =", "F2 =", "Z4 =", "0x210 sent by", "0x4d3 original-source"):
        assert out.count(label) == 1, label
    assert out.index("labels:") < out.index("step 1:")
    # Each step is announced before it runs, then its verdict; setup actions relay
    # their own progress (node up's steps), so no stretch of work goes unannounced.
    for n, title in demo.TITLES.items():
        start = out.index(f"] step {n}: {title} ...")
        assert start < out.index(f"step {n}: PASS"), n
    relayed = [x for x in lines if re.search(r"\] +node up: ", x)]
    assert any("ipset" in x for x in relayed) and any("iptables" in x for x in relayed), out
    assert "removing the profiles" in out and "deleting namespaces" in out
