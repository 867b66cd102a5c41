"""ExampleBackend: zephyr's reference backend under its own name, with one op of its own.

A real backend would implement every op of zephyr.backend.Backend for its device; this one
inherits them from the reference backend and replaces `swiglu`, to show where an op goes.
"""
import os

import numpy as np

from zephyr.backend import Availability
from zephyr_backends.reference.backend import ReferenceBackend


class ExampleBackend(ReferenceBackend):
    name = "example"
    device = "cpu"
    score = -1          # below the built-in backends: used only when asked for, backend="example"

    @classmethod
    def availability(cls):
        if os.environ.get("ZEPHYR_EXAMPLE_BACKEND_OFF"):
            return Availability(False, "switched off by ZEPHYR_EXAMPLE_BACKEND_OFF")
        return Availability(True)

    def __init__(self, threads: int = 0):
        super().__init__(threads)
        self.swiglu_calls = 0

    def swiglu(self, gate, up):
        # gate, up: [n, d_ffn] float32 -> silu(gate) * up
        self.swiglu_calls += 1
        gate = np.asarray(gate, dtype=np.float32)
        return (gate / (1.0 + np.exp(-gate)) * np.asarray(up, dtype=np.float32)).astype(np.float32)
