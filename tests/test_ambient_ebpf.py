"""Istio 1.20's eBPF redirect mode (reference §8), for real: our BPF programs loaded by
libbpf, attached with tc clsact, in namespaces that start from rp_filter=1.

The `geneve-dp demo --redirect-mode ebpf` steps run once with bpf_sk_assign and once
with Istio's fallback (marks + iptables TPROXY); the watcher must put back filters,
qdiscs and map entries removed behind its back, and reload everything when every
filter (and so every map) is gone; a missing, stale or unloadable build is one line,
exit 2, with nothing attached. Assertions are on the programs' verdict counters, the
proxy's accept log and the kernel's tc/map state, never on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from geneve_dp.ambient import demo
from geneve_dp.ambient import topology as t
from geneve_dp.ambient.ebpf import demo_steps, facts, libbpf, objects
from geneve_dp.ambient.ebpf import node as enode
from geneve_dp.ambient.state import StateFile
from geneve_dp.errors import UserError
from tests.test_ambient_node import one_line_error

WAIT = 20.0  # bound for a repair; the watcher looks once a second
NODE_UP = [
    "node", "up", "--redirect-mode", "ebpf",
    "--ztunnel-ip", t.ZTUNNEL_IP, "--ztunnel-veth", t.ZTUNNEL_VETH,
]  # fmt: skip


def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")


def _tag(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 100000}"


@pytest.fixture(scope="module", params=["sk-assign", "iptables"])
def scenario(request: pytest.FixtureRequest) -> Iterator[demo.Scenario]:
    _root()
    world = t.World(tag=_tag("gdpf"), rp_filter=1)
    sc = demo.Scenario(world, mode="ebpf", ebpf_tproxy=request.param)
    try:
        sc.setup()
        yield sc
    finally:
        sc.destroy()


def steps(sc: demo.Scenario) -> demo_steps.EbpfSteps:
    return demo_steps.EbpfSteps(sc)


def assert_step(step: demo.Step) -> None:
    detail = "\n".join([*step.observed, *(f"FAILED: {f}" for f in step.failures)])
    assert step.passed, f"step {step.number} ({step.title}):\n{detail}"


@pytest.mark.root
def test_1_outbound_capture_keeps_the_original_destination(scenario: demo.Scenario) -> None:
    assert_step(steps(scenario).step1())
    rec = [r for r in scenario.accepts() if r["listener"] == 15001]
    assert rec and rec[-1]["orig_dst"] == f"{t.SERVER_IP}:{t.TCP_PORT}"
    assert rp_filter(scenario.w, scenario.w.node, "all") == "0"  # set by node up


@pytest.mark.root
def test_2_plain_pod_is_not_captured(scenario: demo.Scenario) -> None:
    assert_step(steps(scenario).step2())


@pytest.mark.root
def test_3_dns_and_host_ip_are_not_captured(scenario: demo.Scenario) -> None:
    assert_step(steps(scenario).step3())


@pytest.mark.root
def test_4_inbound_capture_to_15006_and_15008(scenario: demo.Scenario) -> None:
    assert_step(steps(scenario).step4())
    assert [r["listener"] for r in scenario.accepts()[-2:]] == [15006, 15008]


@pytest.mark.root
def test_5_original_source_return_and_ztunnel_bypass(scenario: demo.Scenario) -> None:
    assert_step(steps(scenario).step5())


@pytest.mark.root
def test_5_status_shows_the_programs_verdicts(scenario: demo.Scenario) -> None:
    """`status` reads the counter maps the records name: after steps 1-5, every verdict
    by name, the redirects counted, and no more than the maps hold a moment later."""
    w, ev = scenario.w, steps(scenario)
    shown = {
        role: json.loads(w.gdp(ns, role, "status", "--json").stdout)["ebpf_verdicts"]
        for role, ns in (("node", w.node), ("ztunnel", w.zt))
    }
    after = ev.counters()
    assert sorted(shown["node"]) == sorted(facts.NODE_COUNTERS)
    assert sorted(shown["ztunnel"]) == sorted(facts.ZTUNNEL_COUNTERS)
    assert shown["node"]["out_redirect"] > 0 and shown["node"]["in_redirect"] > 0
    for role, prefix in (("node", "node."), ("ztunnel", "zt.")):
        for name, n in shown[role].items():
            assert n <= after[prefix + name], (role, name)
    ztunnel_taken = sum(n for name, n in shown["ztunnel"].items() if "listener" in name)
    assert ztunnel_taken > 0 or not ev.sk_assign  # iptables TPROXY counts in ztunnel_mark
    text = w.gdp(w.node, "node", "status").stdout
    assert "eBPF verdicts (packets, since the programs were loaded):" in text
    assert "    out_redirect: " in text


@pytest.mark.root
def test_6_pod_del_detaches_and_stops_capture(scenario: demo.Scenario) -> None:
    assert_step(steps(scenario).step6())


@pytest.mark.root
def test_7_down_leaves_no_qdisc_filter_map_program_or_mount(scenario: demo.Scenario) -> None:
    assert_step(steps(scenario).step7())


def rp_filter(w: t.World, ns: str, dev: str) -> str:
    return w.run(ns, "sysctl", "-n", f"net.ipv4.conf.{dev}.rp_filter").stdout.strip()


# --- the watcher -----------------------------------------------------------------------


@pytest.fixture
def ebpf_world() -> Iterator[demo.Scenario]:
    _root()
    sc = demo.Scenario(t.World(tag=_tag("gdpw"), rp_filter=1), mode="ebpf")
    try:
        sc.setup()
        yield sc
    finally:
        sc.destroy()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not come back within {timeout:.0f}s")


def filters(w: t.World, ns: str, dev: str, hook: str) -> str:
    return w.run(ns, "tc", "filter", "show", "dev", dev, hook, check=False).stdout


@pytest.mark.root
def test_watchers_put_back_filters_qdiscs_and_map_entries(ebpf_world: demo.Scenario) -> None:
    sc = ebpf_world
    w, ev = sc.w, steps(sc)
    a, b = t.PODS[0], t.PODS[1]
    # A filter, a whole clsact qdisc, the ztunnel side's filter, and map entries.
    w.run(w.node, "tc", "filter", "del", "dev", a.veth, "ingress")
    w.run(w.node, "tc", "qdisc", "del", "dev", b.veth, "clsact")
    w.run(w.zt, "tc", "qdisc", "del", "dev", "eth0", "clsact")
    st = ev.node_state()
    with objects.opened(st.data["maps"], facts.NODE_MAPS) as maps:
        assert maps is not None
        assert maps.del_pod(a.ip)
        maps.set_host_ip("0.0.0.0")
    wait_for(lambda: "geneve-dp:app_outbound" in filters(w, w.node, a.veth, "ingress"), "filter")
    for hook, prog in (("ingress", "app_outbound"), ("egress", "app_inbound")):
        wait_for(lambda: f"geneve-dp:{prog}" in filters(w, w.node, b.veth, hook), "qdisc")  # noqa: B023
    wait_for(lambda: "geneve-dp:ztunnel_tproxy" in filters(w, w.zt, "eth0", "ingress"), "zt")

    def entries_back() -> bool:
        with objects.opened(ev.node_state().data["maps"], facts.NODE_MAPS) as maps:
            return (
                maps is not None and maps.pod(a.ip) is not None and maps.host_ip() == t.GATEWAY_IP
            )

    def logged() -> bool:
        log = (w.state_root / w.node / "node-watch.log").read_text()
        return "app_info: pod 10.244.1.10 was missing" in log and "host_ip_info" in log

    wait_for(entries_back, "map entries")
    wait_for(logged, "one log line per repair")
    # And it all works again.
    assert_step(ev.step1())
    assert_step(ev.step4())


@pytest.mark.root
def test_every_filter_gone_reloads_the_programs_and_maps(ebpf_world: demo.Scenario) -> None:
    sc = ebpf_world
    w, ev = sc.w, steps(sc)
    old_maps = dict(ev.node_state().data["maps"])
    # The watcher held still while every filter goes, so that the maps go too.
    watcher = int((w.state_root / w.node / "node-watch.pid").read_text().split()[0])
    os.kill(watcher, signal.SIGSTOP)
    try:
        for dev in (t.ZTUNNEL_VETH, t.PODS[0].veth, t.PODS[1].veth):
            w.run(w.node, "tc", "qdisc", "del", "dev", dev, "clsact")
        # Freed once the last program using them is (deferred by the kernel: RCU).
        wait_for(lambda: not any(libbpf.map_exists(i) for i in old_maps.values()), "maps' end")
    finally:
        os.kill(watcher, signal.SIGCONT)

    def reloaded() -> bool:
        attached = [
            f"geneve-dp:{prog}" in filters(w, w.node, dev, hook)
            for dev, hook, prog in (
                (t.ZTUNNEL_VETH, "ingress", "ztunnel_host_ingress"),
                (t.PODS[0].veth, "ingress", "app_outbound"),
                (t.PODS[1].veth, "egress", "app_inbound"),
            )
        ]
        log = (w.state_root / w.node / "node-watch.log").read_text()
        said = "BPF maps were gone (every filter removed); loaded again, 2 pods put back" in log
        return all(attached) and ev.node_state().data["maps"] != old_maps and said

    wait_for(reloaded, "the node programs")
    assert_step(ev.step1())
    assert_step(ev.step5())


@pytest.mark.root
def test_a_lone_filter_comes_back_on_the_same_maps(ebpf_world: demo.Scenario) -> None:
    sc = ebpf_world
    w, ev = sc.w, steps(sc)
    maps = dict(ev.node_state().data["maps"])
    assert_step(ev.step1())
    before = ev.counters()["node.out_redirect"]
    w.run(w.node, "tc", "qdisc", "del", "dev", t.ZTUNNEL_VETH, "clsact")
    wait_for(
        lambda: "geneve-dp:ztunnel_host_ingress" in filters(w, w.node, t.ZTUNNEL_VETH, "ingress"),
        "the ztunnel veth's filter",
    )
    # Same maps: pods' entries and the counters carried on.
    assert ev.node_state().data["maps"] == maps
    assert ev.counters()["node.out_redirect"] >= before > 0
    assert_step(ev.step5())


# --- bad builds and bad input: one line, exit 2, nothing attached -------------------------


@pytest.fixture
def bare_world() -> Iterator[t.World]:
    _root()
    w = t.World(tag=_tag("gdpx"))
    try:
        w.build()
        yield w
    finally:
        for ns, args in ((w.node, ["node", "down"]), (w.zt, ["ztunnel", "down"])):
            w.gdp(ns, *args, check=False)
        w.destroy()


def nothing_attached(w: t.World) -> None:
    for ns in (w.node, w.zt):
        assert "clsact" not in w.run(ns, "tc", "qdisc", "show").stdout
    assert not (w.state_root / w.node / "node.json").exists()


def gdp_env(
    w: t.World, ns: str, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "geneve_dp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**w.env(), **env})


@pytest.mark.root
def test_missing_or_unloadable_objects_are_one_line_and_nothing_attached(
    bare_world: t.World, tmp_path: Path
) -> None:
    w = bare_world
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = gdp_env(w, w.node, {objects.DIR_ENV: str(empty)}, *NODE_UP)
    one_line_error(proc, "--redirect-mode", "not built")
    nothing_attached(w)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / objects.NODE_OBJECT).write_bytes(b"\x7fELF not really")
    proc = gdp_env(w, w.node, {objects.DIR_ENV: str(garbage)}, *NODE_UP)
    one_line_error(proc, "--redirect-mode", "cannot open")
    nothing_attached(w)

    # A program the verifier refuses (reads the packet without a bounds check): the
    # kernel's answer is one line, and nothing of the object is attached anywhere.
    bad = tmp_path / "bad"
    bad.mkdir()
    src = tmp_path / "bad.bpf.c"
    src.write_text(
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
        'SEC("tc") int app_outbound(struct __sk_buff *skb)\n'
        "{ return *(int *)(long)skb->data; }\n"
        'char _license[] SEC("license") = "GPL";\n'
    )
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu",
         "-c", str(src), "-o", str(bad / objects.NODE_OBJECT)],
        check=True,
    )  # fmt: skip
    proc = gdp_env(w, w.node, {objects.DIR_ENV: str(bad)}, *NODE_UP)
    one_line_error(proc, "--redirect-mode", "this kernel cannot load", "Permission denied")
    nothing_attached(w)
    assert w.gdp(w.node, "node", "down").returncode == 0


@pytest.mark.root
def test_bad_input_in_ebpf_mode(bare_world: t.World) -> None:
    w = bare_world
    one_line_error(
        w.gdp(w.node, *NODE_UP, "--istio-version", "1.19", check=False), "--istio-version", "1.20"
    )
    one_line_error(w.gdp(w.node, *NODE_UP, "--port", "6081", check=False), "--port", "no meaning")
    one_line_error(
        w.gdp(w.node, *NODE_UP, "--ztunnel-mac", "zz:00", check=False), "--ztunnel-mac", "MAC"
    )
    one_line_error(
        w.gdp(w.node, *NODE_UP[:4], "--ztunnel-ip", t.ZTUNNEL_IP, "--ztunnel-veth", "veth-a",
              check=False),
        "--ztunnel-veth",
    )  # fmt: skip
    nothing_attached(w)
    w.gdp(w.node, *NODE_UP)
    # The ztunnel pod itself, and an address the node has no route to, are refused.
    one_line_error(w.gdp(w.node, "pod", "add", t.ZTUNNEL_IP, "--uid", "u", check=False), "IP")
    one_line_error(w.gdp(w.node, "pod", "add", "10.99.9.9", "--uid", "u", check=False), "IP")
    assert "clsact" not in w.run(w.node, "tc", "qdisc", "show", "dev", "eth0").stdout
    assert w.gdp(w.node, "pod", "list").stdout == ""
    # Adding twice is a no-op; the listing comes from the app_info map.
    a = t.PODS[0]
    assert "enrolled" in w.gdp(w.node, "pod", "add", a.ip, "--uid", a.uid).stdout
    assert "already" in w.gdp(w.node, "pod", "add", a.ip, "--uid", a.uid).stdout
    assert w.gdp(w.node, "pod", "list").stdout.split() == [a.ip, a.uid]


# --- no root ---------------------------------------------------------------------------


def test_stale_objects_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (objects.OBJECT_DIR / objects.NODE_OBJECT).exists():
        pytest.fail("BPF objects are not built (python3 setup.py build_ext --inplace)")
    shutil.copy(objects.OBJECT_DIR / objects.NODE_OBJECT, tmp_path)
    (tmp_path / objects.BUILD_ID).write_text("0123456789abcdef\n")
    monkeypatch.setattr(objects, "OBJECT_DIR", tmp_path)
    monkeypatch.delenv(objects.DIR_ENV, raising=False)
    with pytest.raises(UserError, match="stale"):
        objects.object_path(objects.NODE_OBJECT)


def test_every_counter_has_a_name_in_the_built_header() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bb", objects.SOURCE_DIR / "build_bpf.py")
    assert spec is not None and spec.loader is not None
    bb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bb)
    header = bb.facts_header()
    for name in facts.NODE_COUNTERS:
        assert f"GDP_NODE_{name}," in header
    for name in facts.ZTUNNEL_COUNTERS:
        assert f"GDP_ZT_{name}," in header
    assert f"#define GDP_CB_BYPASS {facts.CB_BYPASS:#x}u" in header


def test_map_layouts_round_trip() -> None:
    e = objects.PodEntry(7, "02:00:00:00:00:0a")
    assert len(e.pack()) == 12 and objects.PodEntry.unpack(e.pack()) == e
    z = objects.ZtunnelEntry(3, "aa:bb:cc:dd:ee:ff", True)
    assert len(z.pack()) == 12 and objects.ZtunnelEntry.unpack(z.pack()) == z


def test_redirect_mode_is_checked_by_the_parser() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "geneve_dp", "node", "up", "--redirect-mode", "bogus"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--redirect-mode" in proc.stderr


@pytest.mark.root
def test_down_after_a_crash_that_lost_the_record_leaves_nothing(bare_world: t.World) -> None:
    w = bare_world
    before = {ns: w.snapshot(ns) for ns in (w.node, w.zt)}
    w.gdp(w.node, *NODE_UP)
    w.gdp(w.zt, "ztunnel", "up", "--redirect-mode", "ebpf", "--host-ip", t.GATEWAY_IP)
    for pod in t.PODS[:2]:
        w.gdp(w.node, "pod", "add", pod.ip, "--uid", pod.uid)
    node_st = StateFile.load(w.state_root / w.node / "node.json").data
    prog_ids = [int(i) for i in node_st["progs"].values()]
    # The crash: every helper process SIGKILLed, the state directory (in /run) gone.
    for ns in (w.node, w.zt):
        for pid in w.run(ns, "ip", "netns", "pids", ns).stdout.split():
            with contextlib.suppress(ProcessLookupError):  # `ip netns pids` itself
                os.kill(int(pid), signal.SIGKILL)
    shutil.rmtree(w.state_root)
    for ns, role in ((w.node, "node"), (w.zt, "ztunnel")):
        out = w.gdp(ns, role, "down").stdout
        assert "geneve-dp" not in w.run(ns, "tc", "filter", "show", "dev", "lo").stdout, out
    for ns in (w.node, w.zt):
        after = w.snapshot(ns)
        for what in ("tc", "ip rule", "ip route show table all", "iptables-save"):
            assert after[what] == before[ns][what], (ns, what, after[what])

    def gone() -> bool:
        return not any(libbpf.prog_exists(i) for i in prog_ids)

    wait_for(gone, "the programs' release")


@pytest.mark.root
def test_demo_command_in_ebpf_mode_passes_every_step(tmp_path: Path) -> None:
    _root()
    env = {**os.environ, "GENEVE_DP_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run(
        [sys.executable, "-m", "geneve_dp", "demo", "--redirect-mode", "ebpf", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"passed": 7, "total": 7, "failed": []}
    for n, title in demo_steps.TITLES.items():
        assert f"step {n}: {title} ..." in proc.stdout
    assert "node.*: verdicts of the node programs" in proc.stdout
    assert "node up: BPF: ambient_node.bpf.o" in proc.stdout  # relayed progress


@pytest.mark.root
def test_dns_capture_flag_redirects_dns_to_ztunnel(bare_world: t.World) -> None:
    w = bare_world
    w.gdp(w.node, *NODE_UP, "--dns-capture")
    a = t.PODS[0]
    w.gdp(w.node, "pod", "add", a.ip, "--uid", a.uid)
    st = StateFile.load(w.state_root / w.node / "node.json")
    with objects.opened(st.data["maps"], facts.NODE_MAPS) as maps:
        assert maps is not None
        zt = maps.ztunnel()
        assert zt is not None and zt.dns_capture
    c0 = enode.counters(st) or {}
    w.run(
        w.ns(a.role), sys.executable, "-m", "geneve_dp.ambient.echo", "udp", t.SERVER_IP, "53",
        "q", "--timeout", "0.2", check=False,
    )  # fmt: skip
    c1 = enode.counters(st) or {}
    assert c1["out_redirect"] - c0["out_redirect"] >= 1, (c0, c1)
    assert c1["out_pass_dns"] == c0["out_pass_dns"]
