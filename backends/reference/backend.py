"""ReferenceBackend: every op written the obvious way in numpy, in float64 where it helps.

No blocking, no threads, a whole-matrix dequantisation per matmul: correctness is its only job,
and tests compare every other backend against it.
"""
import numpy as np

from zephyr import quants
from zephyr.backend import (HostBackend, HostKVCache, Weight, as_positions, check_activation, check_cache_args,
                            check_rope_args, check_weight)
from zephyr.errors import BackendError


def _as_matrix(x, name, cols=None, rows=None):
    return check_activation(np.ascontiguousarray(x, dtype=np.float32), name, np.ndarray, "numpy", cols, rows)


class ReferenceBackend(HostBackend):
    name = "reference"
    device = "cpu"
    score = 0
    supported_types = quants.SUPPORTED_TYPES

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
        weight = self._decode(w).reshape(-1).astype(np.float64)   # [d]
        x = _as_matrix(x, "rms_norm input", cols=weight.shape[0]).astype(np.float64)
        rms = np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps)
        return (x / rms * weight).astype(np.float32)

    def rope(self, x, positions, head_dim, n_rot, base, neox):
        x = _as_matrix(x, "rope input")
        n, width = x.shape
        check_rope_args(width, head_dim, n_rot)
        positions = as_positions(positions, n)
        heads = x.reshape(n, width // head_dim, head_dim).astype(np.float64)  # [n, heads, hd]
        half = n_rot // 2
        theta = positions[:, None].astype(np.float64) * base ** (-2.0 * np.arange(half) / n_rot)  # [n, half]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        if neox:
            first, second = np.arange(half), np.arange(half) + half
        else:
            first, second = np.arange(0, n_rot, 2), np.arange(1, n_rot, 2)
        a, b = heads[..., first], heads[..., second]
        out = heads.copy()
        out[..., first] = a * cos - b * sin
        out[..., second] = a * sin + b * cos
        return out.reshape(n, width).astype(np.float32)

    def attention(self, cache, layer, q, k, v, batch, n_heads, n_kv_heads, window=0):
        check_cache_args(cache, HostKVCache, layer, batch, n_heads, n_kv_heads)
        hd, n = cache.shape.head_dim, len(batch)
        q = _as_matrix(q, "q", cols=n_heads * hd, rows=n)
        cache.store(layer, batch, _as_matrix(k, "k", n_kv_heads * hd, n), _as_matrix(v, "v", n_kv_heads * hd, n))
        group = n_heads // n_kv_heads
        out = np.empty((n, n_heads, hd))
        for i, (seq, pos) in enumerate(zip(batch.seqs, batch.positions)):
            keys = cache.rows(layer, 0, seq, pos + 1).astype(np.float64)      # [pos + 1, h_kv, hd]
            values = cache.rows(layer, 1, seq, pos + 1).astype(np.float64)
            lo = max(0, pos - window + 1) if window > 0 else 0
            query = q[i].reshape(n_heads, hd).astype(np.float64)
            for head in range(n_heads):
                scores = keys[lo:, head // group] @ query[head] / np.sqrt(hd)   # [visible]
                weights = np.exp(scores - scores.max())
                out[i, head] = weights / weights.sum() @ values[lo:, head // group]
        return out.reshape(n, n_heads * hd).astype(np.float32)

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
