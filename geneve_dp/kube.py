"""A tunnel's remote found in Kubernetes: the pod on this node that a label selector
picks (ztunnel's, as istio-cni finds it), asked from the API server with the pod's own
service account. Standard library only (urllib, ssl, json).

Config: ``[remotes.NAME]`` tables with ``namespace`` and ``selector``; a tunnel whose
``remote`` is NAME gets that pod's IP. The node is ``$NODE_NAME`` and its family that of
``$NODE_IP`` (both from the downward API). Of the pods found, the newest Ready one wins,
as istio-cni 1.18-1.20 picks its ztunnel.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

# Where a pod finds its service account's token and CA (the kubelet mounts them there).
SA_DIR_ENV = "GENEVE_DP_KUBE_SA_DIR"
DEFAULT_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TIMEOUT_S = 5.0
FOLLOW_INTERVAL_S = 10.0
REMOTE_KEYS = ("namespace", "selector")

log = logging.getLogger("geneve_dp.kube")


@dataclass(frozen=True)
class PodRemote:
    """The pod a ``[remotes.NAME]`` table names."""

    name: str
    namespace: str
    selector: str


def parse_remotes(value: object) -> dict[str, PodRemote]:
    """The ``remotes`` top-level table of a config file."""
    accepted = "[remotes.NAME] tables with namespace and selector strings"
    if not isinstance(value, Mapping):
        raise UserError(f"{value!r} is not a table; accepted: {accepted}", "remotes")
    out = {}
    for name, table in value.items():
        field = f"remotes.{name}"
        if not isinstance(table, Mapping) or sorted(table) != sorted(REMOTE_KEYS):
            raise UserError(f"{table!r} is not namespace + selector; accepted: {accepted}", field)
        if not all(isinstance(table[k], str) and table[k] for k in REMOTE_KEYS):
            raise UserError(f"{table!r} has an empty or non-string value; {accepted}", field)
        out[str(name)] = PodRemote(str(name), table["namespace"], table["selector"])
    return out


def _context() -> tuple[str, str, ssl.SSLContext]:
    """API server URL, bearer token and TLS context of this pod's service account."""
    host, port = (
        os.environ.get("KUBERNETES_SERVICE_HOST"),
        os.environ.get("KUBERNETES_SERVICE_PORT"),
    )
    if not host or not port:
        raise UserError(
            "KUBERNETES_SERVICE_HOST/PORT are unset; accepted: run in a pod (the kubelet sets "
            "them) or give the remote as an address",
            "remotes",
        )
    sa = Path(os.environ.get(SA_DIR_ENV, DEFAULT_SA_DIR))
    try:
        token = (sa / "token").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(sa / "ca.crt"))
    except OSError as exc:
        raise UserError(
            f"cannot read the service account in {sa}: {exc.strerror}; accepted: a pod with "
            "automountServiceAccountToken",
            "remotes",
        ) from exc
    url_host = f"[{host}]" if ":" in host else host
    return f"https://{url_host}:{port}", token, ctx


def _get(path: str, query: Mapping[str, str]) -> Any:
    base, token, ctx = _context()
    url = f"{base}{path}?{urllib.parse.urlencode(query)}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S, context=ctx) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise UserError(
            f"the API server answered {exc.code} {exc.reason} for {path}; accepted: a service "
            "account allowed to list pods (the manifest's ClusterRole)",
            "remotes",
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(
            f"cannot ask the API server at {base}: {exc}; accepted: a reachable API server",
            "remotes",
        ) from exc


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def choose(pods: list[Mapping[str, Any]], family: int) -> str | None:
    """The IP of ``family`` of the newest Ready pod (pure: the tests feed it lists)."""
    ready = [p for p in pods if _ready(p)]
    ready.sort(key=lambda p: str(p.get("metadata", {}).get("creationTimestamp", "")))
    for pod in reversed(ready):
        status = pod.get("status", {})
        ips = [i.get("ip") for i in status.get("podIPs") or []] or [status.get("podIP")]
        for ip in ips:
            try:
                if ip and ipaddress.ip_address(ip).version == family:
                    return str(ip)
            except ValueError:
                continue
    return None


def node_family() -> int:
    """The node's address family, from $NODE_IP (IPv4 when unset)."""
    text = os.environ.get("NODE_IP", "")
    try:
        return ipaddress.ip_address(text).version if text else 4
    except ValueError as exc:
        raise UserError(f"{text!r} is not an IP address; accepted: an IP", "NODE_IP") from exc


def resolve(remote: PodRemote) -> str:
    """The pod IP ``remote`` names right now, or a UserError saying why there is none."""
    node = os.environ.get("NODE_NAME")
    if not node:
        raise UserError(
            "NODE_NAME is unset; accepted: the node's name from the downward API "
            "(fieldRef spec.nodeName)",
            f"remotes.{remote.name}",
        )
    listing = _get(
        f"/api/v1/namespaces/{urllib.parse.quote(remote.namespace)}/pods",
        {"labelSelector": remote.selector, "fieldSelector": f"spec.nodeName={node}"},
    )
    family = node_family()
    ip = choose(list(listing.get("items", [])), family)
    if ip is None:
        raise UserError(
            f"no Ready pod with an IPv{family} address matches {remote.selector!r} in "
            f"{remote.namespace} on node {node}; accepted: a selector that finds one",
            f"remotes.{remote.name}",
        )
    return ip


def follow(
    chosen: Mapping[str, str],
    remotes: Mapping[str, PodRemote],
    interval: float = FOLLOW_INTERVAL_S,
    on_move: Callable[[], None] | None = None,
) -> threading.Event:
    """Ask again every ``interval`` seconds; when a remote's pod moved to another IP,
    log one line and call ``on_move`` (default: SIGTERM to this process, so it stops
    cleanly and the kubelet starts it again with the new IP). An unreachable API
    server is logged once per outage and changes nothing. Returns the stop event."""
    stop = threading.Event()
    move = on_move or (lambda: os.kill(os.getpid(), signal.SIGTERM))

    def loop() -> None:
        failing = False
        while not stop.wait(interval):
            for name, remote in remotes.items():
                try:
                    ip = resolve(remote)
                except UserError as exc:
                    if not failing:
                        log.warning("%s; keeping %s", exc, chosen[name], extra={"event": "kube"})
                    failing = True
                    continue
                failing = False
                if ip != chosen[name]:
                    log.warning(
                        "remote %s moved from %s to %s: stopping to start again with it",
                        name,
                        chosen[name],
                        ip,
                        extra={"event": "remote_moved", "remote": name, "ip": ip},
                    )
                    stop.set()
                    move()
                    return

    threading.Thread(target=loop, name="gdp-kube-follow", daemon=True).start()
    return stop
