"""`--ttl inherit|auto` and `--tos inherit`, as iproute2's geneve takes them: the outer
TTL and DSCP copied from each inner packet, or the namespace's default hop limit, seen
on the underlay for real with both engines and the offload path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from geneve_dp.dataplane.spec import build_spec
from geneve_dp.errors import UserError
from tests.endpoint_helpers import endpoint, underlay
from tests.netns import Netns
from tests.test_endpoint_wire import capture, ping

ENGINES = ["c", "python", "c+offload"]


def test_spec_takes_the_iproute2_words() -> None:
    ok = {"name": "gt0", "vni": 1, "remote": "10.0.0.2"}
    assert build_spec({**ok, "ttl": "inherit", "tos": "inherit"}).ttl == "inherit"
    assert build_spec({**ok, "ttl": "auto"}).ttl == "auto"
    assert build_spec({**ok, "tos": "0x28"}).tos == 0x28
    for key, value in (("ttl", "inherited"), ("ttl", 0), ("tos", "auto"), ("tos", 256)):
        with pytest.raises(UserError) as err:
            build_spec({**ok, key: value})
        words = "1..255, auto, inherit" if key == "ttl" else "0..255, inherit"
        assert str(err.value).startswith(f"{key}: ") and f"accepted: {words}" in str(err.value)


def _spec(remote: str, addresses: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    return {"name": "gt0", "vni": 100, "remote": remote, "addresses": addresses, **extra}


def _run(
    netns_factory: Callable[[str], Netns],
    engine: str,
    family: int,
    extra: dict[str, Any],
    traffic: Callable[[Netns], None],
    before: Callable[[Netns], None] = lambda _ns: None,
) -> list[dict[str, Any]]:
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    before(a)
    ra, rb = ("10.0.0.2", "10.0.0.1") if family == 4 else ("fd00::2", "fd00::1")
    sa = _spec(ra, ["192.168.100.1/24"], extra)
    sb = _spec(rb, ["192.168.100.2/24"], {})
    with endpoint(a, engine, [sa]) as ea, endpoint(b, engine, [sb]) as eb:
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        return capture(b, "ub", lambda: traffic(a))


def _icmp(pkts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        p
        for p in pkts
        if len(p["inner"]) > 34 and p["inner"][12:14] == b"\x08\x00" and p["inner"][23] == 1
    ]


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("engine", ENGINES)
# TOS alone keeps the offload path's connected UDP sockets (a TOS cmsg per packet); TTL
# inherit sends through the raw socket, which writes each outer header.
@pytest.mark.parametrize("ttl", ["inherit", 64])
def test_ttl_and_tos_inherit_copy_each_inner_packet(
    netns_factory: Callable[[str], Netns], engine: str, family: int, ttl: str | int
) -> None:
    def traffic(a: Netns) -> None:
        ping(a, "-t", "17", "-Q", "0x28", "-W", "1", "192.168.100.2")
        ping(a, "-t", "33", "-Q", "0xb9", "-W", "1", "192.168.100.2")

    pkts = _run(netns_factory, engine, family, {"ttl": ttl, "tos": "inherit"}, traffic)
    icmp = _icmp(pkts)
    seen = set()
    for p in icmp:
        inner = p["inner"][14:]
        assert p["ttl"] == (inner[8] if ttl == "inherit" else 64), (p["ttl"], inner[8])
        assert p["tos"] & 0xFC == inner[1] & 0xFC  # the inner DSCP
        assert p["tos"] & 3 == inner[1] & 3  # ECN copied as always
        seen.add((inner[8], inner[1]))
    # Both pings crossed (requests from a; b's replies are not captured leaving b).
    assert {(17, 0x28), (33, 0xB9)} <= seen, seen
    # A frame that is not IP (ARP) gets the default TTL and DSCP 0.
    arp = [p for p in pkts if p["inner"][12:14] == b"\x08\x06"]
    assert all(p["ttl"] == 64 and p["tos"] & 0xFC == 0 for p in arp), arp


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("engine", ["c", "python"])
def test_ttl_auto_is_the_namespaces_default_hop_limit(
    netns_factory: Callable[[str], Netns], engine: str, family: int
) -> None:
    def before(a: Netns) -> None:
        a.run("sysctl", "-qw", "net.ipv4.ip_default_ttl=99")
        a.run("sysctl", "-qw", "net.ipv6.conf.ua.hop_limit=99")

    def traffic(a: Netns) -> None:
        ping(a, "-t", "17", "-W", "1", "192.168.100.2")

    icmp = _icmp(_run(netns_factory, engine, family, {"ttl": "auto"}, traffic, before))
    assert icmp and all(p["ttl"] == 99 for p in icmp), [p["ttl"] for p in icmp]
