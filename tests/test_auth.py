"""The integrity option: codec, key files, and the C signing/receive check (csrc/auth.c)
against the Python reference (geneve_dp/auth/mac.py, other libraries), both ways."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geneve_dp import codec
from geneve_dp.auth import mac, option
from geneve_dp.auth.cauth import CAuth, CAuthCache
from geneve_dp.auth.keys import KeyRing, load_key_file, parse_keys
from geneve_dp.errors import UserError
from geneve_dp.fastpath import ffi, lib

CLASS = 0xFFF3
C_REASON = {
    lib.GDP_AUTH_OK: None,
    lib.GDP_AUTH_MISSING: mac.MISSING,
    lib.GDP_AUTH_UNKNOWN_KEY: mac.UNKNOWN_KEY,
    lib.GDP_AUTH_BAD_MAC: mac.BAD_MAC,
    lib.GDP_AUTH_REPLAYED: mac.REPLAYED,
}


def ring(*ids: int, send: int | None = None, seed: int = 1) -> KeyRing:
    rnd = random.Random(seed)
    keys = tuple((i, bytes(rnd.getrandbits(8) for _ in range(32))) for i in ids)
    return KeyRing(keys, ids[0] if send is None else send)


def packet(options: tuple[codec.Option, ...], frame: bytes, auth_at: int) -> tuple[bytearray, int]:
    """A GENEVE header with the integrity option placed among ``options``, + frame."""
    opts = list(options)
    opts.insert(auth_at, codec.Option(CLASS, option.OPT_TYPE, bytes(option.DATA_LEN)))
    hdr = codec.encode(codec.Header(vni=77, protocol=0x6558, critical=True, options=tuple(opts)))
    off = option.find(hdr, CLASS)
    assert off >= 8
    return bytearray(hdr + frame), off


def c_sign(a: CAuth, pkt: bytearray, off: int) -> None:
    buf = ffi.from_buffer(pkt)
    assert lib.gdp_auth_sign(a.ptr, buf, len(pkt), off) == 0


def c_verify(a: CAuth, cache: CAuthCache, pkt: bytes | bytearray) -> str | None:
    buf = ffi.new("uint8_t[]", bytes(pkt))
    off = ffi.new("size_t *")
    rc = lib.gdp_auth_verify(a.ptr, cache.ptr, buf, len(pkt), off)
    assert bytes(ffi.buffer(buf, len(pkt))) == bytes(pkt), "verify must leave the packet as is"
    return C_REASON[rc]


def test_constants_agree_with_c() -> None:
    assert option.OPT_TYPE == lib.GDP_AUTH_OPT_TYPE
    assert option.DATA_LEN == lib.GDP_AUTH_DATA_LEN
    assert option.OPT_LEN == lib.GDP_AUTH_OPT_LEN
    assert option.TAG_LEN == lib.GDP_AUTH_TAG_LEN
    assert option.KEY_LEN == lib.GDP_AUTH_KEY_LEN
    assert option.WINDOW == lib.GDP_AUTH_WINDOW
    assert option.SEQ_SHIFT == lib.GDP_AUTH_SEQ_SHIFT
    assert option.SLACK_US == lib.GDP_AUTH_SLACK_US
    assert option.MAX_KEYS == lib.GDP_AUTH_MAX_KEYS


@given(
    key_id=st.integers(0, 255),
    salt=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    tag=st.binary(min_size=16, max_size=16),
    opt_class=st.integers(option.CLASS_MIN, option.CLASS_MAX),
)
def test_option_codec_round_trips(
    key_id: int, salt: int, seq: int, tag: bytes, opt_class: int
) -> None:
    o = option.AuthOption(key_id, salt, seq, tag)
    wire = o.encode(opt_class)
    assert len(wire) == option.OPT_LEN
    assert option.decode(wire) == o
    # and it is a well-formed, critical GENEVE option for the reference codec
    hdr = codec.encode(
        codec.Header(vni=1, critical=True, options=(codec.Option(opt_class, wire[2], wire[4:]),))
    )
    h, _ = codec.decode(hdr)
    assert h.options[0].critical and h.options[0].data == wire[4:]
    assert option.find(hdr, opt_class) == 8


@given(st.binary(max_size=60))
def test_option_decode_refuses_garbage_with_its_error_only(data: bytes) -> None:
    try:
        option.decode(data)
    except option.OptionError:
        pass


frames = st.binary(min_size=0, max_size=1600)
others = st.lists(
    st.builds(
        codec.Option,
        st.integers(0, 0xFFEF),
        st.integers(0, 0x7F),
        st.binary(max_size=16).map(lambda b: b[: len(b) // 4 * 4]),
    ),
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(frame=frames, opts=others, where=st.integers(0, 4), seq=st.integers(1, 2**63))
def test_c_signs_what_python_verifies_and_back(
    frame: bytes, opts: list[codec.Option], where: int, seq: int
) -> None:
    keys = ring(3, 9, send=9)
    pkt, off = packet(tuple(opts), frame, min(where, len(opts)))
    ca = CAuth(keys, CLASS, start=seq, floor=0)
    pa = mac.PyAuth(keys, CLASS, start=seq, floor=0)
    c_sign(ca, pkt, off)
    assert option.decode(pkt[off : off + 40]).seq == seq
    assert pa.verify(pkt) == (None, off)
    pkt2, off2 = packet(tuple(opts), frame, min(where, len(opts)))
    pa.sign(pkt2, off2)
    assert c_verify(ca, CAuthCache(), pkt2) is None


@settings(max_examples=60, deadline=None)
@given(frame=st.binary(min_size=1, max_size=300), data=st.data())
def test_any_flipped_bit_in_covered_bytes_is_refused(frame: bytes, data: st.DataObject) -> None:
    keys = ring(5)
    pkt, off = packet((codec.Option(0x0102, 0x01, b"abcd"),), frame, 1)
    sender = CAuth(keys, CLASS)
    c_sign(sender, pkt, off)
    bit = data.draw(st.integers(0, len(pkt) * 8 - 1))
    bad = bytearray(pkt)
    bad[bit // 8] ^= 1 << (bit % 8)
    cr = c_verify(CAuth(keys, CLASS), CAuthCache(), bad)
    pr, _ = mac.PyAuth(keys, CLASS).verify(bad)
    assert cr is not None and cr == pr
    assert c_verify(CAuth(keys, CLASS), CAuthCache(), pkt) is None


def test_check_order_and_reasons() -> None:
    keys = ring(1)
    a, cache = CAuth(keys, CLASS), CAuthCache()
    plain = codec.encode(codec.Header(vni=77, options=(codec.Option(CLASS, 0x01, bytes(36)),)))
    assert c_verify(a, cache, plain + b"x") == mac.MISSING  # same class, not our type
    pkt, off = packet((), b"frame", 0)
    other = CAuth(ring(2, seed=2), CLASS)
    c_sign(other, pkt, off)
    assert c_verify(a, cache, pkt) == mac.UNKNOWN_KEY
    same_id_other_key = CAuth(ring(1, seed=3), CLASS)
    c_sign(same_id_other_key, pkt, off)
    assert c_verify(a, cache, pkt) == mac.BAD_MAC
    empty = codec.encode(codec.Header(vni=77, options=(codec.Option(CLASS, 0x81, b""),)))
    assert c_verify(a, cache, empty) == mac.BAD_MAC  # no room for a key ID or a MAC
    assert mac.PyAuth(keys, CLASS).verify(empty)[0] == mac.BAD_MAC
    short = bytearray(pkt)
    c_sign(a, short, off)
    assert c_verify(a, cache, short) is None
    assert c_verify(a, cache, short) == mac.REPLAYED


@settings(max_examples=80, deadline=None)
@given(order=st.lists(st.integers(0, 40), min_size=1, max_size=120), jump=st.integers(0, 3))
def test_window_matches_the_reference(order: list[int], jump: int) -> None:
    """Any arrival order, duplicates included: C and Python accept the same packets."""
    keys = ring(4)
    base = 1 << 40
    sender = CAuth(keys, CLASS, start=base)
    pkts = []
    for i in range(41):
        p, off = packet((), i.to_bytes(2, "big"), 0)
        if i == 20 and jump:  # a jump of more than a window in the middle
            sender = CAuth(keys, CLASS, start=base + jump * option.WINDOW)
        c_sign(sender, p, off)
        pkts.append(p)
    receiver, cache = CAuth(keys, CLASS, floor=0), CAuthCache()
    ref = mac.PyAuth(keys, CLASS, floor=0)
    for k in order:
        assert c_verify(receiver, cache, pkts[k]) == ref.verify(pkts[k])[0]


def test_window_takes_a_jump_of_any_size_in_one_step() -> None:
    """A sender's clock moves its numbers on by ~4e9 a second: a jump far past the
    window starts a fresh bitmap (a bit-shift by the jump would build an integer as
    long as the jump), and what it left behind is too old."""
    w = mac.Window()
    assert w.accept(1000) and w.accept(999)
    assert w.accept(1000 + 2**60)
    assert w.bits == 1 and w.top == 1000 + 2**60
    assert not w.accept(1000)  # older than the window now
    assert w.accept(2**60 + 999 - option.WINDOW + 2)  # inside the window: new to it


def test_reordering_within_the_window_passes_and_older_is_refused() -> None:
    keys = ring(1)
    sender = CAuth(keys, CLASS, start=1000)
    pkts = []
    for _ in range(option.WINDOW + 10):
        p, off = packet((), b"x", 0)
        c_sign(sender, p, off)
        pkts.append(p)
    receiver, cache = CAuth(keys, CLASS, floor=0), CAuthCache()
    newest = pkts[option.WINDOW - 1]
    assert c_verify(receiver, cache, newest) is None
    shuffled = pkts[: option.WINDOW - 1]
    random.Random(7).shuffle(shuffled)
    assert all(c_verify(receiver, cache, p) is None for p in shuffled)
    assert c_verify(receiver, cache, pkts[option.WINDOW + 9]) is None  # moves 10 on
    assert [c_verify(receiver, cache, p) for p in pkts[:10]] == [mac.REPLAYED] * 10
    assert c_verify(receiver, cache, pkts[option.WINDOW + 3]) is None


def test_rotation_keeps_windows_and_accepts_both_keys() -> None:
    old, new = ring(1, seed=1), ring(2, seed=2)
    both_send_old = KeyRing(old.keys + new.keys, 1)
    both_send_new = KeyRing(old.keys + new.keys, 2)
    sender, receiver, cache = CAuth(old, CLASS), CAuth(old, CLASS), CAuthCache()
    sent = []

    def send_one() -> bytearray:
        p, off = packet((), b"data", 0)
        c_sign(sender, p, off)
        sent.append(p)
        return p

    assert c_verify(receiver, cache, send_one()) is None
    receiver.set_keys(both_send_old)
    assert c_verify(receiver, cache, send_one()) is None
    sender.set_keys(both_send_new)
    assert c_verify(receiver, cache, send_one()) is None  # key 2 now
    receiver.set_keys(both_send_new)
    assert c_verify(receiver, cache, send_one()) is None
    assert c_verify(receiver, cache, sent[1]) == mac.REPLAYED  # key 1's window carried on
    receiver.set_keys(new)
    assert c_verify(receiver, cache, sent[1]) == mac.UNKNOWN_KEY
    assert c_verify(receiver, cache, send_one()) is None


def test_sending_numbers_from_the_clock_when_behind_it() -> None:
    """A sender idle since long ago numbers its next packet from the clock (C: the
    engine ticks once per round; Python: each sign), and never moves back."""
    keys = ring(1)
    hour_ago = mac.first_seq(time.time_ns() - 3600 * 10**9)
    c, py = CAuth(keys, CLASS, start=hour_ago), mac.PyAuth(keys, CLASS, start=hour_ago)
    now = mac.first_seq()
    c.tick(now)
    assert c.next_seq == now
    c.tick(now - 5)
    assert c.next_seq == now  # never down
    p, off = packet((), b"x", 0)
    py.sign(p, off, now_seq=now)
    assert option.decode(p[off : off + option.OPT_LEN]).seq == now
    py.sign(p, off, now_seq=now - 5)
    assert option.decode(p[off : off + option.OPT_LEN]).seq == now + 1


@pytest.mark.parametrize("receiver_kind", ["c", "python"])
def test_a_restarted_receiver_refuses_what_was_sent_before_it(receiver_kind: str) -> None:
    """The window of a receiver that (re)starts is empty; its floor (its start less
    SLACK_US) refuses packets sent before that, however new they would be to the
    window, and passes those of a sender whose clock lags by less than the slack."""
    keys = ring(1)
    now_ns = time.time_ns()

    def signed_at(ns: int) -> bytearray:
        sender = CAuth(keys, CLASS, start=mac.first_seq(ns))
        p, off = packet((), b"data", 0)
        c_sign(sender, p, off)
        return p

    old = signed_at(now_ns - 10 * 10**9)
    lagging = signed_at(now_ns - (option.SLACK_US - 500_000) * 1000)
    floor = mac.receive_floor(now_ns)
    if receiver_kind == "c":
        receiver, cache = CAuth(keys, CLASS, floor=floor), CAuthCache()
        assert c_verify(receiver, cache, old) == mac.REPLAYED
        assert c_verify(receiver, cache, lagging) is None
    else:
        ref = mac.PyAuth(keys, CLASS, floor=floor)
        assert ref.verify(old)[0] == mac.REPLAYED
        assert ref.verify(lagging)[0] is None


def test_sequence_continues_across_a_restart() -> None:
    """A sender started later begins above everything an earlier one could have sent."""
    keys = ring(1)
    first = CAuth(keys, CLASS)
    for _ in range(1000):
        p, off = packet((), b"", 0)
        c_sign(first, p, off)
    second = CAuth(keys, CLASS)
    assert second.next_seq > first.next_seq
    assert mac.first_seq() > first.next_seq


# ------------------------------------------------------------------- key files


def test_raw_32_bytes_is_key_id_0() -> None:
    k = os.urandom(32)
    assert parse_keys(k) == KeyRing(((0, k),), 0)


def test_hex_and_two_key_formats() -> None:
    a, b = os.urandom(32), os.urandom(32)
    assert parse_keys(a.hex().encode() + b"\n") == KeyRing(((0, a),), 0)
    text = f"# rotation\n1 {a.hex()}\n2 {b.hex()} send   # new\n".encode()
    assert parse_keys(text) == KeyRing(((1, a), (2, b)), 2)
    assert "key" not in repr(parse_keys(text)).replace("KeyRing", "")


@pytest.mark.parametrize(
    "text, says",
    [
        (b"\xff" * 33, "is not a key file"),
        (b"1 abcd send\n", "64 hex digits"),
        (b"300 " + b"00" * 32 + b" send\n", "0..255"),
        (b"1 " + b"00" * 32 + b"\n2 " + b"11" * 32 + b"\n", "exactly one key"),
        (b"1 " + b"00" * 32 + b" send\n1 " + b"11" * 32 + b"\n", "appears twice"),
        (b"".join(b"%d " % i + b"00" * 32 + b"\n" for i in range(3)), "at most 2"),
        (b"1 " + b"00" * 32 + b" sned\n", "'ID HEX [send]'"),
    ],
)
def test_bad_key_files_are_one_clear_error(text: bytes, says: str) -> None:
    with pytest.raises(UserError, match="--auth-key-file") as err:
        parse_keys(text)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.root
def test_key_file_must_be_root_owned_and_private(tmp_path: Path) -> None:
    p = tmp_path / "key"
    p.write_bytes(os.urandom(32))
    os.chmod(p, 0o600)
    assert load_key_file(p).send_id == 0
    os.chmod(p, 0o644)
    with pytest.raises(UserError, match="mode 0600"):
        load_key_file(p)
    os.chmod(p, 0o600)
    os.chown(p, 1000, 0)
    with pytest.raises(UserError, match="uid 1000"):
        load_key_file(p)
    with pytest.raises(UserError, match="cannot open"):
        load_key_file(tmp_path / "missing")


def test_ambient_endpoints_config_carries_the_auth_settings(tmp_path: Path) -> None:
    """node/ztunnel up record the auth settings; the endpoints they start (and those the
    watcher starts again from the record) get them in their config file."""
    from geneve_dp.ambient import endpoints, profile
    from geneve_dp.ambient.state import StateFile
    from geneve_dp.auth.settings import AuthSettings
    from geneve_dp.dataplane.spec import load_config

    st = StateFile(tmp_path / "node.json")
    key = tmp_path / "key"
    profile.record_auth(st, AuthSettings(key, ring(1), 0xFFF5))
    eps = [endpoints.Endpoint("istioin", 1000, "10.244.1.3", 6081, "192.168.126.1/30")]
    again = StateFile.load(tmp_path / "node.json")  # as the watcher reads it
    config = tmp_path / "endpoints.toml"
    config.write_text(endpoints.render_config(profile.with_auth(again, eps)))
    specs, settings = load_config(config)
    assert [s.name for s in specs] == ["istioin"]
    assert settings["auth_key_file"] == str(key) and settings["auth_option_class"] == 0xFFF5
    profile.record_auth(st, None)
    assert profile.with_auth(StateFile.load(tmp_path / "node.json"), eps) == eps
