"""Shared fixtures. Tests that need root and namespaces use ``netns_factory``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.netns import Netns


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
