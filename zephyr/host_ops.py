"""What RoPE, attention and the ops of block features compute, in numpy (float64 where it helps):
written once, run in two places.

The reference backend runs these as its ops; `zephyr.backend.Backend` runs them on the host, through
`to_host` / `from_host`, for each block feature a backend does not list. Inputs are float32 numpy
arrays whose shapes the callers have checked; results are float32.

RoPE follows llama.cpp's ggml_rope_ext (pairs, frequency factors, linear and YaRN scaling);
attention its soft-capping (cap * tanh(score / cap) before the softmax).
"""
import math

import numpy as np

# GELU's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
GELU_COEF = 0.044715
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def rope_angles(positions, n_rot, base, scaling, freq_factors=None):
    """(cos, sin) of every (row, pair): float64 [n, n_rot / 2] each, scaled by the magnitude
    factor (`scaling`: a zephyr.backend.RopeScaling; freq_factors: float32 [n_rot / 2] or None)."""
    half = n_rot // 2
    pairs = np.arange(half)
    inv_freq = base ** (-2.0 * pairs / n_rot)                                   # [half]
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, np.float64)[:half]
    extrapolated = np.asarray(positions, np.float64)[:, None] * inv_freq        # [n, half]
    theta = scaling.freq_scale * extrapolated
    magnitude = scaling.attn_factor
    if scaling.ext_factor != 0.0:
        low, high = yarn_corr_dims(n_rot, scaling.n_ctx_orig, base, scaling.beta_fast, scaling.beta_slow)
        ramp = (1.0 - np.clip((pairs - low) / max(0.001, high - low), 0.0, 1.0)) * scaling.ext_factor
        theta = theta * (1.0 - ramp) + extrapolated * ramp
        magnitude *= 1.0 + 0.1 * math.log(1.0 / scaling.freq_scale)
    return np.cos(theta) * magnitude, np.sin(theta) * magnitude


def yarn_corr_dims(n_rot, n_ctx_orig, base, beta_fast, beta_slow):
    """The pairs where YaRN's ramp from extrapolated to interpolated angles starts and ends."""
    def dim(rotations):
        return n_rot * math.log(n_ctx_orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
    return max(0.0, math.floor(dim(beta_fast))), min(n_rot - 1.0, math.ceil(dim(beta_slow)))


def rope(x, positions, head_dim, n_rot, base, neox, scaling, freq_factors=None):
    """Rotate the first n_rot dims of every head of x [n, heads * head_dim]."""
    n, width = x.shape
    heads = x.reshape(n, width // head_dim, head_dim).astype(np.float64)        # [n, heads, hd]
    cos, sin = rope_angles(positions, n_rot, base, scaling, freq_factors)
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = n_rot // 2
    if neox:
        first, second = np.arange(half), np.arange(half) + half
    else:
        first, second = np.arange(0, n_rot, 2), np.arange(1, n_rot, 2)
    a, b = heads[..., first], heads[..., second]
    out = heads.copy()
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out.reshape(n, width).astype(np.float32)


def attention(cache, layer, q, k, v, batch, n_heads, n_kv_heads, window, scale, softcap):
    """Causal grouped-query attention over a HostKVCache, storing k and v first (see
    zephyr.backend.Backend.attention). scale: of the scores; softcap > 0: scores become
    softcap * tanh(score / softcap) before the softmax."""
    hd, n = cache.shape.head_dim, len(batch)
    cache.store(layer, batch, k, v)
    group = n_heads // n_kv_heads
    kv_of_head = np.arange(n_heads) // group
    queries = q.reshape(n, n_heads, hd).astype(np.float64)
    out = np.empty((n, n_heads, hd))
    for i, (seq, pos) in enumerate(zip(batch.seqs, batch.positions)):
        lo = max(0, pos - window + 1) if window > 0 else 0
        keys = cache.rows(layer, 0, seq, pos + 1)[lo:].astype(np.float64)      # [visible, h_kv, hd]
        values = cache.rows(layer, 1, seq, pos + 1)[lo:].astype(np.float64)
        scores = np.einsum("hd,thd->ht", queries[i], keys[:, kv_of_head]) * scale    # [h, visible]
        if softcap > 0:
            scores = softcap * np.tanh(scores / softcap)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[i] = np.einsum("ht,thd->hd", weights / weights.sum(axis=1, keepdims=True), values[:, kv_of_head])
    return out.reshape(n, n_heads * hd).astype(np.float32)


def rms_norm(x, w, eps):
    """x [n, d] / sqrt(mean(x^2) + eps) * w [d]."""
    x = x.astype(np.float64)
    return (x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) * np.asarray(w, np.float64)).astype(np.float32)


def rms_norm_heads(x, w, head_dim, eps):
    """rms_norm of every head of x [n, heads * head_dim] on its own, with one weight w [head_dim]."""
    n, width = x.shape
    return rms_norm(x.reshape(-1, head_dim), w, eps).reshape(n, width)


def add_bias(x, b):
    """x [n, m] + b [m]."""
    return (x.astype(np.float64) + np.asarray(b, np.float64)).astype(np.float32)


def gelu(x):
    """GELU, tanh approximation (float64)."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * x * (1.0 + GELU_COEF * x * x)))


def geglu(gate, up):
    """gelu(gate) * up."""
    return (gelu(gate) * up.astype(np.float64)).astype(np.float32)


def scale(x, factor):
    """x * factor."""
    return (x.astype(np.float64) * factor).astype(np.float32)


def softcap(x, cap):
    """cap * tanh(x / cap): values squeezed into (-cap, cap)."""
    return (cap * np.tanh(x.astype(np.float64) / cap)).astype(np.float32)
