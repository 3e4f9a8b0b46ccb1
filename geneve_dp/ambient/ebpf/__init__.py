"""Istio ambient's eBPF redirect mode (Istio 1.20, reference §8), beside the iptables +
GENEVE mode: our own BPF programs (csrc/bpf/), loaded through libbpf (libbpf.py),
attached with tc clsact (tc.py); node.py and ztunnel.py are the two sides, which
`node up` / `ztunnel up --redirect-mode ebpf` run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..state import StateFile

MODE = "ebpf"
REDIRECT_MODES = ("iptables", MODE)
DEFAULT_REDIRECT_MODE = "iptables"


def is_ebpf(st: StateFile) -> bool:
    """The role recorded in ``st`` (node or ztunnel) was brought up in the eBPF mode."""
    return bool((st.data.get("config") or {}).get("redirect_mode") == MODE)
