"""`geneve-dp node|ztunnel|pod|proxy|demo`: the Istio ambient profiles from the shell."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import logs, wire
from ..ambient import constants as k
from ..auth import settings as auth_settings


def _say(msg: str) -> None:
    print(f"  {msg}", flush=True)


def _progress(args: argparse.Namespace, role: str) -> Callable[[str], None]:
    """Where `ROLE up` reports its steps: indented lines on stdout, or JSON log lines
    with --log-format json. The format also goes to the endpoint daemon and the
    watcher that `up` starts (logs.ENV)."""
    if logs.setup_from_args(args) == "text":
        return _say
    log = logging.getLogger(f"geneve_dp.{role}")
    return lambda msg: log.info("%s up: %s", role, msg, extra={"event": "setup_step"})


# The subcommands register() adds (cli builds only the module a command line names).
COMMANDS = ("node", "ztunnel", "pod", "proxy", "demo")


def register(sub: Any) -> None:
    node = sub.add_parser(
        "node",
        help="the node side of Istio ambient redirection (istioin/istioout, ipset, iptables)",
        description=(
            "Set up or remove the node side of Istio ambient (1.18-1.20) iptables + GENEVE "
            "redirection in the current network namespace: geneve-dp endpoints istioin "
            "(VNI 1000) and istioout (VNI 1001) towards the ztunnel pod, the "
            f"{k.IPSET_NAME} ipset, the ztunnel-* iptables chains, ip rules 100-103 and "
            "tables 100-102. Needs root."
        ),
    )
    nsub = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = nsub.add_parser(
        "up",
        help="install (idempotent; re-enrols known pods)",
        description=(
            "Install the node side in this network namespace: endpoints istioin and istioout "
            f"towards --ztunnel-ip, the {k.IPSET_NAME} ipset, the ztunnel-* iptables chains, "
            "ip rules 100-103 and tables 100-102, then start the endpoint daemon and the "
            "`node watch` reconciler in the background and exit. Running it again changes "
            "nothing that is already right and re-enrols the pods it knew. Needs root."
        ),
    )
    up.add_argument("--ztunnel-ip", metavar="IP", help="the ztunnel pod's IPv4 address")
    up.add_argument(
        "--ztunnel-veth", metavar="DEV", help="host-side veth of the ztunnel pod (must be a veth)"
    )
    up.add_argument(
        "--host-ip",
        metavar="IP",
        help="node address used as source of routes to pods (default: the source the "
        "kernel picks towards the ztunnel IP)",
    )
    up.add_argument(
        "--port",
        type=int,
        help="GENEVE UDP port (default: the first free one from 6081 up, as Istio 1.19+; "
        "always 6081 with --istio-version 1.18)",
    )
    up.add_argument(
        "--dns-capture", action="store_true", help="DNAT ambient pods' UDP/53 to ztunnel:15053"
    )
    up.add_argument(
        "--istio-version",
        choices=k.ISTIO_VERSIONS,
        default=k.DEFAULT_ISTIO_VERSION,
        help="which release's rules to reproduce (default %(default)s)",
    )
    _redirect_mode_arg(up)
    up.add_argument(
        "--ztunnel-mac",
        metavar="MAC",
        help="eBPF mode: the ztunnel pod's eth0 MAC (default: learnt by ARP on --ztunnel-veth)",
    )
    up.add_argument(
        "--foreground",
        action="store_true",
        help="then stay: become the `node watch` reconciler (a service's main process; "
        "`node down` stops it)",
    )
    _netns_arg(up)
    auth_settings.add_arguments(up)
    logs.add_argument(up)
    up.set_defaults(func=cmd_node_up)
    down = nsub.add_parser(
        "down",
        help="remove everything `node up` installed",
        description=(
            "Stop the endpoint daemon and the watcher `node up` started and remove exactly "
            "what it added (devices, ipset, chains, rules, routes, sysctls), also after a "
            "crash. Nothing to remove is not an error. Needs root."
        ),
    )
    _netns_arg(down)
    down.set_defaults(func=cmd_down, role="node")
    _watch_parser(nsub, "node")
    _status_parser(nsub, "node")
    rend = nsub.add_parser(
        "render",
        help="print the iptables-restore input `node up` would apply (no root)",
        description=(
            "Print, without changing anything, the iptables-restore text (--noflush, own "
            "chains only) that `node up` applies in one call for these values."
        ),
    )
    rend.add_argument("--ztunnel-ip", metavar="IP", required=True)
    rend.add_argument("--ztunnel-veth", metavar="DEV", required=True)
    rend.add_argument("--host-ip", metavar="IP", required=True)
    rend.add_argument("--port", type=int, default=6081)
    rend.add_argument("--dns-capture", action="store_true")
    rend.add_argument("--istio-version", choices=k.ISTIO_VERSIONS, default=k.DEFAULT_ISTIO_VERSION)
    rend.set_defaults(func=cmd_node_render)

    zt = sub.add_parser(
        "ztunnel",
        help="the ztunnel pod side (pistioin/pistioout, TPROXY rules); run in its netns",
        description=(
            "Set up or remove the ztunnel pod's side, in the current network namespace: "
            "endpoints pistioin/pistioout towards the node, ip rules 20000/20003, table 100 "
            "local default, and mangle PREROUTING TPROXY rules to 15008/15001/15006. Needs root."
        ),
    )
    zsub = zt.add_subparsers(dest="action", required=True, metavar="ACTION")
    zup = zsub.add_parser(
        "up",
        help="install (idempotent)",
        description=(
            "Install the ztunnel pod's side in this network namespace: endpoints pistioin and "
            "pistioout towards the node (--host-ip), ip rules 20000/20003, table 100's local "
            "default and the mangle PREROUTING TPROXY rules; start the endpoint daemon and "
            "the `ztunnel watch` reconciler in the background. Idempotent. Needs root."
        ),
    )
    zup.add_argument("--host-ip", metavar="IP", help="the node's address on the ztunnel pod link")
    zup.add_argument(
        "--port",
        type=int,
        help="GENEVE UDP port (default: the one `node up` chose for this ztunnel, found in "
        "its record; 6081 without one)",
    )
    _redirect_mode_arg(zup)
    zup.add_argument(
        "--ebpf-tproxy",
        choices=("auto", "sk-assign", "iptables"),
        default="auto",
        help="eBPF mode: hand redirected TCP to the proxy with bpf_sk_assign, or mark it "
        "for iptables TPROXY as Istio does where the kernel lacks bpf_sk_assign "
        "(default auto: sk-assign when the kernel has it)",
    )
    _netns_arg(zup)
    auth_settings.add_arguments(zup)
    logs.add_argument(zup)
    zup.set_defaults(func=cmd_ztunnel_up)
    zdown = zsub.add_parser(
        "down",
        help="remove everything `ztunnel up` installed",
        description=(
            "Stop what `ztunnel up` started and remove exactly what it added, also after a "
            "crash. Needs root."
        ),
    )
    _netns_arg(zdown)
    zdown.set_defaults(func=cmd_down, role="ztunnel")
    _watch_parser(zsub, "ztunnel")
    _status_parser(zsub, "ztunnel")

    pod = sub.add_parser(
        "pod",
        help="enrol a pod in the mesh or remove it (ipset entry + table-100 route)",
        description="Enrol a pod IP in ambient redirection on this node, or remove it.",
    )
    psub = pod.add_subparsers(dest="action", required=True, metavar="ACTION")
    padd = psub.add_parser(
        "add",
        help="enrol a pod (adding twice is a no-op)",
        description=(
            f"Enrol pod IP in ambient redirection: an entry in the {k.IPSET_NAME} ipset "
            "(commented with --uid), its route in table 100, so its traffic enters "
            "istioout, and rp_filter off on its device. Adding a pod twice changes "
            "nothing. With --batch FILE, many pods in one run. Needs root."
        ),
    )
    padd.add_argument("ip", metavar="IP", nargs="?", help="the pod's IPv4 address")
    padd.add_argument("--uid", help="the pod's UID (ipset comment)")
    padd.add_argument(
        "--batch",
        metavar="FILE",
        help="enrol many pods in one run: one 'IP UID' per line ('-': standard input); "
        "every line is checked before any pod is enrolled",
    )
    _netns_arg(padd)
    padd.set_defaults(func=cmd_pod_add)
    pdel = psub.add_parser(
        "del",
        help="remove pods (an unknown pod is not an error)",
        description=(
            "Remove pod IPs from ambient redirection (ipset entry and table-100 route). "
            "A pod that is not enrolled is not an error. Needs root."
        ),
    )
    pdel.add_argument("ip", metavar="IP", nargs="*", help="the pods' IPv4 addresses")
    pdel.add_argument(
        "--batch", metavar="FILE", help="also remove the IPs listed in FILE, one a line"
    )
    _netns_arg(pdel)
    pdel.set_defaults(func=cmd_pod_del)
    plist = psub.add_parser(
        "list",
        help="enrolled pods, one 'IP UID' per line",
        description="Print the enrolled pods, one 'IP UID' per line, sorted by IP.",
    )
    _netns_arg(plist)
    plist.set_defaults(func=cmd_pod_list)

    px = sub.add_parser(
        "proxy",
        help="a small transparent stand-in for ztunnel (TPROXY listeners, passthrough)",
        description=(
            "Listen on 15001, 15006 and 15008 with IP_TRANSPARENT, log each accepted "
            "connection as a JSON line (listener, client, original destination) and forward "
            "it to the original destination from the client's address, like ztunnel's "
            "passthrough. No mTLS, no HBONE."
        ),
    )
    px.add_argument("--log", metavar="FILE", help="append JSON lines here (default: stdout)")
    px.add_argument(
        "--ports",
        default=",".join(str(p) for p in k.PROXY_PORTS),
        help="listener ports (default %(default)s)",
    )
    px.add_argument("--no-spoof", action="store_true", help="connect from our own address")
    _netns_arg(px)
    px.set_defaults(func=cmd_proxy)

    demo = sub.add_parser(
        "demo",
        help="build a node, pods, ztunnel and a server in namespaces and walk the scenario",
        description=(
            "Build, in network namespaces, a node with two ambient pods and one plain pod, a "
            "ztunnel pod and a server beyond the node; run node up, ztunnel up, pod add, the "
            "stand-in proxy and servers; check each step of the scenario (expected vs "
            "observed, PASS/FAIL); tear everything down. Exit code 0 only if all passed. "
            "Needs root."
        ),
    )
    demo.add_argument("--keep", action="store_true", help="leave the namespaces up at the end")
    demo.add_argument(
        "--json", action="store_true", help="end with a JSON summary line instead of a sentence"
    )
    _redirect_mode_arg(demo)
    demo.set_defaults(func=cmd_demo)


def _watch_parser(sub: Any, role: str) -> None:
    w = sub.add_parser(
        "watch",
        help=f"reconcile loop: put back what was removed while {role} is up (`up` starts it)",
        description=(
            f"Every INTERVAL seconds compare the kernel with what `{role} up` recorded and "
            "add back what is missing (the endpoint daemon and its devices, ip rules, "
            "routes, iptables rules, sysctls"
            + (", ipset entries" if role == "node" else "")
            + "), one log line per repair. Exits when the record goes (`down`). "
            f"`{role} up` runs it in the background; `{role} down` stops it."
        ),
    )
    w.add_argument("--interval", type=float, default=1.0, help="seconds between passes (default 1)")
    _netns_arg(w)
    logs.add_argument(w)
    w.set_defaults(func=cmd_watch, role=role)


def _status_parser(sub: Any, role: str) -> None:
    st = sub.add_parser(
        "status",
        help=f"what `{role} up` recorded here: settings, iptables backend, watcher",
    )
    st.add_argument("--json", action="store_true", help="one JSON object")
    _netns_arg(st)
    st.set_defaults(func=cmd_status, role=role)


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from ..ambient import procs, state, watch

    _enter(args)
    mod = _profile(args.role)
    path = mod.state_path()
    st = state.StateFile.load(path)
    backend = st.data.get("iptables_backend") or {}
    watcher = procs.find(["geneve_dp", args.role, "watch"], watch.pidfile(path.parent, args.role))
    out: dict[str, Any] = {
        "role": args.role,
        "state": "up" if st.data.get("complete") else "setting up" if st.exists else "down",
        "config": st.data.get("config"),
        "iptables_backend": backend.get("name") or ("as installed" if backend else None),
        "iptables_backend_why": backend.get("why"),
        "watcher_pids": watcher,
    }
    if args.role == "node":
        out["pods"] = len(state.load_pods(path.parent))
    if (out["config"] or {}).get("redirect_mode") == "ebpf":
        out["ebpf_verdicts"] = _ebpf_verdicts(args.role, st)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"{args.role}: {out['state']}")
    for key, value in (out["config"] or {}).items():
        print(f"  {key}: {value}")
    if backend:
        print(f"  iptables backend: {out['iptables_backend']} ({out['iptables_backend_why']})")
    if "pods" in out:
        print(f"  pods: {out['pods']}")
    print(f"  watcher: {', '.join(map(str, watcher)) if watcher else 'not running'}")
    if "ebpf_verdicts" in out:
        verdicts = out["ebpf_verdicts"]
        if verdicts is None:
            print("  eBPF verdicts: the programs' counter map is not loaded")
        else:
            print("  eBPF verdicts (packets, since the programs were loaded):")
            for name, n in verdicts.items():
                print(f"    {name}: {n}")
    return 0


def _ebpf_verdicts(role: str, st: Any) -> dict[str, int] | None:
    """The eBPF programs' verdict counters of this profile, summed over CPUs, by name;
    None when the counter map the record names is not loaded (any more)."""
    from ..ambient.ebpf import node, ztunnel

    return node.counters(st) if role == "node" else ztunnel.counters(st)


def _redirect_mode_arg(p: argparse.ArgumentParser) -> None:
    from ..ambient.ebpf import DEFAULT_REDIRECT_MODE, REDIRECT_MODES

    p.add_argument(
        "--redirect-mode",
        choices=REDIRECT_MODES,
        default=DEFAULT_REDIRECT_MODE,
        help="iptables + GENEVE tunnels, or Istio 1.20's eBPF programs on the veths "
        "(default %(default)s)",
    )


def _netns_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--netns",
        metavar="NS",
        help="act inside this named network namespace (default: the current one)",
    )


def _enter(args: argparse.Namespace) -> None:
    """Switch to --netns before any socket, thread or child process exists."""
    if getattr(args, "netns", None):
        from ..netns import enter_netns

        enter_netns(args.netns)


def _version(value: str) -> k.IstioVersion:
    for v in k.ISTIO_VERSIONS:
        if v == value:
            return v
    return k.DEFAULT_ISTIO_VERSION


def cmd_node_up(args: argparse.Namespace) -> int:
    from ..ambient import checks, node
    from ..netconf import iptables

    if args.redirect_mode == "ebpf":
        return _node_up_ebpf(args)
    checks.require_tools("node up")
    say = _progress(args, "node")
    _enter(args)
    cfg = node.resolve(
        args.ztunnel_ip,
        args.ztunnel_veth,
        args.host_ip,
        wire.GENEVE_PORT if args.port is None else args.port,
        args.dns_capture,
        _version(args.istio_version),
    )
    auth = auth_settings.resolve(args.auth_key_file, args.auth_option_class)
    cfg = node.up(
        cfg, log=say, choose_port=args.port is None, start_watch=not args.foreground, auth=auth
    )
    print(
        f"node up: ztunnel {cfg.ztunnel_ip} via {cfg.ztunnel_veth}, host IP {cfg.host_ip}, "
        f"GENEVE port {cfg.port}, Istio {cfg.version} rules, iptables {iptables.selected()}",
        flush=True,
    )
    if args.foreground:
        _become_watcher("node", args)
    return 0


def _node_up_ebpf(args: argparse.Namespace) -> int:
    from ..ambient import checks
    from ..ambient.ebpf import node
    from ..errors import UserError

    checks.require_root("node up")
    if args.port is not None:
        raise UserError("has no meaning with --redirect-mode ebpf (no tunnels)", "--port")
    say = _progress(args, "node")
    _enter(args)
    cfg = node.resolve(
        args.ztunnel_ip,
        args.ztunnel_veth,
        args.host_ip,
        args.dns_capture,
        args.ztunnel_mac,
        _version(args.istio_version),
    )
    cfg = node.up(cfg, log=say, start_watch=not args.foreground)
    print(
        f"node up: ztunnel {cfg.ztunnel_ip} via {cfg.ztunnel_veth} ({cfg.ztunnel_mac}), "
        f"host IP {cfg.host_ip}, eBPF redirect mode (Istio 1.20)",
        flush=True,
    )
    if args.foreground:
        _become_watcher("node", args)
    return 0


def _become_watcher(role: str, args: argparse.Namespace) -> None:
    """Replace this process with `geneve-dp ROLE watch`: the same pid (a service's main
    process) under the command line `ROLE down` looks for when it stops the watcher."""
    from ..ambient import watch

    directory = _profile(role).state_path().parent
    watch.pidfile(directory, role).write_text(f"{os.getpid()}\n")
    argv = [sys.executable, "-m", "geneve_dp", role, "watch"]
    if args.log_format is not None:
        argv += ["--log-format", args.log_format]
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _profile(role: str) -> Any:
    from ..ambient import node, ztunnel

    return node if role == "node" else ztunnel


def cmd_down(args: argparse.Namespace) -> int:
    from ..ambient import checks

    checks.require_root(f"{args.role} down")
    _enter(args)
    done = _profile(args.role).down()
    print(
        f"{args.role} down: removed {len(done)} objects" + (f" ({', '.join(done)})" if done else "")
    )
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from ..ambient import checks, watch
    from ..errors import UserError

    checks.require_tools(f"{args.role} watch")
    if not 0.05 <= args.interval <= 3600:
        raise UserError(f"{args.interval} is out of range; accepted: 0.05..3600", "--interval")
    logs.setup_from_args(args)
    _enter(args)
    mod = _profile(args.role)
    wlog = logging.getLogger(f"geneve_dp.{args.role}_watch")

    def log(msg: str) -> None:
        wlog.info("%s watch: %s", args.role, msg)

    def repaired(msg: str) -> None:
        wlog.warning("%s watch: %s", args.role, msg, extra={"event": "repair"})

    path = mod.state_path()
    if not path.exists():
        raise UserError(
            f"the {args.role} side is not set up here: run `geneve-dp {args.role} up` first",
            f"{args.role} watch",
        )
    return watch.run(path.parent, path.name, mod.intent, log, args.interval, repaired)


def cmd_node_render(args: argparse.Namespace) -> int:
    from ..ambient import checks, rules
    from ..netconf import iptables

    cfg = rules.NodeRulesConfig(
        checks.ipv4(args.ztunnel_ip, "--ztunnel-ip"),
        args.ztunnel_veth,
        checks.ipv4(args.host_ip, "--host-ip"),
        checks.port(args.port),
        args.dns_capture,
        _version(args.istio_version),
    )
    sys.stdout.write(iptables.render_apply(rules.node_ruleset(cfg), {}))
    return 0


def cmd_ztunnel_up(args: argparse.Namespace) -> int:
    from ..ambient import checks, ztunnel

    if args.redirect_mode == "ebpf":
        return _ztunnel_up_ebpf(args)
    checks.require_tools("ztunnel up")
    say = _progress(args, "ztunnel")
    _enter(args)
    cfg = ztunnel.resolve(args.host_ip, args.port, say)
    auth = auth_settings.resolve(args.auth_key_file, args.auth_option_class)
    ztunnel.up(cfg, log=say, auth=auth)
    print(
        f"ztunnel up: {cfg.ztunnel_ip} on {cfg.eth}, tunnels to {cfg.host_ip}:{cfg.port}, "
        "TPROXY to 15008/15001/15006"
    )
    return 0


def _batch_lines(path: str) -> list[tuple[int, list[str]]]:
    """(line number, words) of each non-empty, non-comment line of FILE or stdin."""
    from ..errors import UserError

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}", "--batch") from exc
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if words:
            out.append((n, words))
    return out


def _pods_to_add(args: argparse.Namespace) -> list[tuple[str, str]]:
    from ..errors import UserError

    if args.batch is None:
        if args.ip is None:
            raise UserError("is required (or --batch FILE)", "IP")
        if not args.uid:
            raise UserError("is required (the pod's UID, kept as the ipset comment)", "--uid")
        return [(args.ip, args.uid)]
    if args.ip is not None or args.uid is not None:
        raise UserError("takes no IP or --uid: each line of the file names one pod", "--batch")
    out = []
    for n, words in _batch_lines(args.batch):
        if len(words) != 2:
            raise UserError(f"line {n}: expected 'IP UID', got {' '.join(words)!r}", "--batch")
        out.append((words[0], words[1]))
    return out


def _ztunnel_up_ebpf(args: argparse.Namespace) -> int:
    from ..ambient import checks
    from ..ambient.ebpf import ztunnel

    checks.require_root("ztunnel up")
    say = _progress(args, "ztunnel")
    _enter(args)
    cfg = ztunnel.resolve(args.host_ip, args.ebpf_tproxy)
    if cfg.tproxy == "iptables":
        checks.require_tools("ztunnel up")
    ztunnel.up(cfg, log=say)
    how = "bpf_sk_assign" if cfg.tproxy == "sk-assign" else "marks + iptables TPROXY"
    print(
        f"ztunnel up: {cfg.ztunnel_ip} on {cfg.eth}, eBPF redirect mode: {cfg.program} "
        f"({how}) to 15008/15001/15006"
    )
    return 0


def cmd_pod_add(args: argparse.Namespace) -> int:
    from ..ambient import checks, pods

    checks.require_root("pod add")
    wanted = _pods_to_add(args)
    _enter(args)
    for result in pods.add_many(wanted):
        print(result.message)
    return 0


def cmd_pod_del(args: argparse.Namespace) -> int:
    from ..ambient import checks, pods
    from ..errors import UserError

    checks.require_root("pod del")
    ips = list(args.ip)
    if args.batch is not None:
        for n, words in _batch_lines(args.batch):
            if len(words) > 2:
                raise UserError(f"line {n}: expected 'IP [UID]'", "--batch")
            ips.append(words[0])
    if not ips:
        raise UserError("is required (one or more, or --batch FILE)", "IP")
    _enter(args)
    for result in pods.delete_many(ips):
        print(result.message)
    return 0


def cmd_pod_list(args: argparse.Namespace) -> int:
    from ..ambient import pods

    _enter(args)
    for ip, uid in sorted(pods.listing().items()):
        print(f"{ip} {uid}")
    return 0


PORTS_ACCEPTED = "comma-separated ports 1..65535, e.g. 15001,15006,15008"


def cmd_proxy(args: argparse.Namespace) -> int:
    from ..ambient import proxy
    from ..errors import UserError

    _enter(args)
    try:
        ports = [int(p) for p in str(args.ports).split(",") if p]
    except ValueError as exc:
        raise UserError(
            f"{args.ports!r} is not a port list; accepted: {PORTS_ACCEPTED}", "--ports"
        ) from exc
    if not ports or any(not 1 <= p <= 65535 for p in ports):
        raise UserError(f"{args.ports!r} is out of range; accepted: {PORTS_ACCEPTED}", "--ports")
    return proxy.main(ports, args.log, spoof=not args.no_spoof)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..ambient import checks, demo

    checks.require_tools("demo")
    return demo.run(keep=args.keep, as_json=args.json, mode=args.redirect_mode)
