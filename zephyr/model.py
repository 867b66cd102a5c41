"""The llama-architecture network (Llama 1/2/3, Mistral/Zephyr, SmolLM2, TinyLlama) as backend calls.

The graph never knows about quant formats, SIMD or devices: it calls the operations of
`zephyr.backend.Backend` on whichever backend the placement gave each layer, and moves the
hidden state between backends only where neighbouring layers differ.
"""
import numpy as np

from . import memory
from .backend import Batch, CacheShape, LayerParams, LayerWeights, Weight
from .config import ModelConfig
from .errors import ContextOverflowError, GGUFError, ZephyrError
from .placement import Placement
from .quants import GGMLType

# Batches whose activations need less than this are not worth a look at the free memory.
WORKING_MEMORY_CHECK_BYTES = 64 << 20


class LlamaModel:
    """Weights (read-only, from the memory map) + KV caches (run state) + the forward pass."""

    def __init__(self, gguf_file, config: ModelConfig, placement: Placement, n_ctx: int, n_seqs: int = 1,
                 kv_cache_type: GGMLType = GGMLType.F16, progress=None):
        """n_ctx positions for each of n_seqs sequences in the KV caches, kept as kv_cache_type.
        progress: an optional callable(layers_loaded, n_layers), called as each layer's weights load."""
        self.config = config
        self.placement = placement
        self.n_ctx, self.n_seqs = n_ctx, n_seqs
        c = config

        def load(backend, name, shape):
            weight = _weight(gguf_file, name, shape)
            if len(shape) == 2 and weight.type not in backend.supported_types:
                raise GGUFError(f"tensor {name!r} has type {weight.type.name}, which backend {backend.name!r} "
                                f"cannot compute with (it supports {', '.join(sorted(t.name for t in backend.supported_types))})",
                                gguf_file.path)
            return backend.load_weight(weight)

        self.token_embd = load(placement.embedding, "token_embd.weight", (c.vocab_size, c.d_model))
        self.params = LayerParams(c.n_heads, c.n_kv_heads, c.head_dim, c.rope_dims, c.rope_base, c.rope_neox,
                                  c.rms_eps, c.sliding_window)
        self.blocks = []
        for i, backend in enumerate(placement.layers):
            p = f"blk.{i}."
            self.blocks.append(LayerWeights(
                attn_norm=load(backend, p + "attn_norm.weight", (c.d_model,)),
                wq=load(backend, p + "attn_q.weight", (c.n_heads * c.head_dim, c.d_model)),
                wk=load(backend, p + "attn_k.weight", (c.kv_dim, c.d_model)),
                wv=load(backend, p + "attn_v.weight", (c.kv_dim, c.d_model)),
                wo=load(backend, p + "attn_output.weight", (c.d_model, c.n_heads * c.head_dim)),
                ffn_norm=load(backend, p + "ffn_norm.weight", (c.d_model,)),
                w_gate=load(backend, p + "ffn_gate.weight", (c.d_ffn, c.d_model)),
                w_up=load(backend, p + "ffn_up.weight", (c.d_ffn, c.d_model)),
                w_down=load(backend, p + "ffn_down.weight", (c.d_model, c.d_ffn)),
            ))
            if progress:
                progress(i + 1, c.n_layers)
        head = placement.head
        self.output_norm = load(head, "output_norm.weight", (c.d_model,))
        output_name = "token_embd.weight" if c.tied_embeddings else "output.weight"
        self.output = load(head, output_name, (c.vocab_size, c.d_model))

        # One cache per backend, holding that backend's layers (numbered locally).
        self.caches, self.local_layer = {}, []
        for backend in placement.backends:
            owned = [i for i, b in enumerate(placement.layers) if b is backend]
            if owned:
                shape = CacheShape(len(owned), n_seqs, n_ctx, c.n_kv_heads, c.head_dim, kv_cache_type)
                smaller = GGMLType.Q8_0 in backend.kv_cache_types and kv_cache_type != GGMLType.Q8_0
                memory.require(shape.nbytes, f"the KV cache on {backend.name} ({n_seqs} x {n_ctx} positions, "
                               f"{kv_cache_type.name})", "load the model with a smaller context_length, fewer "
                               "sequences" + (", or kv_cache_type='q8_0'" if smaller else ""),
                               available=backend.memory_available())
                self.caches[id(backend)] = backend.new_kv_cache(shape)
        counters = {}
        for backend in placement.layers:
            self.local_layer.append(counters.get(id(backend), 0))
            counters[id(backend)] = self.local_layer[-1] + 1

    def forward(self, tokens: np.ndarray, batch: Batch, rows=None) -> np.ndarray:
        """Evaluate `tokens` sitting where `batch` says; return the logits of the tokens at indexes
        `rows` (default: the last one) as float32 [len(rows), vocab]."""
        x, backend = self._blocks(tokens, batch)
        rows = [len(batch) - 1] if rows is None else list(rows)
        normed = backend.rms_norm(x[rows], self.output_norm, self.config.rms_eps)   # normed: [rows, d]
        logits = backend.to_host(backend.matmul(normed, self.output))              # [rows, vocab]
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
        working = 4 * n * (6 * c.d_model + 2 * c.kv_dim + 3 * c.d_ffn)
        if working > WORKING_MEMORY_CHECK_BYTES:
            memory.require(working, f"the activations of a batch of {n} tokens", "use a smaller batch_size")
        backend = self.placement.embedding
        x = backend.embed(self.token_embd, tokens)                          # x: [n, d]
        for i, (block, layer_backend) in enumerate(zip(self.blocks, self.placement.layers)):
            x, backend = _move(x, backend, layer_backend)
            x = backend.decoder_layer(x, block, self.params, self.caches[id(backend)], self.local_layer[i], batch)
        return _move(x, backend, self.placement.head)


def _move(x, src, dst):
    """Hand the hidden state to `dst` (a no-op when it is already there)."""
    if src is dst:
        return x, src
    return dst.from_host(src.to_host(x)), dst


def _weight(gguf_file, name, shape) -> Weight:
    """The named tensor as a Weight, after checking it has the shape the config implies."""
    if name not in gguf_file:
        raise GGUFError(f"tensor {name!r} is missing", gguf_file.path)
    info = gguf_file.tensor(name)
    if tuple(info.shape) != tuple(shape) and not (len(shape) == 1 and info.shape == (1, shape[0])):
        raise GGUFError(f"tensor {name!r} has shape {list(info.shape)}, but the metadata implies {list(shape)}",
                        gguf_file.path)
    if len(shape) == 1 and info.type != GGMLType.F32:
        raise GGUFError(f"norm tensor {name!r} has type {info.type.name}; expected F32", gguf_file.path)
    return Weight(name, info.type, tuple(shape), gguf_file.tensor_data(info))
