"""Offload default: on for the C engine, off when asked (argument or GDP_OFFLOAD=0),
never for the Python engine. Traffic with offload on and off is in the other
endpoint tests ("c" runs with offload=False, "c+offload" with offload=True)."""

from __future__ import annotations

import pytest

from geneve_dp.dataplane import Dataplane
from geneve_dp.dataplane.spec import TunnelSpec, build_spec


def _specs() -> list[TunnelSpec]:
    return [build_spec({"name": "gt0", "vni": 100, "remote": "10.0.0.2"})]


def test_offload_on_by_default_for_c(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GDP_OFFLOAD", raising=False)
    assert Dataplane(_specs()).offload is True
    assert Dataplane(_specs(), engine="python").offload is False
    assert Dataplane(_specs(), offload=False).offload is False


def test_offload_env_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDP_OFFLOAD", "0")
    assert Dataplane(_specs()).offload is False
    assert Dataplane(_specs(), offload=True).offload is True
