"""The CPU backend's build: OpenMP compiled in, and thread counts that change nothing but speed."""
import numpy as np

from zephyr.backend import Batch, CacheShape
from zephyr.quants import GGMLType
from zephyr_backends.cpu import _openmp
from zephyr_backends.cpu.backend import CPUBackend


def test_openmp_is_compiled_in():
    assert _openmp.openmp_enabled(), "the CPU kernels were built without OpenMP: rebuild with -fopenmp"


def test_threads_default_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert CPUBackend(threads=0).threads == 3
    assert CPUBackend(threads=-1).threads == 3
    assert CPUBackend(threads=1).threads == 1


def _every_op(backend, weights):
    """Outputs of every op on fixed inputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    matrix = backend.load_weight(weights["matrix"])
    outputs = {
        "matmul1": backend.matmul(x[:1], matrix),
        "matmul": backend.matmul(x, matrix),
        "embed": backend.embed(matrix, np.array([3, 0, 32], np.int32)),
        "rms_norm": backend.rms_norm(x, backend.load_weight(weights["norm"]), 1e-6),
        "rope": backend.rope(x, np.arange(11, 16), 64, 32, 10000.0, False),
        "rope_neox": backend.rope(x, np.arange(11, 16), 64, 64, 10000.0, True),
        "swiglu": backend.swiglu(x, x[::-1].copy()),
        "add": backend.add(x, x[::-1].copy()),
    }
    cache = backend.new_kv_cache(CacheShape(1, 2, 1200, 2, 64))
    q = rng.standard_normal((5, 8 * 64)).astype(np.float32)
    kv = rng.standard_normal((5, 2 * 64)).astype(np.float32)
    outputs["attention"] = backend.attention(cache, 0, q, kv, kv, Batch.of(0, 5), 8, 2, window=3)
    outputs["decode"] = backend.attention(cache, 0, q[:1], kv[:1], kv[:1], Batch.of(5, 1), 8, 2)
    long = rng.standard_normal((1100, 2 * 64)).astype(np.float32)   # long enough to split a lone token's keys
    backend.attention(cache, 0, np.repeat(q[:1], 1100, axis=0), long, long, Batch.of(0, 1100, seq=1), 8, 2)
    outputs["long decode"] = backend.attention(cache, 0, q[:1], kv[:1], kv[:1], Batch.of(1100, 1, seq=1), 8, 2)
    return outputs


def test_thread_counts_give_identical_results(make_weight):
    weights = {"matrix": make_weight(GGMLType.Q4_K, (33, 512)), "norm": make_weight(GGMLType.F32, (512,))}
    single = _every_op(CPUBackend(threads=1), weights)
    for threads in (2, 3):
        for op, result in _every_op(CPUBackend(threads=threads), weights).items():
            np.testing.assert_array_equal(result, single[op], err_msg=f"{op} with {threads} threads")


def test_a_compiler_without_openmp_still_builds_the_extensions(tmp_path):
    """The generated C of both extensions compiles without -fopenmp and without omp.h (then they run
    serial): an omp.h that stops the compiler stands in for a compiler that has none."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    import pytest
    sources = [Path(__file__).parents[2] / "backends" / "cpu" / f"{name}.c" for name in ("_openmp", "_ops")]
    if not all(source.exists() for source in sources) or not shutil.which("gcc"):
        pytest.skip("needs gcc and the C files Cython generated for the in-place build")
    (tmp_path / "omp.h").write_text("#error this compiler has no OpenMP\n")
    includes = [f"-I{tmp_path}", f"-I{sysconfig.get_paths()['include']}", f"-I{np.get_include()}",
                f"-I{sources[0].parent / 'kernels'}"]
    for source in sources:
        done = subprocess.run(["gcc", "-fsyntax-only", "-Wno-unused-function", *includes, str(source)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
