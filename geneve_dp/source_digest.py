"""Digest of the C sources, shared by the build (csrc/build_fastpath.py embeds it in the
module) and the import-time staleness check (geneve_dp/fastpath.py compares it).

Stdlib only: the build script loads this file by path, before the package is importable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def source_digest(csrc: Path) -> str:
    """Digest of every .c and .h file directly in ``csrc``, in a stable order."""
    digest = hashlib.sha256()
    for path in sorted([*csrc.glob("*.c"), *csrc.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
