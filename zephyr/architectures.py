"""The model families zephyr runs, as data: how each GGUF `general.architecture` differs from
llama's block. One graph (zephyr.model) and one hyperparameter reader (zephyr.config) read these;
nothing else branches on the family.

Every value here is a fact of llama.cpp's graph for that architecture (src/models/<name>.cpp and
its hparams loading), which zephyr matches.
"""
from dataclasses import dataclass
from typing import Optional

@dataclass(frozen=True)
class Family:
    """One architecture's block, as differences from llama's."""

    name: str                      # general.architecture
    title: str                     # the models people know it by
    rope_neox: bool = False        # RoPE pairs (j, j + n_rot/2) rather than (2j, 2j+1)
    qk_norm: bool = False          # attn_q_norm / attn_k_norm: RMSNorm of each head before RoPE
    post_norms: bool = False       # post_attention_norm / post_ffw_norm on each sub-block's output
    activation: str = "silu"       # the FFN's gate: "silu" or "gelu" (tanh)
    embed_scale: bool = False      # token embeddings x sqrt(d_model)
    # Which layers slide (given a window): those with i % n < n - 1, or every layer when n is 0;
    # `<arch>.attention.sliding_window_pattern` (a number or a list of booleans) overrides it.
    window_pattern: int = 0
    window_default: int = 0        # the window when the metadata names none
    window_needs_key: bool = True  # without attention.sliding_window every layer attends fully
    window_ignored: bool = False   # llama.cpp reads no window for this family (Phi-3: switched off)
    # RoPE of sliding layers: rope.freq_base_swa, else this base (0: the global rope.freq_base),
    # and whether they share the global layers' rope scaling.
    swa_rope_base: float = 0.0
    swa_rope_scaled: bool = True
    # Defaults of <arch>.attn_logit_softcapping and <arch>.final_logit_softcapping (0: no cap);
    # None: the family has no such cap, and llama.cpp reads no key.
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    # Block counts of the sizes (Gemma's 27B) whose queries scale by 1/sqrt(d_model / n_heads)
    # instead of 1/sqrt(head_dim).
    width_scaled_sizes: tuple = ()
    fused_gate_up: bool = False    # ffn_up holds gate then up rows; there is no ffn_gate
    # Optional biases llama.cpp reads (blk.N.<name>.bias) beyond Q, K and V's, which every family may
    # have (as it may hold Q, K and V in one attn_qkv tensor, rows in that order, with one bias); and
    # whether output.bias is one.
    biases: tuple = ()
    output_bias: bool = False
    always_tied: bool = False      # the output head is token_embd even if output.weight exists
    rope_freqs: bool = False       # rope_freqs.weight: per-pair frequency factors (Llama 3.1+)
    rope_long_short: bool = False  # rope_factors_long/short.weight, chosen by the context length
    moe_key: bool = False          # <arch>.expert_count > 0 marks a mixture of experts (Mixtral)


_LLAMA = dict(biases=("attn_output", "ffn_gate", "ffn_up", "ffn_down"), rope_freqs=True, moe_key=True)
_GEMMA = dict(rope_neox=True, post_norms=True, activation="gelu", embed_scale=True)

FAMILIES = {f.name: f for f in (
    Family("llama", "Llama 1/2/3, SmolLM2, TinyLlama, Mistral (llama files)", **_LLAMA),
    Family("mistral", "Mistral", **_LLAMA),
    Family("qwen2", "Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen", rope_neox=True, window_ignored=True,
           output_bias=True),
    Family("qwen3", "Qwen3", rope_neox=True, qk_norm=True, window_ignored=True),
    Family("gemma2", "Gemma 2", **_GEMMA, window_pattern=2, window_default=4096, window_needs_key=False,
           attn_softcap=50.0, final_softcap=30.0, width_scaled_sizes=(46,), always_tied=True),
    Family("gemma3", "Gemma 3 (text)", **_GEMMA, qk_norm=True, window_pattern=6, swa_rope_base=10000.0,
           swa_rope_scaled=False, final_softcap=0.0, width_scaled_sizes=(62,)),
    Family("phi3", "Phi-3, Phi-3.5 (mini, medium)", rope_neox=True, window_ignored=True, fused_gate_up=True,
           rope_long_short=True),
)}


def supported() -> str:
    """The architectures zephyr runs, for messages."""
    return ", ".join(FAMILIES)
