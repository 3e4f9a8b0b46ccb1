"""`geneve-dp stats --watch`: rates per device, refreshed every interval.

On a terminal it is a rich Live table redrawn in place; into a pipe or file each
interval's table is printed below the last (no cursor tricks in a log); with --json
one JSON object per interval per line, for scripts. The rates come from rates.py, the
same code the daemon's drop-rate alarm uses.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import rates

Fetch = Callable[[], list[dict[str, Any]]]


def rows_of(
    old: Mapping[rates.Key, rates.Reading], new: Mapping[rates.Key, rates.Reading], dt: float
) -> list[dict[str, Any]]:
    """One dict per tunnel, then one per receive socket that dropped, with rates."""
    out: list[dict[str, Any]] = []
    found = rates.rates(old, new, dt).items()
    for key, r in sorted(found, key=lambda kv: (kv[0][0] != "tunnel", str(kv[0]))):
        if key[0] == "tunnel":
            row: dict[str, Any] = {"device": key[2], "pid": key[1]}
        elif r.drops_ps:
            # A receive socket's rx is its tunnels' rx again and it has no tx: it is
            # shown only for the drops that no tunnel could be named for.
            row = {"socket": f"ipv{key[2]}:{key[3]}", "pid": key[1]}
        else:
            continue
        row.update(
            rx_pps=round(r.rx_pps, 1),
            rx_bps=round(r.rx_bps),
            tx_pps=round(r.tx_pps, 1),
            tx_bps=round(r.tx_bps),
            drops_ps=round(r.drops_ps, 1),
        )
        out.append(row)
    return out


def table(rows: list[dict[str, Any]], dt: float) -> Table:
    t = Table(title=f"geneve-dp rates over {dt:.1f}s", title_justify="left")
    for col, justify in (
        ("device", "left"),
        ("pid", "right"),
        ("rx pps", "right"),
        ("rx bit/s", "right"),
        ("tx pps", "right"),
        ("tx bit/s", "right"),
        ("drops/s", "right"),
    ):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    if not rows:
        t.add_row("(no tunnels)", "", "", "", "", "", "")
    for r in rows:
        drops = f"[red]{r['drops_ps']:.0f}[/red]" if r["drops_ps"] else "0"
        if "device" not in r:
            t.add_row(f"({r['socket']})", str(r["pid"]), "-", "-", "-", "-", drops)
            continue
        t.add_row(
            str(r["device"]),
            str(r["pid"]),
            f"{r['rx_pps']:.0f}",
            rates.human(r["rx_bps"], "bit/s"),
            f"{r['tx_pps']:.0f}",
            rates.human(r["tx_bps"], "bit/s"),
            drops,
        )
    return t


def run(
    fetch: Fetch,
    interval: float = 1.0,
    count: int = 0,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """Show ``count`` intervals (0: until Ctrl-C)."""
    stream = out or sys.stdout
    console = Console(file=stream)
    live: Live | None = None
    if not as_json and console.is_terminal:
        live = Live(table([], interval), console=console, auto_refresh=False)
        live.start()
    shown = 0
    try:
        last_t, last = time.monotonic(), rates.readings(fetch())
        while count == 0 or shown < count:
            time.sleep(max(0.0, last_t + interval - time.monotonic()))
            now, reading = time.monotonic(), rates.readings(fetch())
            rows = rows_of(last, reading, now - last_t)
            dt = now - last_t
            last_t, last = now, reading
            shown += 1
            if as_json:
                stream.write(json.dumps({"interval_s": round(dt, 3), "rates": rows}) + "\n")
                stream.flush()
            elif live is not None:
                live.update(table(rows, dt), refresh=True)
            else:
                console.print(table(rows, dt))
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return 0
