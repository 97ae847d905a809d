"""Only what pyproject.toml cannot say: the optional native CPU extension tcpade._C.

The extension is optional. TCPADE_NO_NATIVE=1 skips it; a failed compile (no compiler,
no OpenMP) leaves the install working, and tcpade falls back to the torch reference on
CPU with one warning at import.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure must not fail the install
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(
            f"WARNING: tcpade's C++ extension was not built ({exc}); "
            "CPU tensors will use the torch reference.\n"
        )


def native_extensions():
    if os.environ.get("TCPADE_NO_NATIVE", "0") == "1":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        return []
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    return [
        Pybind11Extension(
            "tcpade._C",
            ["csrc/tcpade.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3", "-fno-math-errno", *openmp],
            extra_link_args=openmp,
        )
    ]


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
