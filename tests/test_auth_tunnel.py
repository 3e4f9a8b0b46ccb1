"""Authenticated tunnels end to end: two `geneve-dp up --auth-key-file` endpoints in
namespaces. Legit traffic passes; forged, tampered and replayed packets are dropped
and counted by reason; a key rotation under traffic drops nothing; bad key files are
refused with one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from geneve_dp.auth import option as auth_option
from geneve_dp.auth.keys import parse_keys
from geneve_dp.auth.mac import PyAuth
from tests.daemon_helpers import Up
from tests.endpoint_helpers import Sniffer, geneve, send_udp, wait_for
from tests.netns import Netns
from tests.ops_helpers import A_IN, A_UL, B_IN, B_UL, gdp, ping

pytestmark = pytest.mark.root

ENGINES = ["python", "c"]
VNI = 77


def key_file(path: Path, text: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text)
    return path


@contextmanager
def authed_pair(
    a: Netns, b: Netns, key_a: Path, key_b: Path, engine_a: str, engine_b: str
) -> Iterator[tuple[Up, Up]]:
    common = ["gt0", "--vni", str(VNI), "--auth-option-class", "0xfff7"]
    ua = Up(
        a,
        *common,
        "--remote",
        B_UL,
        "--address",
        f"{A_IN}/24",
        "--auth-key-file",
        str(key_a),
        "--engine",
        engine_a,
    )
    try:
        ub = Up(
            b,
            *common,
            "--remote",
            A_UL,
            "--address",
            f"{B_IN}/24",
            "--auth-key-file",
            str(key_b),
            "--engine",
            engine_b,
        )
    except BaseException:
        ua.kill()
        raise
    try:
        yield ua, ub
    finally:
        ua.kill()
        ub.kill()


def drops(u: Up) -> dict[str, int]:
    return u.tunnel("gt0")["counters"]["drops"]  # type: ignore[no-any-return]


def auth_drops(u: Up) -> dict[str, int]:
    return {k: v for k, v in drops(u).items() if k.startswith("auth_")}


@pytest.mark.parametrize(
    "engines", [("python", "python"), ("c", "python"), ("c", "c")], ids="-".join
)
def test_legit_passes_forged_tampered_replayed_are_dropped(
    pair: tuple[Netns, Netns], tmp_path: Path, engines: tuple[str, str]
) -> None:
    a, b = pair
    key = key_file(tmp_path / "key", os.urandom(32))
    with authed_pair(a, b, key, key, *engines) as (ua, ub):
        status = ua.tunnel("gt0")
        assert status["auth"] == {"option_class": "0xfff7", "key_ids": [0], "send_key_id": 0}
        assert status["mtu"] == 1500 - 50 - auth_option.OPT_LEN
        # Capture one legit packet from b to a on the underlay while pinging.
        sniff = Sniffer(a, "ul0", 3.0, bytes([0xFF, 0xF7, auth_option.OPT_TYPE]))
        ping(a, B_IN, 5, 0.05)
        ping(b, A_IN, 5, 0.05)
        frames = sniff.frames()
        assert frames, "no authenticated packet seen on the underlay"
        assert auth_drops(ua) == dict.fromkeys(auth_drops(ua), 0)
        assert auth_drops(ub) == dict.fromkeys(auth_drops(ub), 0)

        # Captured from b: UDP payload after Ethernet (14) + IPv4 (20) + UDP (8).
        legit = [f[42:] for f in frames if f[26:30] == bytes(map(int, B_UL.split(".")))]
        assert legit
        inner = b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x08\x00" + b"\x45" + b"\0" * 45
        forged = geneve(VNI, 0x6558, inner)  # right source, right VNI, no option
        wrong_key = geneve(
            VNI,
            0x6558,
            inner,
            options=auth_option.AuthOption(9, 1, 1).encode(0xFFF7),
            critical=True,
        )
        bad_mac = geneve(
            VNI,
            0x6558,
            inner,
            options=auth_option.AuthOption(0, 1, 1, os.urandom(16)).encode(0xFFF7),
            critical=True,
        )
        tampered = bytearray(legit[0])
        tampered[-1] ^= 0x01  # the last byte of the inner frame
        before = ua.tunnel("gt0")["counters"]["rx_packets"]
        send_udp(b, [(B_UL, A_UL, 6081, 0, p) for p in (forged, wrong_key, bad_mac)])
        send_udp(b, [(B_UL, A_UL, 6081, 0, bytes(tampered))])
        send_udp(b, [(B_UL, A_UL, 6081, 0, legit[0])] * 3)  # a replay, three times
        want = {"auth_missing": 1, "auth_unknown_key": 1, "auth_bad_mac": 2, "auth_replayed": 3}
        assert wait_for(lambda: auth_drops(ua) == want), auth_drops(ua)
        assert ua.tunnel("gt0")["counters"]["rx_packets"] == before
        ping(a, B_IN, 3, 0.05)  # and the legit path still works


@pytest.mark.parametrize("engine", ENGINES)
def test_a_restarted_receiver_refuses_replays_of_what_came_before(
    pair: tuple[Netns, Netns], tmp_path: Path, engine: str
) -> None:
    """Packets captured before a receiver restarts are refused by the new one (its
    window is empty, but its floor is its start time), and b's traffic, numbered from
    b's clock, passes."""
    a, b = pair
    key = key_file(tmp_path / "key", os.urandom(32))
    with authed_pair(a, b, key, key, engine, engine) as (ua, _ub):
        sniff = Sniffer(a, "ul0", 2.0, bytes([0xFF, 0xF7, auth_option.OPT_TYPE]))
        ping(b, A_IN, 3, 0.05)
        b_ul = bytes(map(int, B_UL.split(".")))
        captured = [f[42:] for f in sniff.frames() if f[26:30] == b_ul]
        assert captured
        ua.kill()
        # Sent more than the slack before the new receiver starts.
        time.sleep(auth_option.SLACK_US / 1e6 + 0.5)
        common = ["gt0", "--vni", str(VNI), "--auth-option-class", "0xfff7"]
        again = Up(a, *common, "--remote", B_UL, "--address", f"{A_IN}/24",
                   "--auth-key-file", str(key), "--engine", engine)  # fmt: skip
        try:
            before = again.tunnel("gt0")["counters"]["rx_packets"]
            send_udp(b, [(B_UL, A_UL, 6081, 0, p) for p in captured])
            n = len(captured)
            assert wait_for(lambda: auth_drops(again)["auth_replayed"] == n), auth_drops(again)
            assert again.tunnel("gt0")["counters"]["rx_packets"] == before
            # b's packets now are above the floor and new to the window: they pass
            # (whether the pings are answered is the neighbour caches' business).
            b.run("ping", "-c", "3", "-i", "0.05", "-W", "1", A_IN, check=False)
            assert wait_for(lambda: again.tunnel("gt0")["counters"]["rx_packets"] > before)
            assert auth_drops(again)["auth_replayed"] == n
        finally:
            again.kill()


