"""The CPU backend: Cython + OpenMP kernels that decode quantised weights row by row."""
from zephyr.hookspecs import hookimpl


@hookimpl
def zephyr_register_backends():
    from .backend import CPUBackend
    return [CPUBackend]
