"""Build hooks: the cffi fast path, and the eBPF redirect mode's BPF objects (clang).
Metadata lives in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class build_ext_and_bpf(build_ext):
    """build_ext, then csrc/bpf/*.bpf.c -> geneve_dp/ambient/ebpf/*.bpf.o."""

    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location(
            "_gdp_build_bpf", ROOT / "csrc" / "bpf" / "build_bpf.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        where = ROOT if self.inplace or self.editable_mode else Path(self.build_lib)
        out = where / "geneve_dp" / "ambient" / "ebpf"
        for path in module.build(out):
            print(f"built {path}")


setup(
    cffi_modules=["csrc/build_fastpath.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_and_bpf},
)
