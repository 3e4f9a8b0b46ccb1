"""The reference MAC, anti-replay window and per-tunnel state of the Python engine.

Written apart from csrc/auth.c on other libraries (hashlib's BLAKE2b for the key
derivation libsodium's crypto_kdf does, `cryptography`'s AES-GCM for the GMAC), so the
differential tests compare two implementations, not one twice.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .keys import KeyRing
from .option import (
    DATA_LEN,
    KDF_CTX,
    OFF_KEY_ID,
    OFF_SALT,
    OFF_SEQ,
    OFF_TAG,
    SEQ_SHIFT,
    SLACK_US,
    TAG_LEN,
    WINDOW,
    find,
)

# The receive checks in the order they run, named as the drop counters.
MISSING, UNKNOWN_KEY, BAD_MAC, REPLAYED = (
    "auth_missing",
    "auth_unknown_key",
    "auth_bad_mac",
    "auth_replayed",
)
REASONS = (MISSING, UNKNOWN_KEY, BAD_MAC, REPLAYED)


def subkey(master: bytes, salt: int) -> bytes:
    """libsodium's crypto_kdf_derive_from_key(32, salt, KDF_CTX, master)."""
    return hashlib.blake2b(
        b"",
        digest_size=32,
        key=master,
        salt=salt.to_bytes(8, "little") + bytes(8),
        person=KDF_CTX + bytes(8),
    ).digest()


def nonce(seq: int) -> bytes:
    return bytes(4) + seq.to_bytes(8, "big")


def gmac(aead: AESGCM, seq: int, covered: bytes | bytearray) -> bytes:
    """AES-GCM's tag over ``covered`` as associated data, with an empty message."""
    return aead.encrypt(nonce(seq), b"", bytes(covered))


def first_seq(now_ns: int | None = None) -> int:
    """The realtime clock as a sequence number (option.SEQ_SHIFT): where a sender
    starts counting, and what it counts from whenever it is behind."""
    us = (time.time_ns() if now_ns is None else now_ns) // 1000
    return (us << SEQ_SHIFT) & (2**64 - 1)


def receive_floor(now_ns: int | None = None) -> int:
    """The lowest sequence number a receiver starting now accepts (option.SLACK_US)."""
    us = (time.time_ns() if now_ns is None else now_ns) // 1000
    return max(0, us - SLACK_US) << SEQ_SHIFT


class Window:
    """RFC 4303 §3.4.3 anti-replay with a WINDOW-bit bitmap (bit k: top - k seen)."""

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self.top = -1
        self.bits = 0

    def accept(self, seq: int) -> bool:
        if self.top < 0:
            self.top, self.bits = seq, 1
            return True
        if seq > self.top:
            # A jump of a window or more leaves nothing of the old bitmap (and a shift
            # by the jump would build an integer as long as the jump: a sender's clock
            # moves its numbers on by about 4e9 a second).
            jump = seq - self.top
            self.bits = (
                1 if jump >= self.size else ((self.bits << jump) | 1) & ((1 << self.size) - 1)
            )
            self.top = seq
            return True
        lag = self.top - seq
        if lag >= self.size or self.bits >> lag & 1:
            return False
        self.bits |= 1 << lag
        return True


class PyAuth:
    """One tunnel's signing and receive check in the Python engine."""

    def __init__(
        self, ring: KeyRing, opt_class: int, start: int | None = None, floor: int | None = None
    ) -> None:
        self.opt_class = opt_class
        self._next = first_seq() if start is None else start
        self.floor = receive_floor() if floor is None else floor
        self._lock = threading.Lock()
        self._windows: dict[int, Window] = {}
        self.set_keys(ring)

    def set_keys(self, ring: KeyRing) -> None:
        """A new key ring: a new salt; windows kept for key IDs that stay."""
        salt = secrets.randbits(64)
        aeads = {i: k for i, k in ring.keys}
        with self._lock:
            self.ring = ring
            self.salt = salt
            self._send = AESGCM(subkey(aeads[ring.send_id], salt))
            self._cache: dict[tuple[int, int], AESGCM] = {}
            self._windows = {i: self._windows.get(i, Window()) for i, _ in ring.keys}

    def tick(self, now_seq: int) -> None:
        """Move the send counter up to ``now_seq`` if it is behind (never down)."""
        with self._lock:
            self._next = max(self._next, now_seq)

    @property
    def next_seq(self) -> int:
        return self._next

    def sign(self, geneve: bytearray, opt_off: int, now_seq: int | None = None) -> None:
        """Fill the option at ``opt_off`` of ``geneve`` (header + inner frame), numbered
        from the clock (``now_seq``: what the clock says, for tests) when behind it."""
        with self._lock:
            key_id, salt, aead = self.ring.send_id, self.salt, self._send
            self._next = max(self._next, first_seq() if now_seq is None else now_seq)
            seq = self._next
            self._next += 1
        o = opt_off
        geneve[o + OFF_KEY_ID : o + OFF_SALT] = bytes([key_id, 0, 0, 0])
        geneve[o + OFF_SALT : o + OFF_SEQ] = salt.to_bytes(8, "big")
        geneve[o + OFF_SEQ : o + OFF_TAG] = seq.to_bytes(8, "big")
        geneve[o + OFF_TAG : o + OFF_TAG + TAG_LEN] = bytes(TAG_LEN)
        geneve[o + OFF_TAG : o + OFF_TAG + TAG_LEN] = gmac(aead, seq, geneve)

    def verify(self, geneve: bytes | bytearray) -> tuple[str | None, int]:
        """(None, option offset) when the packet passes, else (reason, -1)."""
        off = find(geneve, self.opt_class)
        if off < 0:
            return MISSING, -1
        # An option of another size names no key and carries no MAC: it cannot verify.
        if (geneve[off + 3] & 0x1F) * 4 != DATA_LEN:
            return BAD_MAC, -1
        key_id = geneve[off + OFF_KEY_ID]
        with self._lock:
            ring = self.ring
            master = ring.key(key_id)
            window = self._windows.get(key_id)
        if master is None or window is None:
            return UNKNOWN_KEY, -1
        salt = int.from_bytes(geneve[off + OFF_SALT : off + OFF_SEQ], "big")
        seq = int.from_bytes(geneve[off + OFF_SEQ : off + OFF_TAG], "big")
        aead = self._cache.get((key_id, salt)) or AESGCM(subkey(master, salt))
        tag = bytes(geneve[off + OFF_TAG : off + OFF_TAG + TAG_LEN])
        covered = bytearray(geneve)
        covered[off + OFF_TAG : off + OFF_TAG + TAG_LEN] = bytes(TAG_LEN)
        if not secrets.compare_digest(tag, gmac(aead, seq, covered)):
            return BAD_MAC, -1
        with self._lock:
            if self.ring is ring:
                self._cache[(key_id, salt)] = aead
                if len(self._cache) > 4:
                    self._cache.pop(next(iter(self._cache)))
            if seq < self.floor or not window.accept(seq):
                return REPLAYED, -1
        return None, off
