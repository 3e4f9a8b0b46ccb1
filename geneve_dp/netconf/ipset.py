"""IPv4 hash:ip sets with per-entry comments: changes through pyroute2's IPSet
(netlink), reads through ipsetdump (no pyroute2 request, no garbage left for the
cycle collector on a watcher's every pass).

The ambient profile keeps one set of enrolled pod IPs, each entry commented with the
pod's UID, like `ipset create NAME hash:ip family inet comment`.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPSet
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import UserError
from . import ipsetdump

IPSET_ERR_EXIST = 4103  # kernel ipset: "element already added"
IPSET_ERR_EXIST_SETNAME = 4097  # kernel ipset: "set with the same name already exists"
IPSET_ERR_NOT_EXIST = 4102  # element not in set  (kernel's IPSET_ERR_EXIST is 4103)

# Full listings made by this process: the work that grows with the number of entries.
LISTINGS = {"entries": 0}


_session = threading.local()  # .ipset: this thread's shared IPSet inside session()


def _open() -> Any:
    try:
        return IPSet()
    except (OSError, NetlinkError) as exc:
        raise UserError(f"cannot open the kernel ipset interface: {exc}", field="ipset") from exc


@contextlib.contextmanager
def _ipset() -> Iterator[Any]:
    shared = getattr(_session, "ipset", None)
    if shared is not None:
        yield shared
        return
    s = _open()
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Inside, this thread's calls here share one netlink socket (see links.session)."""
    if getattr(_session, "ipset", None) is not None:
        yield
        return
    _session.ipset = _open()
    try:
        yield
    finally:
        s, _session.ipset = _session.ipset, None
        s.close()


def create(name: str) -> bool:
    """Create the set; False when it already existed (as Istio, EEXIST is fine)."""
    with _ipset() as s:
        try:
            s.create(name, stype="hash:ip", family=2, comment=True)
        except NetlinkError as exc:
            if exc.code in (errno.EEXIST, IPSET_ERR_EXIST_SETNAME):
                return False
            raise UserError(
                f"cannot create ipset {name}: {exc.args[-1]} (is the kernel's ip_set_hash_ip "
                "module available?)",
                field="ipset",
            ) from exc
    return True


def destroy(name: str) -> bool:
    with _ipset() as s:
        try:
            s.destroy(name)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise
    return True


def entries(name: str) -> dict[str, str]:
    """IP -> comment of every entry; empty if the set does not exist."""
    LISTINGS["entries"] += 1
    found = ipsetdump.listing(name)
    return found.entries if found is not None else {}


def size(name: str) -> int | None:
    """The number of entries, from the set's header (no listing); None if there is no
    such set."""
    found = ipsetdump.listing(name, header_only=True)
    return None if found is None else found.elements or 0


def add(name: str, ip: str, comment: str) -> bool:
    """Add ``ip`` with ``comment``; False when it was already there."""
    with _ipset() as s:
        try:
            s.add(name, ip, etype="ip", comment=comment)
        except NetlinkError as exc:
            if exc.code == IPSET_ERR_EXIST:
                return False
            raise
    return True


def delete(name: str, ip: str) -> bool:
    with _ipset() as s:
        try:
            s.delete(name, ip, etype="ip")
        except NetlinkError:
            return False
    return True
