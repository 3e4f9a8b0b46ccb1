"""Results -> a Markdown table with ratios to kernel VXLAN, and PNG plots.

Ratios rather than absolute numbers are the point: the machines are shared, noisy VMs,
so only figures taken side by side in one run compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Json = dict[str, Any]


def failures(scenario: Json) -> list[str]:
    """Every error of a scenario: its own and each failed step's, named."""
    out = []
    if scenario.get("error"):
        out.append(scenario["error"])
    for step in scenario.get("udp", []):
        if step.get("error"):
            out.append(f"udp {step['frame']} B: {step['error']}")
    for step in scenario.get("tcp", []):
        if step.get("error"):
            out.append(f"tcp x{step['streams']}: {step['error']}")
    rr = scenario.get("rr")
    if rr and rr.get("error"):
        out.append(f"rr: {rr['error']}")
    pdr = scenario.get("pdr")
    if pdr and pdr.get("error"):
        out.append(f"paced rate search: {pdr['error']}")
    inter = scenario.get("interactive")
    if inter and inter.get("error"):
        out.append(f"interactive: {inter['error']}")
    return out


def _ok(step: Json | None) -> bool:
    return bool(step) and step is not None and step.get("error") is None


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    r = value / base
    # Two decimals, or two significant digits for small ratios (x0.0049, not x0.00).
    return f" (x{r:.2f})" if r >= 0.095 else f" (x{r:.2g})"


def _udp(scenario: Json, frame: int) -> Json | None:
    for step in scenario.get("udp", []):
        if step["frame"] == frame and _ok(step):
            return dict(step)
    return None


def _tcp(scenario: Json, streams: int) -> Json | None:
    for step in scenario.get("tcp", []):
        if step["streams"] == streams and _ok(step):
            return dict(step)
    return None


def _fmt_num(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}g}" if v < 10**digits else f"{v:.0f}"


def _per(value: float | None, count: float | None, scale: float) -> float | None:
    return value * scale / count if value is not None and count else None


