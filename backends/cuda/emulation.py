"""The CUDA backend's kernels on the CPU, for tests on machines without a GPU.

`EmulatedGPU()` stands in for runtime.CupyGPU: the same kernel files, compiled by g++ with
kernels/host_emulation.cuh (blocks in turn, a block's threads as fibers), numpy arrays in place of
CuPy's, numpy in place of cuBLAS, and a stream whose capture records kernel launches for replay.
`CudaBackend(gpu=EmulatedGPU())` then runs every op, the decode path and graph replay on the CPU
(slowly: keep the sizes small). What it cannot show: timing, memory-ordering races, the real
compiler's code generation, and the CuPy and cuBLAS calls themselves.
"""
import ctypes
import hashlib
import platform
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

from zephyr import memory

from .runtime import FIRST_KERNEL, KERNEL_DIR, KERNEL_FILES, file_of, kernel_source

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')
_CACHE = Path(tempfile.gettempdir()) / "zephyr-cuda-emulation"


def compiler_available() -> bool:
    """Whether this machine can build and run the emulator (g++ on x86-64)."""
    return shutil.which("g++") is not None and platform.machine() in ("x86_64", "AMD64")


class EmulatedArray(np.ndarray):
    """A numpy array with the few CuPy methods the backend calls."""

    def set(self, host, stream=None):
        self[...] = host

    def get(self, stream=None):
        return np.array(self)


def _wrap(a):
    return a.view(EmulatedArray)


def _make_cp():
    cp = types.SimpleNamespace()
    cp.ndarray = EmulatedArray
    for name in ("float16", "float32", "int8", "int32", "uint8"):
        setattr(cp, name, getattr(np, name))
    cp.empty = lambda shape, dtype=np.float32: _wrap(np.empty(shape, dtype))
    cp.zeros = lambda shape, dtype=np.float32: _wrap(np.zeros(shape, dtype))
    cp.empty_like = lambda a, dtype=None: _wrap(np.empty_like(a, dtype=dtype))
    cp.ascontiguousarray = lambda a, dtype=None: _wrap(np.ascontiguousarray(a, dtype=dtype))
    cp.copyto = np.copyto
    return cp


class _Graph:
    def __init__(self, launches):
        self._launches = launches

    def launch(self, stream=None):
        for kernel, grid, block, args in self._launches:
            kernel.run(grid, block, args)


class EmulatedStream:
    """Runs work at once; between begin_capture and end_capture it records kernel launches."""

    ptr = 0

    def __init__(self):
        self.captured = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass

    def begin_capture(self):
        self.captured = []

    def end_capture(self):
        graph, self.captured = _Graph(self.captured), None
        return graph


class _Kernel:
    def __init__(self, function, params, stream, name):
        self._function, self._params, self._stream, self.name = function, params, stream, name

    def __call__(self, grid, block, args, shared_mem=0):
        if self._stream.captured is not None:
            self._stream.captured.append((self, grid, block, args))
        else:
            self.run(grid, block, args)

    def run(self, grid, block, args):
        if len(args) != len(self._params):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self._params)} parameters")
        values = []
        for (kind, ctype), arg in zip(self._params, args):
            if kind == "pointer":
                if isinstance(arg, np.ndarray):
                    if not arg.flags.c_contiguous:
                        raise ValueError(f"{self.name}: a non-contiguous array as a pointer argument")
                    values.append(ctypes.c_void_p(arg.ctypes.data))
                elif int(arg) == 0:
                    values.append(ctypes.c_void_p(0))
                else:
                    raise TypeError(f"{self.name}: {arg!r} for a pointer parameter")
            else:
                if isinstance(arg, np.ndarray) or type(arg) not in ctype[1]:
                    raise TypeError(f"{self.name}: {type(arg).__name__} for a {ctype[0].__name__} parameter "
                                    f"(pass numpy scalars of the exact width)")
                values.append(ctype[0](arg))
        dims = [int(v) for v in tuple(grid) + (1,) * (3 - len(grid))] + \
               [int(v) for v in tuple(block) + (1,) * (3 - len(block))]
        error = self._function(*dims, *values)
        if error:
            raise RuntimeError(f"{self.name}: {error.decode()}")


