"""The decoder-only transformer of every family zephyr runs, as backend calls.

One graph: llama's pre-norm block, varied by the data of zephyr.architectures (biases, head norms,
post-norms, GELU, soft-caps, sliding layers, RoPE per layer) through the weights and params each
block hands its backend. The graph never knows about quant formats, SIMD or devices: it calls the
operations of `zephyr.backend.Backend` on whichever backend the placement gave each layer, and
moves the hidden state between backends only where neighbouring layers differ.
"""
import math

import numpy as np

from . import host_ops, memory
from .backend import (KV_CACHE_TYPES, Batch, CacheShape, HostKVCache, LayerWeights, Weight, choose_decoder_layer,
                      load_optional_weight, needs_host_cache)
from .config import ModelConfig
from .errors import ContextOverflowError, GGUFError, ZephyrError
from .placement import Placement
from .quants import TYPE_INFO, GGMLType

# Batches whose activations need less than this are not worth a look at the free memory.
WORKING_MEMORY_CHECK_BYTES = 64 << 20

# Optional vectors of a block by their tensor names (blk.N.<name>.weight or .bias).
NORM_TENSORS = {"q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "post_attn_norm": "post_attention_norm",
                "post_ffn_norm": "post_ffw_norm"}
BIAS_TENSORS = {"o_bias": "attn_output", "gate_bias": "ffn_gate", "up_bias": "ffn_up", "down_bias": "ffn_down"}


