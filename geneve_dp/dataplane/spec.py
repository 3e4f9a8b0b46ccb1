"""What a tunnel endpoint is asked to be: validated, immutable, engine-independent.

``TunnelSpec`` is the contract between the control side (CLI flags, TOML config, the
Istio profiles) and the engines. Everything here is checked before any device or
socket is created, so a bad value never leaves half a dataplane behind.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import codec, wire
from ..auth import option as auth_option
from ..errors import UserError
from ..options import parse_option

if TYPE_CHECKING:  # kube (urllib, ssl) is imported only by a config that names remotes
    from ..kube import PodRemote

# Forwarding workers of one dataplane (dataplane.Dataplane, `up --workers`).
MIN_WORKERS, MAX_WORKERS = 1, 64
# Scheduling priority of the forwarding threads (setpriority; negative needs CAP_SYS_NICE).
MIN_NICE, MAX_NICE, DEFAULT_NICE = -20, 19, -10
# How long a worker keeps polling, without sleeping, for the answer to what the other
# direction just forwarded (microseconds; 0: off, the default). dataplane.py.
MIN_BUSY_POLL_US, MAX_BUSY_POLL_US = 0, 1000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Mode = Literal["tap", "tun"]
DfPolicy = Literal["unset", "set", "inherit"]
TtlPolicy = Literal["auto", "inherit"]
TosPolicy = Literal["inherit"]
TTL_POLICIES: tuple[TtlPolicy, ...] = ("auto", "inherit")
TOS_POLICIES: tuple[TosPolicy, ...] = ("inherit",)
MODES: tuple[Mode, ...] = ("tap", "tun")
DF_POLICIES: tuple[DfPolicy, ...] = ("unset", "set", "inherit")
ENGINES = ("c", "python")
TOP_LEVEL_KEYS = (
    "engine",
    "netns",
    "offload",
    "workers",
    "nice",
    "busy_poll_us",
    "metrics_addr",
    "drop_alarm",
    "auth_key_file",
    "auth_option_class",
    "remotes",
)

# The kernel's rule for a device name (dev_valid_name): 1..IFNAMSIZ-1 bytes, counted in
# UTF-8 since that is what reaches the kernel, not "." or "..", no whitespace, '/' or ':';
# and no '%', which TUNSETIFF takes as a template to fill in ("gt%d" becomes gt0).
IFNAMSIZ = 16
_IFNAME_FORBIDDEN = re.compile(r"[\s/:%\x00]")
NAME_ACCEPTED = (
    f"1..{IFNAMSIZ - 1} bytes (UTF-8), no whitespace, '/', ':', '%' or NUL, not '.' or '..'"
)


def check_ifname(value: object, field_name: str) -> str:
    """A device name the kernel will take, or a UserError saying why not."""
    if not isinstance(value, str):
        raise UserError(f"{value!r} is not a string; accepted: {NAME_ACCEPTED}", field_name)
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        size = -1
    if size < 0 or not value or value in (".", "..") or _IFNAME_FORBIDDEN.search(value):
        raise UserError(f"{value!r} is not a device name; accepted: {NAME_ACCEPTED}", field_name)
    if size >= IFNAMSIZ:
        raise UserError(f"{value!r} is {size} bytes long; accepted: {NAME_ACCEPTED}", field_name)
    return value


@dataclass(frozen=True)
class TunnelSpec:
    """One endpoint, the userspace twin of `ip link add NAME type geneve id VNI remote IP`."""

    name: str
    vni: int
    remote: IPAddress
    local: IPAddress | None = None
    port: int = wire.GENEVE_PORT
    mode: Mode = "tap"
    mtu: int | None = None  # None: underlay MTU minus the encapsulation overhead
    # As iproute2's geneve: a number, "auto" (the route's default hop limit, as the
    # kernel's ttl 0) or "inherit" (the inner packet's TTL / hop limit; the default for
    # a frame that is not IP).
    ttl: int | TtlPolicy = 64
    # None: DSCP 0; "inherit": the inner packet's DSCP. ECN is copied from the inner
    # header in every case (RFC 6040 normal mode).
    tos: int | TosPolicy | None = None
    df: DfPolicy = "unset"
    udp_csum: bool | None = None  # None: off over IPv4, on over IPv6 (as the kernel)
    udp6_zero_csum_rx: bool = False
    options: tuple[codec.Option, ...] = ()
    reflect_options: bool = False
    mac: str | None = None  # TAP only; None lets the kernel pick a random one
    addresses: tuple[IPInterface, ...] = ()  # put on the device once it is up
    # Integrity option class (geneve_dp/auth) when the tunnel authenticates, else None.
    auth_class: int | None = None
    # Every packet leaves this process no bigger than the underlay MTU: no TCP
    # super-frame or UDP run through the inject device, no UDP GSO send. For a peer
    # that reads the underlay raw (an AF_PACKET reader such as Open vSwitch's
    # userspace datapath), which would otherwise get super-packets whole off a veth.
    wire_sized: bool = False
    # The outer packets' firewall mark (SO_MARK), which routes and matches them: the
    # kernel's geneve gives the outer packet the inner's mark, which a TAP read does not
    # carry, so a tunnel whose inner packets all have one mark (the profile knows) says so.
    mark: int | None = None

    @property
    def family(self) -> int:
        return self.remote.version

    @property
    def dscp(self) -> int:
        """The configured outer TOS without its ECN bits (0 when none, or "inherit")."""
        return self.tos & 0xFC if isinstance(self.tos, int) else 0

    @property
    def tx_udp_csum(self) -> bool:
        """Whether transmitted packets carry a UDP checksum."""
        return self.udp_csum if self.udp_csum is not None else self.family == 6

    @property
    def protocol(self) -> int | None:
        """The protocol type sent; None in TUN mode where it follows the IP version."""
        return wire.Protocol.ETHERNET if self.mode == "tap" else None

    @property
    def overhead(self) -> int:
        """Bytes the underlay carries on top of the device MTU."""
        base = wire.OVERHEAD_IPV4 if self.family == 4 else wire.OVERHEAD_IPV6
        opts = sum(o.wire_len for o in self.options)
        if self.auth_class is not None:
            opts += auth_option.OPT_LEN
        return base + opts + (wire.ETH_HEADER_LEN if self.mode == "tap" else 0)


def parse_address(value: object, field_name: str) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError as exc:
        raise UserError(
            f"{value!r} is not an IPv4 or IPv6 address; accepted: e.g. 10.0.0.2 or fd00::2",
            field_name,
        ) from exc


def whole_number(value: object, field_name: str, lo: int, hi: int) -> int:
    """An integer in lo..hi from an int or a string in decimal or 0x hex."""
    # A float would be cut to an integer without a word (vni = 1.5 is VNI 1): refused.
    if isinstance(value, bool | float):
        raise UserError(f"{value!r} is not a whole number; accepted: {lo}..{hi}", field_name)
    try:
        number = int(value, 0) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError) as exc:
        raise UserError(
            f"{value!r} is not a number; accepted: {lo}..{hi} (decimal or 0x hex)", field_name
        ) from exc
    if not lo <= number <= hi:
        raise UserError(f"{number} is out of range; accepted: {lo}..{hi}", field=field_name)
    return number


def _number_or(value: object, field_name: str, lo: int, hi: int, words: tuple[str, ...]) -> Any:
    """A whole number in lo..hi or one of ``words`` (iproute2's `ttl auto`, `tos inherit`)."""
    if isinstance(value, str) and value in words:
        return value
    accepted = f"{lo}..{hi}, " + ", ".join(words)
    try:
        return whole_number(value, field_name, lo, hi)
    except UserError as exc:
        what = str(exc).split(": ", 1)[1].split("; accepted:")[0]
        raise UserError(f"{what}; accepted: {accepted}", field_name) from None


def _choice(value: object, field_name: str, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise UserError(f"{value!r} is not accepted; accepted: {', '.join(choices)}", field_name)
    return value


def _bool(value: object, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{value!r} is not true or false; accepted: true, false", field=field_name)
    return value


def _list(value: object, field_name: str, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise UserError(f"{value!r} is not a list; accepted: a list of {what}", field_name)
    return value


_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

# What a missing required key accepts, for its error message.
REQUIRED = {
    "name": "a device name, " + NAME_ACCEPTED,
    "vni": f"0..{wire.MAX_VNI} (decimal or 0x hex)",
    "remote": "the peer's IPv4 or IPv6 address",
}

KEYS = (
    "name vni remote local port mode mtu ttl tos df udp_csum udp6_zero_csum_rx "
    "options reflect_options mac addresses wire_sized mark"
).split()


def build_spec(raw: Mapping[str, Any], where: str = "") -> TunnelSpec:
    """A TunnelSpec from loosely typed values (CLI flags or a TOML table).

    ``where`` prefixes field names in errors, e.g. ``tunnel[2].`` for a config file.
    """
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise UserError(f"unknown key; accepted: {', '.join(KEYS)}", field=where + unknown[0])

    def f(key: str) -> str:
        return where + key

    if "name" not in raw or "vni" not in raw or "remote" not in raw:
        missing = next(k for k in ("name", "vni", "remote") if k not in raw)
        raise UserError(f"is required; accepted: {REQUIRED[missing]}", field=f(missing))
    name = check_ifname(raw["name"], f("name"))
    vni = whole_number(raw["vni"], f("vni"), 0, wire.MAX_VNI)
    remote = parse_address(raw["remote"], f("remote"))
    if remote.is_unspecified or remote.is_multicast:
        raise UserError(
            f"{remote} is not a unicast address; accepted: a unicast IPv4 or IPv6 address",
            f("remote"),
        )
    local = parse_address(raw["local"], f("local")) if raw.get("local") is not None else None
    if local is not None and local.version != remote.version:
        raise UserError(
            f"{local} is not of the same family as remote {remote}; accepted: an "
            f"IPv{remote.version} address",
            f("local"),
        )
    mode: Mode = _choice(raw.get("mode", "tap"), f("mode"), MODES)
    mtu = whole_number(raw["mtu"], f("mtu"), 68, 65535) if raw.get("mtu") is not None else None
    options = tuple(
        parse_option(str(o), field=f("options")) if not isinstance(o, codec.Option) else o
        for o in _list(raw.get("options", ()), f("options"), "CLASS:TYPE:HEX strings")
    )
    try:
        codec.encode_options(options)
    except codec.EncodeError as exc:
        raise UserError(str(exc), field=f("options")) from exc
    mac = raw.get("mac")
    if mac is not None:
        if mode != "tap":
            raise UserError(
                "a TUN device has no MAC; accepted: mac only on a TAP device (mode tap)", f("mac")
            )
        if not _MAC.match(str(mac)) or int(str(mac)[:2], 16) & 1:
            raise UserError(
                f"{mac!r} is not a unicast MAC; accepted: e.g. 02:00:00:00:00:01", f("mac")
            )
    addresses = []
    for text in _list(raw.get("addresses", ()), f("addresses"), "address/prefix strings"):
        try:
            addresses.append(ipaddress.ip_interface(str(text)))
        except ValueError as exc:
            raise UserError(
                f"{text!r} is not an address/prefix; accepted: e.g. 192.168.126.1/30",
                f("addresses"),
            ) from exc
    tos = (
        _number_or(raw["tos"], f("tos"), 0, 255, TOS_POLICIES)
        if raw.get("tos") is not None
        else None
    )
    mark = (
        whole_number(raw["mark"], f("mark"), 0, 0xFFFFFFFF) if raw.get("mark") is not None else None
    )
    return TunnelSpec(
        name=name,
        vni=vni,
        remote=remote,
        local=local,
        port=whole_number(raw.get("port", wire.GENEVE_PORT), f("port"), 1, 65535),
        mode=mode,
        mtu=mtu,
        ttl=_number_or(raw.get("ttl", 64), f("ttl"), 1, 255, TTL_POLICIES),
        tos=tos,
        df=_choice(raw.get("df", "unset"), f("df"), DF_POLICIES),
        udp_csum=_bool(raw["udp_csum"], f("udp_csum")) if raw.get("udp_csum") is not None else None,
        udp6_zero_csum_rx=_bool(raw.get("udp6_zero_csum_rx", False), f("udp6_zero_csum_rx")),
        options=options,
        reflect_options=_bool(raw.get("reflect_options", False), f("reflect_options")),
        mac=str(mac).lower() if mac is not None else None,
        addresses=tuple(addresses),
        wire_sized=_bool(raw.get("wire_sized", False), f("wire_sized")),
        mark=mark or None,
    )


def spec_to_raw(spec: TunnelSpec) -> dict[str, Any]:
    """The loosely typed form of ``spec`` (JSON-safe) that build_spec turns back into it:
    what the control socket carries, and what `set` applies its changes to."""
    return {
        "name": spec.name,
        "vni": spec.vni,
        "remote": str(spec.remote),
        "local": str(spec.local) if spec.local is not None else None,
        "port": spec.port,
        "mode": spec.mode,
        "mtu": spec.mtu,
        "ttl": spec.ttl,
        "tos": spec.tos,
        "df": spec.df,
        "udp_csum": spec.udp_csum,
        "udp6_zero_csum_rx": spec.udp6_zero_csum_rx,
        "options": [f"0x{o.opt_class:04x}:0x{o.type:02x}:{o.data.hex()}" for o in spec.options],
        "reflect_options": spec.reflect_options,
        "mac": spec.mac,
        "addresses": [str(a) for a in spec.addresses],
        "wire_sized": spec.wire_sized,
    }


def with_auth(specs: list[TunnelSpec], option_class: int | None) -> list[TunnelSpec]:
    """The specs with the integrity option on (``option_class``; None: as they are),
    if it fits in their option area."""
    if option_class is None:
        return specs
    room = wire.MAX_OPTIONS_LEN - auth_option.OPT_LEN
    for spec in specs:
        if sum(o.wire_len for o in spec.options) > room:
            raise UserError(
                f"{spec.name}: its options leave no room for the {auth_option.OPT_LEN}-byte "
                f"integrity option (at most {room} bytes of options with authentication)",
                "--auth-key-file",
            )
    return [dataclasses.replace(s, auth_class=option_class) for s in specs]


def check_together(specs: list[TunnelSpec]) -> None:
    """Refuse sets of tunnels the kernel would refuse: duplicate names, or two tunnels
    that a receiver could not tell apart (same port, VNI and remote)."""
    if not specs:
        raise UserError("no tunnel given; accepted: one or more [[tunnel]] tables", "tunnel")
    names: set[str] = set()
    keys: dict[tuple[int, int, IPAddress], str] = {}
    for spec in specs:
        if spec.name in names:
            raise UserError(f"{spec.name!r} appears twice; accepted: distinct names", "name")
        names.add(spec.name)
        key = (spec.port, spec.vni, spec.remote)
        if key in keys:
            raise UserError(
                f"{spec.name!r} and {keys[key]!r} have the same port, VNI and remote; accepted: "
                "tunnels that differ in one of them",
                field="vni",
            )
        keys[key] = spec.name
    per_socket = Counter((spec.port, spec.remote.version) for spec in specs)
    limit = max_tunnels_per_port()
    for (port, version), n in per_socket.items():
        if n > limit:
            raise UserError(
                f"{n} IPv{version} tunnels on port {port}; accepted: at most {limit} per port "
                "and family (spread them over ports)",
                "tunnel",
            )


def max_tunnels_per_port() -> int:
    """How many tunnels one receive socket (port and family) serves: the C engine's
    limit, read from the compiled module."""
    from ..fastpath import lib

    return int(lib.GDP_MAX_TUNNELS)


def load_config(
    path: Path, resolver: Callable[[PodRemote], str] | None = None
) -> tuple[list[TunnelSpec], dict[str, Any]]:
    """Tunnels from a TOML file of ``[[tunnel]]`` tables, plus its top-level settings.

    Top-level keys other than ``tunnel`` (``TOP_LEVEL_KEYS``) are returned as is
    for the caller to apply; each tunnel table takes the keys of ``KEYS``. A tunnel
    whose ``remote`` names a ``[remotes.NAME]`` table gets the address ``resolver``
    (default: kube.resolve, the pod on this node) finds for it; the settings then hold
    ``remotes`` as {NAME: (PodRemote, address)} for the caller to follow.
    """
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UserError(
            f"cannot read {path}: {exc.strerror}; accepted: a readable TOML file", "--config"
        ) from exc
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text at byte {exc.start}; accepted: TOML, which is UTF-8",
            "--config",
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML ({exc}); accepted: TOML", "--config") from exc
    tables = data.pop("tunnel", None)
    if not isinstance(tables, list) or not tables:
        raise UserError(
            f"{path} has no [[tunnel]] tables; accepted: one or more [[tunnel]] tables",
            "--config",
        )
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise UserError(
            f"unknown top-level key; accepted: {', '.join(TOP_LEVEL_KEYS)}, [[tunnel]]",
            unknown[0],
        )
    for i, t in enumerate(tables):
        if not isinstance(t, dict):
            raise UserError(f"{t!r} is not a table; accepted: [[tunnel]] tables", f"tunnel[{i}]")
    if "remotes" in data:
        from .. import kube

        remotes = kube.parse_remotes(data["remotes"])
        resolve = resolver or kube.resolve
        found = {name: resolve(remote) for name, remote in remotes.items()}
        for t in tables:
            if isinstance(t.get("remote"), str) and t["remote"] in found:
                t["remote"] = found[t["remote"]]
        data["remotes"] = {name: (remotes[name], ip) for name, ip in found.items()}
    specs = [build_spec(t, where=f"tunnel[{i}].") for i, t in enumerate(tables)]
    check_together(specs)
    return specs, data
