"""Synthetic GGUF models with random weights, for tests and benchmarks: llama/Mistral-shaped, or of
any family zephyr runs (`ModelShape.architecture`, presets in FAMILY_PRESETS).

The shapes, tensor names, metadata keys and per-tensor quant mixtures follow what llama.cpp's
converter and quantiser produce, so a synthetic file exercises exactly the code a real one does.
Everything is drawn from seeded generators: the same arguments write the same bytes.
"""
from dataclasses import dataclass, replace

import numpy as np

from .gguf_writer import TensorSpec, Typed, write_gguf
from ..architectures import FAMILIES
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
    architecture: str = "llama"
    key_length: int = 0              # the head size, where it is not d_model / n_heads
    rope_base_swa: float = 0.0       # rope.freq_base_swa, where set
    attn_softcap: float = 0.0        # attn_logit_softcapping, where set
    final_softcap: float = 0.0       # final_logit_softcapping, where set
    rope_scaling: tuple = ()         # (type, factor, original context): rope.scaling.*
    rope_freqs: bool = False         # a rope_freqs.weight of Llama 3.1's formula (for the original context)
    rope_long_short: float = 0.0     # Phi-3's long/short factors and this rope.scaling.attn_factor
    biases: bool = False             # q/k/v biases (Qwen2)

    @property
    def head_dim(self) -> int:
        return self.key_length or self.d_model // self.n_heads


PRESETS = {
    # Mistral-7B-v0.1 / Zephyr-7B-beta
    "zephyr-7b": ModelShape(32, 4096, 32, 8, 14336, 32000, context_length=32768, sliding_window=4096),
    # Small enough for fast tests, with grouped-query attention and k-quant-sized rows.
    "tiny": ModelShape(2, 256, 4, 2, 512, 32000, context_length=512),
    # Qwen2-7B's shapes (Qwen2.5-7B-Instruct), for benchmarks.
    "qwen2-7b": ModelShape(28, 3584, 28, 4, 18944, 152064, context_length=32768, rope_base=1e6, rms_eps=1e-6,
                           architecture="qwen2", biases=True),
}