@pytest.mark.parametrize("engine", ENGINES)
def test_rotation_under_traffic_drops_nothing(
    pair: tuple[Netns, Netns], tmp_path: Path, engine: str
) -> None:
    a, b = pair
    old, new = os.urandom(32).hex(), os.urandom(32).hex()
    ka = key_file(tmp_path / "ka", f"1 {old} send\n".encode())
    kb = key_file(tmp_path / "kb", f"1 {old} send\n".encode())
    with authed_pair(a, b, ka, kb, engine, engine) as (ua, ub):
        flood = a.popen(
            ["ping", "-q", "-i", "0.005", "-c", "700", "-W", "2", B_IN], stdout=subprocess.PIPE
        )
        steps = [
            f"1 {old} send\n2 {new}\n",  # both accept the new key
            f"1 {old}\n2 {new} send\n",  # both sign with it
            f"2 {new} send\n",  # the old one goes
        ]
        for text in steps:
            for u, path in ((ua, ka), (ub, kb)):
                key_file(path, text.encode())
                os.kill(u.pid, signal.SIGHUP)
                time.sleep(0.4)
        out, _ = flood.communicate(timeout=30)
        assert " 0% packet loss" in out, out
        assert ua.tunnel("gt0")["auth"]["key_ids"] == [2]
        assert auth_drops(ua) == dict.fromkeys(auth_drops(ua), 0)
        assert auth_drops(ub) == dict.fromkeys(auth_drops(ub), 0)
        # a bad file on reload changes nothing: the keys in force stay
        os.chmod(ka, 0o644)
        os.kill(ua.pid, signal.SIGHUP)
        time.sleep(0.3)
        assert ua.tunnel("gt0")["auth"]["key_ids"] == [2]
        ping(a, B_IN, 3, 0.05)


