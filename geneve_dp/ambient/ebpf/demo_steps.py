"""`geneve-dp demo --redirect-mode ebpf`: the scenario's steps in the eBPF redirect mode.

The same world, servers, proxy and clients as the iptables demo (demo.py); what
differs is the evidence. Instead of GENEVE packets and iptables rule counters, each
step reads the programs' own verdict counters (node_stats in the node, ztunnel_stats
in the ztunnel pod, by the map IDs the state files record) and the kernel's tc and
map state. The expectations are the reference's (istio-ambient-redirect.md §8).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import constants as k
from .. import topology as t
from ..state import StateFile
from . import facts, libbpf, objects
from . import node as enode
from . import ztunnel as ezt

if TYPE_CHECKING:
    from ..demo import Scenario, Step

Counters = dict[str, int]

TITLES = {
    1: "ambient pod -> server, TCP: captured outbound (eBPF)",
    2: "plain pod -> server, TCP: not captured",
    3: "DNS and the node's own address: not captured; other UDP not proxied",
    4: "server -> ambient pod, TCP: captured inbound (eBPF)",
    5: "original-source return path and the ztunnel-to-pod bypass",
    6: "pod del for an ambient pod: its next connection is not captured",
    7: "node down + ztunnel down: nothing left",
}

# What the evidence in the steps means, printed once before the first step.
LEGEND = (
    "node.*: verdicts of the node programs (app_outbound out_*, app_inbound in_*, "
    "ztunnel_host_ingress zt_*), from node_stats; zt.*: ztunnel_tproxy (tp_*) or, with the "
    "iptables TPROXY fallback, ztunnel_mark (mk_*), from ztunnel_stats",
    "cb OUTBOUND/INBOUND: skb->cb[4] set by the node for the ztunnel side; BYPASS: frames "
    "ztunnel_host_ingress sends straight to a pod's veth",
)
RELEASE_WAIT = 5.0


def setup(sc: Scenario) -> None:
    w = sc.w
    # A pod's namespace on a Kubernetes node inherits the node's forwarding=1; the
    # ztunnel pod's must route on the UDP the node programs redirect to it.
    w.run(w.zt, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sc.before = {ns: w.snapshot(ns) for ns in (w.node, w.zt)}
    sc.say(f"node up --redirect-mode ebpf (ztunnel {t.ZTUNNEL_IP} via {t.ZTUNNEL_VETH})")
    sc.relay(
        w.node, "node", "up", "--redirect-mode", "ebpf",
        "--ztunnel-ip", t.ZTUNNEL_IP, "--ztunnel-veth", t.ZTUNNEL_VETH,
    )  # fmt: skip
    sc.say(f"ztunnel up --redirect-mode ebpf --ebpf-tproxy {sc.ebpf_tproxy}")
    sc.relay(
        w.zt, "ztunnel", "up", "--redirect-mode", "ebpf", "--host-ip", t.GATEWAY_IP,
        "--ebpf-tproxy", sc.ebpf_tproxy,
    )  # fmt: skip
    for pod in t.PODS:
        if pod.ambient:
            sc.say(f"pod add {pod.ip} ({pod.role})")
            w.gdp(w.node, "pod", "add", pod.ip, "--uid", pod.uid)
    sc.say("starting the stand-in proxy (15001/15006/15008) and the echo servers")
    w.start_servers()
    w.start_proxy()


class EbpfSteps:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.w = sc.w

    # --- evidence -------------------------------------------------------------------------
    def node_state(self) -> StateFile:
        return StateFile.load(self.w.state_root / self.w.node / "node.json")

    def zt_state(self) -> StateFile:
        return StateFile.load(self.w.state_root / self.w.zt / "ztunnel.json")

    def counters(self) -> Counters:
        node = enode.counters(self.node_state()) or {}
        zt = ezt.counters(self.zt_state()) or {}
        return {
            **{f"node.{n}": v for n, v in node.items()},
            **{f"zt.{n}": v for n, v in zt.items()},
        }

    @property
    def sk_assign(self) -> bool:
        return bool(self.zt_state().data.get("config", {}).get("tproxy") == "sk-assign")

    def new_conn(self, direction: str) -> str:
        """The ztunnel-side counter of a new connection handed to a listener."""
        if not self.sk_assign:
            return f"zt.mk_{'outbound' if direction == 'outbound' else 'inbound'}"
        return f"zt.tp_listener_{direction}"

    @property
    def established(self) -> str:
        return "zt.tp_established" if self.sk_assign else "zt.mk_established"

    @staticmethod
    def delta(before: Counters, after: Counters) -> Counters:
        return {n: after.get(n, 0) - before.get(n, 0) for n in after}

    def moved(self, s: Step, d: Counters, names: list[str], at_least: int = 1) -> None:
        for n in names:
            s.check(d.get(n, 0) >= at_least, f"{n}: +{d.get(n, 0)}")

    def still(self, s: Step, d: Counters, names: list[str]) -> None:
        for n in names:
            s.check(d.get(n, 0) == 0, f"{n}: +{d.get(n, 0)} (unchanged)")

    CAPTURE = [
        "node.out_redirect",
        "node.in_redirect",
        "node.zt_bypass",
        "zt.tp_established",
        "zt.tp_listener_outbound",
        "zt.tp_listener_inbound",
        "zt.tp_listener_plaintext",
        "zt.mk_outbound",
        "zt.mk_inbound",
        "zt.mk_established",
    ]

    # --- the steps ------------------------------------------------------------------------
    def step1(self) -> Step:
        from ..demo import Step

        sc, a = self.sc, t.PODS[0]
        s = Step(
            1,
            TITLES[1],
            "app_outbound on the pod veth's ingress: eth dst = ztunnel MAC, cb OUTBOUND, "
            "redirect into the ztunnel veth; ztunnel_tproxy assigns the 15001 listener "
            f"(mark 0x400 -> rule 20000 -> local); original destination {t.SERVER_IP}:"
            f"{t.TCP_PORT} kept; echo comes back",
        )
        n, c0 = len(sc.accepts()), self.counters()
        sc._connect_and_check(s, a.role, "tcp", t.SERVER_IP, t.TCP_PORT, a.ip, "step1-data")
        new, d = sc._new_accepts(n), self.delta(c0, self.counters())
        sc._check_outbound_accept(s, new, a.ip)
        self.moved(s, d, ["node.out_redirect"])
        self.moved(s, d, [self.new_conn("outbound")])
        s.check(d.get(self.new_conn("outbound"), 0) == 1, "exactly one new connection")
        return s

    def _not_captured(
        self, s: Step, role: str, proto: str, host: str, port: int, src: str, passed: list[str]
    ) -> None:
        sc = self.sc
        n, c0 = len(sc.accepts()), self.counters()
        sc._connect_and_check(s, role, proto, host, port, src, f"step{s.number}-{port}")
        new, d = sc._new_accepts(n), self.delta(c0, self.counters())
        s.check(not new, f"{role} -> {host}:{port}/{proto}: proxy accepted {len(new)}")
        self.still(s, d, self.CAPTURE)
        self.moved(s, d, passed)

    def step2(self) -> Step:
        from ..demo import Step

        p = t.PODS[2]
        s = Step(
            2,
            TITLES[2],
            "no program on its veth: no verdict counted, no proxy log",
        )
        self._not_captured(s, p.role, "tcp", t.SERVER_IP, t.TCP_PORT, p.ip, [])
        return s

    def step3(self) -> Step:
        from ..demo import Step

        sc, a, b = self.sc, t.PODS[0], t.PODS[1]
        s = Step(
            3,
            TITLES[3],
            "app_outbound/app_inbound pass UDP to/from port 53 (no DNS capture) and "
            "traffic to/from the host IP; other UDP is redirected into the ztunnel "
            "namespace, which routes it on (not TCP: no socket assigned)",
        )
        self._not_captured(
            s, a.role, "udp", t.SERVER_IP, t.DNS_PORT, a.ip,
            ["node.out_pass_dns", "node.in_pass_dns"],
        )  # fmt: skip
        self._not_captured(
            s, a.role, "tcp", t.GATEWAY_IP, t.TCP_PORT, a.ip, ["node.out_pass_host_ip"]
        )
        self._not_captured(
            s, "node", "tcp", b.ip, t.TCP_PORT, t.GATEWAY_IP, ["node.in_pass_host_ip"]
        )
        n, c0 = len(sc.accepts()), self.counters()
        sc._connect_and_check(s, a.role, "udp", t.SERVER_IP, t.UDP_PORT, a.ip, "step3-udp")
        new, d = sc._new_accepts(n), self.delta(c0, self.counters())
        s.check(not new, f"UDP {t.UDP_PORT}: proxy accepted {len(new)}")
        self.moved(
            s, d, ["node.out_redirect", "node.in_redirect", "node.zt_bypass", "zt.tp_pass_not_tcp"]
        )
        return s

    def step4(self) -> Step:
        from ..demo import Step

        sc, b = self.sc, t.PODS[1]
        s = Step(
            4,
            TITLES[4],
            "app_inbound on the pod veth's egress redirects to the ztunnel veth (cb "
            "INBOUND); ztunnel_tproxy assigns 15006, or 15008 for destination port 15008",
        )
        for port, listener, direction in (
            (t.TCP_PORT, k.ZTUNNEL_INBOUND_PLAINTEXT_PORT, "plaintext"),
            (k.ZTUNNEL_INBOUND_PORT, k.ZTUNNEL_INBOUND_PORT, "inbound"),
        ):
            n, c0 = len(sc.accepts()), self.counters()
            sc._connect_and_check(s, "server", "tcp", b.ip, port, t.SERVER_IP, f"step4-{port}")
            new, d = sc._new_accepts(n), self.delta(c0, self.counters())
            sc._check_inbound_accept(s, new, listener, b.ip, port)
            self.moved(s, d, ["node.in_redirect", self.new_conn(direction)])
        return s

    def step5(self) -> Step:
        from ..demo import Step

        sc, a, b = self.sc, t.PODS[0], t.PODS[1]
        s = Step(
            5,
            TITLES[5],
            "ztunnel_host_ingress sends ztunnel's frames for a pod straight to its veth "
            "(cb BYPASS, app_inbound lets them pass); the server's replies to the spoofed "
            "upstream legs reach the pod veth, are redirected to ztunnel and assigned to "
            "the connection's own socket; both connections complete both ways",
        )
        n, c0 = len(sc.accepts()), self.counters()
        sc._connect_and_check(s, a.role, "tcp", t.SERVER_IP, t.TCP_PORT, a.ip, "step5-out")
        sc._connect_and_check(s, "server", "tcp", b.ip, t.TCP_PORT, t.SERVER_IP, "step5-in")
        d = self.delta(c0, self.counters())
        self.moved(s, d, ["node.zt_bypass", "node.in_pass_from_ztunnel", "node.in_redirect"])
        self.moved(s, d, [self.established])
        closes = [r for r in sc.w.proxy_records() if r.get("event") == "close"]
        new_ids = {(r["client"], r["listener"]) for r in sc._new_accepts(n)}
        done = [r for r in closes if (r["client"], r["listener"]) in new_ids]
        both = [r for r in done if r["bytes_up"] > 0 and r["bytes_down"] > 0]
        s.check(
            len(both) == 2,
            f"proxied connections with bytes both ways: {len(both)} of {len(new_ids)}",
        )
        route = sc.w.run(sc.w.zt, "ip", "route", "get", t.SERVER_IP, "mark", "0x400").stdout
        route = route.split("\n")[0]
        s.check(route.startswith("local "), f"ztunnel route (mark 0x400): {route}")
        return s

    def step6(self) -> Step:
        from ..demo import Step

        a = t.PODS[0]
        s = Step(
            6,
            TITLES[6],
            "app_info entry gone, no filter of ours on its veth; no verdict, no proxy log",
        )
        st = self.node_state()
        out = self.w.gdp(self.w.node, "pod", "del", a.ip).stdout.strip()
        s.observed.append(f"pod del: {out}")
        with objects.opened(st.data.get("maps", {}), facts.NODE_MAPS) as maps:
            entry = maps.pod(a.ip) if maps is not None else None
        s.check(entry is None, f"app_info[{a.ip}]: {entry}")
        shown = "".join(
            self.w.run(self.w.node, "tc", "filter", "show", "dev", a.veth, hook, check=False).stdout
            for hook in ("ingress", "egress")
        )
        s.check("geneve-dp:" not in shown, f"tc filters on {a.veth}: {shown.strip() or 'none'}")
        self._not_captured(s, a.role, "tcp", t.SERVER_IP, t.TCP_PORT, a.ip, [])
        return s

    def step7(self) -> Step:
        from ..demo import Step, _diff

        s = Step(
            7,
            TITLES[7],
            "no qdisc, filter, map, program or mount of ours; iptables, rules, routes and "
            "links as before node up, in the node and in the ztunnel namespace",
        )
        node, zt = self.node_state().data, self.zt_state().data
        prog_ids = [int(i) for i in node.get("progs", {}).values()] + [int(zt.get("prog_id", 0))]
        map_ids = [int(i) for i in node.get("maps", {}).values()] + [int(zt.get("stats_map_id", 0))]
        self.w.stop_procs()
        node_out, zt_out = self.sc.teardown_profiles()
        s.observed += [node_out.split(" (")[0], zt_out.split(" (")[0]]
        # The kernel frees a detached program, then its maps, after an RCU grace
        # period: give that a bounded moment.
        deadline = time.monotonic() + RELEASE_WAIT
        while time.monotonic() < deadline and any(
            i and (libbpf.prog_exists(i) or libbpf.map_exists(i)) for i in prog_ids + map_ids
        ):
            time.sleep(0.05)
        left = [i for i in prog_ids if i and libbpf.prog_exists(i)]
        s.check(not left, f"programs still loaded: {left or 'none'} (of {prog_ids})")
        maps_left = [i for i in map_ids if i and libbpf.map_exists(i)]
        s.check(not maps_left, f"maps still there: {maps_left or 'none'} (of {map_ids})")
        for ns, label in ((self.w.node, "node"), (self.w.zt, "ztunnel")):
            after = self.w.snapshot(ns)
            for what, text in self.sc.before[ns].items():
                same = after[what] == text
                s.check(same, f"{label}: {what} {'identical' if same else 'DIFFERS'}")
                if not same:
                    s.failures.append(_diff(text, after[what]))
        return s

    def steps(self) -> list[Callable[[], Step]]:
        return [self.step1, self.step2, self.step3, self.step4, self.step5, self.step6, self.step7]
