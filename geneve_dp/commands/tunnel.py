"""`geneve-dp up`, `show` and `stats`: tunnel endpoints from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import alarms, logs, wire
from ..auth import settings as auth_settings
from ..dataplane.spec import (
    DEFAULT_NICE,
    ENGINES,
    MAX_BUSY_POLL_US,
    MAX_NICE,
    MAX_WORKERS,
    MIN_BUSY_POLL_US,
    MIN_NICE,
    MIN_WORKERS,
    REQUIRED,
    TunnelSpec,
    build_spec,
    check_together,
    load_config,
)
from ..dataplane.spec import with_auth as spec_with_auth
from ..errors import UserError

UP_DESCRIPTION = """\
Create GENEVE tunnel devices in userspace and forward until SIGINT/SIGTERM (or until
`geneve-dp down` removes the last), then remove them and exit 0. One tunnel from
flags (like `ip link add NAME type geneve id VNI remote IP dstport 6081`), or many
from --config FILE (TOML: optional top-level
`engine`, `netns`, `offload`, `workers`, `nice`, `busy_poll_us`, `metrics_addr` and
`drop_alarm`, then one
[[tunnel]] table per device with the keys name, vni,
remote, local, port, mode, mtu, ttl, tos, df, udp_csum, udp6_zero_csum_rx, options,
reflect_options, mac, addresses, wire_sized; `remote` may name a [remotes.NAME] table
with `namespace` and `selector`: the IP of the newest Ready pod on this node, $NODE_NAME,
of the family of $NODE_IP, asked from the Kubernetes API and followed: when the pod
moves to another IP, `up` stops cleanly to be started again). Tunnels on the same port
share one UDP socket and are told apart by VNI and outer source address. The device is
set up (and given --address) once it exists; a line with "ready" is printed when
forwarding.

