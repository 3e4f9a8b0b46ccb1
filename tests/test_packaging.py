"""What an install puts in site-packages, and that the benchmark still runs without it.

``bench/`` stays in the source tree and is not installed as a top-level ``bench``
package (the name collides with others'); `geneve-dp bench` finds it beside the
``geneve_dp`` package, as a checkout and an editable install have it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parent.parent


def test_only_geneve_dp_packages_are_installed() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(REPO), include=find["include"])
    assert "geneve_dp" in packages
    assert "bench" not in packages and "tests" not in packages
    assert all(p == "geneve_dp" or p.startswith("geneve_dp.") for p in packages), packages
    assert "bench" not in config["tool"]["setuptools"].get("package-data", {})


def test_geneve_dp_bench_finds_the_source_trees_suite_without_it_on_the_path(
    tmp_path: Path,
) -> None:
    # Only geneve_dp importable (the repo taken off sys.path once it is imported), run
    # from elsewhere: as after `pip install -e .` with no top-level bench installed.
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import geneve_dp.cli\n"
        f"sys.path.remove({str(REPO)!r})\n"
        "try:\n"
        "    geneve_dp.cli.main(['bench', '--help'])\n"
        "finally:\n"
        "    print('BENCH', sys.modules['bench'].__file__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--scenarios" in proc.stdout
    assert f"BENCH {REPO / 'bench' / '__init__.py'}" in proc.stdout
