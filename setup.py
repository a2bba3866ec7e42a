"""Builds the optional C++ CPU kernels as ``sgsc._C``.

Set ``SGSC_SKIP_CPP=1`` to install without them: the ops then run on the pure-PyTorch reference
on CPU, and ``sgsc doctor`` says why the extension is missing.
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
options = {}
# The kernels use only the LibTorch stable ABI (csrc/stable.h) at the level of the lowest torch the
# package supports, so this one build loads beside that torch and every later one; the headers then
# refuse anything newer. Keep it equal to the lower bound of `torch` in pyproject.toml.
TORCH_TARGET_VERSION = (2 << 56) | (13 << 48)
if os.environ.get("SGSC_SKIP_CPP", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            name="sgsc._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            # Python's limited API too: one file, sgsc/_C.abi3.so, for every CPython >= 3.10.
            py_limited_api=True,
            # -O3 turns on the loop vectoriser that fills each ISA clone (no -march=native: the
            # binary runs on any x86-64 and picks its clone at load time). -fno-trapping-math lets
            # the compare-and-select loops of the backward vectorise; the kernels raise no FP traps.
            # -g0 and -s: Python's default flags carry -g, which made the library 29 MB instead of 0.6 MB.
            # No OpenMP: the parallel loops are torch's own (torch_parallel_for), run inside libtorch.
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", "-g0",
                                f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION:#x}"],
            extra_link_args=["-s"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    options["bdist_wheel"] = {"py_limited_api": "cp310"}

setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
