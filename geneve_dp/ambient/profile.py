"""The steps `node up/down` and `ztunnel up/down` take alike.

Each setup step records its intent in the state file *before* changing the kernel, so
a crash half-way leaves a record for `down`; each teardown step removes what the record
lists. The profiles differ in what they install, not in how, and that "how" lives here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..auth.settings import AuthSettings
from ..errors import UserError
from ..netconf import iptables, links
from . import endpoints
from .state import StateFile


def begin(path: Path, config: dict[str, Any]) -> StateFile:
    """A fresh record holding ``config``, marked incomplete until ``finish``."""
    st = StateFile(path)
    st.data = {"config": config, "complete": False}
    st.save()
    return st


def finish(st: StateFile) -> None:
    """Mark the setup complete: from now on the reconcile watcher holds on to it."""
    st.data["complete"] = True
    st.save()


@contextlib.contextmanager
def rolled_back_on_error(undo: Callable[[], object], role: str) -> Iterator[None]:
    """Run ``undo`` if the block fails; anything unexpected becomes one UserError line."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            undo()
        if isinstance(exc, Exception) and not isinstance(exc, UserError):
            raise UserError(
                f"{role} setup failed and was rolled back: {exc}", f"{role} up"
            ) from exc
        raise


def record_auth(st: StateFile, auth: AuthSettings | None) -> None:
    """Keep the auth settings in the record: the endpoints started now and by the
    watcher later authenticate with them."""
    st.data["auth"] = (
        None if auth is None else {"key_file": str(auth.key_file), "class": auth.option_class}
    )
    st.save()


def with_auth(st: StateFile, eps: list[endpoints.Endpoint]) -> list[endpoints.Endpoint]:
    """``eps`` with the recorded auth settings."""
    auth = st.data.get("auth")
    if not auth:
        return eps
    return [
        dataclasses.replace(e, auth_key_file=auth["key_file"], auth_option_class=auth["class"])
        for e in eps
    ]


def start_endpoints(st: StateFile, eps: list[endpoints.Endpoint], role: str) -> None:
    eps = with_auth(st, eps)
    st.data["endpoints"] = {"devices": [e.name for e in eps], "pidfile": None}
    st.save()
    for e in eps:  # stale devices of a crashed run would make the daemon refuse
        links.delete_link(e.name)
    st.data["endpoints"]["pidfile"] = str(endpoints.start(eps, st.path.parent, role))
    st.save()


def stop_endpoints(st: StateFile, role: str, names: Iterable[str]) -> list[str]:
    """Stop the endpoint daemon and delete its devices (also by ``names``, after a crash)."""
    recorded = (st.data.get("endpoints") or {}).get("devices") or []
    devices = list(dict.fromkeys([*recorded, *names]))
    present = [d for d in devices if links.link(d) is not None]
    endpoints.stop(endpoint_pidfile(st, role), devices)
    return [f"device {d}" for d in present]


def endpoint_pidfile(st: StateFile, role: str) -> Path:
    """The endpoint daemon's pidfile: as recorded, else where `start` puts it."""
    pidfile = (st.data.get("endpoints") or {}).get("pidfile")
    return _recorded_path(pidfile) if pidfile else st.path.parent / f"{role}-endpoints.pid"


@functools.lru_cache(maxsize=8)
def _recorded_path(text: str) -> Path:
    # The same Path for the same recorded text: the watcher asks on every pass, and
    # pathlib interns each part it parses, so parsing afresh would put the file's name
    # into CPython's interned-string table again every time (tests/test_watch_memory.py).
    return Path(text)


def set_sysctls(st: StateFile, pairs: Iterable[tuple[str, str]]) -> None:
    """Write each sysctl, keeping its first-seen value in the record for `down`."""
    old_values: dict[str, str] = st.data.setdefault("sysctls", {})
    for key, value in pairs:
        old = links.sysctl_get(key)
        if old is None:
            continue
        old_values.setdefault(key, old)
        st.save()
        links.sysctl_set(key, value)


def global_rp_filter_off() -> list[tuple[str, str]]:
    """rp_filter 0 for ``all`` (which the kernel ORs with each device's) and ``default``
    (what new devices get). Set before the endpoints start: their inject device is made
    only where nothing reverse-path filters (dataplane/inject.py)."""
    return [(links.conf_key(d, "rp_filter"), "0") for d in ("all", "default")]


def restore_sysctls(old_values: dict[str, str]) -> None:
    for key, old in reversed(list(old_values.items())):
        with contextlib.suppress(OSError):
            links.sysctl_set(key, old)


def add_routes(st: StateFile, routes: Iterable[links.Route]) -> None:
    for r in routes:
        st.record("routes", asdict(r))
        links.add_route(r)


def add_rules(st: StateFile, rules: Iterable[links.Rule]) -> None:
    for rule in rules:
        st.record("rules", asdict(rule))
        links.add_rule(rule)


def route_from_dict(d: dict[str, Any]) -> links.Route:
    return links.Route(**d)


def delete_routes(recorded: Iterable[dict[str, Any]]) -> list[str]:
    """Delete recorded routes, newest first; what went."""
    done = []
    for rd in reversed(list(recorded)):
        r = route_from_dict(rd)
        if links.del_route(r):
            done.append(f"route {r.describe()}")
    return done


def delete_rules(rules: Iterable[links.Rule]) -> list[str]:
    """Delete our ip rules by selector: ours whether or not they were recorded."""
    return [f"ip rule {r.describe()}" for r in rules if links.del_rule(r)]


def select_iptables(st: StateFile, version: str, say: Callable[[str], None]) -> None:
    """Detect the iptables backend as Istio ``version`` does, use it, and record it."""
    backend, why = iptables.detect_backend(version)
    iptables.select(backend)
    st.data["iptables_backend"] = {"name": backend, "why": why}
    st.save()
    say(f"iptables backend: {iptables.selected()} ({why})")


def drop_created_tables(data: dict[str, Any], current: Iterable[str] | None = None) -> list[str]:
    """Drop the iptables tables that `up` created (not in ``data["tables_before"]``) and
    are empty now; ``current``: the tables as iptables.save() gave them, if at hand."""
    if "tables_before" not in data:
        return []
    created = set(iptables.save() if current is None else current) - set(data["tables_before"])
    return [f"empty iptables table {t}" for t in iptables.drop_empty_tables(created)]


def use_recorded_iptables(st: StateFile) -> bool:
    """Use the backend ``st`` records; False when it records none."""
    rec = st.data.get("iptables_backend")
    if not isinstance(rec, dict):
        return False
    iptables.select(rec.get("name"))
    return True


def iptables_backends(st: StateFile) -> list[str | None]:
    """Where `down` looks for our rules: the recorded backend, else every one."""
    rec = st.data.get("iptables_backend")
    if isinstance(rec, dict):
        return [rec.get("name")]
    if iptables.detect_backend("1.20")[0] is None:
        return [None]
    return list(iptables.BACKENDS)


def iptables_ok() -> bool:
    try:
        iptables.require_binaries()
    except UserError:
        return False
    return True


def flush_tables(tables: Iterable[int]) -> list[str]:
    """Without a record: Istio's clean slate, flushing tables nothing else is meant to use."""
    return [f"routes of table {t}" for t in tables if links.flush_table(t)]
