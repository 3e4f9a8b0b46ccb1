"""TunnelSpec validation and TOML config: bad values are one-line errors naming the field."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from geneve_dp import wire
from geneve_dp.dataplane.spec import build_spec, check_together, load_config
from geneve_dp.errors import UserError

BASE = {"name": "gdp0", "vni": 1000, "remote": "10.0.0.2"}


def test_defaults_follow_the_kernel() -> None:
    spec = build_spec(BASE)
    assert spec.port == wire.GENEVE_PORT
    assert spec.mode == "tap" and spec.protocol == wire.Protocol.ETHERNET
    assert spec.ttl == 64 and spec.df == "unset"
    assert spec.tx_udp_csum is False  # IPv4: checksum 0, as the kernel
    assert build_spec({**BASE, "remote": "fd00::2"}).tx_udp_csum is True  # IPv6: on
    # 20 IPv4 + 8 UDP + 8 GENEVE + 14 inner Ethernet: the kernel's 1450 on a 1500 underlay.
    assert 1500 - spec.overhead == 1450
    assert 1500 - build_spec({**BASE, "mode": "tun"}).overhead == 1464


def test_options_count_in_the_overhead() -> None:
    spec = build_spec({**BASE, "options": ["0x0102:0x01:deadbeef"]})
    assert spec.options[0].opt_class == 0x0102
    assert spec.overhead == build_spec(BASE).overhead + 8


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        ({"vni": 16777216}, "vni", "0..16777215"),
        ({"vni": -1}, "vni", "0..16777215"),
        ({"vni": "ten"}, "vni", "not a number"),
        ({"remote": "10.0.0"}, "remote", "not an IPv4 or IPv6"),
        ({"remote": "0.0.0.0"}, "remote", "unicast"),
        ({"local": "fd00::1"}, "local", "same family"),
        ({"port": 0}, "port", "1..65535"),
        ({"mode": "tunnel"}, "mode", "tap, tun"),
        ({"mtu": 20}, "mtu", "68..65535"),
        ({"ttl": 0}, "ttl", "1..255"),
        ({"df": "maybe"}, "df", "unset, set, inherit"),
        ({"name": "a-very-long-device-name"}, "name", "1..15 bytes"),
        ({"name": "a/b"}, "name", "device name"),
        ({"options": ["1:2:abc"]}, "options", "not hex"),
        ({"options": ["1:2:aabbcc"]}, "options", "multiple of 4"),
        ({"mac": "01:00:00:00:00:01"}, "mac", "unicast"),
        ({"mode": "tun", "mac": "02:00:00:00:00:01"}, "mac", "TAP"),
        ({"addresses": ["10.1.1.1/33"]}, "addresses", "address/prefix"),
        ({"udp_csum": "yes"}, "udp_csum", "true or false"),
        ({"colour": "blue"}, "colour", "unknown key"),
    ],
)
def test_bad_values_name_the_field(change: dict[str, object], field: str, needle: str) -> None:
    with pytest.raises(UserError) as info:
        build_spec({**BASE, **change})
    assert info.value.field == field
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_required_keys() -> None:
    for key in ("name", "vni", "remote"):
        raw = {k: v for k, v in BASE.items() if k != key}
        with pytest.raises(UserError, match="required") as info:
            build_spec(raw)
        assert info.value.field == key


def test_tunnels_must_be_distinguishable() -> None:
    a = build_spec(BASE)
    with pytest.raises(UserError, match="appears twice"):
        check_together([a, a])
    b = build_spec({**BASE, "name": "gdp1"})
    with pytest.raises(UserError, match="same port, VNI and remote"):
        check_together([a, b])
    check_together([a, build_spec({**BASE, "name": "gdp1", "vni": 1001})])


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "tunnels.toml"
    path.write_text(
        'engine = "python"\n'
        "[[tunnel]]\n"
        'name = "istioin"\nvni = 1000\nremote = "10.244.0.5"\naddresses = ["192.168.126.1/30"]\n'
        "[[tunnel]]\n"
        'name = "istioout"\nvni = 1001\nremote = "10.244.0.5"\nmode = "tap"\n'
    )
    specs, settings = load_config(path)
    assert [s.name for s in specs] == ["istioin", "istioout"]
    assert specs[0].addresses == (ipaddress.ip_interface("192.168.126.1/30"),)
    assert settings == {"engine": "python"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[tunnel]]\nname = 1 2\n", "not valid TOML"),
        ('engine = "c"\n', "no [[tunnel]]"),
        ('[[tunnel]]\nname = "a"\nvni = 1\nremote = "1.1.1.1"\nport = 99999\n', "tunnel[0].port"),
        ('colour = 1\n[[tunnel]]\nname = "a"\nvni = 1\nremote = "1.1.1.1"\n', "colour"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    assert needle in str(info.value)


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
