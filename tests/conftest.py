"""Shared fixtures. Tests that need root and namespaces use ``netns_factory`` (and
carry the ``root`` marker for it, so ``-m "not root"`` runs as an ordinary user)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Netns
from tests.ops_helpers import make_pair, use_run_dir

# Fixtures that make namespaces: netns_factory, and the ambient topologies' ``world``.
ROOT_FIXTURES = frozenset({"netns_factory", "world"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for namespaces needs root: it is marked so before ``-m``
    selects (tryfirst), whichever fixture brought one of ROOT_FIXTURES in."""
    for item in items:
        if ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session")
def fuzz_build() -> Path:
    """Every libFuzzer harness built once per session (tests.fuzz_campaign.build)."""
    from tests import fuzz_campaign

    return fuzz_campaign.build()


@pytest.fixture(scope="session")
def fuzz_results(fuzz_build: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The session's bounded campaign: every harness side by side, one budget
    (tests.fuzz_campaign.SECONDS); each test checks its harness's result."""
    from tests import fuzz_campaign

    return dict(fuzz_campaign.session_campaign(tmp_path_factory.mktemp("fuzz")))


@pytest.fixture
def netns_factory() -> Iterator[Callable[[str], Netns]]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    made: list[Netns] = []

    def make(tag: str = "ns") -> Netns:
        ns = Netns(tag)
        made.append(ns)
        return ns

    yield make
    for ns in reversed(made):
        ns.delete()


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run directory of the test's own (tests.ops_helpers.use_run_dir)."""
    return use_run_dir(tmp_path, monkeypatch)


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns], run_dir: Path) -> tuple[Netns, Netns]:
    """Two namespaces joined by an underlay (tests.ops_helpers.make_pair), with the
    run directory of the daemons started in them private to the test."""
    return make_pair(netns_factory)
