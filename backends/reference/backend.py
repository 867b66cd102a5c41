"""ReferenceBackend: every op written the obvious way in numpy, in float64 where it helps.

No blocking, no threads, a whole-matrix dequantisation per matmul: correctness is its only job,
and tests compare every other backend against it.
"""
import numpy as np

from zephyr import quants
from zephyr.backend import Backend, Weight
from zephyr.errors import BackendError


class KVCache:
    """Per-layer key and value arrays, each [n_ctx, h_kv, hd] float32."""

    def __init__(self, n_layers, n_ctx, n_kv_heads, head_dim):
        self.n_ctx, self.n_kv_heads, self.head_dim = n_ctx, n_kv_heads, head_dim
        self.k = [np.zeros((n_ctx, n_kv_heads, head_dim), np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((n_ctx, n_kv_heads, head_dim), np.float32) for _ in range(n_layers)]


def _as_matrix(x, name, cols=None):
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise BackendError(f"{name} must be 2-D [n, width], got shape {x.shape}")
    if cols is not None and x.shape[1] != cols:
        raise BackendError(f"{name} has width {x.shape[1]}, expected {cols}")
    return x


_LEGACY_TYPES = frozenset({quants.GGMLType.Q4_0, quants.GGMLType.Q4_1, quants.GGMLType.Q5_0,
                           quants.GGMLType.Q5_1, quants.GGMLType.Q8_0})
_FLOAT_TYPES = frozenset({quants.GGMLType.F32, quants.GGMLType.F16, quants.GGMLType.BF16})


def _round_activations(x, weight_type):
    """x [n, k] as the integer kernels for `weight_type` see it (see ReferenceBackend.matmul)."""
    if weight_type in _FLOAT_TYPES:
        return x
    if weight_type in _LEGACY_TYPES:
        return quants.dequantize(quants.quantize_q8_0(x), quants.GGMLType.Q8_0, x.shape)
    return quants.dequantize(quants.quantize_q8_k(x), quants.GGMLType.Q8_K, x.shape)


class ReferenceBackend(Backend):
    name = "reference"
    device = "cpu"
    score = 0
    supported_types = quants.SUPPORTED_TYPES

    # -- memory ---------------------------------------------------------------------------
    def load_weight(self, weight: Weight):
        if weight.type not in self.supported_types:
            raise BackendError(f"reference backend cannot use {weight.name!r}: "
                               f"type {weight.type.name} is not supported")
        info = quants.TYPE_INFO[weight.type]
        if weight.cols % info.block_size:
            raise BackendError(f"{weight.name!r}: {weight.cols} columns is not a whole number of "
                               f"{weight.type.name} blocks of {info.block_size}")
        needed = weight.rows * info.row_bytes(weight.cols)
        if weight.data.size != needed:
            raise BackendError(f"{weight.name!r}: {weight.data.size} bytes of data, but shape "
                               f"{weight.shape} of {weight.type.name} takes {needed}")
        return weight

    def from_host(self, x):
        return np.array(x, dtype=np.float32)

    def to_host(self, x):
        return np.asarray(x, dtype=np.float32)

    def new_kv_cache(self, n_layers, n_ctx, n_kv_heads, head_dim):
        return KVCache(n_layers, n_ctx, n_kv_heads, head_dim)

    # -- helpers --------------------------------------------------------------------------
    def _decode(self, w):
        """A weight handle (or float array) -> float32 values in its row-major shape."""
        if not isinstance(w, Weight):
            return np.asarray(w, dtype=np.float32)
        w = self.load_weight(w)
        return quants.dequantize(w.data, w.type, w.shape).astype(np.float32)

    # -- ops --------------------------------------------------------------------------------
    def matmul(self, x, w):
        """x @ dequant(W).T in float64, after rounding x as the weight type's integer kernels do.

        Quantised weights multiply 8-bit activations: x is first rounded through Q8_0 (legacy
        types Q4_0 ... Q8_0, blocks of 32) or Q8_K (k-quants, blocks of 256) with zephyr.quants'
        quantisers and decoded back; float weights (F32, F16, BF16) take x as it is. llama.cpp
        computes the same products, and an optimised backend then differs from this one only in
        float summation order.
        """
        weight = self._decode(w)                                  # [m, k]
        x = _as_matrix(x, "matmul input", cols=weight.shape[-1])  # [n, k]
        x = _round_activations(x, w.type if isinstance(w, Weight) else quants.GGMLType.F32)
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

    def rope(self, x, start_pos, head_dim, n_rot, base, neox):
        x = _as_matrix(x, "rope input")
        n, width = x.shape
        if head_dim <= 0 or width % head_dim or n_rot % 2 or not 0 <= n_rot <= head_dim:
            raise BackendError(f"rope: width {width}, head_dim {head_dim}, n_rot {n_rot}: width must be "
                               f"a multiple of head_dim and n_rot even and at most head_dim")
        heads = x.reshape(n, width // head_dim, head_dim).astype(np.float64)  # [n, heads, hd]
        half = n_rot // 2
        positions = start_pos + np.arange(n, dtype=np.float64)
        theta = positions[:, None] * base ** (-2.0 * np.arange(half) / n_rot)  # [n, half]
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

    def attention(self, cache, layer, q, k, v, start_pos, n_heads, n_kv_heads, window=0):
        hd = cache.head_dim
        if not 0 <= layer < len(cache.k):
            raise BackendError(f"layer {layer} is outside the cache's {len(cache.k)} layers")
        if n_kv_heads != cache.n_kv_heads or n_heads % n_kv_heads:
            raise BackendError(f"{n_heads} query heads over {n_kv_heads} kv heads do not fit a cache "
                               f"of {cache.n_kv_heads} kv heads")
        q = _as_matrix(q, "q", cols=n_heads * hd)
        n = q.shape[0]
        k = _as_matrix(k, "k", cols=n_kv_heads * hd)
        v = _as_matrix(v, "v", cols=n_kv_heads * hd)
        if k.shape[0] != n or v.shape[0] != n:
            raise BackendError(f"q, k, v must have the same number of tokens, got {n}, {len(k)}, {len(v)}")
        if start_pos < 0 or start_pos + n > cache.n_ctx:
            raise BackendError(f"positions {start_pos}..{start_pos + n - 1} do not fit a cache of "
                               f"{cache.n_ctx} positions")
        end = start_pos + n
        cache.k[layer][start_pos:end] = k.reshape(n, n_kv_heads, hd)
        cache.v[layer][start_pos:end] = v.reshape(n, n_kv_heads, hd)

        keys = cache.k[layer][:end].astype(np.float64)      # [T, h_kv, hd]
        values = cache.v[layer][:end].astype(np.float64)
        query_pos = np.arange(start_pos, end)[:, None]      # [n, 1]
        key_pos = np.arange(end)[None, :]                   # [1, T]
        visible = key_pos <= query_pos
        if window > 0:
            visible &= key_pos > query_pos - window
        group = n_heads // n_kv_heads
        queries = q.reshape(n, n_heads, hd).astype(np.float64)
        out = np.empty((n, n_heads, hd))
        for head in range(n_heads):
            kv = head // group
            scores = queries[:, head] @ keys[:, kv].T / np.sqrt(hd)   # [n, T]
            scores = np.where(visible, scores, -np.inf)
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            out[:, head] = weights @ values[:, kv]
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
