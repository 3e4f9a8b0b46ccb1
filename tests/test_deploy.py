"""deploy/: the Kubernetes manifest is valid YAML of the expected shape whose command
line and ConfigMap our own parsers accept; the systemd unit passes `systemd-analyze
verify` and its command lines parse; and the two capabilities both grant are enough:
`node up`/`down` and the DaemonSet's `up --config` run for real with only those."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from geneve_dp import kube
from geneve_dp.ambient import topology as t
from geneve_dp.cli import build_parser
from geneve_dp.dataplane.spec import load_config
from geneve_dp.errors import UserError
from geneve_dp.kube import PodRemote
from geneve_dp.metrics import parse_addr
from tests import kube_api as kube_api_mod
from tests.netns import Netns, veth

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "geneve-dp.yaml"
UNIT = ROOT / "deploy" / "systemd" / "geneve-dp-node.service"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_NICE = 12, 13, 23
UNIT_CAPS = 1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW | 1 << CAP_SYS_NICE
K8S_CAPS = UNIT_CAPS
VENV_BIN = "/opt/geneve-dp/bin/geneve-dp"


KINDS = ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]


def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]


def manifest() -> tuple[dict[str, Any], dict[str, Any]]:
    kinds = {d["kind"]: d for d in docs()}
    assert sorted(kinds) == KINDS and len(docs()) == len(KINDS)
    return kinds["ConfigMap"], kinds["DaemonSet"]


def k8s_argv(ds: dict[str, Any], node_ip: str) -> list[str]:
    """The container's command line as the kubelet expands $(VAR) from its env."""
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    fields = {"status.hostIP": node_ip, "spec.nodeName": "node-1"}
    env = {
        e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for e in c["env"]
        if "valueFrom" in e
    }
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["command"] + c["args"]]


def container_env(ds: dict[str, Any]) -> dict[str, str]:
    """Where each env variable comes from: a value, or the downward API's field."""
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] if "valueFrom" in e else e["value"]
        for e in c["env"]
    }