def _cost_table(scenarios: list[Json], base: Json | None, small: int) -> list[str]:
    """CPU per packet and per gigabyte, and the dataplane's peak memory: the machine's
    busy time covers every path alike (kernel tunnels run in softirq and in the
    senders' own system calls); the dataplane's own time exists only for geneve-dp."""

    def cost(s: Json | None) -> tuple[float | None, ...]:
        if s is None:
            return (None, None, None, None)
        u, t = _udp(s, small), _tcp(s, 1)
        ucpu, tcpu = (u or {}).get("cpu") or {}, (t or {}).get("cpu") or {}
        received = u.get("received") if u else None
        gb = t["bytes"] / 1e9 if t and t.get("bytes") else None
        return (
            _per(ucpu.get("busy_s"), received, 1e6),
            _per(ucpu.get("dataplane_s"), received, 1e6),
            _per(tcpu.get("busy_s"), gb, 1.0),
            _per(tcpu.get("dataplane_s"), gb, 1.0),
        )

    bc = cost(base)
    lines = [
        "",
        f"CPU per unit of work (UDP {small} B: µs per delivered packet; TCP 1 stream: "
        "CPU s per GB delivered; lower is better) and the dataplane's peak RSS:",
        "",
        "| path | UDP µs/pkt: machine | UDP µs/pkt: dataplane | TCP s/GB: machine "
        "| TCP s/GB: dataplane | dataplane peak RSS (per process) |",
        "|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        c = cost(s)
        cells = []
        for k, v in enumerate(c):
            if v is None:
                cells.append("n/a")
            else:
                cells.append(f"{_fmt_num(v)}{_ratio(v, bc[k]) if k % 2 == 0 else ''}")
        peak = (s.get("cpu") or {}).get("peak_rss_kib")
        cells.append(f"{peak / 1024:.1f} MiB" if peak else "n/a")
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    return lines


def _auth_cost(scenarios: list[Json], small: int, streams: list[int]) -> list[str]:
    """Each authenticated path against its unauthenticated twin of the same run (the
    same id without ``-auth``), and against the twin without the inject device
    (``-noinject``) when the run has it: authentication turns injection off, so the
    second ratio is the cost of the signing and checking alone."""
    by_id = {s["id"]: s for s in scenarios}
    lines: list[str] = []
    for s in scenarios:
        sid = str(s["id"])
        if not sid.endswith("-auth"):
            continue
        for twin_id in (sid.removesuffix("-auth"), sid.removesuffix("-auth") + "-noinject"):
            plain = by_id.get(twin_id)
            if plain is not None:
                cells = _auth_ratios(s, plain, small, streams)
                lines.append(f"- {s['label']} vs {plain['label']}: " + ", ".join(cells))
    if lines:
        lines = ["", "Authentication cost (ratio to the same path unauthenticated):", "", *lines]
    return lines


def _auth_ratios(s: Json, plain: Json, small: int, streams: list[int]) -> list[str]:
    cells = []
    p, pp = s.get("pdr"), plain.get("pdr")
    if _ok(p) and _ok(pp) and p is not None and pp is not None and pp["pps"]:
        cells.append(f"{small} B zero-loss x{p['pps'] / pp['pps']:.2f}")
    u, pu = _udp(s, small), _udp(plain, small)
    if u and pu and pu["delivered_pps"]:
        cells.append(f"{small} B delivered x{u['delivered_pps'] / pu['delivered_pps']:.2f}")
    for n in streams:
        t, pt = _tcp(s, n), _tcp(plain, n)
        if t and pt and pt["gbps"]:
            cells.append(f"TCP {n} x{t['gbps'] / pt['gbps']:.2f}")
    us = _per(((u or {}).get("cpu") or {}).get("dataplane_s"), (u or {}).get("received"), 1e6)
    pus = _per(((pu or {}).get("cpu") or {}).get("dataplane_s"), (pu or {}).get("received"), 1e6)
    if us is not None and pus is not None:
        cells.append(f"dataplane CPU {_fmt_num(us)} vs {_fmt_num(pus)} µs/pkt")
    return cells


def _interactive_table(scenarios: list[Json], base: Json | None) -> list[str]:
    """Round trips of interactive traffic (the path idle between packets) and the
    CPU an idle dataplane takes; ratios of p50 and p99 to kernel VXLAN."""
    rows = [s for s in scenarios if _ok(s.get("interactive"))]
    if not rows:
        return []
    rates: list[Any] = [x["rate"] for x in rows[0]["interactive"]["rr"]]
    interval = (rows[0]["interactive"].get("ping") or {}).get("interval_ms", 20)
    binter = base.get("interactive") if base and _ok(base.get("interactive")) else None

    def cell(m: Json | None, bm: Json | None) -> str:
        if not m:
            return "n/a"
        text = f"{m['p50_us']:.0f} / {m['p99_us']:.0f} / {m['p999_us']:.0f}"
        if bm:
            text += (
                f" (x{m['p50_us'] / bm['p50_us']:.1f} / x{m['p99_us'] / bm['p99_us']:.1f})"
                if bm["p50_us"] and bm["p99_us"]
                else ""
            )
        return text

    def by_rate(inter: Json | None, rate: Any) -> Json | None:
        return next((x for x in (inter or {}).get("rr", []) if x["rate"] == rate), None)

    lines = [
        "",
        "Interactive traffic, the path idle between packets: round trips p50 / p99 / "
        "p99.9 in µs (x p50 / x p99 against kernel VXLAN), and the CPU the dataplane "
        "takes with no traffic:",
        "",
        "| path | "
        + " | ".join(f"UDP RR paced {r}/s" for r in rates)
        + f" | ping every {interval:g} ms | idle CPU, % of a core |",
        "|---" * (len(rates) + 3) + "|",
    ]
    for s in rows:
        inter = s["interactive"]
        cells = [cell(by_rate(inter, r), by_rate(binter, r)) for r in rates]
        cells.append(cell(inter.get("ping"), (binter or {}).get("ping")))
        idle = (inter.get("idle_cpu") or {}).get("core_pct")
        cells.append("n/a" if idle is None else f"{idle:.2f}")
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    return lines


def _copy_floor(floor: Json) -> str:
    """One paragraph: what copying costs and the TCP throughput that leaves geneve-dp
    at most (bench/copy_floor.py)."""
    copies, cores = floor["copies"], floor["cores"]
    text = (
        f"TCP bound from copies alone (loose: it counts nothing else a userspace hop "
        f"costs): copying {floor['block_bytes'] // 1024} KiB blocks costs "
        f"{_fmt_num(floor['hot_s_per_gb'])} s/GB in cache "
        f"({_fmt_num(floor['cold_s_per_gb'])} s/GB from a "
        f"{floor['working_set_bytes'] >> 20} MiB working set). geneve-dp copies each byte "
        f"{copies} more times than kernel VXLAN, so its CPU per GB is at least kernel "
        f"VXLAN's (machine busy time less steal) plus {copies} copies in cache, and "
        f"{cores} cores carry at most"
    )
    parts = []
    for b in floor["bounds"]:
        n = f"{b['streams']} stream{'s' if b['streams'] != 1 else ''}"
        if b.get("error"):
            parts.append(f"n/a with {n} ({b['error']})")
            continue
        parts.append(
            f"{_fmt_num(b['max_gbps'])} Gbit/s with {n} (x{b['max_ratio']:.2f} kernel VXLAN; "
            f"{_fmt_num(b['vxlan_s_per_gb'])} + "
            f"{_fmt_num(b['floor_s_per_gb'] - b['vxlan_s_per_gb'])} = "
            f"{_fmt_num(b['floor_s_per_gb'])} s/GB)"
        )
    if not parts:
        return text + ": n/a (no kernel VXLAN TCP figures in this run)."
    return text + " " + ", ".join(parts) + "."


REDIRECT_LABELS = {
    "uncaptured": "plain pod -> server, not captured (floor)",
    "iptables": "captured: iptables + GENEVE tunnels",
    "ebpf": "captured: eBPF (tc redirect + bpf_sk_assign)",
}


def _redirect(red: Json) -> list[str]:
    """Istio's two redirect designs through the ztunnel stand-in, beside the floor;
    (xN) is the ratio to the iptables + GENEVE mode measured in the same run."""
    rows = {m["mode"]: m for m in red["modes"] if m.get("error") is None}
    ipt = rows.get("iptables")
    lines = [
        f"Istio redirect modes through the ztunnel stand-in (TCP, {red['payload']} B "
        f"requests, {red['rounds']} round(s) of {_fmt_num(red['seconds'])} s per path, "
        "medians; (xN): ratio to iptables + GENEVE):",
        "",
        "| path | connections/s (connect+request+reply+close) | setup p50 / p99: µs "
        "| RR p50 / p99: µs | machine CPU µs per connection / per transaction |",
        "|---|---|---|---|---|",
    ]
    for mode, label in REDIRECT_LABELS.items():
        m = rows.get(mode)
        if m is None:
            lines.append(f"| {label} | n/a | n/a | n/a | n/a |")
            continue

        base = ipt if mode != "iptables" else None

        def r(key: str, m: Json = m, base: Json | None = base) -> str:
            return _ratio(m[key], base[key]) if base is not None else ""

        lines.append(
            f"| {label} | {_fmt_num(m['connections_per_s'])}{r('connections_per_s')} "
            f"| {_fmt_num(m['connect_p50_us'])}{r('connect_p50_us')} / "
            f"{_fmt_num(m['connect_p99_us'])} "
            f"| {_fmt_num(m['rr_p50_us'])}{r('rr_p50_us')} / {_fmt_num(m['rr_p99_us'])} "
            f"| {_fmt_num(m['busy_us_per_connection'])}{r('busy_us_per_connection')} / "
            f"{_fmt_num(m['busy_us_per_transaction'])}{r('busy_us_per_transaction')} |"
        )
    return lines


def markdown(results: Json) -> str:
    params = results["parameters"]
    m = results["machine"]
    scenarios = results["scenarios"]
    base = next((s for s in scenarios if s["id"] == results["baseline"]), None)
    frames: list[int] = params["frames"]
    small = frames[0]
    streams: list[int] = params.get("tcp_streams", [1, 4])
    lines = [
        f"### geneve-dp bench{' --quick' if params['quick'] else ''}, {results['started']}",
        "",
        f"Machine: {m['cores']} cores ({m.get('cpu_model') or 'unknown CPU'}), "
        f"kernel {m['kernel']}"
        + (
            f", load average {m['loadavg'][0]:.1f} at the start and "
            f"{m['loadavg_end'][0]:.1f} at the end"
            if "loadavg" in m and "loadavg_end" in m
            else ""
        )
        + ". All figures from this one run; (xN) is the ratio to kernel "
        "VXLAN in the same run: higher is better for rates, lower is better for latency "
        "and CPU.",
        "",
    ]
    head = [f"UDP {small} B frames: kpps delivered, loss"]
    with_pdr = any(s.get("pdr") for s in scenarios)
    if with_pdr:
        head.append(f"UDP {small} B paced, loss <= {params.get('pdr_loss', 0.001):.1%}: kpps")
    head += [f"TCP {n} stream{'s' if n > 1 else ''}: Gbit/s" for n in streams]
    head += ["UDP RR p50 / p99 / p99.9: µs", "CPU s: dataplane / softirq / machine"]
    lines.append("| path | " + " | ".join(head) + " |")
    lines.append("|---" * (len(head) + 1) + "|")
    notes: list[str] = []
    for s in scenarios:
        cells = []
        u, bu = _udp(s, small), _udp(base, small) if base else None
        if u:
            kpps = u["delivered_pps"] / 1e3
            cells.append(
                f"{_fmt_num(kpps)}{_ratio(kpps, bu['delivered_pps'] / 1e3 if bu else None)}, "
                f"{u['loss']:.1%}"
            )
        else:
            cells.append("error")
        if with_pdr:
            p, bp = s.get("pdr"), base.get("pdr") if base else None
            if _ok(p) and p is not None:
                kpps = p["pps"] / 1e3
                base_kpps = bp["pps"] / 1e3 if _ok(bp) and bp is not None else None
                cells.append(f"{_fmt_num(kpps)}{_ratio(kpps, base_kpps)}")
            else:
                cells.append("error" if p else "n/a")
        for n in streams:
            t, bt = _tcp(s, n), _tcp(base, n) if base else None
            cells.append(
                f"{_fmt_num(t['gbps'])}{_ratio(t['gbps'], bt['gbps'] if bt else None)}"
                if t
                else "error"
            )
        rr = s.get("rr")
        brr = base.get("rr") if base else None
        if _ok(rr):
            assert rr is not None
            cells.append(
                f"{rr['p50_us']:.0f} / {rr['p99_us']:.0f} / {rr['p999_us']:.0f}"
                + _ratio(rr["p50_us"], brr["p50_us"] if _ok(brr) and brr else None)
            )
        else:
            cells.append("error")
        cpu = s.get("cpu")
        if cpu:
            dp = "n/a" if cpu["dataplane_s"] is None else f"{cpu['dataplane_s']:.1f}"
            busy = f"{cpu['busy_s']:.1f}" if "busy_s" in cpu else "n/a"
            cells.append(f"{dp} / {cpu['softirq_s']:.1f} / {busy}")
        else:
            cells.append("error")
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
        notes += [f"- {s['label']}: {e}" for e in failures(s)]
    lines += _cost_table(scenarios, base, small)
    lines += _auth_cost(scenarios, small, streams)
    lines += _interactive_table(scenarios, base)
    if len(frames) > 1:
        lines += [
            "",
            "UDP kpps delivered by frame size (ratio to kernel VXLAN):",
            "",
            "| path | " + " | ".join(f"{f} B" for f in frames) + " |",
            "|---" * (len(frames) + 1) + "|",
        ]
        for s in scenarios:
            cells = []
            for f in frames:
                u, bu = _udp(s, f), _udp(base, f) if base else None
                if u:
                    kpps = u["delivered_pps"] / 1e3
                    cells.append(
                        f"{_fmt_num(kpps)}{_ratio(kpps, bu['delivered_pps'] / 1e3 if bu else None)}"
                    )
                else:
                    cells.append("error")
            lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"UDP ({'raw frames via AF_PACKET' if params.get('generator') == 'raw' else 'sent'}"
        f"{'' if params.get('generator') == 'raw' else ' through a UDP socket'}"
        f"): {params['flows']} flows, {params['udp_seconds']:g} s per size, bursts of "
        f"{params['burst']}, offered rate "
        f"{'unlimited' if not params['rate'] else str(params['rate']) + ' pps'}; "
        + (
            f"paced: the highest offered rate losing at most {params.get('pdr_loss', 0):.1%} "
            f"(bisection, {params.get('pdr_probes')} probes of "
            f"{min(1, params['udp_seconds']):g} s; the unpaced rate itself when that was "
            "already within the threshold, as on kernel paths, which pace the generator); "
            if with_pdr
            else ""
        )
        + f"TCP: iperf3, {params['tcp_seconds']:g} s; RR: {params.get('rr_payload', 64)} B UDP "
        f"ping-pong for {params.get('rr_seconds', 0):g} s. CPU: summed over the UDP, TCP "
        "and RR steps; dataplane = user+system time of the geneve-dp processes (n/a for "
        "kernel paths); softirq and machine (all non-idle time, generator and sink "
        "included) are system-wide.",
    ]
    gen = results.get("generator") or {}
    gen_steps = {g["frame"]: g["pps"] for g in gen.get("steps", [])}
    best = max(
        (u["delivered_pps"] for s in scenarios for u in s.get("udp", []) if _ok(u)), default=0
    )
    if small in gen_steps:
        lines += [
            "",
            "Generator alone ("
            + (
                "frames written with AF_PACKET"
                if params.get("generator") == "raw"
                else "packets sent through the full UDP/IP stack"
            )
            + f" to a veth whose peer drops them): {_fmt_num(gen_steps[small] / 1e3)} kpps at "
            f"{small} B"
            + (
                f", {gen_steps[small] / best:.1f}x the highest rate any path delivered."
                if best
                else "."
            ),
        ]
    elif gen.get("error"):
        notes.append(f"- generator ceiling: {gen['error']}")
    red = results.get("redirect")
    if red and red.get("error") is None and red.get("modes"):
        lines += ["", *_redirect(red)]
    elif red and red.get("error"):
        notes.append(f"- redirect modes: {red['error']}")
    floor = results.get("copy_floor")
    if floor and floor.get("hot_s_per_gb") is not None:
        lines += ["", _copy_floor(floor)]
    elif floor and floor.get("error"):
        notes.append(f"- copy cost: {floor['error']}")
    if notes:
        lines += ["", "Errors:", "", *notes]
    return "\n".join(lines) + "\n"


