"""Configuration: the model's hyperparameters (read from GGUF metadata) and the user's run settings.

`ModelConfig` is the blueprint of the network; `Config` mirrors ctransformers 0.2.27's Config so
code written for ctransformers passes the same keyword arguments.
"""
import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

from .errors import GGUFError

# Architectures that share llama's graph (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
LLAMA_LIKE = ("llama", "mistral")

# Tensors one llama block needs (norms, q/k/v/o, gate/up/down): a file claiming more blocks than
# its tensor table could hold is lying, and is refused before anything is sized from the claim.
TENSORS_PER_BLOCK = 9

# Unless the user asks, the KV cache is capped at this many positions: Mistral's 32768-token
# window would otherwise cost 4 GiB of cache on a 7B model.
DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a llama-architecture model."""

    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ffn: int
    vocab_size: int
    context_length: int        # what the model was trained for
    rope_base: float
    rope_dims: int
    rope_neox: bool            # split-half rotation (NeoX) rather than adjacent pairs
    rms_eps: float
    sliding_window: int        # 0: full attention
    tied_embeddings: bool      # no output.weight: the token embedding doubles as the output head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_gguf(cls, model) -> "ModelConfig":
        """Read from a GGUFFile; every missing or ill-typed key is a GGUFError naming it."""
        meta = model.metadata
        arch = meta.get("general.architecture")
        if arch not in LLAMA_LIKE:
            raise GGUFError(f"architecture {arch!r} is not supported (zephyr runs: {', '.join(LLAMA_LIKE)})",
                            model.path)

        def get(key, kind, default=None):
            full = f"{arch}.{key}"
            value = meta.get(full, default)
            if value is None:
                raise GGUFError(f"required metadata key {full!r} is missing", model.path)
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise GGUFError(f"metadata {full!r} should be an integer, got {value!r}", model.path)
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise GGUFError(f"metadata {full!r} should be a number, got {value!r}", model.path)
            return kind(value)

        d_model = get("embedding_length", int)
        n_heads = get("attention.head_count", int)
        if "token_embd.weight" not in model:
            raise GGUFError("tensor 'token_embd.weight' is missing", model.path)
        vocab_size = model.tensor("token_embd.weight").shape[0]
        n_layers = get("block_count", int)
        if n_layers > len(model.tensors) // TENSORS_PER_BLOCK:
            raise GGUFError(f"metadata {arch}.block_count = {n_layers}, but the file holds only "
                            f"{len(model.tensors)} tensors ({TENSORS_PER_BLOCK} per block)", model.path)
        tokens = meta.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and len(tokens) != vocab_size:
            raise GGUFError(f"the vocabulary has {len(tokens)} tokens but token_embd.weight has {vocab_size} rows; "
                            f"every token id must have exactly one embedding", model.path)
        config = cls(
            architecture=arch,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", int, n_heads),
            d_ffn=get("feed_forward_length", int),
            vocab_size=vocab_size,
            context_length=get("context_length", int, 2048),
            rope_base=get("rope.freq_base", float, 10000.0),
            rope_dims=get("rope.dimension_count", int, d_model // max(n_heads, 1)),
            rope_neox=False,
            rms_eps=get("attention.layer_norm_rms_epsilon", float, 1e-5),
            sliding_window=get("attention.sliding_window", int, 0),
            tied_embeddings="output.weight" not in model,
        )
        config.validate(model.path)
        return config

    def validate(self, path=None):
        problems = []
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ffn", "vocab_size", "context_length"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} = {getattr(self, name)} must be positive")
        if not problems:
            if self.d_model % self.n_heads:
                problems.append(f"embedding_length {self.d_model} is not divisible by head_count {self.n_heads}")
            elif self.n_heads % self.n_kv_heads:
                problems.append(f"head_count {self.n_heads} is not a multiple of head_count_kv {self.n_kv_heads}")
            elif not (0 < self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0):
                problems.append(f"rope.dimension_count {self.rope_dims} must be even and at most the head size {self.head_dim}")
        if self.sliding_window < 0:
            problems.append(f"attention.sliding_window {self.sliding_window} must not be negative")
        if not (0 < self.rope_base < math.inf and 0 < self.rms_eps < math.inf):
            problems.append(f"rope.freq_base ({self.rope_base}) and layer_norm_rms_epsilon ({self.rms_eps}) "
                            f"must be positive and finite")
        if problems:
            raise GGUFError("invalid hyperparameters: " + "; ".join(problems), path)


@dataclass
class Config:
    """Run settings, with ctransformers 0.2.27's names and defaults, except batch_size: 512 (llama.cpp's
    n_batch) rather than 8, since prompts evaluate several times faster in large batches. Beyond
    ctransformers: `kv_cache_type` ("f16", llama.cpp's default; "q8_0" holds twice the context in
    the same memory; "f32") and `sequences` (how many conversations the KV cache holds at once,
    each of context_length positions: the server's --parallel)."""

    top_k: int = 40
    top_p: float = 0.95
    temperature: float = 0.8
    repetition_penalty: float = 1.1
    last_n_tokens: int = 64
    seed: int = -1
    max_new_tokens: int = 256
    stop: Optional[Union[str, Sequence[str]]] = None
    stream: bool = False
    reset: bool = True
    batch_size: int = 512
    threads: int = -1
    context_length: int = -1
    gpu_layers: int = 0
    mmap: bool = True
    mlock: bool = False
    kv_cache_type: str = "f16"
    sequences: int = 1

    def __post_init__(self):
        # ctransformers' switches for how weights are held, accepted for its users' code; zephyr has one way.
        if self.mmap is not True:
            raise ValueError(f"mmap={self.mmap!r} is not supported: zephyr always memory-maps the GGUF file (the CPU "
                             f"backends read most weights in place); leave mmap out")
        if self.mlock is not False:
            raise ValueError(f"mlock={self.mlock!r} is not supported: zephyr does not lock the weights in RAM; "
                             f"leave mlock out")

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]

    def updated(self, **kwargs) -> "Config":
        """A copy with `kwargs` applied; an unknown name is a TypeError, as a misspelt argument should be."""
        unknown = set(kwargs) - set(self.field_names())
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; valid: {', '.join(self.field_names())}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(kwargs)
        return Config(**values)


