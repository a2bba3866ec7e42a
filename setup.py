"""Builds the optional C++ CPU kernels as ``sgsc._C``.

Set ``SGSC_SKIP_CPP=1`` to install without them: the ops then run on the pure-PyTorch reference
on CPU, and ``sgsc doctor`` says why the extension is missing.
"""

import glob
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
# at::parallel_for is a header template: without OpenMP at compile time its `omp parallel` is
# ignored and every kernel runs on one thread. The library linked is the libgomp.so.1 torch
# already loaded, so there is one OpenMP runtime in the process.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
if os.environ.get("SGSC_SKIP_CPP", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            name="sgsc._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            # -O3 turns on the loop vectoriser that fills each ISA clone (no -march=native: the
            # binary runs on any x86-64 and picks its clone at load time). -fno-trapping-math lets
            # the compare-and-select loops of the backward vectorise; the kernels raise no FP traps.
            # -g0 and -s: Python's default flags carry -g, which made the library 29 MB instead of 0.6 MB.
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", "-g0", *OPENMP],
            extra_link_args=[*OPENMP, "-s"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