def plots(results: Json, out_dir: Path) -> list[str]:
    """pps_vs_size.png and latency_cdf.png; returns notes on what was written or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a display
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install -e '.[bench]')"]
    notes = []
    scenarios = results["scenarios"]

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in scenarios:
        pts = [(u["frame"], u["delivered_pps"] / 1e3) for u in s["udp"] if _ok(u)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=s["label"])
    ax.set_xlabel("Ethernet frame size, bytes (UDP payload + 46)")
    ax.set_ylabel("packets delivered, kpps (log)")
    ax.set_yscale("log")
    ax.set_title("UDP packets per second delivered vs packet size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / "pps_vs_size.png", dpi=110)
    plt.close(fig)
    notes.append(f"wrote {out_dir / 'pps_vs_size.png'}")

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in scenarios:
        rr = s.get("rr")
        if _ok(rr) and rr is not None and rr.get("cdf_us"):
            cdf = rr["cdf_us"]
            ys = [i / (len(cdf) - 1) for i in range(len(cdf))]
            ax.plot(cdf, ys, label=s["label"])
    ax.set_xlabel("round-trip time, µs (log)")
    ax.set_xscale("log")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"UDP request/response latency CDF ({results['parameters']['rr_payload']} B)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=110)
    plt.close(fig)
    notes.append(f"wrote {out_dir / 'latency_cdf.png'}")
    return notes
