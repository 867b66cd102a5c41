"""Everything that talks to CuPy beyond arrays: whether a GPU is usable, and the compiled kernels.

CuPy is an optional dependency (`zephyr[cuda12]` / `zephyr[cuda13]`); nothing here imports it
before `availability()` or `Kernels` asks for it.
"""
import re
from pathlib import Path

import numpy as np

from zephyr.backend import Availability

INSTALL_HINT = "pip install 'zephyr[cuda12]' or 'zephyr[cuda13]'"
KERNEL_DIR = Path(__file__).parent / "kernels"
KERNEL_FILES = ("attention", "dequant", "elementwise", "matvec", "norm", "quantize", "rope")
NVRTC_OPTIONS = ("-std=c++17",)   # CuPy adds -arch for the current device
MIN_COMPUTE_CAPABILITY = 61       # __dp4a

_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.MULTILINE)


def import_cupy():
    """The cupy module, or None when it is not installed."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def availability() -> Availability:
    """Whether CuPy, an NVIDIA driver new enough for it and a CUDA device (number 0) are present."""
    try:
        cupy = import_cupy()
    except Exception as exc:   # a broken CuPy install raises more than ImportError
        return Availability(False, f"CuPy failed to import ({exc}); reinstall it: {INSTALL_HINT}")
    if cupy is None:
        return Availability(False, f"CuPy is not installed ({INSTALL_HINT})")
    runtime = cupy.cuda.runtime
    try:
        driver = runtime.driverGetVersion()
        built_for = runtime.runtimeGetVersion()
    except Exception as exc:
        return Availability(False, f"the CUDA runtime could not be loaded ({exc})")
    if driver == 0:
        return Availability(False, "no NVIDIA driver found (CuPy is installed, but libcuda.so is missing)")
    if driver // 1000 < built_for // 1000:
        return Availability(False, f"the NVIDIA driver supports CUDA {_version(driver)}, older than the CUDA "
                                   f"{_version(built_for)} CuPy was built for: update the driver or install "
                                   f"the CuPy for CUDA {driver // 1000} ({INSTALL_HINT})")
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:
        return Availability(False, f"no usable CUDA device ({exc})")
    if count == 0:
        return Availability(False, "no CUDA device found")
    try:
        capability = int(cupy.cuda.Device(0).compute_capability)
    except Exception as exc:
        return Availability(False, f"CUDA device 0 cannot be queried ({exc})")
    if capability < MIN_COMPUTE_CAPABILITY:
        return Availability(False, f"CUDA device 0 has compute capability {capability // 10}.{capability % 10}; "
                                   f"the kernels need 6.1 or newer")
    return Availability(True)


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def kernel_source(name: str) -> str:
    """The source of kernels/<name>.cu with its local headers inlined (each once), so the text alone
    decides what CuPy compiles and caches."""
    seen = set()

    def expand(path: Path) -> str:
        def include(match):
            header = KERNEL_DIR / match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            return expand(header)
        return _INCLUDE.sub(include, path.read_text())

    return expand(KERNEL_DIR / f"{name}.cu").replace("#pragma once\n", "")


class CupyGPU:
    """What CudaBackend uses of CuPy: the array module `cp`, the kernels, one stream, and cuBLAS.

    (The tests hand the backend a stand-in with the same attributes that runs the kernels on the
    CPU: emulation.py.)
    """

    def __init__(self):
        cp = import_cupy()
        self.cp = cp
        self.kernels = Kernels(cp)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._scalars = np.array([1.0, 0.0, 1.0], dtype=np.float32)   # alpha, beta = 0, beta = 1

    def memory_available(self) -> int:
        """Bytes the device can still give: its free memory and what CuPy's pool holds unused."""
        free, _total = self.cp.cuda.runtime.memGetInfo()
        return free + self.cp.get_default_memory_pool().free_bytes()

    def gemm(self, w, x, y, row0, accumulate):
        """y[:, row0:row0 + rows] (+)= x @ w.T through cuBLAS on the stream, in f32.

        w: [rows, k] weight rows, x: [n, k], both f16 or both f32 (C-contiguous); y: f32 [n, m].
        """
        from cupy_backends.cuda.libs import cublas
        rows, k = w.shape
        n, m = y.shape
        types = {np.dtype(np.float16): _CUDA_R_16F, np.dtype(np.float32): _CUDA_R_32F}
        handle = self.cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, self.stream.ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        alpha = self._scalars.ctypes.data
        beta = alpha + (8 if accumulate else 4)
        # Column-major, cuBLAS's view of these row-major arrays: y^T[row0:row0+rows, :] = w (k x rows)^T x^T (k x n)
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, rows, n, k, alpha,
                      w.data.ptr, types[w.dtype], k, x.data.ptr, types[x.dtype], k, beta,
                      y.data.ptr + 4 * row0, _CUDA_R_32F, m, cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)


# CUDA data type enum values (library_types.h)
_CUDA_R_32F, _CUDA_R_16F = 0, 2


class Kernels:
    """The kernel functions of the current device, compiled once per process and device (CuPy also
    keeps the binaries in its on-disk cache across processes)."""

    _modules = {}   # (device id, file name) -> cupy.RawModule

    def __init__(self, cupy):
        self._cupy = cupy
        self._device = cupy.cuda.Device().id
        self._functions = {}

    def __getitem__(self, name):
        """The kernel `name` of the file that defines it (see KERNEL_FILES); looked up once."""
        function = self._functions.get(name)
        if function is None:
            function = self._module(file_of(name)).get_function(name)
            self._functions[name] = function
        return function

    def _module(self, file):
        key = (self._device, file)
        module = self._modules.get(key)
        if module is None:
            module = self._cupy.RawModule(code=kernel_source(file), options=NVRTC_OPTIONS)
            self._modules[key] = module
        return module

    def compile_all(self):
        """Compile every kernel file now (the first process on a machine takes a while)."""
        for file in KERNEL_FILES:
            self._module(file).get_function(FIRST_KERNEL[file])


def file_of(name: str) -> str:
    """The kernel file (see KERNEL_FILES) that defines kernel `name`."""
    for prefix, file in _PREFIXES:
        if name.startswith(prefix):
            return file
    raise KeyError(f"no kernel file defines {name!r}")


# kernel-name prefix -> file, longest prefixes first
_PREFIXES = (
    ("attention", "attention"),
    ("dequant_f16_", "dequant"), ("embed_", "dequant"),
    ("mvglu_", "matvec"), ("mv_", "matvec"), ("mv3_", "matvec"),
    ("quantize_q8_", "quantize"),
    ("rms_norm", "norm"),
    ("rope", "rope"),
    ("add", "elementwise"), ("swiglu", "elementwise"), ("to_f16", "elementwise"),
)
FIRST_KERNEL = {"attention": "attention_f32", "dequant": "embed_f32", "elementwise": "add", "matvec": "mv_f32_1",
                "norm": "rms_norm", "quantize": "quantize_q8_0", "rope": "rope"}
