"""The plugin module named by the entry point: it only says which backends it provides.

Heavy imports (the backend itself, and in a real plugin CUDA or a native library) wait until
zephyr asks, so `zephyr backends` and every model load stay fast.
"""
from zephyr.hookspecs import hookimpl


@hookimpl
def zephyr_register_backends():
    from .backend import ExampleBackend
    return [ExampleBackend]
