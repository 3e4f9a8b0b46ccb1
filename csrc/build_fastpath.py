"""cffi out-of-line API-mode build of ``geneve_dp._fastpath``.

setup.py names ``ffibuilder`` in ``cffi_modules``; ``pip install -e .`` runs it. The
module embeds a digest of the C sources so that ``geneve_dp.fastpath`` can refuse a
build that no longer matches the checkout (see ``source_digest``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent


def c_sources() -> list[Path]:
    """The C files compiled into the module: every .c here (fuzz/ and tools are apart)."""
    return sorted(CSRC.glob("*.c"))


def _load_source_digest() -> Callable[[Path], str]:
    # By path: during a PEP 517 build the geneve_dp package is not importable yet.
    spec = importlib.util.spec_from_file_location(
        "_gdp_source_digest", CSRC.parent / "geneve_dp" / "source_digest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest  # type: ignore[no-any-return]


def source_digest() -> str:
    """Digest of every file the module is built from (geneve_dp/source_digest.py)."""
    return _load_source_digest()(CSRC)


# Headers that both the C build and cffi read: their part between the markers below is
# cdef-clean as written, so it is declared once, there, not copied into fastpath_cdef.h.
CDEF_HEADERS = ("testpoints.h", "auth.h")
CDEF_BEGIN = "/* cdef-begin"
CDEF_END = "/* cdef-end */"


def cdef_part(header: Path) -> str:
    """The lines of ``header`` from its cdef-begin marker to its cdef-end marker."""
    text = header.read_text()
    begin, end = text.find(CDEF_BEGIN), text.find(CDEF_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{header.name}: needs one {CDEF_BEGIN} ... {CDEF_END} part")
    return f"/* ---- {header.name} ---- */\n" + text[begin:end]


def cdef_source() -> str:
    """What cffi's cdef reads: fastpath_cdef.h, then the cdef part of each CDEF_HEADERS."""
    parts = [(CSRC / "fastpath_cdef.h").read_text()]
    parts += [cdef_part(CSRC / name) for name in CDEF_HEADERS]
    return "\n".join(parts)


def make_builder(absolute_sources: bool = False) -> FFI:
    """The cffi builder; setuptools wants source paths relative to setup.py."""
    builder = FFI()
    builder.cdef(cdef_source())
    build_id = f'const char *gdp_build_id(void) {{ return "{source_digest()}"; }}\n'
    builder.set_source(
        "geneve_dp._fastpath",
        '#include "fastpath.h"\n' + build_id,
        sources=[str(p if absolute_sources else p.relative_to(CSRC.parent)) for p in c_sources()],
        include_dirs=[str(CSRC)],
        # -flto: the engine's parts inline into each other as one file would;
        # -fvisibility=hidden: only the module's init function is exported.
        extra_compile_args=[
            "-std=gnu11",
            "-O2",
            "-flto=auto",
            "-fvisibility=hidden",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
        ],
        extra_link_args=["-O2", "-flto=auto"],
        libraries=["pthread", "sodium"],
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    # Quick in-place rebuild for development: `python csrc/build_fastpath.py`.
    import os
    import shutil
    import sysconfig

    os.chdir(CSRC.parent)
    built = Path(make_builder(absolute_sources=True).compile(tmpdir="build/cffi"))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for stale in (CSRC.parent / "geneve_dp").glob("_fastpath*.so"):
        stale.unlink()
    shutil.copy2(built, CSRC.parent / "geneve_dp" / f"_fastpath{suffix}")
    print(f"built geneve_dp/_fastpath{suffix} ({source_digest()})")
