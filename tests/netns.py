"""Network namespaces for tests: uniquely named, bounded, always removed.

Plain `ip` commands rather than pyroute2 so that a failing test shows the exact
command that failed.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Sequence
from typing import Any

_counter = itertools.count()


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its stderr if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Netns:
    """A network namespace named gdpt-<pid>-<n>-<tag>; loopback is up."""

    def __init__(self, tag: str = "ns") -> None:
        self.name = f"gdpt-{os.getpid()}-{next(_counter)}-{tag}"[:32]
        sh("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(*cmd), check=check, timeout=timeout)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*cmd), text=True, **kwargs)

    def delete(self) -> None:
        # Kill anything still running inside, so the namespace really goes away.
        pids = sh("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", self.name, check=False)


def veth(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    tmp = f"gdpv{os.getpid() % 100000}{next(_counter)}"[:15]
    sh("ip", "link", "add", tmp, "type", "veth", "peer", "name", b_if, "netns", b.name)
    sh("ip", "link", "set", tmp, "netns", a.name)
    a.run("ip", "link", "set", tmp, "name", a_if)
    a.run("ip", "link", "set", a_if, "up")
    b.run("ip", "link", "set", b_if, "up")
