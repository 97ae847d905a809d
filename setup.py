"""Only what pyproject.toml cannot say: the optional native CPU extension tcpade._C.

The extension is optional. TCPADE_NO_NATIVE=1 skips it; a failed compile (no compiler,
no OpenMP) leaves the install working, and tcpade falls back to the torch reference on
CPU with one warning at import.
"""

import os
import runpy
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


HERE = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(HERE, "build", "generated")


def generate_layout_header() -> str:
    """Write tcpade_layout.h (the C++ view of tcpade/core/layout.py) into build/generated.

    layout.py is plain Python, run here on its own (tcpade itself needs torch). The file is
    rewritten only when its text changes, so an unchanged layout does not force a rebuild."""
    text = runpy.run_path(os.path.join(HERE, "tcpade", "core", "layout.py"))["c_header"]()
    os.makedirs(GENERATED, exist_ok=True)
    path = os.path.join(GENERATED, "tcpade_layout.h")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)
    return GENERATED


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
            include_dirs=[generate_layout_header()],
            depends=[os.path.join(GENERATED, "tcpade_layout.h")],
            cxx_std=17,
            extra_compile_args=["-O3", "-fno-math-errno", *openmp],
            extra_link_args=openmp,
        )
    ]


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
