"""Istio ambient's eBPF redirect mode (Istio 1.20, reference §8), beside the iptables +
GENEVE mode: our own BPF programs (csrc/bpf/), loaded through libbpf (libbpf.py),
attached with tc clsact (tc.py); node.py and ztunnel.py are the two sides, which
`node up` / `ztunnel up --redirect-mode ebpf` run.
"""

REDIRECT_MODES = ("iptables", "ebpf")
DEFAULT_REDIRECT_MODE = "iptables"
