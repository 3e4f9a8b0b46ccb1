"""What a running endpoint may be asked to change, worked out before anything changes.

`up` on a netns and port that an endpoint already serves adds tunnels to it, `down`
removes them, `set` changes one, and a config reload makes the endpoint's tunnels
those of the file. These pure functions turn such a request and the running specs
into the specs to apply (dataplane.Dataplane.apply), or refuse it with a UserError
naming the field, so that nothing is half-applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .dataplane.spec import KEYS, TunnelSpec, build_spec, check_together, spec_to_raw
from .errors import UserError

# What `set` cannot change on a running tunnel, and why; the rest of KEYS it can.
FIXED = {
    "name": "it names the tunnel",
    "mode": "a TAP device cannot become a TUN one or back: that is a new device",
    "port": "the port is the endpoint's receive socket",
    "mac": "the MAC stays for the device's life (peers' neighbour caches hold it)",
    "udp6_zero_csum_rx": "it is a property of the port's receive socket",
}
SETTABLE = tuple(k for k in KEYS if k not in FIXED)


def added(running: Sequence[TunnelSpec], raws: Sequence[Mapping[str, Any]]) -> list[TunnelSpec]:
    """The running specs followed by those of ``raws``; a name already running, or a
    tunnel a receiver could not tell from another, is refused."""
    if not raws:
        raise UserError("no tunnel given", "tunnel")
    new = [build_spec(raw) for raw in raws]
    names = {s.name for s in running}
    for spec in new:
        if spec.name in names:
            raise UserError(
                f"a tunnel named {spec.name!r} already exists in this endpoint "
                f"(`geneve-dp set {spec.name} ...` changes it)",
                "name",
            )
    out = [*running, *new]
    check_together(out)
    return out


def removed(running: Sequence[TunnelSpec], names: Sequence[str]) -> list[TunnelSpec]:
    """The running specs without ``names`` (each of which must run here)."""
    have = {s.name for s in running}
    for name in names:
        if name not in have:
            raise UserError(f"no tunnel named {name!r} runs in this endpoint", "NAME")
    return [s for s in running if s.name not in set(names)]


def changed(current: TunnelSpec, changes: Mapping[str, Any]) -> TunnelSpec:
    """``current`` with ``changes`` (loosely typed, as build_spec takes) applied."""
    if not changes:
        raise UserError(f"nothing to change; accepted: {', '.join(SETTABLE)}", "set")
    for key in changes:
        if key in FIXED:
            raise UserError(
                f"cannot be changed on a running tunnel ({FIXED[key]}); "
                f"`geneve-dp down {current.name}` and `up` it again",
                key,
            )
        if key not in KEYS:
            raise UserError(f"unknown key; accepted: {', '.join(SETTABLE)}", key)
    spec = build_spec({**spec_to_raw(current), **changes})
    if spec.family != current.family:
        raise UserError(
            f"{spec.remote} is not of the family of {current.remote}: the underlay's "
            f"address family is the endpoint's socket; `geneve-dp down {current.name}` "
            "and `up` it again",
            "remote",
        )
    return spec


def replaced(running: Sequence[TunnelSpec], spec: TunnelSpec) -> list[TunnelSpec]:
    """The running specs with the one named like ``spec`` replaced by it."""
    out = [spec if s.name == spec.name else s for s in running]
    check_together(out)
    return out


def reload_steps(
    running: Sequence[TunnelSpec], wanted: Sequence[TunnelSpec]
) -> list[list[TunnelSpec]]:
    """The applies that turn ``running`` into ``wanted`` (a reloaded config file).

    One step when every kept tunnel can change in place; a tunnel whose mode or MAC
    changes needs a new device, so a first step removes it (and the second adds it
    anew; if every tunnel is so replaced, the first leaves none for a moment). A
    change of the receive socket's zero-checksum setting is refused.
    """
    check_together(list(wanted))
    old = {s.name: s for s in running}
    renewed = set()
    for spec in wanted:
        was = old.get(spec.name)
        if was is None:
            continue
        if was.udp6_zero_csum_rx != spec.udp6_zero_csum_rx and was.port == spec.port:
            why = FIXED["udp6_zero_csum_rx"]
            raise UserError(
                f"{spec.name}: cannot be changed while its port is open ({why})",
                "udp6_zero_csum_rx",
            )
        if was.mode != spec.mode or (spec.mac is not None and was.mac != spec.mac):
            renewed.add(spec.name)
    if not renewed:
        return [list(wanted)]
    # First without them (possibly no tunnel at all for a moment), then as wanted.
    return [[s for s in running if s.name not in renewed], list(wanted)]


def difference(running: Sequence[TunnelSpec], wanted: Sequence[TunnelSpec]) -> dict[str, list[str]]:
    """Names added, removed and changed going from ``running`` to ``wanted``."""
    old = {s.name: s for s in running}
    new = {s.name: s for s in wanted}
    return {
        "added": [n for n in new if n not in old],
        "removed": [n for n in old if n not in new],
        "changed": [n for n in new if n in old and old[n] != new[n]],
    }
