"""Build the native parts: the Cython + OpenMP CPU backend.

ZEPHYR_PORTABLE=1 builds without -march=native (for wheels that run on other x86 machines).
"""
import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

portable = os.environ.get("ZEPHYR_PORTABLE", "") not in ("", "0")
if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/openmp"], []
else:
    # No implicit FMA contraction: gcc would fuse products into later sums differently in each
    # inlined copy of a kernel, and results must not depend on tile position or thread count.
    # The kernels ask for FMA explicitly where they want it.
    compile_args = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if not portable:
        compile_args.append("-march=native")
    link_args = ["-fopenmp"]


def cpu_extension(name):
    return Extension(
        f"zephyr_backends.cpu.{name}",
        [f"backends/cpu/{name}.pyx"],
        include_dirs=[numpy.get_include(), "backends/cpu/kernels"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


extensions = [cpu_extension(name) for name in ("_openmp", "_ops")]

setup(
    package_dir={"zephyr": "zephyr", "zephyr_backends": "backends"},
    packages=["zephyr", "zephyr.server", "zephyr.integrations", "zephyr.testing", "zephyr_backends", "zephyr_backends.reference",
              "zephyr_backends.cpu", "zephyr_backends.cuda"],
    package_data={"zephyr_backends.cpu": ["kernels/*.h", "*.pyx", "*.pxd"], "zephyr.server": ["static/*.html"],
                  "zephyr_backends.cuda": ["kernels/*.cu", "kernels/*.cuh"]},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "initializedcheck": False},
    ),
)
