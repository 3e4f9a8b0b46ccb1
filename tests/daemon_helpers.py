"""`geneve-dp up` as a real process for the fault, hostile-input and soak tests: started
in a namespace, asked for its status over its control socket, stopped or killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from geneve_dp.control import socket_path
from tests.netns import Netns

GDP = [sys.executable, "-m", "geneve_dp"]
ROOT = Path(__file__).resolve().parent.parent


class Up:
    """`geneve-dp up --netns NS ARGS` in the foreground, ready once constructed."""

    def __init__(self, ns: Netns, *args: str) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(
            [*GDP, "up", "--netns", ns.name, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.proc.kill()
            _out, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"up did not get ready: {line!r} {err}")
        self.pid = self.proc.pid

    @property
    def sock(self) -> Path:
        return socket_path(self.pid)

    def request(self, data: bytes, timeout: float = 10.0) -> bytes:
        """Send raw bytes to the control socket; the reply line (b"" if none)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.sock))
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon answered and closed before reading it all
            out = b""
            while not out.endswith(b"\n"):
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
        return out

    def status(self) -> dict[str, Any]:
        reply = json.loads(self.request(b'{"cmd": "status"}\n'))
        assert isinstance(reply, dict) and "tunnels" in reply, reply
        return reply

    def tunnel(self, name: str) -> dict[str, Any]:
        for t in self.status()["tunnels"]:
            if t["name"] == name:
                return t  # type: ignore[no-any-return]
        raise KeyError(name)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process (all threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 15.0) -> tuple[int, float, str]:
        """SIGTERM; exit code, seconds it took, and what it wrote on stderr."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, time.monotonic() - t0, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@contextmanager
def up(ns: Netns, *args: str) -> Iterator[Up]:
    d = Up(ns, *args)
    try:
        yield d
    finally:
        d.kill()


def cpu_over(d: Up, seconds: float) -> float:
    """CPU seconds the daemon used per wall second over the next ``seconds``."""
    c0, t0 = d.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (d.cpu_seconds() - c0) / (time.monotonic() - t0)