One endpoint process serves a network namespace and port: `up` of a tunnel on a port
an endpoint of this namespace already serves adds the tunnel to it (its other tunnels
forward on untouched) and returns; `geneve-dp set NAME` changes one in place, `geneve-dp
down NAME` removes one (the last one ends the process), `--config` of the file the
endpoint was started from applies the file's difference (as SIGHUP does). A device
deleted with `ip link del` while its tunnel is configured is opened again (same name
and MAC: the tunnel's intent wins); `geneve-dp down NAME` is how it goes for good.

Logs go to stderr, one line per event (tunnel up/down, repairs, drop-rate alarms; never
per packet), as text or, with --log-format json, one JSON object per line.
--metrics-addr serves Prometheus /metrics; without a host it listens on 127.0.0.1
only, and a non-loopback address exposes the counters to anyone who can reach it.
"""

# The subcommands register() adds (cli builds only the module a command line names).
COMMANDS = ("up", "show", "stats")


# Accepted values, laid out as `ip link help geneve` does.
UP_WHERE = f"""\
Where: VNI  := 0..{wire.MAX_VNI} (decimal or 0x hex)
       ADDR := an IPv4 or IPv6 address (local and remote of one family)
       PORT := 1..65535
       MODE := {{ tap | tun }}
       MTU  := 68..65535
       TTL  := {{ 1..255 | auto | inherit }}
       TOS  := {{ 0..255 | inherit }}
       DF   := {{ unset | set | inherit }}
       N    := workers {MIN_WORKERS}..{MAX_WORKERS}; nice {MIN_NICE}..{MAX_NICE}
       NAME := 1..15 bytes (UTF-8), no whitespace, '/' or ':'
"""


def register(sub: Any) -> None:
    up = sub.add_parser(
        "up",
        help="add tunnel devices: to the endpoint serving this netns and port, else a new "
        "one that forwards until SIGTERM",
        description=UP_DESCRIPTION,
        epilog=UP_WHERE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("name", nargs="?", help="device name (1-15 characters)")
    up.add_argument("--config", type=Path, metavar="FILE", help="TOML file with [[tunnel]] tables")
    up.add_argument("--vni", metavar="VNI", help="virtual network identifier")
    up.add_argument("--remote", metavar="ADDR", help="peer's underlay address")
    up.add_argument(
        "--local", metavar="ADDR", help="our underlay address (default: the route's source)"
    )
    up.add_argument(
        "--port", metavar="PORT", default=wire.GENEVE_PORT, help="UDP port (default 6081)"
    )
    up.add_argument(
        "--mode", metavar="MODE", default="tap", help="tap: Ethernet, 0x6558 (default); tun: IP"
    )
    up.add_argument(
        "--mtu", metavar="MTU", help="device MTU (default: underlay MTU minus overhead)"
    )
    up.add_argument(
        "--ttl",
        metavar="TTL",
        default=64,
        help="outer TTL (default 64; auto: the route's default hop limit; inherit: the "
        "inner packet's)",
    )
    up.add_argument(
        "--tos",
        metavar="TOS",
        help="outer DSCP/TOS byte (default 0; inherit: the inner packet's); ECN is always "
        "copied from the inner header",
    )
    up.add_argument("--df", metavar="DF", default="unset", help="outer DF bit (default unset)")
    csum = up.add_mutually_exclusive_group()
    csum.add_argument(
        "--udp-csum",
        dest="udp_csum",
        action="store_const",
        const=True,
        help="compute outer UDP checksums (default: off over IPv4, on over IPv6)",
    )
    csum.add_argument(
        "--no-udp-csum", dest="udp_csum", action="store_const", const=False, help="send checksum 0"
    )
    up.add_argument(
        "--udp6-zero-csum-rx",
        action="store_true",
        help="accept zero UDP checksums over an IPv6 underlay (RFC 6935/6936)",
    )
    up.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="CLASS:TYPE:HEX",
        help="TLV option added to every packet sent, e.g. 0x0102:0x01:deadbeef (repeatable)",
    )
    up.add_argument(
        "--reflect-options",
        action="store_true",
        help="return the options seen on a flow on the packets of its reverse direction",
    )
    up.add_argument(
        "--wire-sized",
        action="store_true",
        help="send no packet bigger than the underlay MTU (no super-packets on the underlay), "
        "for a peer that reads the underlay raw, e.g. Open vSwitch's userspace datapath",
    )
    up.add_argument("--mac", help="TAP device MAC address (default: random)")
    up.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="CIDR",
        help="address to put on the device, e.g. 192.168.126.1/30 (repeatable)",
    )
    up.add_argument("--netns", help="create the devices inside this named network namespace")
    up.add_argument(
        "--engine", help="per-packet engine: c (default) or python (slow; a baseline and oracle)"
    )
    offload = up.add_mutually_exclusive_group()
    offload.add_argument(
        "--offload",
        dest="offload",
        action="store_const",
        const=True,
        help="TAP/TUN offloads (IFF_VNET_HDR, TSO super-frames segmented in C, UDP GSO/GRO)",
    )
    offload.add_argument(
        "--no-offload", dest="offload", action="store_const", const=False, help="no offloads"
    )
    up.add_argument(
        "--workers",
        metavar="N",
        help="forwarding workers, each a queue of every device and a receive socket "
        "(C engine; default: one per two cores, or GDP_WORKERS)",
    )
    up.add_argument(
        "--nice",
        metavar="N",
        help=f"scheduling priority of the workers, {MIN_NICE}..{MAX_NICE} (default "
        f"{DEFAULT_NICE}: ahead of the programs whose packets they carry, as the kernel's "
        "softirq forwarding is; 0 leaves it alone)",
    )
    up.add_argument(
        "--busy-poll",
        metavar="US",
        help=f"after forwarding a packet, keep polling for its answer this many µs "
        f"({MIN_BUSY_POLL_US}..{MAX_BUSY_POLL_US}; default 0: off): lower latency for "
        "request/response traffic, paid in CPU after each packet (C engine)",
    )
    up.add_argument(
        "--detach", action="store_true", help="go to the background once ready (print the pid)"
    )
    up.add_argument("--pidfile", type=Path, metavar="FILE", help="write the pid here while running")
    up.add_argument(
        "--metrics-addr",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (host default 127.0.0.1; "
        "IPv6 as [ADDR]:PORT)",
    )
    up.add_argument(
        "--drop-alarm",
        metavar="N",
        help=f"log a warning when a tunnel drops N packets/s or more (default "
        f"{alarms.DEFAULT_THRESHOLD:g}; 0: never)",
    )
    auth_settings.add_arguments(up)
    logs.add_argument(up)
    up.add_argument("-v", "--verbose", action="store_true", help="log more")
    up.set_defaults(func=cmd_up)

    for name, helptext in (
        ("show", "show running tunnels: device, VNI, remote, port, mode, MTU"),
        ("stats", "show counters of running tunnels: packets, bytes, drops by reason"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext.capitalize() + ".")
        p.add_argument("name", nargs="?", help="only this device")
        p.add_argument("--json", action="store_true", help="print JSON")
        where = p.add_mutually_exclusive_group()
        where.add_argument(
            "--netns", help="tunnels in this named network namespace (default: this one)"
        )
        where.add_argument("--all", action="store_true", help="tunnels in every network namespace")
        where.add_argument(
            "--pid", type=int, help="tunnels of the dataplane process with this pid, anywhere"
        )
        p.set_defaults(func=cmd_show if name == "show" else cmd_stats)
        if name == "stats":
            p.description = STATS_DESCRIPTION
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            p.add_argument(
                "--watch",
                action="store_true",
                help="rates per device (pps, bit/s, drops/s), refreshed every --interval",
            )
            p.add_argument(
                "--interval", default="1", help="seconds between refreshes, 0.1..3600 (default 1)"
            )
            p.add_argument(
                "--count", default="0", help="stop after N refreshes (default 0: until Ctrl-C)"
            )


_FLAG_FIELDS = {
    "vni": "--vni",
    "remote": "--remote",
    "local": "--local",
    "port": "--port",
    "mode": "--mode",
    "mtu": "--mtu",
    "ttl": "--ttl",
    "tos": "--tos",
    "df": "--df",
    "options": "--option",
    "mac": "--mac",
    "addresses": "--address",
    "name": "NAME",
}


def specs_from_args(args: argparse.Namespace) -> tuple[list[TunnelSpec], dict[str, Any]]:
    """The tunnels and top-level settings that `up` was asked for."""
    if args.config is not None:
        if args.name or args.vni is not None or args.remote is not None:
            raise UserError(
                "is given with NAME --vni --remote; accepted: one of the two", "--config"
            )
        return load_config(args.config)
    if not args.name:
        raise UserError("is missing; accepted: a device NAME, or --config FILE", "NAME")
    for flag in ("vni", "remote"):
        if getattr(args, flag) is None:
            raise UserError(f"is required; accepted: {REQUIRED[flag]}", f"--{flag}")
    raw: dict[str, Any] = {
        "name": args.name,
        "vni": args.vni,
        "remote": args.remote,
        "local": args.local,
        "port": args.port,
        "mode": args.mode,
        "mtu": args.mtu,
        "ttl": args.ttl,
        "tos": args.tos,
        "df": args.df,
        "udp_csum": args.udp_csum,
        "udp6_zero_csum_rx": args.udp6_zero_csum_rx,
        "options": args.option,
        "reflect_options": args.reflect_options,
        "mac": args.mac,
        "addresses": args.address,
        "wire_sized": args.wire_sized,
    }
    try:
        spec = build_spec(raw)
    except UserError as exc:
        # Name the command-line flag rather than the config key.
        if exc.field in _FLAG_FIELDS:
            raise UserError(str(exc).split(": ", 1)[1], _FLAG_FIELDS[exc.field]) from None
        raise
    return [spec], {}


def _int_setting(
    flag: str | None, configured: object, key: str, lo: int, hi: int, flag_name: str = ""
) -> int | None:
    """A whole-number setting from --KEY (``flag_name`` if it is named otherwise; a
    string) or the config key, in lo..hi."""
    field = (flag_name or f"--{key}") if flag is not None else key
    value: object = configured
    if flag is not None:
        try:
            value = int(flag)
        except ValueError:
            raise UserError(
                f"{flag!r} is not a whole number; accepted: {lo}..{hi}", field
            ) from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{value!r} is not a whole number; accepted: {lo}..{hi}", field)
    if not lo <= value <= hi:
        raise UserError(f"{value} is out of range; accepted: {lo}..{hi}", field)
    return value


@dataclass
class UpPlan:
    """What `up` was asked for, every input checked, nothing changed yet."""

    specs: list[TunnelSpec]
    settings: dict[str, Any]
    engine: str
    netns: str | None
    netns_field: str
    offload: bool | None
    daemon_args: dict[str, Any]
    log_format: str


def plan_up(args: argparse.Namespace) -> UpPlan:
    """Check everything `up` takes (flags, the config file, the environment) before
    anything is created: a bad input is a one-line UserError from here."""
    from ..netns import named_path

    specs, settings = specs_from_args(args)
    check_together(specs)
    engine = args.engine or settings.get("engine", "c")
    if engine not in ENGINES:
        raise UserError(f"{engine!r} is not an engine; accepted: {', '.join(ENGINES)}", "--engine")
    netns = args.netns or settings.get("netns")
    netns_field = "--netns" if args.netns else "netns"
    if netns is not None:
        if not isinstance(netns, str):
            raise UserError(f"{netns!r} is not a string; accepted: a name", netns_field)
        named_path(netns, netns_field)
    offload = args.offload if args.offload is not None else settings.get("offload")
    if offload is not None and not isinstance(offload, bool):
        raise UserError(f"{offload!r} is not a boolean; accepted: true, false", "offload")
    daemon_args = _daemon_args(args, settings, engine, offload)
    auth = auth_settings.resolve(args.auth_key_file, args.auth_option_class, settings)
    if auth is not None:
        spec_with_auth(specs, auth.option_class)  # checked now, applied by the dataplane
        daemon_args["auth"] = auth
    fmt = logs.resolve(args.log_format)
    return UpPlan(specs, settings, engine, netns, netns_field, offload, daemon_args, fmt)


def cmd_up(args: argparse.Namespace) -> int:
    plan = plan_up(args)
    specs, settings, offload, daemon_args = (
        plan.specs,
        plan.settings,
        plan.offload,
        plan.daemon_args,
    )
    if os.geteuid() != 0:
        raise UserError("is run without root; accepted: root (CAP_NET_ADMIN)", "up")
    from ..control import prepare_run_dir

    prepare_run_dir()  # an untrusted run directory is refused before anything exists
    logs.setup(plan.log_format, args.verbose)
    if plan.netns:
        from ..netns import enter_netns

        enter_netns(plan.netns, plan.netns_field)
    from . import live

    explicit = {k for k in daemon_args if k not in ("engine", "offload")}
    if args.engine or "engine" in settings:
        explicit.add("engine")
    if offload is not None:
        explicit.add("offload")
    lock = live.lock_run_dir()
    try:
        rc = live.join(specs, daemon_args, explicit, args.config, args.pidfile)
    except BaseException:
        live.unlock(lock)
        raise
    if rc is not None:
        live.unlock(lock)
        return rc
    # None runs here for these ports: start one, holding the lock until it is ready.
    daemon_args["config"] = args.config
    remotes = settings.get("remotes")
    if args.detach:
        return _up_detached(specs, daemon_args, args.pidfile, remotes, lock)

    def announce(message: str) -> None:
        print(f"geneve-dp: {message}", flush=True)
        live.unlock(lock)

    try:
        return _run_daemon(specs, daemon_args, args.pidfile, announce, remotes)
    finally:
        live.unlock(lock)


def _daemon_args(
    args: argparse.Namespace, settings: dict[str, Any], engine: str, offload: bool | None
) -> dict[str, Any]:
    """The Daemon's keyword arguments from the flags, else the config's top level."""
    from ..metrics import parse_addr

    out: dict[str, Any] = {"engine": engine, "offload": offload}
    if args.metrics_addr is not None:
        out["metrics_addr"] = parse_addr(args.metrics_addr, "--metrics-addr")
    elif settings.get("metrics_addr") is not None:
        out["metrics_addr"] = parse_addr(str(settings["metrics_addr"]), "metrics_addr")
    field, raw = ("--drop-alarm", args.drop_alarm)
    if raw is None:
        field, raw = ("drop_alarm", settings.get("drop_alarm"))
    if raw is not None:
        try:
            threshold = float(raw)
        except (TypeError, ValueError):
            threshold = -1.0
        if isinstance(raw, bool) or not 0 <= threshold <= 1e9:
            raise UserError(f"{raw!r} is not a number; accepted: drops/s in 0..1e9 (0: off)", field)
        out["drop_alarm"] = threshold
    workers = _int_setting(
        args.workers, settings.get("workers"), "workers", MIN_WORKERS, MAX_WORKERS
    )
    if workers is not None:
        out["workers"] = workers
    nice = _int_setting(args.nice, settings.get("nice"), "nice", MIN_NICE, MAX_NICE)
    if nice is not None:
        out["nice"] = nice
    busy = _int_setting(
        args.busy_poll, settings.get("busy_poll_us"), "busy_poll_us", MIN_BUSY_POLL_US,
        MAX_BUSY_POLL_US, "--busy-poll",
    )  # fmt: skip
    if busy is not None:
        out["busy_poll_us"] = busy
    return out


def _run_daemon(
    specs: list[TunnelSpec],
    daemon_args: dict[str, Any],
    pidfile: Path | None,
    on_ready: Any,
    remotes: dict[str, Any] | None = None,
) -> int:
    import uvloop

    from ..daemon import Daemon

    if remotes:
        from .. import kube

        # A remote found in Kubernetes moves with its pod: stop cleanly when it does,
        # and the kubelet starts this container again with the new address.
        kube.follow(
            {n: ip for n, (_r, ip) in remotes.items()}, {n: r for n, (r, _) in remotes.items()}
        )

    daemon = Daemon(specs, pidfile=pidfile, **daemon_args)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(daemon.run(on_ready))


def _up_detached(
    specs: list[TunnelSpec],
    daemon_args: dict[str, Any],
    pidfile: Path | None,
    remotes: dict[str, Any] | None = None,
    lock: int = -1,
) -> int:
    """Fork; the child runs the daemon and reports readiness (or the error) through a
    pipe, so the parent exits 0 only once the devices exist, or 2 with the message.
    The parent holds ``lock`` (live.lock_run_dir) until then."""
    from ..control import open_log, prepare_run_dir

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            report = pipe.read()
        if lock >= 0:
            os.close(lock)
        if report.startswith("ready"):
            print(f"geneve-dp: {report.strip()}", flush=True)
            return 0
        message = report.strip() or "the dataplane exited before it was ready"
        print(f"geneve-dp up: error: {message}", file=sys.stderr)
        return 2
    # Child: a session of its own, stdio to a log file, report through the pipe.
    os.close(read_fd)
    if lock >= 0:
        os.close(lock)  # the parent's to release
    os.setsid()
    rc = 1
    log_path: Path | None = None
    try:
        directory = prepare_run_dir()
        _sweep_empty_logs(directory)
        log_fd = open_log(os.getpid())
        log_path = directory / f"gdp-{os.getpid()}.log"
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)

        def ready(message: str) -> None:
            os.write(write_fd, message.encode())
            os.close(write_fd)

        rc = _run_daemon(specs, daemon_args, pidfile, ready, remotes)
    except UserError as exc:
        try:
            os.write(write_fd, str(exc).encode())
        except OSError:
            pass
        rc = 2
    except BaseException as exc:  # the parent must hear about any failure
        try:
            os.write(write_fd, f"{type(exc).__name__}: {exc}".encode())
        except OSError:
            pass
    finally:
        # A clean stop leaves nothing to diagnose, and an empty log nothing to read (a
        # failure before "ready" went to the parent): only a crash's words are kept.
        if log_path is not None and (rc == 0 or _is_empty(log_path)):
            log_path.unlink(missing_ok=True)
        os._exit(rc)


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _sweep_empty_logs(directory: Path) -> None:
    """Remove the empty logs of detached daemons that are gone (killed with SIGKILL, so
    they could not clean up): an empty file has nothing to diagnose."""
    for path in directory.glob("gdp-*.log"):
        pid = path.stem.removeprefix("gdp-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and _is_empty(path):
            path.unlink(missing_ok=True)


def tunnels_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The running tunnels the command asks about: like `ip link`, those of the current
    network namespace unless --netns, --all or --pid say otherwise."""
    from ..control import query_all
    from ..netns import netns_inode, netns_names

    name: str | None = args.name
    rows = []
    replies = query_all()
    if args.pid is not None:
        replies = [r for r in replies if r.get("pid") == args.pid]
        if not replies:
            raise UserError(
                f"{args.pid} is not running a dataplane; accepted: a pid from `geneve-dp show "
                "--all --json`",
                "--pid",
            )
    elif not args.all:
        wanted = netns_inode(args.netns)
        replies = [r for r in replies if r.get("netns_id") == wanted]
    names = netns_names()
    for reply in replies:
        ino = reply.get("netns_id")
        netns = names.get(ino, f"net:[{ino}]") if isinstance(ino, int) else "?"
        for tunnel in reply.get("tunnels", []):
            rows.append(
                {"pid": reply.get("pid"), "engine": reply.get("engine"), "netns": netns, **tunnel}
            )
    if name is not None:
        rows = [t for t in rows if t.get("name") == name]
        if not rows:
            raise UserError(
                f"{name!r} is not a running tunnel here; accepted: a device `geneve-dp show` lists",
                "NAME",
            )
    return rows


def cmd_show(args: argparse.Namespace) -> int:
    rows = tunnels_of(args)
    if args.json:
        print(json.dumps([{k: v for k, v in t.items() if k != "counters"} for t in rows], indent=2))
        return 0
    if not rows:
        print("no tunnels running")
        return 0
    ns_col = bool(args.all)
    head = f"{'netns':<20} " if ns_col else ""
    print(
        f"{head}{'device':<15} {'vni':>8} {'remote':<26} {'port':>5} {'mode':<4} {'mtu':>5} "
        f"{'engine':<6} {'tx via':<8} pid"
    )
    for t in rows:
        ns = f"{t.get('netns', '')!s:<20} " if ns_col else ""
        print(
            f"{ns}{t['name']:<15} {t['vni']:>8} {t['remote']!s:<26} {t['port']:>5} "
            f"{t['mode']:<4} {t['mtu']!s:>5} {t.get('engine', '')!s:<6} {_via(t):<8} {t['pid']}"
        )
    print("\ntransmit paths:")
    for t in rows:
        path = t.get("tx_path") or {}
        where = f"{t.get('netns')}/" if ns_col else ""
        line = f"{where}{t['name']}: {_via(t)}: {path.get('why', 'unknown')}"
        print(
            textwrap.fill(
                line, 88, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False
            )
        )
    injects = sorted({str(t["inject_device"]) for t in rows if t.get("inject_device")})
    for dev in injects:
        print()
        print(
            textwrap.fill(
                f"{dev} (in `ip link`) is the endpoint's inject device, not a tunnel: a TAP "
                "with no address to which the tunnels marked with it write whole TCP "
                "super-frames and UDP runs behind their outer headers; the kernel forwards "
                "them to the underlay, cutting them into segments only where a device "
                "must. It goes when the endpoint process ends.",
                88,
                break_on_hyphens=False,
            )
        )
    return 0


def _via(t: dict[str, Any]) -> str:
    """The transmit path column: the inject device's name, or "sockets"."""
    path = t.get("tx_path") or {}
    if path.get("via") == "inject":
        return str(path.get("device") or "inject")
    return "sockets"


STATS_DESCRIPTION = """\
Show counters of running tunnels: packets, bytes, drops by reason (--json: the same as
JSON). With --watch, rates instead: packets/s, bit/s and drops/s per device over each
--interval, redrawn in place on a terminal and printed one table per interval into a
pipe; --watch --json prints one JSON object per interval and line. Ctrl-C ends it.
"""


def _number(value: str, field: str, low: float, high: float) -> float:
    try:
        n = float(value)
    except ValueError:
        n = float("nan")
    if not low <= n <= high:
        raise UserError(f"{value!r} is not a number in range; accepted: {low:g}..{high:g}", field)
    return n


def cmd_stats(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(args)
    rows = tunnels_of(args)
    if args.json:
        if args.all:
            # Device names repeat across namespaces: keyed by namespace, then device.
            nested: dict[str, dict[str, Any]] = {}
            for t in rows:
                nested.setdefault(str(t["netns"]), {})[t["name"]] = t["counters"]
            print(json.dumps(nested, indent=2))
        else:
            print(json.dumps({t["name"]: t["counters"] for t in rows}, indent=2))
        return 0
    if not rows:
        print("no tunnels running")
        return 0
    for t in rows:
        c = t["counters"]
        print(
            f"{t['name']}: rx {c['rx_packets']} pkts {c['rx_bytes']} bytes, "
            f"tx {c['tx_packets']} pkts {c['tx_bytes']} bytes, control {c.get('control', 0)}"
        )
        drops = {k: v for k, v in c.get("drops", {}).items() if v}
        print("  drops: " + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"))
        seen = c.get("options_seen", {})
        if seen:
            print("  options seen: " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
    # Drops no tunnel can be named for (unknown VNI, wrong peer, bad header) are the
    # receive socket's: once per process and port.
    done: set[tuple[Any, Any, Any]] = set()
    for t in rows:
        sock = t.get("socket") or {}
        key = (t.get("pid"), sock.get("family"), sock.get("port"))
        if not sock or key in done:
            continue
        done.add(key)
        drops = {k: v for k, v in sock.get("drops", {}).items() if v}
        where = f"IPv{sock['family']} port {sock['port']}"
        if args.all:
            where += f" in {t.get('netns')}"
        print(
            f"socket {where} (pid {t.get('pid')}): rx {sock.get('rx_packets', 0)} pkts, "
            f"queue overflow {sock.get('rx_queue_overflow', 0)}"
        )
        print("  drops: " + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"))
    return 0


def _watch(args: argparse.Namespace) -> int:
    from .. import statsview

    interval = _number(args.interval, "--interval", 0.1, 3600)
    count = _number(args.count, "--count", 0, 1e9)
    if count != int(count):
        raise UserError(f"{args.count!r} is not a whole number; accepted: 0..1e9", "--count")
    tunnels_of(args)  # a wrong NAME, --pid or --netns is an error now, not an empty view

    def fetch() -> list[dict[str, Any]]:
        try:
            return tunnels_of(args)
        except UserError:  # the tunnel went away while watching: show it gone
            return []

    return statsview.run(fetch, interval, int(count), args.json)
