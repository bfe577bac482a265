"""Only the optional C++ extension lives here; everything else is in pyproject.toml.

The lookup-table kernel (weightsmith/kernels/csrc/lut_gemv.cpp) is a plain C++ shared library,
called through ctypes: no torch or Python headers are needed to build it. It is optional — if the
compiler is missing or fails, ``pip install`` still succeeds and weightsmith compiles the kernel on
first use into ~/.cache/weightsmith/kernels, or falls back to the dequantized float path.
``WEIGHTSMITH_NO_KERNEL_BUILD=1`` skips it at install time.
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 — an optional extension never fails the install
            self._skip(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            return
        except Exception as e:  # noqa: BLE001
            first = e
        # without OpenMP (a compiler without it): the kernel then uses its own thread pool
        ext.extra_compile_args = [f for f in ext.extra_compile_args if f != "-fopenmp"]
        ext.extra_link_args = [f for f in ext.extra_link_args if f != "-fopenmp"]
        try:
            super().build_extension(ext)
        except Exception:  # noqa: BLE001
            self._skip(first)

    @staticmethod
    def _skip(e):
        print(f"weightsmith: the lookup-table kernel was not built ({type(e).__name__}: {e}); "
              "it will be compiled on first use if a C++ compiler is available, else the dequantized path is used",
              file=sys.stderr)


ext_modules = []
if not os.environ.get("WEIGHTSMITH_NO_KERNEL_BUILD") and sys.platform == "linux":
    ext_modules.append(Extension(
        "weightsmith.kernels._lut_gemv",
        sources=["weightsmith/kernels/csrc/lut_gemv.cpp"],
        language="c++",
        # -fopenmp: the library's libgomp.so.1 resolves at run time to the copy torch has loaded, so
        # the kernel shares torch's OpenMP threads
        extra_compile_args=["-O3", "-std=c++17", "-pthread", "-ffp-contract=off", "-fopenmp"],
        extra_link_args=["-pthread", "-fopenmp"],
        optional=True,
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
