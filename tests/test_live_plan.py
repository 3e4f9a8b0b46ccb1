"""The planning of live changes (geneve_dp/live.py) and the spec's loose form that the
control socket carries: pure, no root."""

from __future__ import annotations

import json

import pytest

from geneve_dp import live
from geneve_dp.dataplane.spec import TunnelSpec, build_spec, spec_to_raw
from geneve_dp.errors import UserError


def spec(name: str, vni: int, **extra: object) -> TunnelSpec:
    return build_spec({"name": name, "vni": vni, "remote": "10.0.0.2", **extra})


def test_spec_survives_its_loose_form_through_json() -> None:
    full = build_spec(
        {
            "name": "gt0", "vni": "0x4d", "remote": "fd00::2", "local": "fd00::1",
            "port": 7081, "mode": "tap", "mtu": 1400, "ttl": 9, "tos": 0x20, "df": "set",
            "udp_csum": True, "udp6_zero_csum_rx": True, "reflect_options": True,
            "options": ["0x0102:0x80:deadbeef", "1:2:"], "mac": "02:00:00:00:00:07",
            "addresses": ["fd01::1/64", "192.0.2.1/24"], "wire_sized": True,
        }
    )  # fmt: skip
    assert build_spec(json.loads(json.dumps(spec_to_raw(full)))) == full
    for ttl, tos in (("inherit", "inherit"), ("auto", None)):
        policy = build_spec({"name": "gt1", "vni": 1, "remote": "10.0.0.2", "ttl": ttl, "tos": tos})
        assert build_spec(json.loads(json.dumps(spec_to_raw(policy)))) == policy


def test_added_refuses_a_running_name_and_a_tunnel_no_receiver_could_tell_apart() -> None:
    running = [spec("gt0", 1)]
    more = live.added(running, [{"name": "gt1", "vni": 2, "remote": "10.0.0.2"}])
    assert [s.name for s in more] == ["gt0", "gt1"]
    with pytest.raises(UserError, match="already exists") as err:
        live.added(running, [{"name": "gt0", "vni": 2, "remote": "10.0.0.2"}])
    assert err.value.field == "name"
    with pytest.raises(UserError) as err:
        live.added(running, [{"name": "gt1", "vni": 1, "remote": "10.0.0.2"}])
    assert err.value.field == "vni"


def test_changed_names_what_cannot_change() -> None:
    gt0 = spec("gt0", 1, ttl=64)
    assert live.changed(gt0, {"ttl": 5, "remote": "10.0.0.9"}).ttl == 5
    for key in ("mode", "port", "mac", "udp6_zero_csum_rx", "name"):
        with pytest.raises(UserError, match="cannot be changed on a running tunnel") as err:
            live.changed(gt0, {key: "x"})
        assert err.value.field == key
    with pytest.raises(UserError) as err:
        live.changed(gt0, {"remote": "fd00::9"})
    assert err.value.field == "remote" and "family" in str(err.value)
    with pytest.raises(UserError, match="nothing to change"):
        live.changed(gt0, {})


def test_reload_replaces_a_tunnel_whose_mode_changes_in_two_steps() -> None:
    running = [spec("gt0", 1), spec("gt1", 2)]
    wanted = [spec("gt0", 1, mode="tun"), spec("gt2", 3)]
    steps = live.reload_steps(running, wanted)
    assert [[s.name for s in step] for step in steps] == [["gt1"], ["gt0", "gt2"]]
    assert live.difference(running, wanted) == {
        "added": ["gt2"],
        "removed": ["gt1"],
        "changed": ["gt0"],
    }
    kept = [spec("gt0", 1), spec("gt1", 2, mode="tun")]
    steps = live.reload_steps(running, kept)
    assert [[s.name for s in step] for step in steps] == [["gt0"], ["gt0", "gt1"]]
    alone = [spec("gt0", 1, mode="tun")]
    steps = live.reload_steps([spec("gt0", 1)], alone)
    assert [[s.name for s in step] for step in steps] == [[], ["gt0"]]
