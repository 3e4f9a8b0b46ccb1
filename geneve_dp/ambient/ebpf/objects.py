"""The built BPF objects: where they are, whether they match the checkout, loading
them with one clear error, and the node maps' element layouts.

The objects are built by setup.py's build_ext (csrc/bpf/build_bpf.py) next to this
file; ``GENEVE_DP_BPF_DIR`` points elsewhere. A missing, stale or unloadable object is
a ``UserError`` (exit 2) naming the cause, raised before anything is attached.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from . import facts, libbpf

OBJECT_DIR = Path(__file__).resolve().parent
SOURCE_DIR = OBJECT_DIR.parents[2] / "csrc" / "bpf"  # present in a checkout
DIR_ENV = "GENEVE_DP_BPF_DIR"
NODE_OBJECT = "ambient_node.bpf.o"
ZTUNNEL_OBJECT = "ambient_ztunnel.bpf.o"
BUILD_ID = "bpf_build_id"
FIELD = "--redirect-mode"
REBUILD = (
    "build them with `python3 setup.py build_ext --inplace` or `pip install -e .` "
    "(needs clang and libbpf-dev)"
)

APP_INFO = struct.Struct("=I6s2x")  # struct gdp_app_info
ZTUNNEL_INFO = struct.Struct("=I6sBx")  # struct gdp_ztunnel_info
U32 = struct.Struct("=I")


def _checkout_build_id() -> str | None:
    """The digest the checkout's sources give, when running from a checkout."""
    script = SOURCE_DIR / "build_bpf.py"
    if not script.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_gdp_build_bpf", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.build_id())


def object_path(name: str) -> Path:
    directory = Path(os.environ.get(DIR_ENV, OBJECT_DIR))
    path = directory / name
    if not path.is_file():
        raise UserError(f"the BPF object {path} is not built; {REBUILD}", FIELD)
    if DIR_ENV not in os.environ:
        try:
            built = (directory / BUILD_ID).read_text().strip()
        except OSError:
            built = "unknown"
        wanted = _checkout_build_id()
        if wanted is not None and wanted != built:
            raise UserError(
                f"the BPF objects in {directory} are stale (built from {built}, the "
                f"checkout has {wanted}); {REBUILD}",
                FIELD,
            )
    return path


def load(
    name: str, reuse: dict[str, int] | None = None, skip: Iterable[str] = ()
) -> libbpf.BpfObject:
    """Open and load object ``name``; any failure is one UserError line (exit 2)."""
    path = object_path(name)
    try:
        libbpf.lib()
    except libbpf.BpfError as exc:
        raise UserError(exc.what, FIELD) from exc
    try:
        obj = libbpf.BpfObject(path)
    except libbpf.BpfError as exc:
        raise UserError(f"cannot open {path.name}: {exc.strerror}", FIELD) from exc
    try:
        for prog in skip:
            obj.skip(prog)
        for map_name, fd in (reuse or {}).items():
            obj.reuse_map(map_name, fd)
        obj.load()
    except libbpf.BpfError as exc:
        obj.close()
        why = exc.reason()
        raise UserError(
            f"this kernel cannot load {path.name} ({exc.strerror}"
            + (f"; {why}" if why else "")
            + "): eBPF redirect mode needs BPF, clsact and cls_bpf (Linux 5.7+ for "
            "bpf_sk_assign)",
            FIELD,
        ) from exc
    return obj


# --- element layouts -------------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ip_key(ip: str) -> bytes:
    return socket.inet_aton(ip)  # network order, as the programs compare


@dataclass(frozen=True)
class PodEntry:
    ifindex: int
    mac: str

    def pack(self) -> bytes:
        return APP_INFO.pack(self.ifindex, mac_bytes(self.mac))

    @classmethod
    def unpack(cls, raw: bytes) -> PodEntry:
        ifindex, mac = APP_INFO.unpack(raw)
        return cls(ifindex, mac_text(mac))


@dataclass(frozen=True)
class ZtunnelEntry:
    ifindex: int
    mac: str
    dns_capture: bool

    def pack(self) -> bytes:
        flags = facts.ZTUNNEL_FLAG_DNS_CAPTURE if self.dns_capture else 0
        return ZTUNNEL_INFO.pack(self.ifindex, mac_bytes(self.mac), flags)

    @classmethod
    def unpack(cls, raw: bytes) -> ZtunnelEntry:
        ifindex, mac, flags = ZTUNNEL_INFO.unpack(raw)
        return cls(ifindex, mac_text(mac), bool(flags & facts.ZTUNNEL_FLAG_DNS_CAPTURE))


