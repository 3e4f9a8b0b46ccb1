"""Build hook: the cffi fast path. Metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_fastpath.py:ffibuilder"])
