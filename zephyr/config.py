"""Configuration: the model's hyperparameters (read from GGUF metadata) and the user's run settings.

`ModelConfig` is the blueprint of the network; `Config` mirrors ctransformers 0.2.27's Config so
code written for ctransformers passes the same keyword arguments.
"""
import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence, Union

from .architectures import FAMILIES, Family, supported
from .backend import LayerParams, RopeScaling
from .errors import GGUFError

# The fewest tensors a block has (Phi-3's: norms, attn_qkv, attn_output, ffn_up, ffn_down): a file
# claiming more blocks than its tensor table could hold is lying, and is refused before anything
# is sized from the claim.
TENSORS_PER_BLOCK = 6

# Unless the user asks, the KV cache is capped at this many positions: Mistral's 32768-token
# window would otherwise cost 4 GiB of cache on a 7B model.
DEFAULT_MAX_CONTEXT = 4096

ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a model of one of the families in zephyr.architectures: what the file
    says, with llama.cpp's defaults where it is silent. `layer_params(i)` describes block i."""

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
    key_length: int = 0        # the head size (attention.key_length); 0: d_model / n_heads
    swa_layers: tuple = ()     # per layer, whether the sliding window applies; (): every layer
    rope_base_swa: float = 0.0                    # RoPE base of sliding layers; 0: rope_base
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_scaling_swa: Optional[RopeScaling] = None   # of sliding layers, where it differs
    attn_scale: float = 0.0    # of the attention scores; 0: 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # attention scores capped to (-c, c) by c * tanh(s / c); 0: none
    final_softcap: float = 0.0  # the logits, likewise

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    @property
    def head_dim(self) -> int:
        return self.key_length or self.d_model // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window > 0 and (not self.swa_layers or self.swa_layers[layer])

    def layer_params(self, layer: int) -> LayerParams:
        """Block `layer`'s hyperparameters, for the backends."""
        sliding = self.is_sliding(layer)
        base = self.rope_base_swa if sliding and self.rope_base_swa else self.rope_base
        scaling = self.rope_scaling_swa if sliding and self.rope_scaling_swa is not None else self.rope_scaling
        return LayerParams(self.n_heads, self.n_kv_heads, self.head_dim, self.rope_dims, base, self.rope_neox,
                           self.rms_eps, self.sliding_window if sliding else 0, scaling, self.attn_scale,
                           self.attn_softcap, self.family.activation)

    @classmethod
    def from_gguf(cls, model) -> "ModelConfig":
        """Read from a GGUFFile; every missing or ill-typed key is a GGUFError naming it."""
        meta = model.metadata
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in FAMILIES:
            raise GGUFError(f"architecture {arch!r} is not supported (zephyr runs: {supported()})", model.path)
        family = FAMILIES[arch]

        def get(key, kind, default=None):
            full = f"{arch}.{key}"
            value = meta.get(full, default)
            if value is None:
                raise GGUFError(f"required metadata key {full!r} is missing", model.path)
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise GGUFError(f"metadata {full!r} should be an integer, got {value!r}", model.path)
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise GGUFError(f"metadata {full!r} should be a number, got {value!r}", model.path)
            if kind is str and not isinstance(value, str):
                raise GGUFError(f"metadata {full!r} should be a string, got {value!r}", model.path)
            return kind(value)

        if family.moe_key and get("expert_count", int, 0) > 0:
            raise GGUFError(f"this {arch} file is a mixture of experts ({get('expert_count', int)} experts, as "
                            f"Mixtral), which zephyr does not run; it runs dense models of: {supported()}",
                            model.path)
        d_model = get("embedding_length", int)
        n_heads = get("attention.head_count", int)
        if "token_embd.weight" not in model:
            raise GGUFError("tensor 'token_embd.weight' is missing", model.path)
        vocab_size = model.tensor("token_embd.weight").shape[0]
        n_layers = get("block_count", int)
        if n_layers > len(model.tensors) // TENSORS_PER_BLOCK:
            raise GGUFError(f"metadata {arch}.block_count = {n_layers}, but the file holds only "
                            f"{len(model.tensors)} tensors (at least {TENSORS_PER_BLOCK} per block)", model.path)
        tokens = meta.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and len(tokens) != vocab_size:
            raise GGUFError(f"the vocabulary has {len(tokens)} tokens but token_embd.weight has {vocab_size} rows; "
                            f"every token id must have exactly one embedding", model.path)
        head_dim = get("attention.key_length", int, d_model // max(n_heads, 1))
        if get("attention.value_length", int, head_dim) != head_dim:
            raise GGUFError(f"attention.key_length {head_dim} and value_length {get('attention.value_length', int)} "
                            f"differ; zephyr's attention needs keys and values of one size", model.path)
        context_length = get("context_length", int, 2048)
        rope_scaling = _rope_scaling(get, context_length, model.path)
        window = 0 if family.window_ignored else get("attention.sliding_window", int, family.window_default)
        if window and family.window_needs_key and f"{arch}.attention.sliding_window" not in meta:
            window = 0
        config = cls(
            architecture=arch,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", int, n_heads),
            d_ffn=get("feed_forward_length", int),
            vocab_size=vocab_size,
            context_length=context_length,
            rope_base=get("rope.freq_base", float, 10000.0),
            rope_dims=get("rope.dimension_count", int, head_dim),
            rope_neox=family.rope_neox,
            rms_eps=get("attention.layer_norm_rms_epsilon", float, 1e-5),
            sliding_window=window,
            tied_embeddings=family.always_tied or "output.weight" not in model,
            key_length=head_dim if head_dim != d_model // max(n_heads, 1) else 0,
            swa_layers=_swa_layers(meta.get(f"{arch}.attention.sliding_window_pattern", family.window_pattern),
                                   n_layers, arch, model.path) if window else (),
            rope_base_swa=get("rope.freq_base_swa", float, family.swa_rope_base) if window else 0.0,
            rope_scaling=rope_scaling,
            rope_scaling_swa=None if family.swa_rope_scaled else replace(rope_scaling, freq_scale=1.0),
            attn_scale=1.0 / math.sqrt(d_model / n_heads) if n_layers in family.width_scaled_sizes else 0.0,
            attn_softcap=0.0 if family.attn_softcap is None else get("attn_logit_softcapping", float,
                                                                      family.attn_softcap),
            final_softcap=0.0 if family.final_softcap is None else get("final_logit_softcapping", float,
                                                                        family.final_softcap),
        )
        config.validate(model.path)
        return config

    def validate(self, path=None):
        problems = []
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ffn", "vocab_size", "context_length"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} = {getattr(self, name)} must be positive")
        if not problems:
            if self.key_length <= 0 and self.d_model % self.n_heads:
                problems.append(f"embedding_length {self.d_model} is not divisible by head_count {self.n_heads}")
            elif self.n_heads % self.n_kv_heads:
                problems.append(f"head_count {self.n_heads} is not a multiple of head_count_kv {self.n_kv_heads}")
            elif not (0 < self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0):
                problems.append(f"rope.dimension_count {self.rope_dims} must be even and at most the head size {self.head_dim}")
        if self.key_length < 0:
            problems.append(f"attention.key_length {self.key_length} must be positive")
        if self.sliding_window < 0:
            problems.append(f"attention.sliding_window {self.sliding_window} must not be negative")
        if not (0 < self.rope_base < math.inf and 0 < self.rms_eps < math.inf and 0 <= self.rope_base_swa < math.inf):
            problems.append(f"rope.freq_base ({self.rope_base}), freq_base_swa ({self.rope_base_swa}) and "
                            f"layer_norm_rms_epsilon ({self.rms_eps}) must be positive and finite")
        for name in ("attn_softcap", "final_softcap"):
            if not 0 <= getattr(self, name) < math.inf:
                problems.append(f"{name} {getattr(self, name)} must be a finite number >= 0")
        r = self.rope_scaling
        if not (0 < r.freq_scale < math.inf and 0 < r.attn_factor < math.inf and r.n_ctx_orig > 0):
            problems.append(f"rope.scaling.factor, attn_factor and original_context_length must be positive: {r}")
        if problems:
            raise GGUFError("invalid hyperparameters: " + "; ".join(problems), path)