def test_manifests_pass_the_kubernetes_schema() -> None:
    import kubernetes_validate

    for version in ("1.27.0", "1.30.0"):
        for doc in docs():
            kubernetes_validate.validate(doc, version, strict=True)
    # The validator can fail, and it runs offline (the schemas ship with it).
    _cm, ds = manifest()
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["timeoutSeconds"] = "5"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.30.0", strict=True)
    ds["spec"]["template"]["spec"]["hostNetwork"] = True
    ds["spec"]["template"]["spec"]["hostNetworking"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.30.0", strict=True)


def test_daemonset_shape_and_its_command_line(tmp_path: Path) -> None:
    cm, ds = manifest()
    assert ds["apiVersion"] == "apps/v1" and cm["apiVersion"] == "v1"
    pod = ds["spec"]["template"]["spec"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items()
        <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod["hostNetwork"] is True
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW", "SYS_NICE"]}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    env = container_env(ds)
    assert env["NODE_IP"] == "status.hostIP" and env["NODE_NAME"] == "spec.nodeName"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    netns = mounts["/var/run/netns"]
    assert volumes[netns["name"]]["hostPath"]["path"] == "/var/run/netns"
    assert netns["mountPropagation"] == "HostToContainer"
    assert volumes[mounts["/dev/net/tun"]["name"]]["hostPath"]["type"] == "CharDevice"

    argv = k8s_argv(ds, "192.0.2.10")
    assert argv[0] == "geneve-dp"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "up" and args.func.__name__ == "cmd_up"
    assert args.log_format == "json"
    # One form of --metrics-addr for IPv4 and IPv6 nodes alike.
    assert parse_addr(args.metrics_addr) == ("192.0.2.10", 9464)
    v6 = build_parser().parse_args(k8s_argv(ds, "fd00:10::7")[1:])
    assert parse_addr(v6.metrics_addr) == ("fd00:10::7", 9464)
    # --config names the ConfigMap's key where the volume mounts it, and parses.
    config = Path(args.config)
    (cm_mount,) = [m for m in c["volumeMounts"] if volumes[m["name"]].get("configMap")]
    assert volumes[cm_mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert str(config.parent) == cm_mount["mountPath"] and config.name in cm["data"]
    local = tmp_path / config.name
    local.write_text(cm["data"][config.name])
    asked: list[PodRemote] = []

    def resolver(remote: PodRemote) -> str:
        asked.append(remote)
        return "10.244.7.3"

    specs, settings = load_config(local, resolver)
    # No cluster-wide address: every tunnel's remote is the node's own ztunnel.
    assert asked == [PodRemote("ztunnel", "istio-system", "app=ztunnel")]
    assert [(s.name, s.vni, str(s.remote)) for s in specs] == [
        ("istioin", 1000, "10.244.7.3"),
        ("istioout", 1001, "10.244.7.3"),
    ]
    assert settings["drop_alarm"] == 100
    assert settings["remotes"] == {"ztunnel": (asked[0], "10.244.7.3")}
    probe = c["livenessProbe"]
    parsed = build_parser().parse_args(probe["exec"]["command"][1:])
    assert parsed.func.__name__ == "cmd_show" and parsed.name == "istioin"
    # The probe's command imports no engine (tests/test_papercuts.py): seconds to spare.
    assert probe["timeoutSeconds"] >= 3 and probe["periodSeconds"] > probe["timeoutSeconds"]
    port = int(ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    assert argv[argv.index("--metrics-addr") + 1].endswith(f":{port}")


def test_rbac_allows_exactly_what_up_asks_and_the_pod_uses_it() -> None:
    kinds = {d["kind"]: d for d in docs()}
    sa, role, binding = kinds["ServiceAccount"], kinds["ClusterRole"], kinds["ClusterRoleBinding"]
    _cm, ds = manifest()
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "kube-system"}
    ]


def test_dockerfile_builds_the_image_the_daemonset_runs() -> None:
    text = DOCKERFILE.read_text()
    _cm, ds = manifest()
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert f"-t {c['image']} " in text  # the build line names the manifest's image
    # Every source it copies is in the repository, and the entry point is the command.
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert json.loads(text.split("ENTRYPOINT ", 1)[1].splitlines()[0]) == c["command"]
    assert "pip install" in text and "/opt/geneve-dp/bin/pip" in text  # a venv (PEP 668)
    for tool in ("iproute2", "iptables", "ipset"):
        assert tool in text
    # the fast path links libsodium (csrc/auth.c): headers to build, library to run
    build, runtime = text.split("\nFROM ", 2)[1:]
    assert "libsodium-dev" in build and "libsodium23" in runtime
    ignored = (ROOT / ".dockerignore").read_text()
    assert "**/*.so" in ignored  # a locally built fast path never replaces the image's


def unit() -> dict[str, dict[str, list[str]]]:
    """The unit file as systemd reads it: sections of keys with every value given."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_argv(command: str, env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in shlex.split(command)]


def unit_env(svc: dict[str, list[str]]) -> dict[str, str]:
    return dict(w.split("=", 1) for line in svc["Environment"] for w in shlex.split(line))


def test_systemd_unit_verifies_and_its_commands_parse(tmp_path: Path) -> None:
    svc = unit()["Service"]
    # Long-running: the main process is the node's reconciler, restarted if it fails.
    assert svc["Type"] == ["simple"] and svc["Restart"] == ["on-failure"]
    assert unit()["Unit"]["StartLimitIntervalSec"] == ["0"]  # a late ztunnel: keep trying
    assert "RemainAfterExit" not in svc
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_NICE"}
    assert set(svc["CapabilityBoundingSet"][0].split()) == caps
    assert set(svc["AmbientCapabilities"][0].split()) == caps
    assert svc["NoNewPrivileges"] == ["yes"]
    env = unit_env(svc)
    (start,) = svc["ExecStart"]
    (stop_cmd,) = svc["ExecStop"]
    up = unit_argv(start, env)
    # A venv's entry point: Debian's Python refuses system-wide pip installs (PEP 668).
    assert up[0] == VENV_BIN and unit_argv(stop_cmd, env)[0] == VENV_BIN
    args = build_parser().parse_args(up[1:])
    assert args.func.__name__ == "cmd_node_up" and args.ztunnel_ip == env["ZTUNNEL_IP"]
    assert args.log_format == "json" and args.foreground is True
    down = build_parser().parse_args(unit_argv(stop_cmd, env)[1:])
    assert down.func.__name__ == "cmd_down" and down.role == "node"

    # systemd's own check. It insists the binary exists: point a copy at a stand-in.
    stub = tmp_path / "geneve-dp"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(VENV_BIN, str(stub)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    bad = tmp_path / "bad.service"
    bad.write_text(copy.read_text().replace("Restart=", "Restarts="))
    proc = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert "Restarts" in proc.stderr  # the check can fail


def exposure(path: Path) -> float:
    """`systemd-analyze security`'s overall exposure of a unit file (0 best, 10 worst)."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1))


def test_systemd_unit_exposure_is_below_the_old_units(tmp_path: Path) -> None:
    # 6.6 was the rating of the first unit (capabilities and ProtectSystem only).
    score = exposure(UNIT)
    assert score < 4.0, score
    # The measure can fail: the same unit without its sandboxing rates worse.
    kept = ("[", "Description", "Type", "ExecStart", "ExecStop", "Environment", "WantedBy")
    bare = tmp_path / "bare.service"
    bare.write_text(
        "\n".join(x for x in UNIT.read_text().splitlines() if x.startswith(kept)) + "\n"
    )
    assert exposure(bare) > 6.6 > score


def capped(caps: list[str] | None = None) -> list[str]:
    """setpriv limited to ``caps`` (default: the unit's): as CapabilityBoundingSet= does, a
    uid-0 process then runs with exactly these."""
    caps = caps or unit()["Service"]["CapabilityBoundingSet"][0].split()
    names = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    return ["setpriv", f"--bounding-set=-all,{names}", "--inh-caps=-all", "--"]


def cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


@pytest.fixture
def world() -> Iterator[t.World]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces and real devices)")
    w = t.World(tag=f"gdpd-{os.getpid()}-{time.monotonic_ns() % 100000}")
    try:
        w.build()
        yield w
    finally:
        w.gdp(w.node, "node", "down", check=False)
        w.destroy()


def nices(pid: int) -> set[int]:
    """The nice values of a process's threads (field 19 of /proc/PID/task/TID/stat)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return out


@pytest.mark.root
def test_node_service_runs_long_with_only_the_units_capabilities(world: t.World) -> None:
    w = world
    svc = unit()["Service"]
    env = unit_env(svc)
    env.update(ZTUNNEL_IP=t.ZTUNNEL_IP, ZTUNNEL_VETH=t.ZTUNNEL_VETH)
    cmd = ["ip", "netns", "exec", w.node, *capped(), sys.executable, "-m", "geneve_dp"]
    start = subprocess.Popen(
        [*cmd, *unit_argv(svc["ExecStart"][0], env)[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=w.env(),
    )
    try:
        assert start.stdout is not None
        line = start.stdout.readline()
        while line and not line.startswith("node up:"):
            line = start.stdout.readline()
        assert line.startswith("node up:"), start.stderr.read() if start.stderr else ""
        # ExecStart's process stays: it became the reconciler (Type=simple's main pid).
        deadline = time.monotonic() + 20
        while b"watch" not in Path(f"/proc/{start.pid}/cmdline").read_bytes():
            assert start.poll() is None and time.monotonic() < deadline, "did not stay"
            time.sleep(0.1)
        assert cap_eff(start.pid) == UNIT_CAPS
        daemon = int((w.state_root / w.node / "node-endpoints.pid").read_text().split()[0])
        assert cap_eff(daemon) == UNIT_CAPS
        # CAP_SYS_NICE is what lets the forwarding workers run at nice -10.
        assert -10 in nices(daemon), nices(daemon)
        assert "istioin" in w.run(w.node, "ip", "-o", "link").stdout
        # The reconciler does its job: a deleted device comes back.
        w.run(w.node, "ip", "link", "del", "istioin")
        while "istioin" not in w.run(w.node, "ip", "-o", "link").stdout:
            assert time.monotonic() < deadline + 30, "istioin was not put back"
            time.sleep(0.2)
        # ExecStop: `node down` stops the main process and removes everything.
        stop = subprocess.run(
            [*cmd, *unit_argv(svc["ExecStop"][0], env)[1:]],
            capture_output=True,
            text=True,
            env=w.env(),
            timeout=90,
        )
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert start.wait(timeout=30) == 0
    finally:
        if start.poll() is None:
            start.kill()
        start.communicate(timeout=10)
    assert "istioin" not in w.run(w.node, "ip", "-o", "link").stdout


@contextlib.contextmanager
def kube_api(
    directory: Path, pods: list[dict[str, Any]], argv: Callable[..., list[str]]
) -> Iterator[int]:
    """The API server stand-in (tests/kube_api.py) run through ``argv`` (a namespace's,
    or plain); yields its port."""
    directory.mkdir(parents=True, exist_ok=True)
    kube_api_mod.make_cert(directory)
    (directory / "pods.json").write_text(json.dumps(pods))
    with socket.socket() as probe:  # a free port (the server binds it just after)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        argv(sys.executable, "-m", "tests.kube_api", str(directory), str(port)), cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 20
        while not (directory / "ready").exists():
            assert server.poll() is None and time.monotonic() < deadline, "API stand-in failed"
            time.sleep(0.05)
        yield port
    finally:
        server.kill()
        server.wait(timeout=10)


def service_account(directory: Path, api: Path, port: int) -> dict[str, str]:
    """A pod's environment for geneve_dp.kube: the API address and a service account."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text("test-token\n")
    (directory / "ca.crt").write_bytes((api / "cert.pem").read_bytes())
    return {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(port),
        kube.SA_DIR_ENV: str(directory),
        "NODE_NAME": "node-1",
    }


ZTUNNELS = [
    kube_api_mod.pod("ztunnel-old", ["10.244.1.99"], "2026-01-01T00:00:00Z"),
    kube_api_mod.pod("ztunnel-new", ["10.244.1.3", "fd00:244::3"], "2026-01-02T00:00:00Z"),
    kube_api_mod.pod("ztunnel-starting", ["10.244.1.77"], "2026-01-03T00:00:00Z", ready=False),
]


def test_choose_takes_the_newest_ready_pod_of_the_nodes_family() -> None:
    assert kube.choose(ZTUNNELS, 4) == "10.244.1.3"
    assert kube.choose(ZTUNNELS, 6) == "fd00:244::3"
    assert kube.choose(ZTUNNELS[:1], 6) is None
    assert kube.choose(ZTUNNELS[2:], 4) is None  # not Ready yet
    assert kube.choose([{"status": {"podIP": "junk"}}], 4) is None


def test_resolve_and_follow_against_an_api_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = PodRemote("ztunnel", "istio-system", "app=ztunnel")
    with kube_api(tmp_path / "api", ZTUNNELS, lambda *a: list(a)) as port:
        for key, value in service_account(tmp_path / "sa", tmp_path / "api", port).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("NODE_IP", "fd00::10")  # an IPv6 node gets ztunnel's IPv6
        assert kube.resolve(remote) == "fd00:244::3"
        monkeypatch.setenv("NODE_IP", "192.0.2.10")
        assert kube.resolve(remote) == "10.244.1.3"
        (request, *_) = [json.loads(x) for x in (tmp_path / "api" / "requests.jsonl").open()]
        assert request == {
            "path": "/api/v1/namespaces/istio-system/pods",
            "query": {"labelSelector": "app=ztunnel", "fieldSelector": "spec.nodeName=node-1"},
            "auth": "Bearer test-token",
        }
        # ztunnel restarts with another IP: follow() notices and says so, once.
        moved = threading.Event()
        stop = kube.follow({"ztunnel": "10.244.1.3"}, {"ztunnel": remote}, 0.1, moved.set)
        try:
            time.sleep(0.5)
            assert not moved.is_set()  # the same answer is no move
            pods = [kube_api_mod.pod("ztunnel-next", ["10.244.1.4"], "2026-02-01T00:00:00Z")]
            (tmp_path / "api" / "pods.json").write_text(json.dumps(pods))
            assert moved.wait(10)
        finally:
            stop.set()
        # No pod at all: one line naming the selector and the node.
        (tmp_path / "api" / "pods.json").write_text("[]")
        with pytest.raises(UserError, match=r"^remotes.ztunnel: no Ready pod .*node-1"):
            kube.resolve(remote)
    # The API server gone: a one-line error, not a traceback.
    with pytest.raises(UserError, match=r"^remotes: cannot ask the API server"):
        kube.resolve(remote)


def test_daemonset_command_runs_with_only_its_capabilities(
    netns_factory: Callable[[str], Netns], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENEVE_DP_RUN_DIR", str(tmp_path / "run"))
    cm, ds = manifest()
    ns, peer = netns_factory("ds"), netns_factory("zt")
    # The "node" reaches its ztunnel pod over its eth0; the API server answers on its
    # loopback with the pods of tests/kube_api.py.
    veth(ns, "eth0", peer, "eth0")
    ns.run("ip", "addr", "add", "10.244.1.1/24", "dev", "eth0")
    ns.run("ip", "link", "set", "lo", "up")
    config = tmp_path / "tunnels.toml"
    config.write_text(cm["data"]["tunnels.toml"])
    argv = k8s_argv(ds, "127.0.0.1")
    argv[argv.index("--config") + 1] = str(config)
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    caps = ["CAP_" + cap for cap in c["securityContext"]["capabilities"]["add"]]
    with kube_api(tmp_path / "api", ZTUNNELS, ns.argv) as port:
        env = {
            **os.environ,
            **service_account(tmp_path / "sa", tmp_path / "api", port),
            "NODE_IP": "127.0.0.1",
        }
        proc = subprocess.Popen(
            ns.argv(*capped(caps), sys.executable, "-m", "geneve_dp", *argv[1:]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "ready: istioin, istioout" in line and "http://127.0.0.1:9464" in line, line + (
                proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            )
            pid = int(re.search(r"pid (\d+)", line).group(1))  # type: ignore[union-attr]
            assert cap_eff(pid) == K8S_CAPS
            # The node's own ztunnel, the newest Ready one, is every tunnel's remote.
            show = ns.run(sys.executable, "-m", "geneve_dp", "show", "--json").stdout
            assert {t["name"]: t["remote"] for t in json.loads(show)} == {
                "istioin": "10.244.1.3",
                "istioout": "10.244.1.3",
            }
            # The liveness probe's command answers from inside.
            probe = c["livenessProbe"]["exec"]
            check = subprocess.run(
                ns.argv(sys.executable, "-m", "geneve_dp", *probe["command"][1:]),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert check.returncode == 0 and "istioin" in check.stdout, check.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "istioin" not in ns.run("ip", "-o", "link").stdout
