"""ExampleBackend: a whole zephyr backend in numpy, written against the contract in zephyr/backend.py.

HostBackend supplies what every host-memory backend shares (numpy activations, the KV cache);
this class implements the ops, those of every block feature included (Qwen's biases, Gemma's GELU
and soft-caps, Llama 3's RoPE factors...: `features`). A backend may list fewer features: the
blocks that need the others then run through the default decoder_layer, those ops on the host.
Weights are decoded to float32 once, at load: simple, and memory hungry (4 bytes a value), which a
real backend would avoid by keeping them quantised.
"""
import os

import numpy as np

from zephyr.backend import (FEATURES, Availability, HostBackend, HostKVCache, RopeScaling, Weight, as_positions,
                            check_activation, check_cache_args, check_rope_args, check_weight)
from zephyr.errors import BackendError
from zephyr.host_ops import yarn_corr_dims
from zephyr.quants import SUPPORTED_TYPES, dequantize, round_activations


class ExampleWeight:
    """A weight decoded to float32 [rows, cols], remembering its type for the activation rule."""

    def __init__(self, weight: Weight):
        self.name, self.type, self.shape = weight.name, weight.type, weight.shape
        self.values = dequantize(weight.data, weight.type, (weight.rows, weight.cols)).astype(np.float32)


def _matrix(x, name, cols=None, rows=None):
    return check_activation(x, name, np.ndarray, "numpy", cols, rows)


class ExampleBackend(HostBackend):
    name = "example"
    device = "cpu"
    score = -1          # below the built-in backends: used only when asked for, backend="example"
    supported_types = SUPPORTED_TYPES
    features = frozenset(FEATURES)   # every op below takes the weights and arguments of every feature

    @classmethod
    def availability(cls):
        if os.environ.get("ZEPHYR_EXAMPLE_BACKEND_OFF"):
            return Availability(False, "switched off by ZEPHYR_EXAMPLE_BACKEND_OFF")
        return Availability(True)

    def __init__(self):
        self.swiglu_calls = 0   # the tests check this backend really ran

    def load_weight(self, weight):
        if isinstance(weight, ExampleWeight):
            return weight
        return ExampleWeight(check_weight(weight, self.name, self.supported_types))

    def matmul(self, x, w):
        w = self.load_weight(w)                                    # [m, k]
        x = _matrix(x, "matmul input", cols=w.shape[-1])          # [n, k]
        # The numeric contract: quantised weights meet x rounded to 8-bit blocks first.
        return round_activations(x, w.type) @ w.values.T

    def embed(self, w, ids):
        w, ids = self.load_weight(w), np.asarray(ids)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= w.shape[0])):
            raise BackendError(f"token ids must be a 1-D array in [0, {w.shape[0]}), got {ids!r}")
        return w.values[ids]                                       # [n, d]

    def rms_norm(self, x, w, eps):
        x = _matrix(x, "rms_norm input", cols=self.load_weight(w).values.shape[-1])
        return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + np.float32(eps)) * self.load_weight(w).values[0]

    def rope(self, x, positions, head_dim, n_rot, base, neox, scaling=RopeScaling(), freq_factors=None):
        x = _matrix(x, "rope input")
        check_rope_args(x.shape[1], head_dim, n_rot)
        positions = as_positions(positions, x.shape[0])
        heads = x.reshape(x.shape[0], -1, head_dim).copy()         # [n, heads, hd]
        half = n_rot // 2
        inv_freq = base ** (-2.0 * np.arange(half) / n_rot)        # [half]
        if freq_factors is not None:
            inv_freq = inv_freq / self.load_weight(freq_factors).values[0]
        theta = positions[:, None] * inv_freq                      # [n, half]
        scaled = scaling.freq_scale * theta
        magnitude = scaling.attn_factor
        if scaling.ext_factor:   # YaRN: a ramp from scaled to unscaled angles over the pairs
            low, high = yarn_corr_dims(n_rot, scaling.n_ctx_orig, base, scaling.beta_fast, scaling.beta_slow)
            ramp = (1 - np.clip((np.arange(half) - low) / max(0.001, high - low), 0, 1)) * scaling.ext_factor
            scaled = scaled * (1 - ramp) + theta * ramp
            magnitude *= 1 + 0.1 * np.log(1 / scaling.freq_scale)
        cos, sin = np.cos(scaled)[:, None, :] * magnitude, np.sin(scaled)[:, None, :] * magnitude
        a, b = (np.arange(half), np.arange(half) + half) if neox else (np.arange(0, n_rot, 2), np.arange(1, n_rot, 2))
        x0, x1 = heads[..., a].copy(), heads[..., b].copy()
        heads[..., a] = x0 * cos - x1 * sin
        heads[..., b] = x0 * sin + x1 * cos
        return heads.reshape(x.shape).astype(np.float32)

    def attention(self, cache, layer, q, k, v, batch, n_heads, n_kv_heads, window=0, scale=None, softcap=0.0):
        check_cache_args(cache, HostKVCache, layer, batch, n_heads, n_kv_heads)
        hd, n = cache.shape.head_dim, len(batch)
        q = _matrix(q, "q", cols=n_heads * hd, rows=n).reshape(n, n_heads, hd)
        cache.store(layer, batch, _matrix(k, "k", n_kv_heads * hd, n), _matrix(v, "v", n_kv_heads * hd, n))
        scale = 1 / np.sqrt(hd) if scale is None else scale
        out = np.empty_like(q)
        for i, (seq, pos) in enumerate(zip(batch.seqs, batch.positions)):
            lo = max(0, pos - window + 1) if window > 0 else 0
            keys = cache.rows(layer, 0, seq, pos + 1)[lo:]         # [visible, h_kv, hd]
            values = cache.rows(layer, 1, seq, pos + 1)[lo:]
            kv = np.arange(n_heads) // (n_heads // n_kv_heads)     # the kv head of each query head
            scores = np.einsum("hd,thd->ht", q[i], keys[:, kv]) * scale   # [h, visible]
            if softcap:
                scores = softcap * np.tanh(scores / softcap)
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[i] = np.einsum("ht,thd->hd", weights / weights.sum(axis=1, keepdims=True), values[:, kv])
        return out.reshape(n, n_heads * hd)

    def swiglu(self, gate, up):
        self.swiglu_calls += 1
        gate, up = _matrix(gate, "gate"), _matrix(up, "up", cols=gate.shape[1], rows=gate.shape[0])
        return gate / (1.0 + np.exp(-np.clip(gate, -80, 80))) * up

    def add(self, a, b):
        return _matrix(a, "a") + _matrix(b, "b", cols=a.shape[1], rows=a.shape[0])

    # -- the optional ops of the features listed above ------------------------------------------
    def add_bias(self, x, b):
        return _matrix(x, "add_bias input", cols=self.load_weight(b).shape[-1]) + self.load_weight(b).values[0]

    def rms_norm_heads(self, x, w, head_dim, eps):
        heads = _matrix(x, "rms_norm_heads input").reshape(x.shape[0], -1, head_dim)
        normed = heads / np.sqrt(np.mean(heads * heads, axis=2, keepdims=True) + np.float32(eps))
        return (normed * self.load_weight(w).values[0]).reshape(x.shape)

    def geglu(self, gate, up):
        gate, up = _matrix(gate, "gate"), _matrix(up, "up", cols=gate.shape[1], rows=gate.shape[0])
        g = gate.astype(np.float64)   # GELU, tanh approximation
        return (0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * up).astype(np.float32)

    def scale(self, x, factor):
        return _matrix(x, "scale input") * np.float32(factor)
