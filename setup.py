"""Build the native parts: the Cython + OpenMP CPU backend.

ZEPHYR_PORTABLE=1 builds without -march=native (for wheels that run on other x86 machines).
"""
import glob
import os
import shlex
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

portable = os.environ.get("ZEPHYR_PORTABLE", "") not in ("", "0")


def openmp_flags():
    """(compile, link) flags for OpenMP where the compiler has it; else none, with a warning: the
    extension then builds serial (one thread), which tests/backends/test_cpu_build.py reports."""
    if sys.platform == "win32":
        return ["/openmp"], []
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler
    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp.c")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=["-fopenmp"])
            # LDFLAGS as the extension's link gets them (an ASan build's -fsanitize=address, say)
            linked = ["-fopenmp", *shlex.split(os.environ.get("LDFLAGS", ""))]
            compiler.link_executable(objects, os.path.join(tmp, "omp"), extra_postargs=linked)
        except Exception:  # noqa: BLE001 - any failure means: no OpenMP here
            print("warning: the C compiler has no OpenMP; the CPU backend will run on one thread", file=sys.stderr)
            return [], []
    return ["-fopenmp"], ["-fopenmp"]


omp_compile, omp_link = openmp_flags()
if sys.platform == "win32":
    compile_args, link_args = ["/O2", *omp_compile], omp_link
else:
    # No implicit FMA contraction: gcc would fuse products into later sums differently in each
    # inlined copy of a kernel, and results must not depend on tile position or thread count.
    # The kernels ask for FMA explicitly where they want it.
    compile_args = ["-O3", *omp_compile, "-ffp-contract=off"]
    if not portable:
        compile_args.append("-march=native")
    link_args = omp_link


def cpu_extension(name):
    return Extension(
        f"zephyr_backends.cpu.{name}",
        [f"backends/cpu/{name}.pyx"],
        include_dirs=[numpy.get_include(), "backends/cpu/kernels"],
        depends=sorted(glob.glob("backends/cpu/kernels/*.h")),   # a changed kernel rebuilds the extension
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
