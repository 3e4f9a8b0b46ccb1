"""`geneve-dp capture NAME -w FILE`: a running tunnel's traffic into a pcap file."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import UserError

FLUSH_S = 0.1

DESCRIPTION = """\
Write what the tunnel endpoint NAME sends and receives to a classic pcap file that
tshark, tcpdump and Wireshark read: the inner frames on the tunnel device (--inner,
the default: Ethernet for TAP, raw IP for TUN), or the outer GENEVE/UDP packets on
the underlay interface (--outer: only this tunnel's, by port, VNI and peer, filtered
in the kernel). Stops after --count frames, after --duration seconds, or on
Ctrl-C/SIGTERM, whichever comes first; while it runs the file holds whole frames up
to 0.1 s behind, so it can be read before the capture ends. Nothing
is opened on the dataplane's side: when no capture runs, capturing costs nothing.
Needs root (CAP_NET_RAW).
"""

# The subcommands register() adds (cli builds only the module a command line names).
COMMANDS = ("capture",)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "capture",
        help="write a running tunnel's inner or outer frames to a pcap file",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="the tunnel device (see `geneve-dp show`)")
    p.add_argument(
        "-w", "--write", metavar="FILE", required=True, help="pcap file to write ('-': stdout)"
    )
    side = p.add_mutually_exclusive_group()
    side.add_argument(
        "--inner", dest="outer", action="store_false", help="frames on the tunnel device (default)"
    )
    side.add_argument(
        "--outer", dest="outer", action="store_true", help="GENEVE/UDP packets on the underlay"
    )
    p.add_argument("-c", "--count", default="0", help="stop after N frames (default 0: no limit)")
    p.add_argument(
        "--duration", default="0", help="stop after SECONDS (default 0: no limit; Ctrl-C stops)"
    )
    p.add_argument(
        "--interface",
        metavar="DEV",
        help="with --outer, listen on DEV instead of the interface of the route to the peer",
    )
    p.add_argument("--netns", help="the tunnel runs in this named network namespace")
    p.set_defaults(func=cmd_capture, outer=False)


def _bound(value: str, field: str, whole: bool) -> float:
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if not 0 <= n <= 1e9 or (whole and n != int(n)):
        kind = "a whole number" if whole else "a number of seconds"
        raise UserError(f"{value!r} is not {kind}; accepted: 0..1e9 (0: no limit)", field)
    return n


def cmd_capture(args: argparse.Namespace) -> int:
    from .. import capture, pcap
    from ..netns import enter_netns
    from .tunnel import tunnels_of

    count = int(_bound(args.count, "--count", whole=True))
    duration = _bound(args.duration, "--duration", whole=False)
    if args.interface and not args.outer:
        raise UserError(
            "is given without --outer; accepted: with --outer (the inner side is the device)",
            "--interface",
        )
    query = argparse.Namespace(name=args.name, netns=args.netns, all=False, pid=None)
    tunnel = tunnels_of(query)[0]
    if args.netns:
        enter_netns(args.netns)  # the devices are reachable from inside only
    target = (
        capture.outer_target(tunnel, args.interface) if args.outer else capture.inner_target(tunnel)
    )
    stop = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    to_stdout = args.write == "-"
    sock = capture.open_socket(target)  # before the file: a refusal leaves no empty file
    with ExitStack() as stack:
        stack.callback(sock.close)
        out: BinaryIO
        if to_stdout:
            out = sys.stdout.buffer
        else:
            try:
                out = stack.enter_context(Path(args.write).open("wb"))
            except OSError as exc:
                raise UserError(f"cannot write {args.write}: {exc.strerror}", "-w") from exc
        writer = pcap.Writer(out, target.linktype, capture.SNAPLEN)
        out.flush()
        flushed = time.monotonic()

        def write(frame: bytes, ts: float) -> None:
            nonlocal flushed
            writer.write(frame, ts)
            # A reader following the file sees whole frames at most FLUSH_S late; a
            # write per frame would cost a syscall per packet.
            if time.monotonic() - flushed >= FLUSH_S:
                out.flush()
                flushed = time.monotonic()

        print(f"capture: listening on {target.what}", file=sys.stderr, flush=True)
        started = time.monotonic()
        n = capture.run(
            sock, write, count=count, duration=duration, stopped=lambda: stop, on_idle=out.flush
        )
        out.flush()
    where = "stdout" if to_stdout else args.write
    print(
        f"capture: {n} frames written to {where} in {time.monotonic() - started:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return 0
