"""The one compiled part of charstream: the sampler's kernel (server/engine/sampling_kernel.c and
the files it names: sampling_screen32.c, sampling_check64.c, sampling_kernel.h).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is found
the install still succeeds and the server screens with NumPy (server/engine/sampling_screen.py),
drawing the same tokens, more slowly.
"""

import sys

from setuptools import Extension, setup

# Every float operation as written, rounded to nearest (the screen's error bound assumes it):
# no contraction into fused multiply-adds, and never -ffast-math.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

KERNEL = ["server/engine/sampling_kernel.c", "server/engine/sampling_screen32.c", "server/engine/sampling_check64.c"]

setup(ext_modules=[Extension("server.engine._sampling_kernel", KERNEL, depends=["server/engine/sampling_kernel.h"],
                             extra_compile_args=FLAGS, optional=True)])
