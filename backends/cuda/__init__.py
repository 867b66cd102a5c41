"""The CUDA backend: CuPy raw kernels (backends/cuda/kernels/*.cu) for NVIDIA GPUs."""
from zephyr.hookspecs import hookimpl


@hookimpl
def zephyr_register_backends():
    from .backend import CudaBackend
    return [CudaBackend]