class LlamaModel:
    """Weights (read-only, from the memory map) + KV caches (run state) + the forward pass.
    Named for llama, whose block every family varies."""

    def __init__(self, gguf_file, config: ModelConfig, placement: Placement, n_ctx: int, n_seqs: int = 1,
                 kv_cache_type: GGMLType = GGMLType.F16, progress=None):
        """n_ctx positions for each of n_seqs sequences in the KV caches, kept as kv_cache_type.
        progress: an optional callable(layers_loaded, n_layers), called as each layer's weights load."""
        self.config = config
        self.placement = placement
        self.n_ctx, self.n_seqs = n_ctx, n_seqs
        c = config
        tensors = _Tensors(gguf_file)

        # Every tensor is found and checked before any backend loads one.
        embedding = tensors.get("token_embd.weight", (c.vocab_size, c.d_model))
        rope_freqs = self._rope_freqs(tensors)
        block_tensors = [_block_tensors(tensors, c, i, rope_freqs) for i in range(c.n_layers)]
        output_norm = tensors.get("output_norm.weight", (c.d_model,))
        output = tensors.get("token_embd.weight" if c.tied_embeddings else "output.weight", (c.vocab_size, c.d_model))
        output_bias = tensors.optional("output.bias", (c.vocab_size,)) if c.family.output_bias else None
        tensors.check_all_used(c.architecture)

        self.token_embd = tensors.load(placement.embedding, embedding)
        self.params = [c.layer_params(i) for i in range(c.n_layers)]
        self.blocks, self.run_block = [], []
        for i, backend in enumerate(placement.layers):
            block = LayerWeights(**{name: tensors.load(backend, weight, LayerWeights.FEATURE_OF.get(name))
                                    for name, weight in block_tensors[i].items()})
            self.blocks.append(block)
            self.run_block.append(choose_decoder_layer(backend, block, self.params[i]))
            if progress:
                progress(i + 1, c.n_layers)
        head = placement.head
        self.output_norm = tensors.load(head, output_norm)
        self.output = tensors.load(head, output)
        self.output_bias = None if output_bias is None else tensors.load(head, output_bias, "bias")
        self._make_caches(kv_cache_type)

    def _rope_freqs(self, tensors):
        """The RoPE frequency factors every block shares (Llama 3.1's rope_freqs; Phi-3's long
        factors when the context exceeds the trained one, else its short ones), or None."""
        c, shape = self.config, (self.config.rope_dims // 2,)
        if c.family.rope_freqs:
            return tensors.optional("rope_freqs.weight", shape)
        if c.family.rope_long_short:
            long, short = (tensors.optional(f"rope_factors_{kind}.weight", shape) for kind in ("long", "short"))
            return long if self.n_ctx > c.rope_scaling.n_ctx_orig else short
        return None

    def _make_caches(self, kv_cache_type):
        """One cache per backend, holding that backend's layers (numbered locally), and one in host
        memory for layers whose attention runs on the host (zephyr.backend.needs_host_cache)."""
        c, n_seqs, n_ctx = self.config, self.n_seqs, self.n_ctx
        owners = [None if needs_host_cache(b, self.params[i]) else b for i, b in enumerate(self.placement.layers)]
        self.caches = {}
        self.cache_of = [None] * c.n_layers    # per layer: (its cache, its index there)
        for owner in [*self.placement.backends, None]:
            owned = [i for i, b in enumerate(owners) if b is owner]
            if not owned:
                continue
            shape = CacheShape(len(owned), n_seqs, n_ctx, c.n_kv_heads, c.head_dim, kv_cache_type)
            where = "host memory (attention on the host)" if owner is None else owner.name
            kinds = KV_CACHE_TYPES.values() if owner is None else owner.kv_cache_types
            smaller = GGMLType.Q8_0 in kinds and kv_cache_type != GGMLType.Q8_0
            memory.require(shape.nbytes, f"the KV cache on {where} ({n_seqs} x {n_ctx} positions, "
                           f"{kv_cache_type.name})", "load the model with a smaller context_length, fewer "
                           "sequences" + (", or kv_cache_type='q8_0'" if smaller else ""),
                           available=memory.available_memory() if owner is None else owner.memory_available())
            cache = HostKVCache(shape) if owner is None else owner.new_kv_cache(shape)
            self.caches["host" if owner is None else id(owner)] = cache
            for local, i in enumerate(owned):
                self.cache_of[i] = (cache, local)

    def forward(self, tokens: np.ndarray, batch: Batch, rows=None) -> np.ndarray:
        """Evaluate `tokens` sitting where `batch` says; return the logits of the tokens at indexes
        `rows` (default: the last one) as float32 [len(rows), vocab]."""
        x, backend = self._blocks(tokens, batch)
        rows = [len(batch) - 1] if rows is None else list(rows)
        normed = backend.rms_norm(x[rows], self.output_norm, self.config.rms_eps)   # normed: [rows, d]
        logits = backend.matmul(normed, self.output)                               # [rows, vocab]
        if self.output_bias is not None:
            logits = backend.add_bias(logits, self.output_bias)
        logits = backend.to_host(logits)
        if self.config.final_softcap:
            logits = host_ops.softcap(logits, self.config.final_softcap)
        if not np.isfinite(logits).all():
            raise ZephyrError(f"the model computed non-finite logits: its weights hold NaN or infinite values "
                              f"(a corrupt file?), or backend {backend.name!r} is broken")
        return logits

    def hidden_states(self, tokens: np.ndarray, batch: Batch) -> np.ndarray:
        """The final-normed hidden states of `tokens` (placed by `batch`): float32 [n, d]."""
        x, backend = self._blocks(tokens, batch)
        return backend.to_host(backend.rms_norm(x, self.output_norm, self.config.rms_eps))

    # -- sequences: whole prefixes moved between the caches' sequence slots ------------------
    def copy_sequence(self, src: int, dst: int, length: int):
        """Positions 0..length-1 of sequence `src` into `dst`, in every backend's cache."""
        for cache in self.caches.values():
            cache.copy_sequence(src, dst, length)

    def read_sequence(self, seq: int, length: int) -> list:
        """Positions 0..length-1 of sequence `seq`: one host array per backend's cache."""
        return [cache.read_sequence(seq, length) for cache in self.caches.values()]

    def write_sequence(self, seq: int, saved: list):
        """What read_sequence returned, back into sequence `seq`."""
        for cache, data in zip(self.caches.values(), saved):
            cache.write_sequence(seq, data)

    def _blocks(self, tokens, batch):
        """Embed and run every block: (x [n, d], the backend holding it)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        n = tokens.shape[0]
        if not isinstance(batch, Batch) or len(batch) != n:
            raise ValueError(f"{n} tokens need a zephyr.backend.Batch of {n} places, got {batch!r}")
        if n and batch.positions.max() >= self.n_ctx:
            raise ContextOverflowError(
                f"position {batch.positions.max()} does not fit the context window of {self.n_ctx}; "
                f"shorten the prompt, reset the model, or load it with a larger context_length")
        if n and batch.seqs.max() >= self.n_seqs:
            raise ValueError(f"sequence {batch.seqs.max()} does not exist: the KV cache holds {self.n_seqs}")
        if n and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {tokens.min()}..{tokens.max()}")
        c = self.config
        # Activations alive at once in a block (x, h, q, k, v, attention, gate, up, ...): [n, width] f32 each.
        working = 4 * n * (4 * c.d_model + 2 * c.q_dim + 2 * c.kv_dim + 3 * c.d_ffn)
        if working > WORKING_MEMORY_CHECK_BYTES:
            memory.require(working, f"the activations of a batch of {n} tokens", "use a smaller batch_size")
        backend = self.placement.embedding
        x = backend.embed(self.token_embd, tokens)                          # x: [n, d]
        if c.family.embed_scale:
            x = backend.scale(x, math.sqrt(c.d_model))
        for i, layer_backend in enumerate(self.placement.layers):
            x, backend = _move(x, backend, layer_backend)
            cache, local = self.cache_of[i]
            x = self.run_block[i](x, self.blocks[i], self.params[i], cache, local, batch)
        return _move(x, backend, self.placement.head)


def _block_tensors(tensors, c: ModelConfig, i: int, rope_freqs) -> dict:
    """Block i's tensors as {LayerWeights field: Weight}, named as llama.cpp names them: fused
    tensors split into row views (no copy), optional ones where the file has them."""
    family, p = c.family, f"blk.{i}."
    d, f, qd, kvd = c.d_model, c.d_ffn, c.q_dim, c.kv_dim
    out = {name: tensors.get(f"{p}{name}.weight", (d,)) for name in ("attn_norm", "ffn_norm")}
    qkv_rows = {"q": qd, "k": kvd, "v": kvd}
    fused_bias = None
    if p + "attn_qkv.weight" in tensors:   # Q, K and V in one tensor, any family (Phi-3's converter writes it)
        matrices = tensors.split(tensors.get(p + "attn_qkv.weight", (qd + 2 * kvd, d)), qkv_rows.values())
        fused_bias = tensors.optional(p + "attn_qkv.bias", (qd + 2 * kvd,))
    else:
        matrices = [tensors.get(f"{p}attn_{x}.weight", (rows, d)) for x, rows in qkv_rows.items()]
    biases = tensors.split(fused_bias, qkv_rows.values()) if fused_bias is not None else [
        tensors.optional(f"{p}attn_{x}.bias", (rows,)) for x, rows in qkv_rows.items()]
    for x, matrix, bias in zip(qkv_rows, matrices, biases):
        out[f"w{x}"], out[f"{x}_bias"] = matrix, bias
    if family.fused_gate_up:
        out["w_gate"], out["w_up"] = tensors.split(tensors.get(p + "ffn_up.weight", (2 * f, d)), (f, f))
    else:
        out["w_gate"], out["w_up"] = tensors.get(p + "ffn_gate.weight", (f, d)), tensors.get(p + "ffn_up.weight", (f, d))
    out["wo"], out["w_down"] = tensors.get(p + "attn_output.weight", (d, qd)), tensors.get(p + "ffn_down.weight", (d, f))
    lengths = {"o_bias": d, "gate_bias": f, "up_bias": f, "down_bias": d}
    for name, tensor in BIAS_TENSORS.items():
        if tensor in family.biases:
            out[name] = tensors.optional(f"{p}{tensor}.bias", (lengths[name],))
    norms = {"q_norm": family.qk_norm, "k_norm": family.qk_norm, "post_attn_norm": family.post_norms,
             "post_ffn_norm": family.post_norms}
    for name, tensor in NORM_TENSORS.items():
        if norms[name]:
            out[name] = tensors.get(f"{p}{tensor}.weight", (c.head_dim if name in ("q_norm", "k_norm") else d,))
    out["rope_freqs"] = rope_freqs
    return {name: weight for name, weight in out.items() if weight is not None}


class _Tensors:
    """The file's tensors as checked Weights, remembering which the graph used: a tensor it never
    asks for belongs to a variant of the architecture zephyr does not run (llama.cpp refuses such
    files too), and is refused rather than ignored."""

    def __init__(self, gguf_file):
        self.file, self.used = gguf_file, set()

    def __contains__(self, name):
        return name in self.file

    def get(self, name, shape) -> Weight:
        """The named tensor, after checking it has the shape the config implies."""
        if name not in self.file:
            raise GGUFError(f"tensor {name!r} is missing", self.file.path)
        info = self.file.tensor(name)
        if tuple(info.shape) != tuple(shape) and not (len(shape) == 1 and info.shape == (1, shape[0])):
            raise GGUFError(f"tensor {name!r} has shape {list(info.shape)}, but the metadata implies {list(shape)}",
                            self.file.path)
        if len(shape) == 1 and info.type != GGMLType.F32:
            raise GGUFError(f"vector tensor {name!r} has type {info.type.name}; expected F32", self.file.path)
        self.used.add(name)
        return Weight(name, info.type, tuple(shape), self.file.tensor_data(info))

    def optional(self, name, shape):
        return self.get(name, shape) if name in self.file else None

    def load(self, backend, weight: Weight, feature=None):
        """`weight` handed to `backend` (for an optional op's `feature`: see load_optional_weight)."""
        if len(weight.shape) == 2 and weight.type not in backend.supported_types:
            raise GGUFError(f"tensor {weight.name!r} has type {weight.type.name}, which backend {backend.name!r} "
                            f"cannot compute with (it supports "
                            f"{', '.join(sorted(t.name for t in backend.supported_types))})", self.file.path)
        return load_optional_weight(backend, feature, weight)

    @staticmethod
    def split(weight: Weight, rows) -> list:
        """A fused tensor's consecutive row ranges (of `rows` rows each) as Weights viewing its bytes."""
        row_bytes = TYPE_INFO[weight.type].row_bytes(weight.cols if len(weight.shape) == 2 else 1)
        parts, start = [], 0
        for count in rows:
            shape = (count, weight.cols) if len(weight.shape) == 2 else (count,)
            parts.append(Weight(f"{weight.name}[{start}:{start + count}]", weight.type, shape,
                                weight.data[start * row_bytes:(start + count) * row_bytes]))
            start += count
        return parts

    def check_all_used(self, arch):
        unused = [t.name for t in self.file.tensors if t.name not in self.used]
        if unused:
            raise GGUFError(f"tensor {unused[0]!r} (of {len(unused)} unused) is not part of the {arch} model zephyr "
                            f"runs: this file is a variant of the architecture zephyr does not support", self.file.path)


def _move(x, src, dst):
    """Hand the hidden state to `dst` (a no-op when it is already there)."""
    if src is dst:
        return x, src
    return dst.from_host(src.to_host(x)), dst
