"""One tunnel's C auth state (csrc/auth.c): memory, key rings, reloads.

The engines' threads read the published ring through an atomic pointer; a ring
replaced by a reload stays allocated here for the next RETIRED reloads, so a thread
that loaded it just before the swap finishes its packet on live memory.
"""

from __future__ import annotations

import collections
import secrets
from typing import Any

from ..errors import UserError
from ..fastpath import ffi, lib
from .keys import KeyRing
from .mac import first_seq, receive_floor

RETIRED = 8
SLOTS = 4  # csrc/auth.c WINDOW_SLOTS

_SETUP = {
    lib.GDP_AUTH_E_INIT: "libsodium did not initialise",
    lib.GDP_AUTH_E_NO_AES: "this CPU lacks AES-NI/PCLMUL, which libsodium's AES-GCM needs",
    lib.GDP_AUTH_E_ARGS: "bad key ring or option class",
}


def check_available() -> None:
    """Refuse authentication up front on a machine that cannot run it."""
    rc = lib.gdp_auth_available()
    if rc < 0:
        raise UserError(_SETUP.get(rc, f"error {rc}"), field="--auth-key-file")


class CAuth:
    def __init__(
        self, ring: KeyRing, opt_class: int, start: int | None = None, floor: int | None = None
    ) -> None:
        self._mem = ffi.new("uint8_t[]", lib.gdp_auth_size())
        self.ptr: Any = ffi.cast("struct gdp_auth *", self._mem)
        rc = lib.gdp_auth_init(
            self.ptr,
            opt_class,
            first_seq() if start is None else start,
            receive_floor() if floor is None else floor,
        )
        if rc < 0:
            raise UserError(_SETUP.get(rc, f"error {rc}"), field="--auth-key-file")
        self._rings: collections.deque[Any] = collections.deque(maxlen=RETIRED + 1)
        self._slots: dict[int, int] = {}
        self.set_keys(ring)

    def set_keys(self, ring: KeyRing, salt: int | None = None) -> None:
        """Publish ``ring``: a new salt; key IDs that stay keep their windows."""
        old = set(self._slots.values())
        slots = {i: self._slots[i] for i, _ in ring.keys if i in self._slots}
        free = [s for s in range(SLOTS) if s not in old and s not in slots.values()]
        reset = 0
        for i, _ in ring.keys:
            if i not in slots:
                slots[i] = free.pop(0)
                reset |= 1 << slots[i]
        ids = bytes(i for i, _ in ring.keys)
        keys = b"".join(k for _, k in ring.keys)
        send = [i for i, _ in ring.keys].index(ring.send_id)
        mem = ffi.new("uint8_t[]", lib.gdp_auth_ring_size())
        r = ffi.cast("struct gdp_auth_ring *", mem)
        rc = lib.gdp_auth_ring_init(
            r,
            ids,
            keys,
            bytes(slots[i] for i, _ in ring.keys),
            len(ring.keys),
            send,
            secrets.randbits(64) if salt is None else salt,
        )
        if rc < 0:
            raise UserError(_SETUP.get(rc, f"error {rc}"), field="--auth-key-file")
        lib.gdp_auth_set_ring(self.ptr, r, reset)
        self._rings.append(mem)
        self._slots = slots

    @property
    def next_seq(self) -> int:
        return int(lib.gdp_auth_next_seq(self.ptr))

    def tick(self, now_seq: int) -> None:
        """Move the send counter up to ``now_seq`` if it is behind (the engine does this
        once per transmit round)."""
        lib.gdp_auth_tick(self.ptr, now_seq)

    def close(self) -> None:
        """Only once no engine thread uses it any more."""
        lib.gdp_auth_destroy(self.ptr)


class CAuthCache:
    """A receiving thread's cache of derived keys (tests; the engine embeds its own)."""

    def __init__(self) -> None:
        self._mem = ffi.new("uint8_t[]", lib.gdp_auth_cache_size())
        self.ptr: Any = ffi.cast("struct gdp_auth_cache *", self._mem)
