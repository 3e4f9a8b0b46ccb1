"""Put back what someone removed while a profile is up (ARCHITECTURE rule 7).

An ``Intent`` is what the state file says should exist: ip rules, routes, sysctls,
ipset entries and our iptables rules. ``repair`` compares it with the kernel and adds
only what is missing, one log line per repair. It never removes anything: an extra
rule or route someone added is not ours to judge, and `down` is what takes ours away.

iptables rules are compared in the form iptables-save prints them, recorded right
after setup applied them (``expected_chains``): the kernel rewrites some options
(``--set-mark`` becomes ``--set-xmark``, ``-p tcp`` gains ``-m tcp``), so the rendered
text cannot be compared with a save directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..netconf import ipset, iptables, links
from . import constants as k
from . import endpoints

Say = Callable[[str], None]

# A running endpoint daemon opens a deleted device again by itself within a fraction of
# a second (daemon.py); the watcher replaces the daemon only if it has not after this.
DAEMON_GRACE = 1.5


@dataclass
class Memory:
    """What a watcher carries from one pass to the next."""

    devices_gone_since: float | None = None


@dataclass(frozen=True)
class ChainIntent:
    """Rules of ours in one chain, as iptables-save shows them.

    ``owned``: the chain is ours (created, hooked from ``parent`` by a jump, nothing
    else in it). Otherwise it is a built-in chain we share, and our rules are the first
    ones in it (setup flushed it and appended them, as Istio does).
    """

    table: str
    chain: str
    rules: tuple[str, ...]
    owned: bool
    parent: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "chain": self.chain,
            "rules": list(self.rules),
            "owned": self.owned,
            "parent": self.parent,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChainIntent:
        return cls(d["table"], d["chain"], tuple(d["rules"]), bool(d["owned"]), d.get("parent"))


@dataclass(frozen=True)
class Intent:
    role: str = ""
    endpoints: tuple[endpoints.Endpoint, ...] = ()
    pidfile: Path | None = None  # the endpoint daemon's
    rules: tuple[links.Rule, ...] = ()
    routes: tuple[links.Route, ...] = ()
    sysctls: tuple[tuple[str, str], ...] = ()
    ipset_entries: dict[str, str] | None = None  # IP -> comment; None: no ipset here
    chains: tuple[ChainIntent, ...] = ()
    # Per enrolled pod; as many as there are pods, so looked at on routing passes only.
    pod_routes: tuple[links.Route, ...] = ()
    pod_sysctls: tuple[tuple[str, str], ...] = ()
    # Repairs of a profile's own kind (the eBPF mode's maps and tc filters): each is
    # called with (say, routing) on every pass and returns the repairs it made.
    extra: tuple[Callable[[Say, bool], list[str]], ...] = ()


def expected_chains(ruleset: iptables.Ruleset, saved: iptables.Saved) -> list[ChainIntent]:
    """What ``ruleset`` looks like in ``saved`` (an iptables-save taken right after it
    was applied): our chains whole, and our trailing rules of each shared chain."""
    out: list[ChainIntent] = []

    def rules_of(table: str, chain: str) -> list[str]:
        st = saved.get(table, iptables.SavedTable())
        return [spec for c, spec in st.rules if c == chain]

    for c in ruleset.chains:
        out.append(ChainIntent(c.table, c.name, tuple(rules_of(c.table, c.name)), True, c.parent))
    owned = {(c.table, c.name) for c in ruleset.chains}
    shared = dict.fromkeys((r.table, r.chain) for r in ruleset.rules)
    for table, chain in shared:
        if (table, chain) in owned:
            continue
        n = sum(1 for r in ruleset.rules if (r.table, r.chain) == (table, chain))
        ours = rules_of(table, chain)[-n:]
        out.append(ChainIntent(table, chain, tuple(ours), False))
    return out


def iptables_repair_text(
    chains: tuple[ChainIntent, ...], current: iptables.Saved
) -> tuple[str, list[str]]:
    """iptables-restore --noflush input that puts back missing rules, and what it fixes.

    An owned chain that differs is re-declared (which flushes it) and refilled: its
    rules are all ours and their order is the logic. A missing jump is inserted first
    in its parent. In a shared chain ours are deleted and inserted again at the top,
    in order, leaving other rules where they are.
    """
    lines: dict[str, list[str]] = {}
    fixes: list[str] = []
    for ci in chains:
        st = current.get(ci.table, iptables.SavedTable())
        have = [spec for c, spec in st.rules if c == ci.chain]
        out = lines.setdefault(ci.table, [])
        if ci.owned:
            exists = ci.chain in st.chains
            if not exists:
                fixes.append(
                    f"iptables: chain {ci.table} {ci.chain} was deleted; created again with "
                    f"its {len(ci.rules)} rules"
                )
            elif have != list(ci.rules):
                missing = [r for r in ci.rules if r not in have]
                what = "lost " + "; ".join(repr(r) for r in missing) if missing else "changed"
                fixes.append(f"iptables: chain {ci.table} {ci.chain} {what}; refilled")
            if not exists or have != list(ci.rules):
                out.append(f":{ci.chain} - [0:0]")
                out += [f"-A {ci.chain} {r}" for r in ci.rules]
            jump = f"-j {ci.chain}"
            if ci.parent and (ci.parent, jump) not in st.rules:
                fixes.append(f"iptables: jump {ci.table} {ci.parent} -> {ci.chain} was deleted")
                out.append(f"-I {ci.parent} 1 {jump}")
        else:
            present = [spec for spec in have if spec in ci.rules]
            if present != list(ci.rules):
                missing = [r for r in ci.rules if r not in have]
                what = "lost " + "; ".join(repr(r) for r in missing) if missing else "reordered"
                fixes.append(f"iptables: {ci.table} {ci.chain} {what}; our rules put back on top")
                out += [f"-D {ci.chain} {spec}" for spec in present]
                out += [f"-I {ci.chain} {i} {r}" for i, r in enumerate(ci.rules, 1)]
    text = []
    for table in iptables.TABLE_ORDER:
        if lines.get(table):
            text += [f"*{table}", *lines[table], "COMMIT"]
    return ("\n".join(text) + "\n" if text else ""), fixes


@dataclass(frozen=True)
class View:
    """The kernel's routes (of tables 100-102, where every profile route lives), rules
    and ipset entries, read by the watcher *before* it takes the state lock, so that a
    pod add or del never waits for these reads. A pod changed in between only makes
    the pass add again what is already there, which the kernel reports (EEXIST) and
    which is then neither counted nor logged as a repair."""

    routes: frozenset[links.RouteKey]
    rules: tuple[links.Rule, ...]
    ipset_entries: dict[str, str]


def read_view() -> View:
    routes: set[links.RouteKey] = set()
    for table in k.NODE_TABLES:
        routes |= links.route_keys(table)
    return View(frozenset(routes), tuple(links.list_rules()), ipset.entries(k.IPSET_NAME))


def repair(
    intent: Intent,
    say: Say,
    memory: Memory | None = None,
    routing: bool = True,
    view: View | None = None,
) -> list[str]:
    """Add back whatever of ``intent`` is missing; the repairs made, each also said.

    Without ``memory`` (a one-off pass) a deleted device restarts its daemon at once.
    ``routing=False`` leaves out what the kernel announces when it changes (ip rules,
    routes, the pods' sysctls) and compares the ipset by its size only: the watcher
    looks at those fully when rtnetlink announced a change (and now and then
    regardless), with ``view`` read before it took the state lock. However many pods
    there are, a pass makes one dump of each of tables 100-102 and one rule dump."""
    done: list[str] = []

    def fixed(msg: str) -> None:
        done.append(msg)
        say(msg)

    # The endpoint daemon keeps its devices' addresses and link state and opens a
    # deleted device again itself; nothing runs it again if it dies, or if it does not
    # bring its device back (stuck): start it afresh for either. Routes and sysctls of
    # its devices are put back further down.
    if intent.endpoints and intent.pidfile is not None:
        gone = [e.name for e in intent.endpoints if not links.link_exists(e.name)]
        pid = endpoints.running(intent.pidfile)
        waiting = False
        if gone and pid is not None and memory is not None:
            now = time.monotonic()
            if memory.devices_gone_since is None:
                memory.devices_gone_since = now
            waiting = now - memory.devices_gone_since < DAEMON_GRACE
        if (gone or pid is None) and not waiting:
            names = [e.name for e in intent.endpoints]
            endpoints.stop(intent.pidfile, names)
            endpoints.start(list(intent.endpoints), intent.pidfile.parent, intent.role)
            new = endpoints.running(intent.pidfile)
            # A daemon that died took its devices with it: name the cause, not the effect.
            why = (
                "its daemon had exited"
                if pid is None
                else f"device {', '.join(gone)} was deleted and its daemon did not open it "
                f"again within {DAEMON_GRACE:g}s"
            )
            fixed(f"endpoints {', '.join(names)}: {why}; daemon started again (pid {new})")
        if memory is not None and not waiting:
            memory.devices_gone_since = None

    if intent.ipset_entries is not None:
        # One look at the set's header: whether it exists, and how many entries.
        size = ipset.size(k.IPSET_NAME)
        if size is None:
            ipset.create(k.IPSET_NAME)
            fixed(f"ipset {k.IPSET_NAME} was destroyed; created again")
        # An entry removed shows in the count; one swapped for another does not, and
        # waits for the next full look.
        if routing or (size or 0) < len(intent.ipset_entries):
            have = view.ipset_entries if view is not None else ipset.entries(k.IPSET_NAME)
            for ip, comment in intent.ipset_entries.items():
                if ip not in have and ipset.add(k.IPSET_NAME, ip, comment):
                    fixed(f"ipset {k.IPSET_NAME}: pod {ip} (uid {comment}) was missing; added")

    if intent.chains:
        text, fixes = iptables_repair_text(intent.chains, iptables.save())
        if text:
            iptables.restore(text)
            for msg in fixes:
                fixed(msg)

    sysctls = (*intent.sysctls, *intent.pod_sysctls) if routing else intent.sysctls
    for key, value in sysctls:
        cur = links.sysctl_get(key)
        if cur is not None and cur != value:
            links.sysctl_set(key, value)
            fixed(f"sysctl {key} was {cur}; set to {value} again")
    for fix in intent.extra:
        done += fix(say, routing)
    if not routing:
        return done
    rules_now = view.rules if view is not None else tuple(links.list_rules())
    for rule in intent.rules:
        if rule not in rules_now and links.add_rule(rule):
            fixed(f"ip rule {rule.describe()} was missing; added")

    routes_now = view.routes if view is not None else read_view().routes
    for route in (*intent.routes, *intent.pod_routes):
        rkey = links.route_key(route)
        # A route through a device that is not there cannot be added: skip it quietly.
        if rkey is None or rkey in routes_now:
            continue
        if links.add_route(route):
            fixed(f"route {route.describe()} was missing; added")

    return done