class Maps:
    """File descriptors of a set of maps, by name; ``close`` releases them."""

    def __init__(self, fds: dict[str, int]) -> None:
        self.fds = fds

    @classmethod
    def by_ids(cls, ids: dict[str, int], names: Iterable[str]) -> Maps | None:
        """The maps recorded as ``ids``, if every one of ``names`` still exists."""
        fds: dict[str, int] = {}
        for name in names:
            fd = libbpf.map_fd_by_id(int(ids.get(name, 0)), name) if ids.get(name) else None
            if fd is None:
                for f in fds.values():
                    os.close(f)
                return None
            fds[name] = fd
        return cls(fds)

    @classmethod
    def of(cls, obj: libbpf.BpfObject, names: Iterable[str]) -> Maps:
        """Our own fds of ``obj``'s maps (they outlive ``obj.close()``)."""
        return cls({n: os.dup(obj.map_fd(n)) for n in names})

    def ids(self) -> dict[str, int]:
        return {n: libbpf.map_id(fd) for n, fd in self.fds.items()}

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}

    # node maps
    def pod(self, ip: str) -> PodEntry | None:
        raw = libbpf.lookup(self.fds[facts.MAP_APP_INFO], ip_key(ip), APP_INFO.size)
        return PodEntry.unpack(raw) if raw is not None else None

    def set_pod(self, ip: str, entry: PodEntry) -> None:
        libbpf.update(self.fds[facts.MAP_APP_INFO], ip_key(ip), entry.pack())

    def del_pod(self, ip: str) -> bool:
        return libbpf.delete(self.fds[facts.MAP_APP_INFO], ip_key(ip))

    def pods(self) -> dict[str, PodEntry]:
        fd = self.fds[facts.MAP_APP_INFO]
        out = {}
        for key in libbpf.keys(fd, 4):
            raw = libbpf.lookup(fd, key, APP_INFO.size)
            if raw is not None:
                out[socket.inet_ntoa(key)] = PodEntry.unpack(raw)
        return out

    def ztunnel(self) -> ZtunnelEntry | None:
        raw = libbpf.lookup(self.fds[facts.MAP_ZTUNNEL_INFO], U32.pack(0), ZTUNNEL_INFO.size)
        return ZtunnelEntry.unpack(raw) if raw is not None else None

    def set_ztunnel(self, entry: ZtunnelEntry) -> None:
        libbpf.update(self.fds[facts.MAP_ZTUNNEL_INFO], U32.pack(0), entry.pack())

    def host_ip(self) -> str | None:
        raw = libbpf.lookup(self.fds[facts.MAP_HOST_IP], U32.pack(0), 4)
        return socket.inet_ntoa(raw) if raw is not None and raw != bytes(4) else None

    def set_host_ip(self, ip: str) -> None:
        libbpf.update(self.fds[facts.MAP_HOST_IP], U32.pack(0), ip_key(ip))

    def counters(self, map_name: str, names: Iterable[str]) -> dict[str, int]:
        """Per-CPU counters summed over CPUs, by name."""
        fd, ncpu = self.fds[map_name], libbpf.possible_cpus()
        out = {}
        for i, name in enumerate(names):
            raw = libbpf.lookup(fd, U32.pack(i), 8 * ncpu) or b""
            out[name] = sum(struct.unpack(f"={len(raw) // 8}Q", raw))
        return out


@contextlib.contextmanager
def opened(ids: dict[str, int], names: Iterable[str]) -> Iterator[Maps | None]:
    maps = Maps.by_ids(ids, names)
    try:
        yield maps
    finally:
        if maps is not None:
            maps.close()


def counters_by_id(map_id: int, map_name: str, names: Iterable[str]) -> dict[str, int] | None:
    """A counter map's values read by its kernel ID (from another process), or None."""
    with opened({map_name: map_id}, [map_name]) as maps:
        return maps.counters(map_name, names) if maps is not None else None


def ipv4(text: str) -> str:
    return str(ipaddress.IPv4Address(text))
