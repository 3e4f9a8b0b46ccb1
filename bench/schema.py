"""The shape of results.json, as a JSON Schema (draft 2020-12 subset), and a small
validator for exactly that subset, so checking a result needs no extra package.

A step that failed carries its identifying keys and an ``error`` string instead of
figures; a figure is never made up.
"""

from __future__ import annotations

from typing import Any

SCHEMA_ID = "geneve-dp-bench/1"

NUM = {"type": "number", "minimum": 0}
INT = {"type": "integer", "minimum": 0}
ERROR = {"type": ["string", "null"]}
NUM_OR_NULL = {"type": ["number", "null"], "minimum": 0}

CPU = {
    "type": "object",
    "required": ["dataplane_s", "softirq_s", "wall_s"],
    "properties": {
        "dataplane_s": {"type": ["number", "null"]},
        "softirq_s": {"type": "number"},
        "busy_s": {"type": "number"},
        # Results from before steal was recorded have no steal_s.
        "steal_s": NUM_OR_NULL,
        "wall_s": NUM,
        "rss_kib": {"type": ["integer", "null"], "minimum": 0},
        "peak_rss_kib": {"type": ["integer", "null"], "minimum": 0},
        "note": {"type": "string"},
    },
}

UDP_STEP = {
    "type": "object",
    "required": ["frame", "payload", "error"],
    "properties": {
        "frame": {"type": "integer", "minimum": 64, "maximum": 1518},
        "payload": {"type": "integer", "minimum": 18, "maximum": 1472},
        "sent": INT,
        "sent_pps": NUM,
        "received": INT,
        "delivered_pps": NUM,
        "delivered_gbps": NUM,
        "lost": INT,
        "loss": {"type": "number", "minimum": 0, "maximum": 1},
        "reordered": INT,
        "duplicates": INT,
        "send_errors": INT,
        "kernel_drops": {"type": "object"},
        "one_way_latency_us": {
            "type": "object",
            "properties": {k: NUM for k in ("p50", "p99", "p999", "max")},
        },
        "cpu": CPU,
        "error": ERROR,
    },
}

TCP_STEP = {
    "type": "object",
    "required": ["streams", "seconds", "error"],
    "properties": {
        "streams": {"type": "integer", "minimum": 1},
        "seconds": NUM,
        "gbps": NUM,
        "sender_gbps": NUM,
        "bytes": INT,
        "retransmits": INT,
        "cpu": CPU,
        "error": ERROR,
    },
}

RR_STEP = {
    "type": "object",
    "required": ["payload", "error"],
    "properties": {
        "payload": INT,
        "requests": INT,
        "responses": INT,
        "timeouts": INT,
        "transactions_per_s": NUM,
        **{k: NUM for k in ("p50_us", "p90_us", "p99_us", "p999_us", "mean_us", "max_us")},
        "cdf_us": {"type": "array", "items": NUM},
        "cpu": CPU,
        "error": ERROR,
    },
}

PDR_STEP = {
    "type": "object",
    "required": ["frame", "payload", "error"],
    "properties": {
        "frame": {"type": "integer", "minimum": 64, "maximum": 1518},
        "payload": INT,
        "loss_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "pps": NUM,
        "note": {"type": "string"},
        "probes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["rate", "delivered_pps", "loss", "ok"],
                "properties": {
                    "rate": NUM,
                    "sent_pps": NUM,
                    "delivered_pps": NUM,
                    "loss": {"type": "number", "minimum": 0, "maximum": 1},
                    "ok": {"type": "boolean"},
                },
            },
        },
        "error": ERROR,
    },
}

COPY_BOUND = {
    "type": "object",
    "required": [
        "streams",
        "vxlan_gbps",
        "vxlan_s_per_gb",
        "floor_s_per_gb",
        "max_gbps",
        "max_ratio",
        "error",
    ],
    "properties": {
        "streams": {"type": ["integer", "null"], "minimum": 1},
        "vxlan_gbps": NUM_OR_NULL,
        "vxlan_s_per_gb": NUM_OR_NULL,
        "floor_s_per_gb": NUM_OR_NULL,
        "max_gbps": NUM_OR_NULL,
        "max_ratio": NUM_OR_NULL,
        "error": ERROR,
    },
}

