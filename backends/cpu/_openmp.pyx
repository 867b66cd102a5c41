# cython: language_level=3
"""The one module that talks to the OpenMP runtime (thread counts, build check).

A compiler without OpenMP still builds it (and the kernels, whose loops then run on one thread):
omp.h is included only when the build has OpenMP."""
import os


def openmp_enabled():
    """True when this extension was compiled with OpenMP (a build without it is a bug)."""
    return _OPENMP_ENABLED


cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define ZEPHYR_OPENMP 1
    static int zephyr_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define ZEPHYR_OPENMP 0
    static int zephyr_omp_max_threads(void) { return 1; }
    #endif
    """
    int ZEPHYR_OPENMP
    int zephyr_omp_max_threads()


_OPENMP_ENABLED = bool(ZEPHYR_OPENMP)


def default_threads():
    """Threads to use when the caller says 0 or less: OMP_NUM_THREADS, else every core we may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def resolve_threads(int threads):
    """The thread count to run with: `threads` if positive, else the default."""
    return threads if threads > 0 else default_threads()


def max_threads():
    """What the OpenMP runtime itself would use."""
    return zephyr_omp_max_threads()
