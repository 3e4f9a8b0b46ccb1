"""What `node up` / `ztunnel up` / `pod add` applied, on disk, so `down` removes exactly that.

One directory per network namespace (/run/geneve-dp/ambient/<netns-or-host>/) holding
``node.json`` or ``ztunnel.json``, and on the node one file per enrolled pod under
``pods/`` (so that enrolling a pod writes one small file, whatever the number of pods).
Setup writes its intent *before* each change, so a crash half-way still leaves a record
for `down` to work from. Writes are atomic (temp file + rename): a reader never sees
half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..netns import current_netns_name
from . import constants as k
from .rules import NodeRulesConfig

STATE_ROOT_ENV = "GENEVE_DP_AMBIENT_STATE"


def state_root() -> Path:
    return Path(os.environ.get(STATE_ROOT_ENV, k.STATE_ROOT))


def state_dir(netns: str | None = None) -> Path:
    return state_root() / (netns or current_netns_name())


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
        _write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

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


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the node's record -------------------------------------------------------------------

NODE_STATE_NAME = "node.json"
PODS_DIR = "pods"
GENERATION = "generation"  # in PODS_DIR; not a record (records end in .json)


def node_state_path(netns: str | None = None) -> Path:
    return state_dir(netns) / NODE_STATE_NAME


def load_node_state() -> StateFile:
    return StateFile.load(node_state_path())


def node_config(st: StateFile) -> NodeRulesConfig | None:
    """The node profile's settings as `node up` recorded them (None: not set up)."""
    c = st.data.get("config")
    if not c or "port" not in c:  # none, or another mode's (eBPF: no tunnels, no port)
        return None
    return NodeRulesConfig(
        ipaddress.IPv4Address(c["ztunnel_ip"]),
        c["ztunnel_veth"],
        ipaddress.IPv4Address(c["host_ip"]),
        int(c["port"]),
        bool(c["dns_capture"]),
        c["version"],
    )


# --- pod records: one file each ----------------------------------------------------------


@dataclass
class PodRecord:
    """An enrolled pod: what `pod add` changed, for `pod del`, `node down` and the watcher.

    ``route`` is the table-100 route as ``links.Route`` fields; ``sysctls`` maps each key
    that `pod add` wrote to the value it had before (restored on removal).
    """

    ip: str
    uid: str
    route: dict[str, Any] | None = None
    sysctls: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PodRecord:
        return cls(str(d["ip"]), str(d.get("uid", "")), d.get("route"), dict(d.get("sysctls", {})))


def pods_dir(directory: Path) -> Path:
    return directory / PODS_DIR


def _pod_path(directory: Path, ip: str) -> Path:
    return pods_dir(directory) / f"{ip}.json"


def load_pod(directory: Path, ip: str) -> PodRecord | None:
    try:
        return PodRecord.from_dict(json.loads(_pod_path(directory, ip).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return PodRecord(ip, "")  # corrupt: known by its name, changes unknown


def save_pod(directory: Path, rec: PodRecord) -> None:
    _write_atomic(_pod_path(directory, rec.ip), json.dumps(asdict(rec), sort_keys=True) + "\n")
    _bump(directory)


def remove_pod(directory: Path, ip: str) -> None:
    _pod_path(directory, ip).unlink(missing_ok=True)
    _bump(directory)


def load_pods(directory: Path) -> dict[str, PodRecord]:
    """Every pod record, by IP (sorted)."""
    out: dict[str, PodRecord] = {}
    try:
        names = sorted(p.name for p in pods_dir(directory).iterdir())
    except OSError:
        return out
    for name in names:
        if name.endswith(".json"):
            ip = name.removesuffix(".json")
            rec = load_pod(directory, ip)
            if rec is not None:
                out[ip] = rec
    return out


def _generation_path(directory: Path) -> Path:
    return pods_dir(directory) / GENERATION


def pods_version(directory: Path) -> int:
    """A number that changes whenever a pod record is saved or removed (-1: none yet).
    Pod changes and its readers hold the directory's lock, so a reader that sees the
    same number as before has seen the same records."""
    try:
        return int(_generation_path(directory).read_text())
    except (OSError, ValueError):
        return -1


def _bump(directory: Path) -> None:
    _write_atomic(_generation_path(directory), f"{pods_version(directory) + 1}\n")


_cache: dict[Path, tuple[int, dict[str, PodRecord]]] = {}  # one entry per directory


def load_pods_cached(directory: Path) -> dict[str, PodRecord]:
    """``load_pods``, read again only when ``pods_version`` moved (the watcher asks
    every pass; the records change only with pod add/del)."""
    version = pods_version(directory)
    hit = _cache.get(directory)
    if hit is not None and hit[0] == version and version != -1:
        return hit[1]
    recs = load_pods(directory)
    _cache[directory] = (version, recs)
    return recs


def remove_pods_dir(directory: Path) -> None:
    d = pods_dir(directory)
    with contextlib.suppress(OSError):
        for p in d.iterdir():
            p.unlink(missing_ok=True)
        d.rmdir()