# One small model of each family, every quirk switched on where a short prompt shows it: windows
# of a few positions, soft-caps low enough to bite, RoPE scaled from a short original context.
FAMILY_PRESETS = {
    "llama3": ModelShape(2, 256, 4, 2, 512, 384, rope_base=500000.0, rope_scaling=("", 0.0, 32), rope_freqs=True),
    "qwen2": ModelShape(2, 256, 4, 2, 512, 384, rope_base=1e6, rms_eps=1e-6, architecture="qwen2", biases=True,
                        tied_embeddings=True, rope_scaling=("yarn", 4.0, 32)),
    "qwen3": ModelShape(2, 256, 4, 2, 512, 384, rope_base=1e6, rms_eps=1e-6, architecture="qwen3", key_length=128),
    "gemma2": ModelShape(2, 256, 4, 2, 512, 384, rms_eps=1e-6, architecture="gemma2", key_length=128,
                         sliding_window=6, attn_softcap=1.0, final_softcap=5.0, tied_embeddings=True),
    "gemma3": ModelShape(6, 256, 4, 2, 512, 384, rope_base=1e6, rms_eps=1e-6, architecture="gemma3",
                         key_length=128, sliding_window=4, tied_embeddings=True, rope_scaling=("linear", 8.0, 0)),
    "phi3": ModelShape(2, 256, 4, 4, 512, 384, architecture="phi3", rope_scaling=("", 0.0, 64),
                       rope_long_short=1.4142),
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
    if name == "attn_qkv" and layout in ("Q3_K_M", "Q3_K_L", "Q4_K_M", "Q5_K_M"):
        return {"Q3_K_M": T.Q4_K, "Q3_K_L": T.Q4_K, "Q4_K_M": T.Q5_K, "Q5_K_M": T.Q6_K}[layout]
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
    """The metadata llama.cpp's converter writes for a model of `shape` (of its architecture)."""
    tokens, scores, types = vocab
    arch = shape.architecture
    meta = {
        "general.architecture": arch,
        "general.name": name,
        "general.file_type": Typed(GGUFValueType.UINT32, LAYOUT_FILE_TYPES.get(layout, 0)),
        f"{arch}.context_length": shape.context_length,
        f"{arch}.embedding_length": shape.d_model,
        f"{arch}.block_count": shape.n_layers,
        f"{arch}.feed_forward_length": shape.d_ffn,
        f"{arch}.rope.dimension_count": shape.head_dim,
        f"{arch}.attention.head_count": shape.n_heads,
        f"{arch}.attention.head_count_kv": shape.n_kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": shape.rms_eps,
        f"{arch}.rope.freq_base": shape.rope_base,
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
    optional = {
        "attention.key_length": shape.key_length, "attention.value_length": shape.key_length,
        "attention.sliding_window": shape.sliding_window, "rope.freq_base_swa": shape.rope_base_swa,
        "attn_logit_softcapping": shape.attn_softcap, "final_logit_softcapping": shape.final_softcap,
        "rope.scaling.attn_factor": shape.rope_long_short,
    }
    if shape.rope_scaling:
        kind, factor, original = shape.rope_scaling
        optional.update({"rope.scaling.type": kind, "rope.scaling.factor": factor,
                         "rope.scaling.original_context_length": original})
    meta.update((f"{arch}.{key}", value) for key, value in optional.items() if value)
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template
    return meta


LAYOUT_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
                     "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
                     "Q5_K_M": 17, "Q6_K": 18}


def llama_tensors(shape: ModelShape, layout: str, seed: int = 0):
    """TensorSpecs (data generated lazily) of a model of `shape`, named and laid out as llama.cpp's
    converter does for its architecture (fused tensors, biases, head and post norms, RoPE factors)."""
    family = FAMILIES[shape.architecture]
    d, hd, f = shape.d_model, shape.head_dim, shape.d_ffn
    qd, kvd = shape.n_heads * hd, shape.n_kv_heads * hd

    def spec(name, kind, rows, cols, layer=-1):
        qtype = tensor_type(layout, kind, layer, shape.n_layers)
        # About 1/sqrt(cols) per weight keeps activations of a random network at a sane size.
        scale = 0.7 / np.sqrt(cols)
        tensor_seed = (seed, len(name), sum(map(ord, name)), layer + 1)
        return TensorSpec(name, qtype, (rows, cols),
                          lambda: random_blocks(qtype, (rows, cols), np.random.default_rng(tensor_seed), scale))

    def vector(name, size, mean=1.0, spread=0.1):
        rng = np.random.default_rng((seed, sum(map(ord, name))))
        return TensorSpec(name, T.F32, (size,), (mean + spread * rng.standard_normal(size)).astype(np.float32))

    out = [spec("token_embd.weight", "token_embd", shape.vocab_size, d)]
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        out.append(vector(p + "attn_norm.weight", d))
        if family.fused_gate_up:   # Phi-3's converter also fuses Q, K and V
            out.append(spec(p + "attn_qkv.weight", "attn_qkv", qd + 2 * kvd, d, i))
        else:
            out += [spec(p + "attn_q.weight", "attn_q", qd, d, i), spec(p + "attn_k.weight", "attn_k", kvd, d, i),
                    spec(p + "attn_v.weight", "attn_v", kvd, d, i)]
        if shape.biases:
            out += [vector(f"{p}attn_{name}.bias", rows, 0.0, 0.5)
                    for name, rows in (("q", qd), ("k", kvd), ("v", kvd))]
        if family.qk_norm:
            out += [vector(p + "attn_q_norm.weight", hd), vector(p + "attn_k_norm.weight", hd)]
        out.append(spec(p + "attn_output.weight", "attn_output", d, qd, i))
        if family.post_norms:
            out.append(vector(p + "post_attention_norm.weight", d))
        out.append(vector(p + "ffn_norm.weight", d))
        if family.fused_gate_up:
            out.append(spec(p + "ffn_up.weight", "ffn_up", 2 * f, d, i))
        else:
            out += [spec(p + "ffn_gate.weight", "ffn_gate", f, d, i), spec(p + "ffn_up.weight", "ffn_up", f, d, i)]
        out.append(spec(p + "ffn_down.weight", "ffn_down", d, f, i))
        if family.post_norms:
            out.append(vector(p + "post_ffw_norm.weight", d))
    out += rope_factor_tensors(shape, seed)
    out.append(vector("output_norm.weight", d))
    if not (shape.tied_embeddings or family.always_tied):
        out.append(spec("output.weight", "output", shape.vocab_size, d))
    return out


def rope_factor_tensors(shape: ModelShape, seed: int = 0):
    """Llama 3.1's rope_freqs (its formula, factor 8, from rope.scaling.original_context_length), or
    Phi-3's random long and short factors: TensorSpecs of [head_dim / 2] values."""
    half = shape.head_dim // 2
    if shape.rope_freqs:
        original = shape.rope_scaling[2]
        wavelength = 2 * np.pi * shape.rope_base ** (2.0 * np.arange(half) / shape.head_dim)
        factor, low, high = 8.0, 1.0, 4.0
        smooth = (original / wavelength - low) / (high - low)
        factors = np.where(wavelength < original / high, 1.0,
                           np.where(wavelength > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        return [TensorSpec("rope_freqs.weight", T.F32, (half,), factors.astype(np.float32))]
    if shape.rope_long_short:
        rng = np.random.default_rng((seed, 7))
        return [TensorSpec(f"rope_factors_{kind}.weight", T.F32, (half,), rng.uniform(1.0, top, half).astype(np.float32))
                for kind, top in (("long", 20.0), ("short", 3.0))]
    return []


# The hyperparameters a llama block reads, under `<arch>.`: what a twin carries over.
_LLAMA_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.key_length", "attention.value_length",
               "attention.layer_norm_rms_epsilon", "rope.freq_base")


def write_llama_twin(source, path):
    """A llama-architecture copy of the GGUF file `source` of another family: the same matrices
    (bytes, types, shapes), token embedding and vocabulary, run by llama's block. Tensors llama has
    no place for (per-head Q/K norms, post-norms) are left out; so are the family's window, caps and
    RoPE of local layers. Measured beside the original, the twin tells what the family's own ops cost
    at the same weight bytes (benchmarks/bench_cpu.py). Returns `path`."""
    from .. import gguf
    from ..model import NORM_TENSORS

    with gguf.read(source) as f:
        arch = f.architecture
        meta = {"general.architecture": "llama", "general.name": f"{f.metadata.get('general.name', arch)} (llama twin)"}
        meta.update((f"llama.{key}", f.metadata[f"{arch}.{key}"]) for key in _LLAMA_KEYS
                    if f"{arch}.{key}" in f.metadata)
        for key, value in f.metadata.items():
            if key.startswith("tokenizer."):
                meta[key] = _typed_list(value) if isinstance(value, list) else value
        tensors = [TensorSpec(t.name, t.type, t.shape, lambda t=t: f.tensor_data(t)) for t in f.tensors
                   if not t.name.startswith("blk.") or t.name.split(".")[2] not in NORM_TENSORS.values()]
        write_gguf(path, meta, tensors)
    return path


def _typed_list(values):
    """A list of metadata values with the item type llama.cpp expects of it (strings, float32, int32)."""
    kind = (GGUFValueType.STRING if all(isinstance(v, str) for v in values) else
            GGUFValueType.INT32 if all(isinstance(v, int) for v in values) else GGUFValueType.FLOAT32)
    return Typed(kind, list(values))


def write_llama_model(path, shape="tiny", layout="Q4_K_M", vocab=None, name="huggingfaceh4_zephyr-7b-beta",
                      seed=0, chat_template=None, **overrides):
    """Write a synthetic GGUF (llama-architecture unless the shape says otherwise). `shape` is a
    preset name (PRESETS or FAMILY_PRESETS) or a ModelShape; `vocab` is (tokens, scores,
    token_types), e.g. from zephyr.testing.spm_model.read_spm_model, or a minimal one."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    shape = {**PRESETS, **FAMILY_PRESETS}[shape] if isinstance(shape, str) else shape
    shape = replace(shape, **overrides)
    if vocab is None:
        vocab = minimal_llama_vocab(shape.vocab_size)
    shape = replace(shape, vocab_size=len(vocab[0]))
    write_gguf(path, llama_metadata(shape, vocab, name, layout, chat_template), llama_tensors(shape, layout, seed))
    return path
