"""links.Changes, the reconcile loops' wake-up: a burst bigger than its socket holds
(ENOBUFS) is counted and is a wake-up, and the subscription goes on working after it."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from tests.netns import Netns

pytestmark = pytest.mark.root

# Runs inside the namespace: a Changes with a socket far too small for the burst.
SCRIPT = r"""
import subprocess, sys, tempfile
from geneve_dp.netconf import links
links.CHANGES_RCVBUF = 4096  # the kernel doubles it; a burst of 200 veth pairs is far more
c = links.Changes()
assert not c.wait(0.2)
with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
    f.write("".join(f"link add gdpc{i} type veth peer name gdpd{i}\n" for i in range(200)))
    f.flush()
    subprocess.run(["ip", "-batch", f.name], check=True)
woke = c.wait(1.0)
while c.wait(0.2):
    pass
print("woke", woke, "overflows", c.overflows)
late = ["ip", "link", "add", "gdpc-late", "type", "veth", "peer", "name", "gdpd-late"]
subprocess.run(late, check=True)
print("after", c.wait(2.0))
c.close()
"""


def test_an_overflowed_subscription_wakes_counts_and_goes_on(
    netns_factory: Callable[[str], Netns],
) -> None:
    ns = netns_factory("chg")
    out = ns.run(sys.executable, "-c", SCRIPT).stdout.split()
    assert out[:2] == ["woke", "True"], out
    assert int(out[3]) >= 1, out  # the burst did overflow: what is under test happened
    assert out[4:] == ["after", "True"], out
