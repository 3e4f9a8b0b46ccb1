"""What `node up` / `ztunnel up` applied, on disk, so `down` removes exactly that.

One directory per network namespace (/run/geneve-dp/ambient/<netns-or-host>/) holding
``node.json`` or ``ztunnel.json``. Setup writes its intent *before* each change, so a
crash half-way still leaves a record for `down` to work from. Writes are atomic (temp
file + rename): a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..netns import current_netns_name
from . import constants as k

STATE_ROOT_ENV = "GENEVE_DP_AMBIENT_STATE"


def state_dir(netns: str | None = None) -> Path:
    root = Path(os.environ.get(STATE_ROOT_ENV, k.STATE_ROOT))
    return root / (netns or current_netns_name())


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[bool]:
    """Hold an exclusive lock on a state directory; yields False when it does not exist.

    Pod add/del and each pass of the reconcile watcher run under it, so the watcher
    never acts on a record that a pod command is half-way through changing (it would
    put back an entry that `pod del` had just removed).
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing drops the lock


class StateFile:
    """A JSON document kept in sync with the disk on every ``save()``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    @classmethod
    def load(cls, path: Path) -> StateFile:
        st = cls(path)
        try:
            st.data = json.loads(path.read_text())
        except FileNotFoundError:
            st.data = {}
        except (OSError, ValueError):
            # A corrupt record is no record: `down` falls back to removal by name.
            st.data = {}
        return st

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        for p in (self.path, self.path.with_suffix(".tmp")):
            p.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # only when nothing else lives there
        except OSError:
            pass

    def record(self, key: str, item: Any) -> None:
        """Append ``item`` to the list ``key`` (once) and save, before the change is made."""
        items = self.data.setdefault(key, [])
        if item not in items:
            items.append(item)
        self.save()
