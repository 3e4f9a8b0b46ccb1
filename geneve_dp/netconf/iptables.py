"""iptables as one atomic text: render iptables-restore input, apply it, read iptables-save.

The rule sets themselves (which rules, in which order) come from the ambient profiles
as ``Ruleset`` values; this module turns a ruleset plus what is currently installed into
iptables-restore input (pure functions, unit tested without root) and applies that
input with one ``iptables-restore --noflush`` call, so the kernel sees all of it or
none of it. Only the chains named in the ruleset are touched.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import UserError

TABLE_ORDER = ("raw", "mangle", "nat", "filter", "security")
BUILTIN_CHAINS = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

# The binaries in use: `iptables*` as installed until ``select`` names a backend.
RESTORE = "iptables-restore"
SAVE = "iptables-save"
CHECK = "iptables"

BACKENDS = ("nft", "legacy")
KUBELET_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
LEGACY_RULES_ENOUGH = 10  # Istio 1.18/1.19: more legacy rules than this means legacy


@dataclass(frozen=True)
class Chain:
    """A chain we own in ``table``, hooked from built-in ``parent`` by a jump at position 1."""

    table: str
    name: str
    parent: str | None


@dataclass(frozen=True)
class Rule:
    """One rule appended to ``chain``; ``spec`` is iptables argument text after ``-A CHAIN``."""

    table: str
    chain: str
    spec: str


@dataclass(frozen=True)
class Ruleset:
    """Everything a profile installs.

    ``chains`` are created (or flushed when present) and hooked; ``flush_builtin`` lists
    built-in chains that are flushed before ``rules`` are appended (the ztunnel side
    owns its namespace's mangle PREROUTING and nat OUTPUT, as Istio does).
    """

    chains: tuple[Chain, ...] = ()
    rules: tuple[Rule, ...] = ()
    flush_builtin: tuple[tuple[str, str], ...] = ()

    def tables(self) -> list[str]:
        used = {c.table for c in self.chains} | {r.table for r in self.rules}
        used |= {t for t, _ in self.flush_builtin}
        return [t for t in TABLE_ORDER if t in used]


@dataclass
class SavedTable:
    chains: dict[str, str] = field(default_factory=dict)  # name -> policy ("-" for user chains)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, spec) in order


Saved = dict[str, SavedTable]


def parse_save(text: str) -> Saved:
    """The tables, chains and rules of iptables-save output (counters and comments dropped)."""
    tables: Saved = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and "] " in line:  # iptables-save -c packet:byte counters
            line = line.split("] ", 1)[1]
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable())
        elif line == "COMMIT":
            current = None
        elif current is None:
            continue
        elif line.startswith(":"):
            name, policy, *_ = line[1:].split()
            current.chains[name] = policy
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.rules.append((chain, rest[0] if rest else ""))
    return tables


def normalize_save(text: str) -> str:
    """iptables-save output without comments and counters, for comparisons."""
    out = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            name, policy, *_ = line[1:].split()
            line = f":{name} {policy}"
        out.append(line)
    return "\n".join(out) + "\n"


def _jumps_to(saved: Saved, table: str, target: str) -> list[tuple[str, str]]:
    """Rules in ``table`` whose only job is to jump to ``target``."""
    st = saved.get(table)
    if st is None:
        return []
    return [(c, s) for c, s in st.rules if s == f"-j {target}"]


def render_apply(ruleset: Ruleset, current: Saved) -> str:
    """iptables-restore --noflush input that makes ``ruleset`` installed, idempotently.

    Our chains are declared (which creates them, or flushes them when they exist), any
    existing jumps to them are removed and one jump per chain is inserted first in its
    parent, built-in chains we own are flushed, then every rule is appended in order.
    """
    out: list[str] = []
    for table in ruleset.tables():
        out.append(f"*{table}")
        chains = [c for c in ruleset.chains if c.table == table]
        for c in chains:
            out.append(f":{c.name} - [0:0]")
        for c in chains:
            for parent, spec in _jumps_to(current, table, c.name):
                out.append(f"-D {parent} {spec}")
        for t, builtin in ruleset.flush_builtin:
            if t == table:
                out.append(f"-F {builtin}")
        for c in chains:
            if c.parent is not None:
                out.append(f"-I {c.parent} 1 -j {c.name}")
        for r in ruleset.rules:
            if r.table == table:
                out.append(f"-A {r.chain} {r.spec}")
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_remove(
    tables_chains: Iterable[tuple[str, str]],
    current: Saved,
    delete_rules: Sequence[Rule] = (),
    restore_rules: Sequence[Rule] = (),
) -> str:
    """iptables-restore --noflush input that removes chains (and every jump to them).

    Only chains that exist in ``current`` are named, so the text also works after a
    partial setup or a crash. ``delete_rules`` (known to be present) are deleted from
    built-in chains and ``restore_rules`` appended back (what a flush had removed).
    """
    by_table: dict[str, list[str]] = {}
    for table, name in tables_chains:
        st = current.get(table)
        if st is not None and name in st.chains:
            by_table.setdefault(table, []).append(name)
    used = set(by_table) | {r.table for r in delete_rules} | {r.table for r in restore_rules}
    out: list[str] = []
    for table in [t for t in TABLE_ORDER if t in used]:
        out.append(f"*{table}")
        names = by_table.get(table, [])
        for name in names:
            for parent, spec in _jumps_to(current, table, name):
                out.append(f"-D {parent} {spec}")
        for r in delete_rules:
            if r.table == table:
                out.append(f"-D {r.chain} {r.spec}")
        for name in names:
            out.append(f"-F {name}")
        for name in names:
            out.append(f"-X {name}")
        for r in restore_rules:
            if r.table == table:
                out.append(f"-A {r.chain} {r.spec}")
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def owned_chains(current: Saved, prefix: str) -> list[tuple[str, str]]:
    """(table, chain) of every user chain whose name starts with ``prefix``."""
    return [
        (table, name)
        for table, st in current.items()
        for name, policy in st.chains.items()
        if policy == "-" and name.startswith(prefix)
    ]


# --- which backend (Istio's detectIptablesCommand, per version) --------------------------


def rule_lines(save_text: str) -> int:
    """Rules in iptables-save output (its lines starting with "-")."""
    return sum(1 for line in save_text.splitlines() if line.startswith("-"))


def has_kubelet_chain(save_text: str) -> bool:
    return any(line.startswith(f":{c} ") for line in save_text.splitlines() for c in KUBELET_CHAINS)


def choose_backend(version: str, save_of: Callable[[str, bool], str]) -> tuple[str, str]:
    """The backend Istio ``version`` would pick, and why, for people.

    ``save_of(backend, mangle_only)`` is that backend's iptables-save output, IPv4 and
    IPv6 together ("" where it cannot run). 1.20 looks for the chains kubelet creates
    in the mangle table of the backend it uses, nft first, and falls back to nft; 1.18
    and 1.19 count rules: legacy with more than 10, else the one with more, nft on a tie.
    """
    if version == "1.20":
        for backend in BACKENDS:
            # Only nft is asked for mangle alone: legacy-save -t mangle would make the
            # kernel create that table.
            if has_kubelet_chain(save_of(backend, backend == "nft")):
                return backend, f"kubelet's chains are in iptables-{backend}"
        return "nft", "no kubelet chains in either backend: the default"
    legacy = rule_lines(save_of("legacy", False))
    if legacy > LEGACY_RULES_ENOUGH:
        return "legacy", f"{legacy} iptables-legacy rules (more than {LEGACY_RULES_ENOUGH})"
    nft = rule_lines(save_of("nft", False))
    if legacy > nft:
        return "legacy", f"{legacy} iptables-legacy rules, {nft} iptables-nft"
    return "nft", f"{nft} iptables-nft rules, {legacy} iptables-legacy"


def _save_output(backend: str, mangle_only: bool) -> str:
    out = []
    for family in ("iptables", "ip6tables"):
        binary = f"{family}-{backend}-save"
        if shutil.which(binary) is None:
            continue
        try:
            proc = subprocess.run(
                [binary, *(["-t", "mangle"] if mangle_only else [])],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        out.append(proc.stdout if proc.returncode == 0 else "")
    return "".join(out)


def detect_backend(version: str) -> tuple[str | None, str]:
    """``choose_backend`` on this namespace; None (the plain `iptables` binaries) where
    the suffixed ones are not installed."""
    if not all(shutil.which(f"iptables-{b}-restore") for b in BACKENDS):
        return None, "iptables-nft/iptables-legacy not both installed: iptables as installed"
    return choose_backend(version, _save_output)


def select(backend: str | None) -> None:
    """Use ``backend``'s binaries from now on in this process (None: plain iptables)."""
    global RESTORE, SAVE, CHECK
    suffix = f"-{backend}" if backend in BACKENDS else ""
    CHECK = f"iptables{suffix}"
    RESTORE, SAVE = f"{CHECK}-restore", f"{CHECK}-save"


def selected() -> str:
    """The backend in use, for people: "nft", "legacy" or "as installed"."""
    for b in BACKENDS:
        if CHECK == f"iptables-{b}":
            return b
    return "as installed"


# --- the side-effecting part -------------------------------------------------------------


def require_binaries() -> None:
    for binary in (RESTORE, SAVE, CHECK):
        if shutil.which(binary) is None:
            raise UserError(f"{binary} is not installed (apt-get install iptables)", field=binary)


def save() -> Saved:
    return parse_save(save_text())


def save_text() -> str:
    proc = subprocess.run([SAVE], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise UserError(f"{SAVE} failed: {proc.stderr.strip()}", field=SAVE)
    return proc.stdout


def restore(text: str) -> None:
    """Apply iptables-restore input atomically, keeping every chain it does not name."""
    if not text:
        return
    proc = subprocess.run(
        [RESTORE, "--noflush"], input=text, capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split())
        raise UserError(f"refused the rules: {detail}", field=RESTORE)


def rule_exists(rule: Rule) -> bool:
    """Whether ``rule`` is in its chain (iptables -C compares rules, not text)."""
    proc = subprocess.run(
        [CHECK, "-w", "5", "-t", rule.table, "-C", rule.chain, *shlex.split(rule.spec)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode == 0


def is_nft_backend() -> bool:
    if selected() != "as installed":
        return selected() == "nft"
    proc = subprocess.run([CHECK, "--version"], capture_output=True, text=True, timeout=10)
    return "nf_tables" in proc.stdout


def drop_empty_tables(tables: Iterable[str]) -> list[str]:
    """Delete tables that our setup created and that are empty again.

    iptables-nft creates a table (with its built-in chains) on first use and never
    deletes it, so without this `iptables-save` after teardown would list tables that
    were not there before. A table goes only if it holds no rule, no user chain and
    only ACCEPT policies, i.e. it has no effect at all.
    """
    wanted = set(tables)
    if not wanted or shutil.which("nft") is None or not is_nft_backend():
        return []
    dropped = []
    for name, st in save().items():
        if name not in wanted or st.rules:
            continue
        if any(policy != "ACCEPT" for policy in st.chains.values()):
            continue  # a user chain ("-") or a DROP policy: not empty
        proc = subprocess.run(
            ["nft", "delete", "table", "ip", name], capture_output=True, text=True, timeout=10
        )
        if proc.returncode == 0:
            dropped.append(name)
    return dropped
