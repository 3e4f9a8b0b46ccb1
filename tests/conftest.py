"""Shared fixtures. Tests that need root and namespaces use ``netns_factory``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns import Netns
from tests.ops_helpers import make_pair, use_run_dir


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
