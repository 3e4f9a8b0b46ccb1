"""`geneve-dp down` and `set`, and how `up` joins the endpoint already running.

One endpoint process serves a network namespace and port: `up` of a tunnel on a port
that an endpoint of the namespace serves hands the tunnel to that process over its
control socket (and returns, as `ip link add` does), `down` removes tunnels from it
(the last one ends it), and `set` changes one in place.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any

from ..dataplane.spec import TunnelSpec, spec_to_raw
from ..errors import UserError
from ..live import FIXED

COMMANDS = ("down", "set")
LOCK_WAIT = 30.0  # seconds an `up` waits for another one starting an endpoint
END_WAIT = 10.0  # seconds `down` waits for an endpoint whose last tunnel went to end

DOWN_DESCRIPTION = """\
Remove tunnels from the endpoint running them, as `ip link del` does: the device goes,
its final counters are printed, and the other tunnels forward on untouched. The last
tunnel's removal ends the endpoint process (its control socket, and the port, are
free when this returns). --all removes every tunnel of the network namespace.
"""

_CANNOT = "\n".join(f"  {k}: {v}" for k, v in FIXED.items() if k != "name")
SET_DESCRIPTION = f"""\
Change a running tunnel in place, as `ip link set NAME type geneve ...` does: the
device, its addresses' neighbours and the other tunnels are untouched. Given flags
change; the rest stays. --option and --address replace the whole list (--no-options,
--no-addresses empty it). What cannot change (`geneve-dp down NAME`, then `up`):
{_CANNOT}
"""

# The set flags, by spec key (flags that take a value; the switches are below).
_SET_VALUES = {
    "vni": ("--vni", "virtual network identifier, 0..16777215"),
    "remote": ("--remote", "peer's underlay address (same family)"),
    "local": ("--local", "our underlay address"),
    "mtu": ("--mtu", "device MTU"),
    "ttl": ("--ttl", "outer TTL: 1..255, auto or inherit"),
    "tos": ("--tos", "outer TOS byte: 0..255 or inherit"),
    "df": ("--df", "outer DF bit: unset, set, inherit"),
    "mode": ("--mode", "refused: a new device"),
    "port": ("--port", "refused: the endpoint's socket"),
    "mac": ("--mac", "refused: the device's for its life"),
}


def register(sub: Any) -> None:
    down = sub.add_parser(
        "down",
        help="remove a running tunnel (the last one ends its endpoint)",
        description=DOWN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    down.add_argument("name", nargs="?", help="the tunnel's device name")
    down.add_argument("--all", action="store_true", help="every tunnel of the network namespace")
    down.add_argument("--netns", help="in this named network namespace (default: this one)")
    down.set_defaults(func=cmd_down)

    st = sub.add_parser(
        "set",
        help="change a running tunnel in place (remote, TTL, TOS, DF, options, ...)",
        description=SET_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    st.add_argument("name", help="the tunnel's device name")
    st.add_argument("--netns", help="in this named network namespace (default: this one)")
    for key, (flag, text) in _SET_VALUES.items():
        st.add_argument(flag, dest=key, help=text)
    st.add_argument(
        "--option", action="append", dest="options", metavar="CLASS:TYPE:HEX", help="TLV option"
    )
    st.add_argument("--no-options", action="store_true", help="send no options")
    st.add_argument("--address", action="append", dest="addresses", metavar="CIDR")
    st.add_argument("--no-addresses", action="store_true", help="take every address off")
    for key, on, off in (
        ("udp_csum", "--udp-csum", "--no-udp-csum"),
        ("reflect_options", "--reflect-options", "--no-reflect-options"),
        ("wire_sized", "--wire-sized", "--no-wire-sized"),
    ):
        group = st.add_mutually_exclusive_group()
        group.add_argument(on, dest=key, action="store_const", const=True)
        group.add_argument(off, dest=key, action="store_const", const=False)
    st.add_argument(
        "--udp6-zero-csum-rx", action="store_const", const=True, help="refused: the socket's"
    )
    st.set_defaults(func=cmd_set)


# -- finding the endpoints ----------------------------------------------------------------


def endpoints_here(netns: str | None = None) -> list[dict[str, Any]]:
    """Status of every endpoint process in the network namespace (this one, or the
    one `ip netns` names ``netns``)."""
    from ..control import query_all
    from ..netns import netns_inode

    here = netns_inode(netns)
    return [r for r in query_all() if r.get("netns_id") == here]


def _owner(replies: list[dict[str, Any]], name: str, netns: str | None) -> dict[str, Any]:
    for reply in replies:
        if any(t.get("name") == name for t in reply.get("tunnels", [])):
            return reply
    where = f"network namespace {netns!r}" if netns else "this network namespace"
    raise UserError(f"no geneve-dp tunnel named {name!r} runs in {where}", "NAME")


def _sock(reply: dict[str, Any]) -> Path:
    from ..control import socket_path

    return socket_path(int(reply["pid"]))


def _flag_error(exc: UserError) -> UserError:
    """The daemon names spec keys; the command line's flags are what the user typed."""
    from .tunnel import _FLAG_FIELDS

    if exc.field in _FLAG_FIELDS or exc.field in _SET_VALUES:
        flag = _FLAG_FIELDS.get(str(exc.field)) or _SET_VALUES[str(exc.field)][0]
        return UserError(str(exc).split(": ", 1)[1], flag)
    return exc


