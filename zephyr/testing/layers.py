"""Each family's block features on a random decoder block, for the backend tests (conformance, the
CPU's fused layer): what `zephyr.backend.FEATURES` asks of a backend, one family at a time."""
from dataclasses import replace

import numpy as np

from ..backend import LayerParams, LayerWeights, RopeScaling, Weight
from ..quants import GGMLType

YARN = RopeScaling(freq_scale=0.25, ext_factor=1.0, attn_factor=1.0, n_ctx_orig=32)

# Per family: (the optional vectors of LayerWeights its blocks have, its LayerParams), with values
# that make every feature bite on a few tokens (a small soft-cap, a short window).
FAMILY_FEATURES = {
    "qwen2": (("q_bias", "k_bias", "v_bias"), dict(rope_neox=True, rope_scaling=YARN)),
    "qwen3": (("q_norm", "k_norm"), dict(rope_neox=True)),
    "gemma2": (("post_attn_norm", "post_ffn_norm"),
               dict(rope_neox=True, activation="gelu", attn_softcap=2.0, attn_scale=0.1, sliding_window=5)),
    "gemma3": (("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"),
               dict(rope_neox=True, activation="gelu", rope_scaling=RopeScaling(freq_scale=0.125))),
    "llama3": (("rope_freqs",), dict(rope_scaling=RopeScaling(attn_factor=1.2))),
    "llama-biases": (("o_bias", "gate_bias", "up_bias", "down_bias"), dict()),
}


def with_family_features(weights: LayerWeights, p: LayerParams, family: str, seed: int = 5):
    """(weights, params) of a llama block (`weights`: zephyr.backend.Weights) with `family`'s
    features added: its optional vectors drawn at random (biases ~0.5, norms ~1, RoPE factors in
    [1, 8]) and its params."""
    names, changes = FAMILY_FEATURES[family]
    rng = np.random.default_rng(seed)
    d, f = weights.wq.shape[1], weights.w_gate.shape[0]
    qd, kvd = p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim
    lengths = dict(q_bias=qd, k_bias=kvd, v_bias=kvd, o_bias=d, gate_bias=f, up_bias=f, down_bias=d,
                   q_norm=p.head_dim, k_norm=p.head_dim, post_attn_norm=d, post_ffn_norm=d,
                   rope_freqs=p.rope_dims // 2)
    vectors = {}
    for name in names:
        if name == "rope_freqs":
            values = rng.uniform(1.0, 8.0, lengths[name])
        elif name.endswith("_bias"):
            values = 0.5 * rng.standard_normal(lengths[name])
        else:
            values = 1 + 0.3 * rng.standard_normal(lengths[name])
        vectors[name] = Weight(name, GGMLType.F32, (lengths[name],), values.astype(np.float32).view(np.uint8))
    return replace(weights, **vectors), replace(p, **changes)
