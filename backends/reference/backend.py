"""ReferenceBackend: every op written the obvious way in numpy, in float64 where it helps.

No blocking, no threads, a whole-matrix dequantisation per matmul: correctness is its only job,
and tests compare every other backend against it. The ops of the block features run the numpy
definitions in zephyr.host_ops (the optional ones as the contract's defaults do).
"""
import numpy as np

from zephyr import host_ops, quants
from zephyr.backend import (FEATURES, HostBackend, HostKVCache, RopeScaling, Weight, as_index, as_positions,
                            check_activation, check_cache_args, check_rope_args, check_weight, host_vector)
from zephyr.errors import BackendError


def _as_matrix(x, name, cols=None, rows=None):
    return check_activation(np.ascontiguousarray(x, dtype=np.float32), name, np.ndarray, "numpy", cols, rows)


class ReferenceBackend(HostBackend):
    name = "reference"
    device = "cpu"
    score = 0
    supported_types = quants.SUPPORTED_TYPES
    features = frozenset(FEATURES)

    # -- memory ---------------------------------------------------------------------------
    def load_weight(self, weight: Weight):
        return check_weight(weight, self.name, self.supported_types)

    def _decode(self, w):
        """A weight handle (or float array) -> float32 values in its row-major shape."""
        if not isinstance(w, Weight):
            return np.asarray(w, dtype=np.float32)
        w = self.load_weight(w)
        return quants.dequantize(w.data, w.type, w.shape).astype(np.float32)

    # -- ops --------------------------------------------------------------------------------
    def matmul(self, x, w):
        """x @ dequant(W).T in float64, after rounding x to the weight type's activation type."""
        weight = self._decode(w)                                  # [m, k]
        x = _as_matrix(x, "matmul input", cols=weight.shape[-1])  # [n, k]
        x = quants.round_activations(x, w.type if isinstance(w, Weight) else quants.GGMLType.F32)
        return (x.astype(np.float64) @ weight.astype(np.float64).T).astype(np.float32)

    def embed(self, w, ids):
        ids = np.asarray(ids)
        vocab = w.rows if isinstance(w, Weight) else len(w)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= vocab)):
            raise BackendError(f"token ids must be a 1-D array in [0, {vocab}), got {ids!r}")
        return self._decode(w).reshape(vocab, -1)[ids]

    def rms_norm(self, x, w, eps):
        weight = self._decode(w).reshape(-1)                      # [d]
        return host_ops.rms_norm(_as_matrix(x, "rms_norm input", cols=weight.shape[0]), weight, eps)

    def rope(self, x, positions, head_dim, n_rot, base, neox, scaling=RopeScaling(), freq_factors=None):
        x = _as_matrix(x, "rope input")
        check_rope_args(x.shape[1], head_dim, n_rot)
        positions = as_positions(positions, x.shape[0])
        factors = None if freq_factors is None else host_vector(freq_factors, n_rot // 2, "rope freq factors")
        return host_ops.rope(x, positions, head_dim, n_rot, base, neox, scaling, factors)

    def attention(self, cache, layer, q, k, v, batch, n_heads, n_kv_heads, window=0, scale=None, softcap=0.0):
        check_cache_args(cache, HostKVCache, layer, batch, n_heads, n_kv_heads)
        hd, n = cache.shape.head_dim, len(batch)
        q = _as_matrix(q, "q", cols=n_heads * hd, rows=n)
        k, v = _as_matrix(k, "k", n_kv_heads * hd, n), _as_matrix(v, "v", n_kv_heads * hd, n)
        scale = 1.0 / np.sqrt(hd) if scale is None else float(scale)
        return host_ops.attention(cache, layer, q, k, v, batch, n_heads, n_kv_heads, as_index(window, "window"),
                                  scale, float(softcap))

    def swiglu(self, gate, up):
        gate = _as_matrix(gate, "gate").astype(np.float64)
        up = _as_matrix(up, "up", cols=gate.shape[1]).astype(np.float64)
        if gate.shape != up.shape:
            raise BackendError(f"gate {gate.shape} and up {up.shape} differ in shape")
        sigmoid = 0.5 * (1.0 + np.tanh(0.5 * gate))   # 1 / (1 + exp(-gate)), without overflow
        return (gate * sigmoid * up).astype(np.float32)

    def add(self, a, b):
        a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
        if a.shape != b.shape:
            raise BackendError(f"cannot add arrays of shapes {a.shape} and {b.shape}")
        return (a.astype(np.float64) + b).astype(np.float32)
