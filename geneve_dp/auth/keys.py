"""Key files: what `--auth-key-file` (config key ``auth_key_file``) accepts.

- exactly 32 bytes: one raw key with key ID 0 (``head -c 32 /dev/urandom > key``);
- text: one 64-hex-digit key (``openssl rand -hex 32``), key ID 0; or up to two lines
  ``ID HEX`` (ID 0..255), one of them ending in ``send``: both keys are accepted on
  receive, the ``send`` one signs. ``#`` starts a comment.

The file must belong to root and be readable by nobody else (mode 0600 or 0400).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .option import KEY_LEN, MAX_KEYS

FORMAT = "32 raw bytes, 64 hex digits, or up to two lines 'ID HEX' with one ending in 'send'"


@dataclass(frozen=True)
class KeyRing:
    """The live keys: (key ID, 32-byte key) pairs and the ID that signs."""

    keys: tuple[tuple[int, bytes], ...]
    send_id: int

    def key(self, key_id: int) -> bytes | None:
        return next((k for i, k in self.keys if i == key_id), None)

    def __repr__(self) -> str:  # never print key material
        return f"KeyRing(ids={[i for i, _ in self.keys]}, send_id={self.send_id})"


def parse_keys(data: bytes, field: str = "--auth-key-file") -> KeyRing:
    """A KeyRing from a key file's bytes."""
    if len(data) == KEY_LEN:
        return KeyRing(((0, data),), 0)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UserError(f"is not a key file ({FORMAT})", field=field) from None
    lines = [ln.split("#", 1)[0].split() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) == 1 and len(lines[0]) == 1:
        return KeyRing(((0, _hex_key(lines[0][0], field)),), 0)
    if not 1 <= len(lines) <= MAX_KEYS:
        raise UserError(f"holds {len(lines)} keys; at most {MAX_KEYS} ({FORMAT})", field=field)
    keys: list[tuple[int, bytes]] = []
    send: list[int] = []
    for words in lines:
        if len(words) not in (2, 3) or (len(words) == 3 and words[2] != "send"):
            raise UserError(f"line {' '.join(words)[:20]!r}... is not 'ID HEX [send]'", field=field)
        try:
            key_id = int(words[0], 0)
        except ValueError:
            key_id = -1
        if not 0 <= key_id <= 255:
            raise UserError(f"key ID {words[0][:8]!r} is not a number in 0..255", field=field)
        if any(i == key_id for i, _ in keys):
            raise UserError(f"key ID {key_id} appears twice", field=field)
        keys.append((key_id, _hex_key(words[1], field)))
        if len(words) == 3:
            send.append(key_id)
    if len(keys) == 1 and not send:
        send = [keys[0][0]]
    if len(send) != 1:
        raise UserError("exactly one key must be marked 'send'", field=field)
    return KeyRing(tuple(keys), send[0])


def _hex_key(word: str, field: str) -> bytes:
    try:
        key = bytes.fromhex(word)
    except ValueError:
        key = b""
    if len(key) != KEY_LEN:
        raise UserError(f"a key must be {2 * KEY_LEN} hex digits ({KEY_LEN} bytes)", field=field)
    return key


def load_key_file(path: Path, field: str = "--auth-key-file") -> KeyRing:
    """Read and check a key file: owned by root, no access for group or others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open {path}: {exc.strerror}", field=field) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path} is not a regular file", field=field)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != 0 or mode & 0o077:
            raise UserError(
                f"{path} must be owned by root with mode 0600 "
                f"(it is uid {st.st_uid}, mode {mode:04o})",
                field=field,
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    return parse_keys(data, field)