def test_bad_key_files_are_one_line_and_exit_2(pair: tuple[Netns, Netns], tmp_path: Path) -> None:
    a, _b = pair
    world = key_file(tmp_path / "world", os.urandom(32))
    os.chmod(world, 0o644)
    other = key_file(tmp_path / "other", os.urandom(32))
    os.chown(other, 1000, 1000)
    short = key_file(tmp_path / "short", b"1 abcd send\n")
    config = tmp_path / "c.toml"
    config.write_text(
        f'auth_key_file = "{world}"\n[[tunnel]]\nname = "gt0"\nvni = 77\nremote = "{B_UL}"\n'
    )
    cases = [
        (["--auth-key-file", str(world)], "mode 0600"),
        (["--auth-key-file", str(other)], "uid 1000"),
        (["--auth-key-file", str(short)], "64 hex digits"),
        (["--auth-key-file", str(tmp_path / "none")], "cannot open"),
        (
            [
                "--auth-key-file",
                str(short).replace("short", "world"),
                "--auth-option-class",
                "0x10",
            ],
            "mode 0600",
        ),
        (["--auth-option-class", "0xfff1"], "needs an auth key file"),
    ]
    for extra, says in cases:
        proc = gdp("up", "--netns", a.name, "gt0", "--vni", "77", "--remote", B_UL, *extra)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and "auth" in lines[0], proc.stderr
    ok = key_file(tmp_path / "ok", os.urandom(32))
    proc = gdp(
        "up",
        "--netns",
        a.name,
        "gt0",
        "--vni",
        "77",
        "--remote",
        B_UL,
        "--auth-key-file",
        str(ok),
        "--auth-option-class",
        "0x0102",
    )
    assert proc.returncode == 2 and "0xFFF0..0xFFFF" in proc.stderr
    proc = gdp("up", "--netns", a.name, "--config", str(config))
    assert proc.returncode == 2
    assert "auth_key_file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "gt0" not in a.run("ip", "-o", "link").stdout  # nothing half-applied


TCP_SINK = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(65536)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""

TCP_SOURCE = r"""
import hashlib, os, socket, sys
data = os.urandom(8 << 20)
c = socket.create_connection((sys.argv[1], 5201), timeout=20)
c.sendall(data)
c.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


@pytest.mark.parametrize("engines", [("c", "c"), ("c", "python")], ids="-".join)
def test_tcp_super_frames_are_signed_per_segment(
    pair: tuple[Netns, Netns], tmp_path: Path, engines: tuple[str, str]
) -> None:
    """8 MiB of TCP from the C engine (TSO super-frames read whole, cut and signed per
    segment, no injection; the signed segments of a super-frame leave in one UDP GSO
    send, on sockets with checksums though the IPv4 default is none) to either engine:
    every segment verifies, the bytes arrive, and the C receiver coalesces them."""
    a, b = pair
    key = key_file(tmp_path / "key", os.urandom(32))
    with authed_pair(a, b, key, key, *engines) as (ua, ub):
        offloads = ua.tunnel("gt0")["offloads"]
        assert offloads["tx_inject"] is False
        assert offloads["udp_gso"] is True, offloads
        sink = b.popen([sys.executable, "-c", TCP_SINK, B_IN], stdout=subprocess.PIPE)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
        sent = a.run(sys.executable, "-c", TCP_SOURCE, B_IN, timeout=60).stdout.split()
        got, _ = sink.communicate(timeout=60)
        assert got.split() == sent
        ca = ua.tunnel("gt0")["counters"]
        assert ca["tx_gso_frames"] > 0, ca  # super-frames were read and cut here
        assert auth_drops(ub) == dict.fromkeys(auth_drops(ub), 0)
        cb = ub.tunnel("gt0")["counters"]
        assert cb["rx_packets"] >= (8 << 20) // 1500
        if engines[1] == "c":
            # Verified segments of one flow are merged for the device, though each
            # came with its own integrity option (sequence number and MAC).
            assert cb["rx_gro_frames"] > 0, cb


def test_reload_keys_by_control_command_and_live_add(
    pair: tuple[Netns, Netns], tmp_path: Path
) -> None:
    """`{"cmd": "reload-keys"}` on the control socket puts a new file in force (or says
    why not, the keys in force staying); a tunnel added live authenticates too."""
    a, b = pair
    k1, k2 = os.urandom(32).hex(), os.urandom(32).hex()
    ka = key_file(tmp_path / "ka", f"1 {k1} send\n".encode())
    kb = key_file(tmp_path / "kb", f"1 {k1} send\n".encode())
    with authed_pair(a, b, ka, kb, "c", "c") as (ua, ub):
        for path, u in ((ka, ua), (kb, ub)):
            key_file(path, f"1 {k1} send\n2 {k2}\n".encode())
            reply = json.loads(u.request(b'{"cmd": "reload-keys"}\n'))
            assert reply.get("key_ids") == [1, 2] and reply["send_key_id"] == 1, reply
        os.chmod(ka, 0o640)
        reply = json.loads(ua.request(b'{"cmd": "reload-keys"}\n'))
        assert "mode 0600" in reply["error"] and reply["field"] == "auth_key_file", reply
        assert ua.tunnel("gt0")["auth"]["key_ids"] == [1, 2]
        ping(a, B_IN, 3, 0.05)
        # A second tunnel added to the running endpoints: authenticated as well.
        for u, remote, addr in ((ua, B_UL, "172.16.9.1/24"), (ub, A_UL, "172.16.9.2/24")):
            spec = {"name": "gt1", "vni": 78, "remote": remote, "addresses": [addr]}
            reply = json.loads(
                u.request(json.dumps({"cmd": "add", "tunnels": [spec]}).encode() + b"\n")
            )
            assert reply.get("added"), reply
            assert u.tunnel("gt1")["auth"]["option_class"] == "0xfff7"
        ping(a, "172.16.9.2", 3, 0.05)
        # `up` joining the running endpoint with another key file: refused, one line.
        other = key_file(tmp_path / "other", os.urandom(32))
        proc = gdp("up", "--netns", a.name, "gt2", "--vni", "79", "--remote", B_UL,
                   "--auth-key-file", str(other))  # fmt: skip
        assert proc.returncode == 2 and "runs with auth key file" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        seen = ub.tunnel("gt1")["counters"]["options_seen"]
        assert set(seen) == {"0xfff7:0x81"} and seen["0xfff7:0x81"] >= 3, seen
        assert auth_drops(ua) == dict.fromkeys(auth_drops(ua), 0)


UDP_BURST = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(300):
    s.sendto(i.to_bytes(2, "big") * 50, (sys.argv[1], 9))
"""


