"""Helpers for the endpoint tests.

Run inside a namespace as ``python -m tests.endpoint_helpers ENGINE SPECS_JSON``: starts
a Dataplane for the specs, puts spec addresses on the devices, prints one JSON line
``{"ready": status}``, then answers stdin lines: ``status`` prints the status JSON,
``quit`` stops and exits. Control messages handed to the hook are included in the
status as ``control_messages``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.netns import Netns, veth

ROOT = __file__.rsplit("/tests/", 1)[0]


def _main(engine: str, specs_json: str) -> int:
    from geneve_dp.dataplane import Dataplane
    from geneve_dp.dataplane.spec import build_spec
    from geneve_dp.errors import UserError

    raw_specs = json.loads(specs_json)
    specs = [build_spec(r) for r in raw_specs]
    control: list[list[str]] = []
    lock = threading.Lock()

    def hook(name: str, packet: bytes) -> None:
        with lock:
            control.append([name, packet.hex()])

    dp = Dataplane(specs, engine=engine, control_hook=hook)
    try:
        dp.start()
    except UserError as exc:
        print(json.dumps({"error": str(exc), "field": exc.field}), flush=True)
        return 2
    for spec in specs:
        for addr in spec.addresses:
            cmd = ["ip", "addr", "add", str(addr), "dev", spec.name]
            if addr.version == 6:
                cmd.append("nodad")
            subprocess.run(cmd, check=True)

    def dump() -> str:
        with lock:
            return json.dumps({"status": dp.status(), "control_messages": list(control)})

    print(json.dumps({"ready": dp.status()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "status":
            dp.check()
            print(dump(), flush=True)
        elif cmd == "quit":
            break
    dp.stop()
    dp.stop()  # idempotent
    print(json.dumps({"stopped": True}), flush=True)
    return 0


class Endpoint:
    """A Dataplane running in a helper process inside ``ns``."""

    def __init__(self, ns: Netns, engine: str, specs: list[dict[str, Any]]) -> None:
        self.ns = ns
        self.proc = ns.popen(
            [sys.executable, "-m", "tests.endpoint_helpers", engine, json.dumps(specs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        first = self._line(timeout=20)
        if "error" in first:
            self.error: dict[str, Any] | None = first
        else:
            self.error = None
            self.ready = first["ready"]

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        result: list[str] = []
        th = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        th.start()
        th.join(timeout)
        if not result or not result[0]:
            self.proc.kill()
            raise RuntimeError(f"endpoint helper gave no answer (rc {self.proc.poll()})")
        return json.loads(result[0])  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        return self._line(timeout=10)

    def tunnel(self, name: str) -> dict[str, Any]:
        for t in self.status()["status"]:
            if t["name"] == name:
                return t  # type: ignore[no-any-return]
        raise KeyError(name)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


@contextmanager
def endpoint(ns: Netns, engine: str, specs: list[dict[str, Any]]) -> Iterator[Endpoint]:
    ep = Endpoint(ns, engine, specs)
    try:
        yield ep
    finally:
        ep.close()


def underlay(a: Netns, b: Netns, mtu: int = 1500) -> None:
    """veth ua (10.0.0.1, fd00::1) in a to ub (10.0.0.2, fd00::2) in b."""
    veth(a, "ua", b, "ub")
    for ns, ifname, v4, v6 in ((a, "ua", "10.0.0.1/24", "fd00::1/64"), (b, "ub", "10.0.0.2/24", "fd00::2/64")):
        ns.run("ip", "link", "set", ifname, "mtu", str(mtu))
        ns.run("ip", "addr", "add", v4, "dev", ifname)
        ns.run("ip", "addr", "add", v6, "dev", ifname, "nodad")


def wait_for(pred: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
