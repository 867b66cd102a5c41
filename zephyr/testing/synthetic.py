"""Synthetic llama/Mistral-shaped GGUF models with random weights, for tests and benchmarks.

The shapes, tensor names, metadata keys and per-tensor quant mixtures follow what llama.cpp's
converter and quantiser produce, so a synthetic file exercises exactly the code a real one does.
"""
from dataclasses import dataclass, replace

import numpy as np

from .gguf_writer import TensorSpec, Typed, write_gguf
from ..gguf import GGUFValueType
from ..quants import GGMLType
from .blocks import random_blocks

T = GGMLType


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ffn: int
    vocab_size: int
    context_length: int = 4096
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    sliding_window: int = 0
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


PRESETS = {
    # Mistral-7B-v0.1 / Zephyr-7B-beta
    "zephyr-7b": ModelShape(32, 4096, 32, 8, 14336, 32000, context_length=32768, sliding_window=4096),
    # Small enough for fast tests, with grouped-query attention and k-quant-sized rows.
    "tiny": ModelShape(2, 256, 4, 2, 512, 32000, context_length=512),
}

# Whole-file quant layouts, named as llama.cpp's file types: (base type, per-tensor overrides).
LAYOUTS = ["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
           "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


def tensor_type(layout: str, name: str, layer: int, n_layers: int) -> GGMLType:
    """The type llama.cpp's quantiser gives tensor `name` (of block `layer`) in a `layout` file."""
    # llama.cpp spends more bits on attn_v / ffn_down in the first and last eighth of the layers
    # and every third layer between.
    more_bits = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
    if layout in ("F32", "F16"):
        return T[layout]
    if name == "output":
        return T.Q8_0 if layout == "Q8_0" else T.Q6_K
    if name == "token_embd":
        return {"Q2_K": T.Q2_K, "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K}.get(layout, _base(layout))
    if layout == "Q2_K":
        return T.Q3_K if name in ("attn_v", "ffn_down") else T.Q2_K
    if layout == "Q3_K_M":
        if name == "attn_v":
            return T.Q5_K if layer < 2 else T.Q4_K
        if name == "ffn_down":
            return T.Q5_K if layer < n_layers // 16 else (T.Q4_K if more_bits else T.Q3_K)
        if name == "attn_output":
            return T.Q4_K
    if layout == "Q3_K_L":
        if name in ("attn_v", "ffn_down", "attn_output"):
            return T.Q5_K
    if layout in ("Q4_K_M", "Q5_K_M") and name in ("attn_v", "ffn_down") and more_bits:
        return T.Q6_K
    if layout == "Q4_K_S" and name in ("attn_v", "ffn_down") and layer < n_layers // 8:
        return T.Q5_K
    return _base(layout)


def _base(layout):
    return T[layout.split("_")[0] + "_K" if layout.endswith(("_S", "_M", "_L")) else layout]


def minimal_llama_vocab(size: int):
    """A SentencePiece-style vocabulary of `size` tokens: unk/bos/eos, 256 byte tokens, then pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pieces = ["\u2581"] + [f"\u2581{c}" for c in letters] + list(letters)
    pieces += [a + b for a in letters for b in letters]
    i = 0
    while len(pieces) < size:
        pieces.append(f"\u2581w{i}")
        i += 1
    tokens += pieces[:max(0, size - len(tokens))]
    types += [1] * (len(tokens) - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens[:size], scores[:size], types[:size]


def llama_metadata(shape: ModelShape, vocab, name: str, layout: str, chat_template=None) -> dict:
    """The metadata llama.cpp's converter writes for a llama-architecture model."""
    tokens, scores, types = vocab
    meta = {
        "general.architecture": "llama",
        "general.name": name,
        "general.file_type": Typed(GGUFValueType.UINT32, LAYOUT_FILE_TYPES.get(layout, 0)),
        "llama.context_length": shape.context_length,
        "llama.embedding_length": shape.d_model,
        "llama.block_count": shape.n_layers,
        "llama.feed_forward_length": shape.d_ffn,
        "llama.rope.dimension_count": shape.head_dim,
        "llama.attention.head_count": shape.n_heads,
        "llama.attention.head_count_kv": shape.n_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": shape.rms_eps,
        "llama.rope.freq_base": shape.rope_base,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": Typed(GGUFValueType.STRING, list(tokens)),
        "tokenizer.ggml.scores": Typed(GGUFValueType.FLOAT32, list(scores)),
        "tokenizer.ggml.token_type": Typed(GGUFValueType.INT32, list(types)),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "general.quantization_version": 2,
    }
    if shape.sliding_window:
        meta["llama.attention.sliding_window"] = shape.sliding_window
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template
    return meta


LAYOUT_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
                     "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
                     "Q5_K_M": 17, "Q6_K": 18}


def llama_tensors(shape: ModelShape, layout: str, seed: int = 0):
    """TensorSpecs (data generated lazily) of a llama model in llama.cpp's tensor naming."""
    d, hd = shape.d_model, shape.head_dim

    def spec(name, kind, rows, cols, layer=-1):
        qtype = tensor_type(layout, kind, layer, shape.n_layers)
        # About 1/sqrt(cols) per weight keeps activations of a random network at a sane size.
        scale = 0.7 / np.sqrt(cols)
        tensor_seed = (seed, len(name), sum(map(ord, name)), layer + 1)
        return TensorSpec(name, qtype, (rows, cols),
                          lambda: random_blocks(qtype, (rows, cols), np.random.default_rng(tensor_seed), scale))

    def norm(name):
        values = (1.0 + 0.1 * np.random.default_rng((seed, sum(map(ord, name)))).standard_normal(d)).astype(np.float32)
        return TensorSpec(name, T.F32, (d,), values)

    out = [spec("token_embd.weight", "token_embd", shape.vocab_size, d)]
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        out += [
            norm(p + "attn_norm.weight"),
            spec(p + "attn_q.weight", "attn_q", shape.n_heads * hd, d, i),
            spec(p + "attn_k.weight", "attn_k", shape.n_kv_heads * hd, d, i),
            spec(p + "attn_v.weight", "attn_v", shape.n_kv_heads * hd, d, i),
            spec(p + "attn_output.weight", "attn_output", d, shape.n_heads * hd, i),
            norm(p + "ffn_norm.weight"),
            spec(p + "ffn_gate.weight", "ffn_gate", shape.d_ffn, d, i),
            spec(p + "ffn_up.weight", "ffn_up", shape.d_ffn, d, i),
            spec(p + "ffn_down.weight", "ffn_down", d, shape.d_ffn, i),
        ]
    out.append(norm("output_norm.weight"))
    if not shape.tied_embeddings:
        out.append(spec("output.weight", "output", shape.vocab_size, d))
    return out


def write_llama_model(path, shape="tiny", layout="Q4_K_M", vocab=None, name="huggingfaceh4_zephyr-7b-beta",
                      seed=0, chat_template=None, **overrides):
    """Write a synthetic llama-architecture GGUF. `shape` is a preset name or a ModelShape; `vocab`
    is (tokens, scores, token_types), e.g. from zephyr.testing.spm_model.read_spm_model, or a minimal one."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    shape = PRESETS[shape] if isinstance(shape, str) else shape
    shape = replace(shape, **overrides)
    if vocab is None:
        vocab = minimal_llama_vocab(shape.vocab_size)
    shape = replace(shape, vocab_size=len(vocab[0]))
    write_gguf(path, llama_metadata(shape, vocab, name, layout, chat_template), llama_tensors(shape, layout, seed))
    return path