# -- up: join, or hold the lock while starting ---------------------------------------------


def lock_run_dir() -> int:
    """An exclusive lock on the run directory (flock), held by an `up` from looking
    for an endpoint to join until the one it starts is ready, so two `up`s at once
    do not both start one. Returns the fd to close."""
    from ..control import prepare_run_dir

    directory = prepare_run_dir()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise UserError(
                    f"another `geneve-dp up` has been starting an endpoint for {LOCK_WAIT:.0f}s",
                    "up",
                ) from None
            time.sleep(0.05)


def unlock(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


# Process-wide settings of `up`: the running endpoint's value must match a given one.
_SETTINGS = (
    ("engine", "--engine"),
    ("offload", "--offload/--no-offload"),
    ("workers", "--workers"),
    ("nice", "--nice"),
    ("busy_poll_us", "--busy-poll"),
    ("metrics_addr", "--metrics-addr"),
    ("drop_alarm", "--drop-alarm"),
)


def _check_settings(reply: dict[str, Any], daemon_args: dict[str, Any], explicit: set[str]) -> None:
    auth = daemon_args.get("auth")  # auth.settings.AuthSettings: given, so it must match
    if auth is not None and (
        reply.get("auth_key_file") != str(auth.key_file)
        or reply.get("auth_option_class") != auth.option_class
    ):
        raise UserError(
            f"the endpoint that serves this port here (pid {reply.get('pid')}) runs with "
            f"auth key file {reply.get('auth_key_file')} and option class "
            f"{reply.get('auth_option_class')}, and a tunnel added to it runs with its "
            "settings: leave the flag out, use another --port, or `geneve-dp down --all` first",
            "--auth-key-file",
        )
    for key, flag in _SETTINGS:
        if key not in explicit or daemon_args.get(key) is None:
            continue
        want = daemon_args[key]
        have = reply.get(key)
        if isinstance(want, tuple):
            want = list(want)
        if want != have:
            raise UserError(
                f"the endpoint that serves this port here (pid {reply.get('pid')}) runs with "
                f"{key} {have}, and a tunnel added to it runs with its settings: leave the "
                "flag out, use another --port, or `geneve-dp down --all` first",
                flag,
            )


def join(
    specs: list[TunnelSpec],
    daemon_args: dict[str, Any],
    explicit: set[str],
    config: Path | None,
    pidfile: Path | None,
) -> int | None:
    """Hand ``specs`` to the endpoint of this netns that serves their port, if one
    runs: an exit code. None when none runs (the caller starts one)."""
    from ..control import request

    replies = endpoints_here()
    if config is not None:
        same = [r for r in replies if r.get("config") == str(config.resolve())]
        if same:
            reply = request(
                _sock(same[0]), {"cmd": "reload", "tunnels": [spec_to_raw(s) for s in specs]}
            )
            pid = reply.get("pid")
            print(
                f"geneve-dp: reloaded {config} into the endpoint (pid {pid}): added "
                f"{', '.join(reply['added']) or 'none'}; removed "
                f"{', '.join(reply['removed']) or 'none'}; changed "
                f"{', '.join(reply['changed']) or 'none'}",
                flush=True,
            )
            return 0
    ports = {s.port for s in specs}
    owners = [r for r in replies if ports & {t.get("port") for t in r.get("tunnels", [])}]
    if not owners:
        return None
    if len(owners) > 1:
        pids = ", ".join(str(r.get("pid")) for r in owners)
        raise UserError(
            f"these tunnels' ports are served by more than one endpoint here (pids {pids}); "
            "add them one endpoint at a time",
            "port",
        )
    owner = owners[0]
    _check_settings(owner, daemon_args, explicit)
    if pidfile is not None:
        raise UserError(
            f"the endpoint that serves this port here runs already (pid {owner.get('pid')}) "
            "and takes the tunnel; --pidfile names a process `up` starts",
            "--pidfile",
        )
    try:
        reply = request(_sock(owner), {"cmd": "add", "tunnels": [spec_to_raw(s) for s in specs]})
    except UserError as exc:
        raise _flag_error(exc) from None
    for row in reply.get("added", []):
        print(
            f"geneve-dp: {row['name']} added to the endpoint on port {row['port']} "
            f"(pid {reply.get('pid')}, VNI {row['vni']} to {row['remote']}, {row['mode']}, "
            f"MTU {row['mtu']}); `geneve-dp down {row['name']}` removes it",
            flush=True,
        )
    return 0


# -- down ----------------------------------------------------------------------------------


def _counters_line(name: str, c: dict[str, Any]) -> str:
    drops = sum(int(v) for v in c.get("drops", {}).values())
    return (
        f"geneve-dp: {name} removed: rx {c.get('rx_packets', 0)} packets "
        f"{c.get('rx_bytes', 0)} bytes, tx {c.get('tx_packets', 0)} packets "
        f"{c.get('tx_bytes', 0)} bytes, drops {drops}"
    )


def _ended(pid: int, sock: Path) -> bool:
    """The process is gone (or a zombie) and its control socket removed."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = "gone"
    return state in ("gone", "Z", "X") and not sock.exists()


def cmd_down(args: argparse.Namespace) -> int:
    from ..control import request

    if args.all == bool(args.name):
        raise UserError("give a tunnel NAME or --all", "NAME")
    replies = endpoints_here(args.netns)
    todo: list[tuple[dict[str, Any], list[str]]] = []
    if args.all:
        todo = [(r, [str(t["name"]) for t in r.get("tunnels", [])]) for r in replies]
        todo = [(r, names) for r, names in todo if names]
        if not todo:
            print("geneve-dp: no tunnels running here")
            return 0
    else:
        todo = [(_owner(replies, args.name, args.netns), [args.name])]
    for reply, names in todo:
        sock = _sock(reply)
        answer = request(sock, {"cmd": "down", "names": names})
        for name in names:
            print(_counters_line(name, answer.get("removed", {}).get(name, {})), flush=True)
        if answer.get("exiting"):
            pid = int(reply["pid"])
            deadline = time.monotonic() + END_WAIT
            while not _ended(pid, sock):
                if time.monotonic() > deadline:
                    raise UserError(
                        f"endpoint pid {pid} did not end within {END_WAIT:.0f}s", "down"
                    )
                time.sleep(0.05)
            print(f"geneve-dp: endpoint pid {pid} ended (its last tunnel was removed)", flush=True)
    return 0


# -- set -----------------------------------------------------------------------------------


def cmd_set(args: argparse.Namespace) -> int:
    from ..control import request

    changes: dict[str, Any] = {}
    for key in (*_SET_VALUES, "udp_csum", "reflect_options", "wire_sized", "udp6_zero_csum_rx"):
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = value
    if args.no_options and args.options:
        raise UserError("give --option or --no-options, not both", "--no-options")
    if args.no_addresses and args.addresses:
        raise UserError("give --address or --no-addresses, not both", "--no-addresses")
    if args.options or args.no_options:
        changes["options"] = args.options or []
    if args.addresses or args.no_addresses:
        changes["addresses"] = args.addresses or []
    if not changes:
        raise UserError(
            "nothing to change; give --remote, --ttl, --tos, --df, --option, ... (see --help)",
            "set",
        )
    for key in changes:
        if key in FIXED:
            flag = _SET_VALUES.get(key, ("--udp6-zero-csum-rx", ""))[0]
            raise UserError(
                f"cannot be changed on a running tunnel ({FIXED[key]}); "
                f"`geneve-dp down {args.name}` and `up` it again",
                flag,
            )
    owner = _owner(endpoints_here(args.netns), args.name, args.netns)
    try:
        reply = request(_sock(owner), {"cmd": "set", "name": args.name, "changes": changes})
    except UserError as exc:
        raise _flag_error(exc) from None
    row = reply.get("changed", {})
    what = ", ".join(
        f"{k} {' '.join(map(str, v)) or 'none'}" if isinstance(v, list) else f"{k} {v}"
        for k, v in changes.items()
    )
    print(
        f"geneve-dp: {args.name} changed ({what}): VNI {row.get('vni')} to {row.get('remote')}, "
        f"MTU {row.get('mtu')}",
        flush=True,
    )
    return 0
