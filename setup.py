"""Builds normkit's optional C++ extension ``normkit._C`` (the ``cpu`` backend's kernels).

Everything else is in pyproject.toml. torch must be importable at build time, so install with
``pip install --no-build-isolation`` after torch (the Makefile does). A failed compile is not
fatal: normkit installs without the extension, and its ``cpu`` backend then reports why it is
unavailable (``normkit info``) while ``auto`` runs the reference backend.

Environment: ``NORMKIT_NO_EXTENSION=1`` skips the extension; ``NORMKIT_CPU_FLAGS`` replaces the
instruction-set flags, which default to AVX2/FMA/F16C when the build machine has them (the
extension is built where it runs).
"""

from __future__ import annotations

import os
import sys
import warnings

from setuptools import setup

# two translation units, compiled in parallel: the kernels and operators, and the layers' one-call forwards
SOURCES = ["src/normkit/csrc/normkit_cpu.cpp", "src/normkit/csrc/layers.cpp"]


def _isa_flags() -> list[str]:
    if "NORMKIT_CPU_FLAGS" in os.environ:
        return os.environ["NORMKIT_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= set(flags) else []


def _extensions():
    if os.environ.get("NORMKIT_NO_EXTENSION"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:
        warnings.warn(f"normkit: torch is not importable at build time ({err}); building without the C++ "
                      "kernels (install torch first and use pip's --no-build-isolation)", stacklevel=1)
        return [], {}

    class OptionalBuild(BuildExtension):
        """A compile error leaves normkit without its C++ kernels instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler/toolchain failure
                print(f"WARNING: normkit: the C++ extension failed to build ({err}); the 'cpu' backend will be "
                      "unavailable and 'auto' will use the reference backend", file=sys.stderr)
                self.extensions = []  # nothing to copy or package

    # -g0: no debug info (it doubles the compile time of this one translation unit)
    # -fopenmp: at::parallel_for is an inline template that only runs in parallel where _OPENMP is
    # defined in *this* translation unit; without the flag every kernel ran on one thread whatever
    # torch.set_num_threads said. Linux wheels of torch ship GNU OpenMP (torch/lib/libgomp.so.1),
    # which the loader then shares with this extension: one thread pool, one thread count.
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-g0", "-ffp-contract=off", "-fno-math-errno", *omp, *_isa_flags()]
    ext = CppExtension("normkit._C", SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=omp)
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