COPY_FLOOR = {
    "type": "object",
    "required": [
        "block_bytes",
        "working_set_bytes",
        "hot_s_per_gb",
        "cold_s_per_gb",
        "copies",
        "cores",
        "bounds",
        "error",
    ],
    "properties": {
        "block_bytes": {"type": ["integer", "null"], "minimum": 1},
        "working_set_bytes": {"type": ["integer", "null"], "minimum": 1},
        "hot_s_per_gb": NUM_OR_NULL,
        "cold_s_per_gb": NUM_OR_NULL,
        "copies": INT,
        "cores": INT,
        "bounds": {"type": "array", "items": COPY_BOUND},
        "error": ERROR,
    },
}

REDIRECT_MODE = {
    "type": "object",
    "required": ["mode", "error"],
    "properties": {
        "mode": {"enum": ["uncaptured", "iptables", "ebpf"]},
        "connections_per_s": NUM,
        "connect_p50_us": NUM,
        "connect_p99_us": NUM,
        "connect_errors": INT,
        "busy_us_per_connection": NUM,
        "transactions_per_s": NUM,
        "rr_p50_us": NUM,
        "rr_p99_us": NUM,
        "busy_us_per_transaction": NUM,
        "error": ERROR,
    },
}

# Istio's two node-level redirect designs through the ztunnel stand-in (bench/redirect.py).
REDIRECT = {
    "type": "object",
    "required": ["seconds", "rounds", "payload", "modes", "error"],
    "properties": {
        "seconds": NUM,
        "rounds": {"type": "integer", "minimum": 1},
        "payload": INT,
        "modes": {"type": "array", "items": REDIRECT_MODE},
        "error": ERROR,
    },
}

_RTT = {k: NUM for k in ("p50_us", "p99_us", "p999_us", "max_us")}

INTERACTIVE = {
    "type": "object",
    "required": ["seconds", "rr", "ping", "idle_cpu", "error"],
    "properties": {
        "seconds": NUM,
        "rr": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["rate", "requests", "responses", "p50_us", "p99_us", "p999_us"],
                "properties": {
                    "rate": NUM,
                    "requests": INT,
                    "responses": INT,
                    "timeouts": INT,
                    **_RTT,
                    "error": ERROR,
                },
            },
        },
        "ping": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["interval_ms", "sent", "received", "p50_us", "p99_us"],
                    "properties": {"interval_ms": NUM, "sent": INT, "received": INT, **_RTT},
                },
            ]
        },
        "idle_cpu": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["wall_s", "dataplane_s", "core_pct"],
                    "properties": {
                        "wall_s": NUM,
                        "dataplane_s": NUM_OR_NULL,
                        "core_pct": NUM_OR_NULL,
                    },
                },
            ]
        },
        "error": ERROR,
    },
}

