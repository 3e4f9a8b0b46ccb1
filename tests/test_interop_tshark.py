"""Interop: frames our encoders write are dissected by tshark (Wireshark's GENEVE
dissector) cleanly and with the same VNI, protocol, flags and options.

Field names checked against `tshark -G fields` (Wireshark 4.0): geneve.version,
geneve.vni, geneve.proto_type, geneve.flags.oam, geneve.flags.critical, geneve.option
(one whole option: header and data), geneve.option.class, geneve.option.type and
geneve.option.length (the header's option area first, then each option, in bytes).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from geneve_dp import codec, fastpath, pcap, wire
from geneve_dp.codec import DecodeError, Header, Option
from tests.test_decode_pcap import geneve_frame

FIELDS = (
    "frame.number",
    "geneve.version",
    "geneve.vni",
    "geneve.proto_type",
    "geneve.flags.oam",
    "geneve.flags.critical",
    "geneve.option",
    "geneve.option.class",
    "geneve.option.type",
    "geneve.option.length",
    "ip.src",
    "ipv6.src",
    "udp.srcport",
    "udp.dstport",
    "_ws.expert",
    "_ws.malformed",
)

ENCODERS: list[Callable[[Header], bytes]] = [codec.encode, fastpath.encode]


def tshark(path: Path) -> list[dict[str, list[str]]]:
    """The layers tshark reports for each frame of ``path``, as lists of strings."""
    assert shutil.which("tshark"), "tshark is required (apt install tshark)"
    argv = ["tshark", "-n", "-r", str(path), "-T", "json"]
    for f in FIELDS:
        argv += ["-e", f]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return [p["_source"]["layers"] for p in json.loads(proc.stdout)]


def edge_headers() -> list[Header]:
    return [
        Header(vni=0),
        Header(vni=wire.MAX_VNI, protocol=wire.Protocol.IPV4),
        Header(vni=1000, protocol=wire.Protocol.IPV6, oam=True),
        Header(vni=1, protocol=0x1234),
        Header(vni=2, options=(Option(0, 1),) * 63),
        Header(
            vni=3, options=(Option(0x0104, 0x81, bytes(range(124))), Option(0xFFF0, 2, bytes(120)))
        ),
        Header(vni=4, options=(Option(0x0102, 0x80, b"\xde\xad\xbe\xef"), Option(0xFFFF, 0x7F))),
    ]


def random_headers(n: int, seed: int = 8926) -> list[Header]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        budget = 63
        options = []
        for _ in range(rng.randint(0, 5)):
            if budget == 0:
                break
            words = rng.randint(0, min(31, budget - 1))
            budget -= words + 1
            options.append(
                Option(rng.randint(0, 0xFFFF), rng.randint(0, 255), rng.randbytes(4 * words))
            )
        out.append(
            Header(
                vni=rng.randint(0, wire.MAX_VNI),
                protocol=rng.choice(list(wire.Protocol)),
                oam=rng.random() < 0.2,
                options=tuple(options),
            )
        )
    return out


def check_frame(layers: dict[str, list[str]], header: Header, src: str, sport: int) -> None:
    """tshark saw ``header`` exactly, in a frame from ``src``, and nothing malformed."""
    assert "_ws.expert" not in layers and "_ws.malformed" not in layers, layers
    assert layers["geneve.version"] == ["0"]
    assert int(layers["geneve.vni"][0], 16) == header.vni
    assert int(layers["geneve.proto_type"][0], 16) == header.protocol
    assert layers["geneve.flags.oam"] == [str(int(header.oam))]
    assert layers["geneve.flags.critical"] == [str(int(header.critical))]
    assert layers.get("geneve.option", []) == [
        codec.encode_options((o,)).hex() for o in header.options
    ]
    assert [int(c, 16) for c in layers.get("geneve.option.class", [])] == [
        o.opt_class for o in header.options
    ]
    assert [int(t, 16) for t in layers.get("geneve.option.type", [])] == [
        o.type for o in header.options
    ]
    assert [int(n) for n in layers["geneve.option.length"]] == [
        4 * header.opt_len,
        *(o.wire_len for o in header.options),
    ]
    family = "ip.src" if ":" not in src else "ipv6.src"
    assert layers[family][0] == src
    assert (int(layers["udp.srcport"][0]), int(layers["udp.dstport"][0])) == (
        sport,
        wire.GENEVE_PORT,
    )


def outer(i: int) -> tuple[str, str, int]:
    """Alternate IPv4 and IPv6 underlays; a distinct source port per frame."""
    if i % 2:
        return "2001:db8::1", "2001:db8::2", 20000 + i
    return "192.0.2.1", "192.0.2.2", 20000 + i


def test_tshark_dissects_our_frames(tmp_path: Path) -> None:
    headers = edge_headers() + random_headers(150)
    frames, expect = [], []
    for i, header in enumerate(headers):
        data = ENCODERS[i % 2](header)
        assert data == codec.encode(header)
        src, dst, sport = outer(i)
        frames.append(geneve_frame(data, src, dst, sport, header.protocol))
        expect.append((header, src, sport))
    path = tmp_path / "encoded.pcap"
    pcap.write(path, frames)
    dissected = tshark(path)
    assert len(dissected) == len(frames)
    for i, (layers, (header, src, sport)) in enumerate(zip(dissected, expect, strict=True)):
        assert layers["frame.number"] == [str(i + 1)]
        check_frame(layers, header, src, sport)


def test_tshark_dissects_cli_encode_output(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "geneve_dp", "encode", "--vni", "4242"),
            *("--protocol", "ipv4", "--oam"),
            *("--option", "0x0102:0x80:deadbeef", "--option", "0xffff:1:"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    data = bytes.fromhex(proc.stdout.strip())
    header = Header(
        vni=4242,
        protocol=wire.Protocol.IPV4,
        oam=True,
        options=(Option(0x0102, 0x80, bytes.fromhex("deadbeef")), Option(0xFFFF, 1)),
    )
    path = tmp_path / "cli.pcap"
    pcap.write(path, [geneve_frame(data, "192.0.2.7", "192.0.2.8", 33333, header.protocol)])
    (layers,) = tshark(path)
    check_frame(layers, header, "192.0.2.7", 33333)


MALFORMED = {
    "bad_version": "4000655800000100",
    "options_truncated": "0300655800000100",
    "option_overruns": "0100655800000100" + "0102030100000000",
}


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_tshark_and_we_both_flag_malformed_headers(tmp_path: Path, reason: str) -> None:
    data = bytes.fromhex(MALFORMED[reason])
    for decode in (codec.decode, fastpath.decode):
        with pytest.raises(DecodeError) as info:
            decode(data)
        assert info.value.reason == reason
    path = tmp_path / "bad.pcap"
    pcap.write(path, [geneve_frame(data, "192.0.2.1", "192.0.2.2")])
    (layers,) = tshark(path)
    assert "geneve.vni" in layers  # the GENEVE dissector ran...
    assert layers.get("_ws.expert"), layers  # ...and complained