def _rope_scaling(get, context_length, path) -> RopeScaling:
    """rope.scaling.* as llama.cpp applies them (a context of the model's own, no user overrides)."""
    kind = get("rope.scaling.type", str, "linear")
    if kind not in ROPE_SCALING_TYPES:
        raise GGUFError(f"rope.scaling.type {kind!r} is not one of {', '.join(ROPE_SCALING_TYPES)}", path)
    factor = get("rope.scaling.factor", float, get("rope.scale_linear", float, 0.0))
    freq_scale = 1.0 if kind == "none" or factor == 0.0 else 1.0 / factor
    attn_factor = get("rope.scaling.attn_factor", float, 1.0)
    ext_factor = 1.0 if kind == "yarn" else 0.0
    if ext_factor and freq_scale > 0:
        # llama.cpp's YaRN magnitude, divided by what the rope kernel multiplies back in.
        stretch = 1.0 / freq_scale
        attn_factor *= (1.0 + 0.1 * math.log(stretch) if stretch > 1.0 else 1.0) / (1.0 + 0.1 * math.log(stretch))
    return RopeScaling(freq_scale=freq_scale, ext_factor=ext_factor, attn_factor=attn_factor,
                       n_ctx_orig=get("rope.scaling.original_context_length", int, context_length))


def _swa_layers(pattern, n_layers, arch, path) -> tuple:
    """Which layers slide: a pattern n (layers i with i % n < n - 1; 0: all), or one boolean a layer."""
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(v, (bool, int)) for v in pattern):
            raise GGUFError(f"metadata {arch}.attention.sliding_window_pattern should hold one boolean per "
                            f"layer ({n_layers}), got {pattern!r}", path)
        return tuple(bool(v) for v in pattern)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise GGUFError(f"metadata {arch}.attention.sliding_window_pattern should be a count or a list, "
                        f"got {pattern!r}", path)
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers))


@dataclass
class Config:
    """Run settings, with ctransformers 0.2.27's names and defaults, except batch_size: 512 (llama.cpp's
    n_batch) rather than 8, since prompts evaluate several times faster in large batches. Beyond
    ctransformers: `kv_cache_type` ("f16", llama.cpp's default; "q8_0" holds twice the context in
    the same memory; "f32"), `sequences` (how many conversations the KV cache holds at once,
    each of context_length positions: the server's --parallel) and `repack` (the CPU backend's
    weights interleaved at load for its fastest kernels: None lets it choose per host, or every
    type when sequences > 1, True repacks every type it can, as llama.cpp does, False none; see
    docs/api.md)."""

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
    repack: Optional[bool] = None

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


