"""What the endpoints put on the underlay (headers, options, reflection) and what they
do with inner packets larger than the path MTU."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from geneve_dp import codec
from tests.endpoint_helpers import Endpoint, Sniffer, endpoint, underlay
from tests.netns import Netns
from tests.test_endpoint_traffic import tcp_transfer

pytestmark = pytest.mark.root

ENGINES = ["c", "python"]
Pair = tuple[Netns, Netns, Endpoint, Endpoint]


def _pair(
    netns_factory: Callable[[str], Netns],
    engine: str,
    mode: str,
    family: int,
    a_extra: dict[str, Any],
    b_extra: dict[str, Any],
) -> Iterator[Pair]:
    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    ra, rb = ("10.0.0.2", "10.0.0.1") if family == 4 else ("fd00::2", "fd00::1")
    sa = {
        "name": "gt0",
        "vni": 100,
        "remote": ra,
        "mode": mode,
        "addresses": ["192.168.100.1/24", "fd10::1/64"],
        **a_extra,
    }
    sb = {
        "name": "gt0",
        "vni": 100,
        "remote": rb,
        "mode": mode,
        "addresses": ["192.168.100.2/24", "fd10::2/64"],
        **b_extra,
    }
    with endpoint(a, engine, [sa]) as ea, endpoint(b, engine, [sb]) as eb:
        assert ea.error is None and eb.error is None, (ea.error, eb.error)
        yield a, b, ea, eb


def parse_outer(frame: bytes) -> dict[str, Any] | None:
    """Outer headers of a GENEVE frame captured on the underlay veth, or None."""
    etype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if etype == 0x0800:
        ihl = (ip[0] & 15) * 4
        if ip[9] != 17:
            return None
        frag = int.from_bytes(ip[6:8], "big")
        out = {
            "family": 4,
            "tos": ip[1],
            "ttl": ip[8],
            "df": bool(frag & 0x4000),
            "frag": frag & 0x3FFF,
        }
        udp = ip[ihl:]
    elif etype == 0x86DD:
        if ip[6] != 17:
            return None
        out = {
            "family": 6,
            "tos": (int.from_bytes(ip[:2], "big") >> 4) & 0xFF,
            "ttl": ip[7],
            "df": False,
            "frag": 0,
        }
        udp = ip[40:]
    else:
        return None
    if out["frag"]:
        return None
    out["sport"] = int.from_bytes(udp[0:2], "big")
    out["dport"] = int.from_bytes(udp[2:4], "big")
    out["csum"] = int.from_bytes(udp[6:8], "big")
    if out["dport"] != 6081:
        return None
    out["header"], offset = codec.decode(udp[8:])
    out["inner"] = udp[8 + offset :]
    return out


def capture(
    ns: Netns, dev: str, action: Callable[[], None], seconds: float = 2.5
) -> list[dict[str, Any]]:
    sniffer = Sniffer(ns, dev, seconds, b"")
    action()
    return [p for p in (parse_outer(f) for f in sniffer.frames()) if p is not None]


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns], request: pytest.FixtureRequest) -> Iterator[Pair]:
    engine, mode, family, a_extra, b_extra = request.param
    yield from _pair(netns_factory, engine, mode, family, a_extra, b_extra)


OPT = "0x0102:0x01:aabbccdd"


def ping(ns: Netns, *args: str, check: bool = True) -> None:
    ns.run("ping", "-c", "2", "-i", "0.2", *args, check=check, timeout=10)


def _id(p: Any) -> str:
    return f"{p[0]}-{p[1]}-ipv{p[2]}"


@pytest.mark.parametrize(
    "pair",
    [(e, "tap", f, {"options": [OPT]}, {}) for e in [*ENGINES, "c+offload"] for f in (4, 6)],
    indirect=True,
    ids=_id,
)
def test_outer_headers_and_options(pair: Pair) -> None:
    a, b, ea, eb = pair
    family = 4 if ea.tunnel("gt0")["remote"] == "10.0.0.2" else 6

    def traffic() -> None:
        for port in range(3):
            # Distinct flows: UDP packets to different ports; then a ping.
            a.run(
                "python3",
                "-c",
                f"import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                f"[s.sendto(b'x',('192.168.100.2',{7000 + port})) for _ in range(3)]",
            )
        a.run("ping", "-c", "2", "-i", "0.2", "-W", "1", "192.168.100.2", check=False)

    pkts = capture(b, "ub", traffic)
    assert len(pkts) >= 5, pkts
    for p in pkts:
        h = p["header"]
        assert h.vni == 100 and h.protocol == 0x6558 and not h.oam
        assert [(o.opt_class, o.type, o.data) for o in h.options] == [
            (0x0102, 0x01, bytes.fromhex("aabbccdd"))
        ]
        assert p["ttl"] == 64 and not p["df"] and p["tos"] & 0xFC == 0
        assert 32768 <= p["sport"] <= 60999, p["sport"]
        if family == 4:
            assert p["csum"] == 0
        else:
            assert p["csum"] != 0
    # The receiver accepted them all (the checksum over IPv6 was right).
    assert eb.tunnel("gt0")["counters"]["options_seen"].get("0x0102:0x01", 0) >= 5
    assert sum(eb.tunnel("gt0")["socket"]["drops"].values()) == 0


@pytest.mark.parametrize("pair", [(e, "tun", 4, {}, {}) for e in ENGINES], indirect=True, ids=_id)
def test_source_port_follows_flow(pair: Pair) -> None:
    a, b, _, _ = pair

    def traffic() -> None:
        a.run(
            "python3",
            "-c",
            "import socket,time\n"
            "for p in range(16):\n"
            " s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            " [s.sendto(b'flow%d' % p,('192.168.100.2',7000+p)) for _ in range(3)]\n",
        )

    pkts = capture(b, "ub", traffic, seconds=2.0)
    # Inner UDP destination port (TUN: the inner IPv4 header is 20 bytes) -> outer ports.
    by_flow: dict[int, set[int]] = {}
    for p in pkts:
        inner = p["inner"]
        if len(inner) >= 24 and inner[9] == 17:
            by_flow.setdefault(int.from_bytes(inner[22:24], "big"), set()).add(p["sport"])
    assert len(by_flow) == 16, by_flow
    assert all(len(v) == 1 for v in by_flow.values()), "one flow, one source port"
    assert len({next(iter(v)) for v in by_flow.values()}) >= 8, "flows spread over ports"


@pytest.mark.parametrize(
    "pair",
    [(e, "tap", 4, {"reflect_options": True}, {"options": [OPT]}) for e in ENGINES],
    indirect=True,
    ids=_id,
)
def test_reflect_options_on_reverse_flow(pair: Pair) -> None:
    _a, b, ea, _ = pair

    def traffic() -> None:
        b.run("ping", "-c", "3", "-i", "0.2", "-W", "1", "192.168.100.1")

    pkts = capture(b, "ub", traffic)
    replies = [p for p in pkts if p["header"].options]
    assert replies, "no packet from the reflecting side carried options"
    for p in replies:
        assert [(o.opt_class, o.type, o.data) for o in p["header"].options] == [
            (0x0102, 0x01, bytes.fromhex("aabbccdd"))
        ]
    assert ea.tunnel("gt0")["counters"]["options_seen"]["0x0102:0x01"] >= 3


@pytest.mark.parametrize(
    "pair",
    [
        (e, m, f, {"mtu": 1500}, {"mtu": 1500})
        for e in [*ENGINES, "c+offload"]
        for m, f in (("tap", 4), ("tun", 6))
    ],
    indirect=True,
    ids=_id,
)
def test_too_big_gets_icmp_and_fragmentation(pair: Pair) -> None:
    a, b, ea, _ = pair
    t = ea.tunnel("gt0")
    path_mtu = (
        1500 - (20 if t["remote"] == "10.0.0.2" else 40) - 16 - (14 if t["mode"] == "tap" else 0)
    )
    # IPv4 without DF: the outer packet is fragmented, as the kernel does (DF unset).
    ping(a, "-M", "dont", "-W", "2", "-s", "1472", "192.168.100.2")
    assert ea.tunnel("gt0")["counters"]["tx_fragmented"] >= 1
    # IPv4 with DF: ICMP fragmentation needed back into the device; the kernel learns.
    ping(a, "-M", "do", "-W", "1", "-s", "1472", "192.168.100.2", check=False)
    route = a.run("ip", "route", "get", "192.168.100.2").stdout
    assert re.search(rf"mtu {path_mtu}\b", route), route
    ping(a, "-M", "do", "-W", "2", "-s", str(path_mtu - 28), "192.168.100.2")
    # IPv6 inner: ICMPv6 packet too big.
    ping(a, "-6", "-W", "1", "-s", "1452", "fd10::2", check=False)
    route6 = a.run("ip", "-6", "route", "get", "fd10::2").stdout
    assert re.search(rf"mtu {path_mtu}\b", route6), route6
    assert ea.tunnel("gt0")["counters"]["drops"]["too_big"] >= 2
    # TCP with the default MSS (from the 1500 device MTU) still completes.
    tcp_transfer(b, a, "192.168.100.1", 1 << 20)
    tcp_transfer(a, b, "fd10::2", 1 << 20)


@pytest.mark.parametrize(
    "pair",
    [
        (
            e,
            "tap",
            f,
            {"udp_csum": True if f == 4 else None, "df": "inherit", "tos": 0xB8, "ttl": 9},
            {},
        )
        for e in ENGINES
        for f in (4, 6)
    ],
    indirect=True,
    ids=_id,
)
def test_outer_settings(pair: Pair) -> None:
    a, b, ea, eb = pair
    family = 4 if ea.tunnel("gt0")["remote"] == "10.0.0.2" else 6
    before = eb.tunnel("gt0")["counters"]["rx_packets"]

    def traffic() -> None:
        ping(a, "-M", "do", "-Q", "2", "-W", "1", "192.168.100.2")
        ping(a, "-M", "dont", "-W", "1", "192.168.100.2")

    pkts = [p for p in capture(b, "ub", traffic) if len(p["inner"]) > 14 + 20]
    icmp = [p for p in pkts if p["inner"][12:14] == b"\x08\x00" and p["inner"][14 + 9] == 1]
    assert len(icmp) >= 4, pkts
    for p in icmp:
        inner_ip = p["inner"][14:]
        inner_df = bool(inner_ip[6] & 0x40)
        assert p["ttl"] == 9 and p["tos"] & 0xFC == 0xB8
        assert p["tos"] & 3 == inner_ip[1] & 3  # ECN copied (no CE here)
        if family == 4:
            assert p["df"] == inner_df  # inherit
        assert p["csum"] != 0  # udp_csum on over IPv4, the default over IPv6
    assert any(p["tos"] & 3 == 2 for p in icmp), "ECT(0) from ping -Q 2 not copied"
    # Every packet was accepted by the receiving kernel's UDP checksum check.
    assert eb.tunnel("gt0")["counters"]["rx_packets"] - before >= len(icmp)


ZERO_CSUM_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_UDP, 101, 1)  # UDP_NO_CHECK6_TX: send with checksum 0
s.bind(("fd00::2", 0))
s.sendto(bytes.fromhex(sys.argv[1]), ("fd00::1", 6081))
"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed"])
def test_udp6_zero_checksum_rx(
    netns_factory: Callable[[str], Netns], engine: str, allow: bool
) -> None:
    """A zero UDP checksum over IPv6 is accepted only with udp6_zero_csum_rx. The
    refusal happens in the kernel's UDP socket (counted in Udp6 InErrors/InCsumErrors,
    not in our counters), exactly as for a kernel geneve device."""
    from tests.endpoint_helpers import geneve, ipv4_udp

    a, b = netns_factory("a"), netns_factory("b")
    underlay(a, b)
    spec = {"name": "gt0", "vni": 7, "remote": "fd00::2", "mode": "tun"}
    spec["udp6_zero_csum_rx"] = allow
    spec["addresses"] = ["192.168.100.1/24"]
    with endpoint(a, engine, [spec]) as ep:
        assert ep.error is None, ep.error
        marker = b"ZEROCSUM-MARK"
        sniffer = Sniffer(a, "gt0", 2.0, marker)
        pkt = geneve(7, 0x0800, ipv4_udp("192.168.100.2", "192.168.100.1", marker))
        b.run("python3", "-c", ZERO_CSUM_SEND, pkt.hex(), timeout=10)
        frames = sniffer.frames()
        assert (len(frames) == 1) == allow, frames
        assert ep.tunnel("gt0")["counters"]["rx_packets"] == (1 if allow else 0)


@pytest.mark.parametrize(
    "pair",
    [(e, m, 4, {"options": [OPT]}, {}) for e in ENGINES for m in ("tap", "tun")],
    indirect=True,
    ids=_id,
)
def test_wireshark_dissects_our_frames(pair: Pair, tmp_path: Any) -> None:
    """Interop: tshark's GENEVE dissector reads the fields we meant to write."""
    import shutil
    import subprocess

    if shutil.which("tshark") is None or shutil.which("tcpdump") is None:
        pytest.skip("tshark/tcpdump not installed")
    a, b, _, _ = pair
    pcap = tmp_path / "underlay.pcap"
    dump = b.popen(
        [
            "tcpdump",
            "-i",
            "ub",
            "-w",
            str(pcap),
            "-c",
            "4",
            "udp dst port 6081 and src host 10.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import time

        time.sleep(1.0)  # tcpdump attaches
        ping(a, "-W", "1", "192.168.100.2")
        ping(a, "-W", "1", "192.168.100.2")
        dump.wait(10)
    finally:
        dump.kill()
    fields = [
        "geneve.version",
        "geneve.vni",
        "geneve.proto_type",
        "geneve.flags.oam",
        "geneve.flags.critical",
        "geneve.option.class",
        "geneve.option.type",
        "geneve.option.length",
        "udp.checksum",
        "_ws.expert",
    ]
    out = (
        subprocess.run(
            ["tshark", "-r", str(pcap), "-T", "fields", *[x for f in fields for x in ("-e", f)]],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    assert len(out) >= 4, out
    proto = "0x6558" if pair[2].tunnel("gt0")["mode"] == "tap" else "0x0800"
    for line in out:
        parts = [*line.split("\t"), "", ""][:10]  # tshark drops empty trailing fields
        ver, vni, ptype, oam, crit, ocls, otype, olen, csum, expert = parts
        assert (ver, int(vni, 0), ptype.lower(), ocls.lower(), otype.lower()) == (
            "0",
            100,
            proto,
            "0x0102",
            "0x01",
        ), line
        assert oam in ("0", "False") and crit in ("0", "False"), line
        # The option is 8 bytes on the wire (header + 4 bytes of data); IPv4: csum 0.
        assert olen.split(",")[0] == "8" and csum == "0x0000" and not expert, line