_SCALARS = {"int": (ctypes.c_int, (np.int32,)), "float": (ctypes.c_float, (np.float32,)),
            "i64": (ctypes.c_int64, (np.int64,))}


def _parse_params(text):
    params = []
    for param in text.split(","):
        param = param.strip()
        if "*" in param:
            params.append(("pointer", None))
        else:
            base = param.replace("const", "").split()[0]
            params.append(("scalar", _SCALARS[base]))
    return params


class _Library:
    """One kernel file built for the host, with a launcher per kernel."""

    def __init__(self, file):
        source = kernel_source(file)
        expanded = subprocess.run(["g++", "-std=c++17", "-E", "-P", "-x", "c++", "-"], input=source, text=True,
                                  capture_output=True, check=True).stdout
        kernels = {name: params for name, params in _KERNEL.findall(expanded)}
        launchers = []
        for name, params in kernels.items():
            names = [re.findall(r"\w+", p)[-1] for p in params.split(",")]
            launchers.append(
                f'extern "C" const char *emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                f'unsigned by, unsigned bz, {params}) {{\n'
                f'    return emu::launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, [=]() {{ {name}({", ".join(names)}); }});\n'
                f'}}\n')
        full = source + "\n" + "".join(launchers)
        digest = hashlib.sha256((full + (KERNEL_DIR / "host_emulation.cuh").read_text()).encode()).hexdigest()[:16]
        _CACHE.mkdir(parents=True, exist_ok=True)
        library = _CACHE / f"{file}-{digest}.so"
        if not library.exists():
            src = _CACHE / f"{file}-{digest}.cpp"
            src.write_text(full)
            partial = library.with_suffix(".partial")
            built = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-include",
                                    str(KERNEL_DIR / "host_emulation.cuh"), "-o", str(partial), str(src)],
                                   capture_output=True, text=True)
            if built.returncode:
                raise RuntimeError(f"g++ could not build {file}.cu for the emulator:\n{built.stderr[-4000:]}")
            partial.rename(library)
        self._dll = ctypes.CDLL(str(library))
        self.kernels = {}
        for name, params in kernels.items():
            function = getattr(self._dll, f"emu_launch_{name}")
            function.restype = ctypes.c_char_p
            self.kernels[name] = (function, _parse_params(params))


class EmulatedKernels:
    """kernels[name] -> a callable like CuPy's RawKernel: kernel(grid, block, args)."""

    _libraries = {}   # file -> _Library, built once per process

    def __init__(self, stream):
        self._stream = stream
        self._functions = {}

    def __getitem__(self, name):
        kernel = self._functions.get(name)
        if kernel is None:
            file = file_of(name)
            library = self._libraries.get(file)
            if library is None:
                library = self._libraries[file] = _Library(file)
            function, params = library.kernels[name]
            kernel = self._functions[name] = _Kernel(function, params, self._stream, name)
        return kernel

    def compile_all(self):
        """Build every kernel file for the host now (as runtime.Kernels.compile_all compiles them)."""
        for file in KERNEL_FILES:
            self[FIRST_KERNEL[file]]


class EmulatedGPU:
    """A stand-in for runtime.CupyGPU that runs on the CPU (see the module docstring)."""

    def __init__(self):
        self.cp = _make_cp()
        self.stream = EmulatedStream()
        self.kernels = EmulatedKernels(self.stream)

    def memory_available(self) -> int:
        """The host's: emulated device arrays live in host memory."""
        return memory.available_memory()

    def gemm(self, w, x, y, row0, accumulate):
        rows = w.shape[0]
        product = np.asarray(x, dtype=np.float32) @ np.asarray(w, dtype=np.float32).T
        if accumulate:
            product += y[:, row0:row0 + rows]
        y[:, row0:row0 + rows] = product