SCENARIO = {
    "type": "object",
    "required": [
        "id",
        "label",
        "description",
        "kernel_path",
        "error",
        "udp",
        "tcp",
        "rr",
        "pdr",
        "cpu",
    ],
    "properties": {
        "id": {"type": "string"},
        "label": {"type": "string"},
        "description": {"type": "string"},
        "kernel_path": {"type": "boolean"},
        "error": ERROR,
        "setup_s": NUM,
        "elapsed_s": NUM,
        "udp": {"type": "array", "items": UDP_STEP},
        "tcp": {"type": "array", "items": TCP_STEP},
        "rr": {"oneOf": [{"type": "null"}, RR_STEP]},
        "pdr": {"oneOf": [{"type": "null"}, PDR_STEP]},
        # Not in "required": results from before it was measured have none.
        "interactive": {"oneOf": [{"type": "null"}, INTERACTIVE]},
        "dataplane_counters": {"type": ["object", "null"]},
        "cpu": {"oneOf": [{"type": "null"}, CPU]},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "type": "object",
    "required": [
        "schema",
        "started",
        "machine",
        "parameters",
        "generator",
        "baseline",
        "scenarios",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "started": {"type": "string"},
        "elapsed_s": NUM,
        "machine": {
            "type": "object",
            "required": ["cores", "kernel"],
            "properties": {
                "cores": {"type": "integer", "minimum": 1},
                "loadavg": {"type": "array", "items": NUM},
                "loadavg_end": {"type": "array", "items": NUM},
                "cpu_model": {"type": "string"},
                "memory_gb": NUM,
                "kernel": {"type": "string"},
                "python": {"type": "string"},
                "iperf3": {"type": "string"},
            },
        },
        "parameters": {
            "type": "object",
            "required": ["quick", "frames", "payloads", "udp_seconds", "tcp_seconds"],
            "properties": {
                "quick": {"type": "boolean"},
                "frames": {"type": "array", "items": {"type": "integer"}},
                "payloads": {"type": "array", "items": {"type": "integer"}},
                "udp_seconds": NUM,
                "tcp_seconds": NUM,
                "rr_seconds": NUM,
                "rr_payload": INT,
                "interactive_seconds": NUM,
                "interactive_rates": {"type": "array", "items": NUM},
                "ping_interval_ms": NUM,
                "flows": {"type": "integer", "minimum": 1},
                "burst": {"type": "integer", "minimum": 1},
                "rate": NUM,
                "tcp_streams": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "generator": {"enum": ["socket", "raw"]},
                "pdr": {"type": "boolean"},
                "pdr_loss": NUM,
                "pdr_probes": INT,
                "redirect": {"type": "boolean"},
            },
        },
        "generator": {
            "type": "object",
            "required": ["seconds", "steps", "error"],
            "properties": {
                "seconds": NUM,
                "steps": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["frame", "pps"],
                        "properties": {"frame": INT, "pps": NUM},
                    },
                },
                "error": ERROR,
            },
        },
        # Not in "required": results from before it was measured have none.
        "copy_floor": COPY_FLOOR,
        "redirect": REDIRECT,
        "baseline": {"type": "string"},
        "scenarios": {"type": "array", "items": SCENARIO},
    },
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "null": (type(None),),
}


def _is(value: Any, name: str) -> bool:
    # bool is an int in Python but not a number in JSON.
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def validate(value: Any, schema: dict[str, Any] | None = None, where: str = "$") -> list[str]:
    """Problems found, as "path: what" strings; empty means valid."""
    s = SCHEMA if schema is None else schema
    if "oneOf" in s:
        matches = sum(1 for sub in s["oneOf"] if not validate(value, sub, where))
        return [] if matches == 1 else [f"{where}: matches {matches} of oneOf"]
    if "enum" in s and value not in s["enum"]:
        return [f"{where}: {value!r} is not one of {s['enum']!r}"]
    if "const" in s and value != s["const"]:
        return [f"{where}: expected {s['const']!r}, got {value!r}"]
    if "type" in s:
        names = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_is(value, n) for n in names):
            return [f"{where}: expected {'/'.join(names)}, got {type(value).__name__}"]
    problems: list[str] = []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in s and value < s["minimum"]:
            problems.append(f"{where}: {value} < minimum {s['minimum']}")
        if "maximum" in s and value > s["maximum"]:
            problems.append(f"{where}: {value} > maximum {s['maximum']}")
    if isinstance(value, dict):
        for key in s.get("required", []):
            if key not in value:
                problems.append(f"{where}: missing {key!r}")
        for key, sub in s.get("properties", {}).items():
            if key in value:
                problems += validate(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in s:
        for i, item in enumerate(value):
            problems += validate(item, s["items"], f"{where}[{i}]")
    return problems