def wire_segments(frame: bytes) -> list[bytes]:
    """The GENEVE packets of a captured IPv4/UDP frame: one, or the segments of a UDP
    GSO super-packet that crossed the veth whole (outer lengths the whole's, every
    segment but the last as long as the first: its GENEVE header plus inner frame)."""
    ihl = (frame[14] & 0x0F) * 4
    payload = frame[14 + ihl + 8 :]
    hlen = 8 + (payload[0] & 0x3F) * 4
    seg = hlen + 14 + int.from_bytes(payload[hlen + 14 + 2 : hlen + 14 + 4], "big")
    return [payload[o : o + seg] for o in range(0, len(payload), seg)]


def test_tcp_segments_on_the_wire_each_verify(pair: tuple[Netns, Netns], tmp_path: Path) -> None:
    """The underlay as captured at the receiver: the signed segments of a super-frame
    cross the veth as UDP GSO super-packets (so several segments per captured frame),
    and every segment cut from them at the segment size, and every datagram of a burst
    of small packets, verifies with the reference MAC (geneve_dp/auth/mac.py), with a
    sequence number of its own."""
    a, b = pair
    raw = os.urandom(32)
    key = key_file(tmp_path / "key", raw)
    ref = PyAuth(parse_keys(raw), 0xFFF7)
    with authed_pair(a, b, key, key, "c", "c") as (_, ub):
        sniff = Sniffer(b, "ul0", 6.0, bytes([0xFF, 0xF7, auth_option.OPT_TYPE]))
        sink = b.popen([sys.executable, "-c", TCP_SINK, B_IN], stdout=subprocess.PIPE)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
        sent = a.run(sys.executable, "-c", TCP_SOURCE, B_IN, timeout=60).stdout.split()
        got, _ = sink.communicate(timeout=60)
        assert got.split() == sent
        # A burst of equal small datagrams: signed one by one, sent in UDP GSO runs.
        a.run(sys.executable, "-c", UDP_BURST, B_IN, timeout=30)
        frames = sniff.frames()
        assert auth_drops(ub) == dict.fromkeys(auth_drops(ub), 0)
    segments = [s for f in frames for s in wire_segments(f)]
    small = [s for s in segments if len(s) < 300]
    assert len(small) >= 250, len(small)  # most of the burst (the capture may miss some)
    assert sum(len(f) > 1500 for f in frames) > 10, [len(f) for f in frames[:20]]
    verdicts = [ref.verify(s)[0] for s in segments]
    assert len(segments) > 1000 and verdicts == [None] * len(segments), (
        len(segments),
        {v: verdicts.count(v) for v in set(verdicts)},
    )
    seqs = [
        auth_option.decode(s[o : o + auth_option.OPT_LEN]).seq
        for s in segments
        for o in [auth_option.find(s, 0xFFF7)]
    ]
    assert len(set(seqs)) == len(seqs)
