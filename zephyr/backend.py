"""The backend contract: what every compute backend (built-in or third-party) implements.

The model graph (zephyr.model) only ever calls these operations; it never sees SIMD, CUDA or
quant block layouts. Arrays a backend returns ("activations") are its own type (numpy for host
backends, device arrays for GPU ones); they cross to another backend only through `to_host` and
`from_host`.

The numeric contract, which conformance (tests/backends/test_conformance.py) holds every backend to:
- matmul with a quantised weight multiplies 8-bit activations: x is first rounded to the weight
  type's activation type (`quants.TypeInfo.activation_type`: Q8_0 blocks for Q4_0..Q8_0, Q8_K
  for the k-quants; `quants.round_activations` does it), as llama.cpp and every zephyr backend do.
  Float weights take x as it is. Then float arithmetic.
- every op then agrees with the reference backend (float64) to 1e-4 of the largest output value.
  A textbook float matmul that skips the rounding misses by 4e-3 (Q4_0) to 7e-3 (Q4_K).
- attention reads the cache's values as stored (rounded to f16 or Q8_0 by the cache type).

Blocks beyond llama's (Qwen, Gemma, Phi-3, Llama 3's RoPE) use *block features* (FEATURES): optional
weights in LayerWeights, optional params in LayerParams, and the ops that take them. A backend lists
the features it runs natively in `Backend.features`; `choose_decoder_layer` gives a block that needs
any other to the default composition, where each op the backend lacks runs from its numpy
definition (zephyr.host_ops) on the host. A backend never computes a block it does not understand.

Shapes: n = tokens in the batch, k = input width, m = output rows, d = model width, hd = head
dim, h = query heads, h_kv = key/value heads, S = sequences in the cache, T = its positions.
"""
import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from . import host_ops, memory
from .errors import BackendError
from .quants import TYPE_INFO, GGMLType, dequantize, quantize_q8_0

# Bumped whenever the contract below changes in an incompatible way.
BACKEND_API_VERSION = 2

# KV cache element types by the names users give them (llama.cpp's --cache-type-k names).
KV_CACHE_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0}


# What blocks beyond llama's ask of a backend (see the module docstring), and what each is.
FEATURES = {
    "bias": "biases added after the q/k/v (and o, gate, up, down) matmuls: add_bias",
    "qk_norm": "RMSNorm of every query and key head (weights q_norm, k_norm [hd]) before RoPE: rms_norm_heads",
    "post_norm": "RMSNorm of the attention and FFN outputs before each residual add (Gemma)",
    "gelu": "a GELU (tanh) gated FFN instead of SiLU: geglu",
    "attn_scale": "attention scores scaled by LayerParams.attn_scale instead of 1/sqrt(hd): attention(scale=)",
    "attn_softcap": "attention scores soft-capped, cap * tanh(s / cap): attention(softcap=)",
    "rope_scaling": "RoPE frequency factors, linear or YaRN scaling: rope(scaling=, freq_factors=)",
}


# -- what the ops take --------------------------------------------------------------------------

@dataclass(frozen=True)
class Weight:
    """A tensor as stored in the file: raw bytes of `rows` rows of `cols` values of `type`."""

    name: str
    type: GGMLType
    shape: tuple          # row-major: (rows, cols) for matrices, (cols,) for vectors
    data: np.ndarray      # uint8 view on the memory map, rows * row_bytes long

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) == 2 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]


@dataclass(frozen=True)
class LayerWeights:
    """One transformer block's weights, as handles returned by `load_weight`."""

    attn_norm: object   # [d] f32
    wq: object          # [h * hd, d]
    wk: object          # [h_kv * hd, d]
    wv: object          # [h_kv * hd, d]
    wo: object          # [d, h * hd]
    ffn_norm: object    # [d] f32
    w_gate: object      # [f, d]
    w_up: object        # [f, d]
    w_down: object      # [d, f]
    # Optional (None: absent), by the feature that uses them. Vectors are f32.
    q_bias: object = None           # [h * hd]  "bias"
    k_bias: object = None           # [h_kv * hd]
    v_bias: object = None           # [h_kv * hd]
    o_bias: object = None           # [d]
    gate_bias: object = None        # [f]
    up_bias: object = None          # [f]
    down_bias: object = None        # [d]
    q_norm: object = None           # [hd]  "qk_norm"
    k_norm: object = None           # [hd]
    post_attn_norm: object = None   # [d]   "post_norm"
    post_ffn_norm: object = None    # [d]
    rope_freqs: object = None       # [rope_dims / 2]: theta_j divided by rope_freqs[j]  "rope_scaling"

    MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    # Each optional vector, and the matrix (or width) its length follows.
    BIASES = {"q_bias": "wq", "k_bias": "wk", "v_bias": "wv", "o_bias": "wo", "gate_bias": "w_gate",
              "up_bias": "w_up", "down_bias": "w_down"}
    NORMS = ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")
    VECTORS = ("attn_norm", "ffn_norm", *BIASES, *NORMS, "rope_freqs")
    # The feature of the op that takes each optional vector (post-norms go to rms_norm, a core op).
    FEATURE_OF = {**{name: "bias" for name in BIASES}, "q_norm": "qk_norm", "k_norm": "qk_norm",
                  "post_attn_norm": None, "post_ffn_norm": None, "rope_freqs": "rope_scaling"}

    def present(self) -> dict:
        """The fields that hold a weight, by name."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if getattr(self, name) is not None}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE beyond theta_j = pos * base^(-2j/n_rot), as llama.cpp's ggml_rope_ext computes it:
    theta = freq_scale * pos * base^(-2j/n_rot) / freq_factor_j, mixed by YaRN (ext_factor > 0)
    with the unscaled angle over a ramp of pairs; cos and sin then multiplied by attn_factor
    (and by 1 + 0.1 ln(1 / freq_scale) under YaRN). The defaults change nothing."""

    freq_scale: float = 1.0      # 1 / rope.scaling.factor (linear and YaRN scaling)
    ext_factor: float = 0.0      # YaRN's mix (1.0 under YaRN, 0: off)
    attn_factor: float = 1.0     # magnitude of cos and sin
    beta_fast: float = 32.0      # YaRN's ramp: pairs that turn faster than this many times ...
    beta_slow: float = 1.0       # ... or slower than this over n_ctx_orig positions
    n_ctx_orig: int = 0          # the context YaRN scales from

    @property
    def plain(self) -> bool:
        return self.freq_scale == 1.0 and self.ext_factor == 0.0 and self.attn_factor == 1.0


@dataclass(frozen=True)
class LayerParams:
    """The hyperparameters one block needs."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dims: int
    rope_base: float
    rope_neox: bool
    rms_eps: float
    sliding_window: int   # 0: full attention
    # Beyond llama's block (the defaults are llama's):
    rope_scaling: RopeScaling = RopeScaling()   # "rope_scaling" unless plain
    attn_scale: float = 0.0      # scale of the attention scores; 0: 1/sqrt(head_dim)  "attn_scale"
    attn_softcap: float = 0.0    # > 0: scores become cap * tanh(score / cap)  "attn_softcap"
    activation: str = "silu"     # the FFN's gate: "silu" (SwiGLU) or "gelu" (GELU tanh)  "gelu"

    ACTIVATIONS = ("silu", "gelu")

    @property
    def scores_scale(self) -> float:
        """What attention multiplies q . k by."""
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)


def block_features(w: LayerWeights, p: LayerParams) -> frozenset:
    """The FEATURES a block (its weights and params) uses."""
    present = w.present()
    used = {
        "bias": any(name in present for name in LayerWeights.BIASES),
        "qk_norm": "q_norm" in present or "k_norm" in present,
        "post_norm": "post_attn_norm" in present or "post_ffn_norm" in present,
        "gelu": p.activation == "gelu",
        "attn_scale": p.attn_scale != 0.0,
        "attn_softcap": p.attn_softcap != 0.0,
        "rope_scaling": not p.rope_scaling.plain or "rope_freqs" in present,
    }
    return frozenset(name for name, on in used.items() if on)


@dataclass(frozen=True)
class CacheShape:
    """What `new_kv_cache` allocates: for each of `n_layers` layers, keys and values of
    `n_seqs` sequences x `n_ctx` positions x `n_kv_heads` heads, a row of `head_dim` values of
    `type` (F32, F16 or Q8_0) per head."""

    n_layers: int
    n_seqs: int
    n_ctx: int
    n_kv_heads: int
    head_dim: int
    type: GGMLType = GGMLType.F16

    def __post_init__(self):
        for name in ("n_layers", "n_seqs", "n_ctx", "n_kv_heads", "head_dim"):
            as_index(getattr(self, name), name, minimum=1)
        if self.type not in KV_CACHE_TYPES.values():
            raise BackendError(f"KV cache type {self.type!r} is not one of {', '.join(KV_CACHE_TYPES)}")
        block = TYPE_INFO[self.type].block_size
        if self.head_dim % block:
            raise BackendError(f"a {self.type.name} KV cache needs a head size that is a multiple of {block}, "
                               f"got {self.head_dim}; use kv_cache_type='f16'")

    @property
    def row_bytes(self) -> int:
        """Bytes of one head's key (or value) at one position."""
        return TYPE_INFO[self.type].row_bytes(self.head_dim)

    @property
    def nbytes(self) -> int:
        return 2 * self.n_layers * self.n_seqs * self.n_ctx * self.n_kv_heads * self.row_bytes


class Batch:
    """Where the n tokens of one forward pass sit: token i at position `positions[i]` of
    sequence `seqs[i]` of the KV cache.

    Attention stores token i's key and value at that row of its sequence, then token i attends to
    rows 0..positions[i] of the same sequence (the last `window` of them with a sliding window):
    rows written by this batch or earlier ones, which the caller guarantees exist. No two tokens
    of a batch share a (sequence, position).
    """

    __slots__ = ("positions", "seqs")

    def __init__(self, positions, seqs):
        positions, seqs = _index_array(positions, "positions"), _index_array(seqs, "seqs")
        if positions.shape != seqs.shape:
            raise BackendError(f"a batch needs a sequence for every position: {positions.size} positions, "
                               f"{seqs.size} sequences")
        self.positions, self.seqs = positions, seqs

    @classmethod
    def of(cls, start: int, n: int, seq: int = 0) -> "Batch":
        """n tokens at positions start.. of one sequence."""
        start, n, seq = as_index(start, "start"), as_index(n, "n"), as_index(seq, "seq")
        return cls(np.arange(start, start + n, dtype=np.int32), np.full(n, seq, np.int32))

    def __len__(self):
        return self.positions.size

    def __eq__(self, other):
        return (isinstance(other, Batch) and np.array_equal(self.positions, other.positions)
                and np.array_equal(self.seqs, other.seqs))

    __hash__ = None

    def __repr__(self):
        return f"Batch({[(int(s), int(p)) for s, p in zip(self.seqs, self.positions)]})"


# -- the checks every backend makes ------------------------------------------------------------

def as_index(value, name, minimum=0) -> int:
    """`value` as an int, if it is an integer >= minimum (never a bool), else a BackendError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BackendError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _index_array(values, name) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or not (values.dtype.kind in "iu" or values.size == 0):
        raise BackendError(f"batch {name} must be a 1-D integer array, got {values.dtype} shape {values.shape}")
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
        raise BackendError(f"batch {name} must lie in [0, 2**31), got {values.min()}..{values.max()}")
    values = np.ascontiguousarray(values, dtype=np.int32)
    values.flags.writeable = False
    return values


def as_positions(positions, n) -> np.ndarray:
    """`positions` as a read-only int32 [n] array, if they are n integers in [0, 2**31)."""
    positions = _index_array(positions, "positions")
    if positions.size != n:
        raise BackendError(f"{positions.size} positions for {n} rows")
    return positions


def check_activation(x, name, array_type, kind, cols=None, rows=None, contiguous_hint=""):
    """x itself, if it is a C-contiguous float32 [rows, cols] `array_type` (the backend's array
    class; `kind` names it in messages), else a BackendError saying what is wrong."""
    if not isinstance(x, array_type):
        raise BackendError(f"{name} must be a {kind} array (use from_host), got {type(x).__name__}")
    if x.dtype != np.float32:
        raise BackendError(f"{name} must be float32, got {x.dtype}")
    if x.ndim != 2:
        raise BackendError(f"{name} must be 2-D [n, width], got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise BackendError(f"{name} must be C-contiguous{contiguous_hint}")
    if cols is not None and x.shape[1] != cols:
        raise BackendError(f"{name} has width {x.shape[1]}, expected {cols}")
    if rows is not None and x.shape[0] != rows:
        raise BackendError(f"{name} has {x.shape[0]} rows, expected {rows}")
    return x


def check_weight(weight, backend_name, supported_types) -> Weight:
    """`weight` itself, if it is a Weight of a supported type whose bytes match its shape."""
    if not isinstance(weight, Weight):
        raise BackendError(f"expected a zephyr.backend.Weight, got {type(weight).__name__}")
    if weight.type not in supported_types:
        raise BackendError(f"the {backend_name} backend cannot use {weight.name!r}: type "
                           f"{getattr(weight.type, 'name', weight.type)} is not supported")
    if len(weight.shape) not in (1, 2) or min(weight.shape) <= 0:
        raise BackendError(f"{weight.name!r}: shape {weight.shape} is not a vector or matrix")
    info = TYPE_INFO[weight.type]
    if weight.cols % info.block_size:
        raise BackendError(f"{weight.name!r}: {weight.cols} columns is not a whole number of "
                           f"{weight.type.name} blocks of {info.block_size}")
    data = weight.data
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        raise BackendError(f"{weight.name!r}: data must be a 1-D uint8 numpy array")
    needed = weight.rows * info.row_bytes(weight.cols)
    if data.size != needed:
        raise BackendError(f"{weight.name!r}: {data.size} bytes of data, but shape {weight.shape} "
                           f"of {weight.type.name} takes {needed}")
    if len(weight.shape) == 1 and weight.type != GGMLType.F32:
        raise BackendError(f"{weight.name!r}: vectors must be F32, got {weight.type.name}")
    return weight


def check_rope_args(width, head_dim, n_rot):
    """Whether rope can rotate rows of `width`: whole heads, an even n_rot of at most head_dim."""
    head_dim, n_rot = as_index(head_dim, "head_dim", minimum=1), as_index(n_rot, "n_rot")
    if width % head_dim or n_rot % 2 or n_rot > head_dim:
        raise BackendError(f"rope: width {width}, head_dim {head_dim}, n_rot {n_rot}: width must be "
                           f"a multiple of head_dim and n_rot even and at most head_dim")


def check_cache_args(cache, cache_class, layer, batch, n_heads, n_kv_heads):
    """Whether `batch` may attend over layer `layer` of `cache` with these head counts."""
    if not isinstance(cache, cache_class):
        raise BackendError(f"expected a cache from this backend's new_kv_cache, got {type(cache).__name__}")
    if not isinstance(batch, Batch):
        raise BackendError(f"expected a zephyr.backend.Batch, got {type(batch).__name__}")
    shape = cache.shape
    if not as_index(layer, "layer") < shape.n_layers:
        raise BackendError(f"layer {layer} is outside the cache's {shape.n_layers} layers")
    n_heads, n_kv_heads = as_index(n_heads, "n_heads", minimum=1), as_index(n_kv_heads, "n_kv_heads", minimum=1)
    if n_kv_heads != shape.n_kv_heads or n_heads % n_kv_heads:
        raise BackendError(f"{n_heads} query heads over {n_kv_heads} kv heads do not fit a cache "
                           f"of {shape.n_kv_heads} kv heads")
    if len(batch):
        if batch.positions.max() >= shape.n_ctx:
            raise BackendError(f"position {batch.positions.max()} does not fit a cache of {shape.n_ctx} positions")
        if batch.seqs.max() >= shape.n_seqs:
            raise BackendError(f"sequence {batch.seqs.max()} does not fit a cache of {shape.n_seqs} sequences")


def check_layer_shapes(rows_cols, p: LayerParams, vector_lengths=None) -> int:
    """Whether a block's matrices fit each other and the params; `rows_cols(name)` gives the
    (rows, cols) of matrix `name`, `vector_lengths` the length of each optional vector the block
    has ({name: length}). Returns the model width d."""
    if not isinstance(p, LayerParams):
        raise BackendError(f"decoder_layer takes LayerParams, got {type(p).__name__}")
    for name in ("n_heads", "n_kv_heads", "head_dim"):
        as_index(getattr(p, name), name, minimum=1)
    as_index(p.sliding_window, "sliding_window")
    if p.n_heads % p.n_kv_heads:
        raise BackendError(f"{p.n_heads} query heads are not a multiple of {p.n_kv_heads} kv heads")
    check_rope_args(p.head_dim, p.head_dim, as_index(p.rope_dims, "rope_dims"))
    check_block_params(p)
    d, f = rows_cols("wq")[1], rows_cols("w_gate")[0]
    qd, kvd = p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim
    expected = {"wq": (qd, d), "wk": (kvd, d), "wv": (kvd, d), "wo": (d, qd), "w_gate": (f, d), "w_up": (f, d),
                "w_down": (d, f)}
    for name, shape in expected.items():
        if tuple(rows_cols(name)) != shape:
            raise BackendError(f"decoder_layer: {name} is {list(rows_cols(name))}, but the layer's shapes "
                               f"need {list(shape)}")
    lengths = {name: expected[matrix][0] for name, matrix in LayerWeights.BIASES.items()}
    lengths.update(q_norm=p.head_dim, k_norm=p.head_dim, post_attn_norm=d, post_ffn_norm=d, rope_freqs=p.rope_dims // 2)
    for name, length in (vector_lengths or {}).items():
        if name in lengths and length != lengths[name]:
            raise BackendError(f"decoder_layer: {name} has {length} values, but the layer's shapes need "
                               f"{lengths[name]}")
    return d


def check_block_params(p: LayerParams):
    """Whether the params beyond llama's hold values the ops can take."""
    if p.activation not in LayerParams.ACTIVATIONS:
        raise BackendError(f"activation {p.activation!r} is not one of {', '.join(LayerParams.ACTIVATIONS)}")
    r = p.rope_scaling
    numbers = {"attn_scale": p.attn_scale, "attn_softcap": p.attn_softcap, "rope freq_scale": r.freq_scale,
               "rope ext_factor": r.ext_factor, "rope attn_factor": r.attn_factor}
    for name, value in numbers.items():
        if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
            raise BackendError(f"{name} must be a finite number >= 0, got {value!r}")
    if r.freq_scale == 0 or (r.ext_factor and not (r.n_ctx_orig > 0 and r.beta_fast > 0 and r.beta_slow > 0)):
        raise BackendError(f"rope scaling {r} needs freq_scale > 0, and under YaRN n_ctx_orig and betas > 0")


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on this machine, and if not, why not."""

    available: bool
    reason: str = ""

    def __bool__(self):
        return self.available


# -- the KV cache --------------------------------------------------------------------------------

class KVCache(ABC):
    """A backend's key/value cache of `shape`. Sequences are independent: the runtime moves whole
    prefixes between them (a prompt shared by several answers, a conversation put aside)."""

    shape: CacheShape

    @abstractmethod
    def copy_sequence(self, src: int, dst: int, length: int):
        """Positions 0..length-1 of sequence `src` (every layer) into sequence `dst`."""

    @abstractmethod
    def read_sequence(self, seq: int, length: int) -> np.ndarray:
        """Positions 0..length-1 of sequence `seq` (every layer) as uint8 bytes on the host."""

    @abstractmethod
    def write_sequence(self, seq: int, data: np.ndarray):
        """Inverse of read_sequence: those bytes back into sequence `seq`."""

    def check_saved(self, data) -> np.ndarray:
        """`data` as a uint8 array, if it has the form read_sequence gives: [n_layers, 2, h_kv, length,
        row_bytes] for length <= n_ctx (the layout every built-in cache uses), else a BackendError."""
        data, s = np.asarray(data), self.shape
        if (data.dtype != np.uint8 or data.ndim != 5 or data.shape[:3] != (s.n_layers, 2, s.n_kv_heads)
                or data.shape[3] > s.n_ctx or data.shape[4] != s.row_bytes):
            raise BackendError(f"write_sequence takes what read_sequence of this cache returned, got "
                               f"{data.dtype} {list(data.shape)}")
        return data

    def check_sequence(self, seq, length) -> tuple:
        """(seq, length) as ints, if they name stored positions 0..length-1 of a sequence."""
        seq, length = as_index(seq, "sequence"), as_index(length, "length")
        if seq >= self.shape.n_seqs or length > self.shape.n_ctx:
            raise BackendError(f"sequence {seq}, {length} positions: the cache holds {self.shape.n_seqs} "
                               f"sequences of {self.shape.n_ctx} positions")
        return seq, length


class HostKVCache(KVCache):
    """A KV cache in host memory: `data` is uint8 [n_layers, 2 (keys, values), S, h_kv, T, row_bytes],
    a head's row at each position in the cache type's bytes (F32, F16, or Q8_0 blocks as GGUF stores
    them). Head-major: the keys one kv head attends over lie in one run of memory."""

    def __init__(self, shape: CacheShape):
        self.shape = shape
        # positions never written cost no memory, and a sequence's first token commits a few pages
        self.data = memory.lazy_zeros((shape.n_layers, 2, shape.n_seqs, shape.n_kv_heads, shape.n_ctx, shape.row_bytes))

    def store(self, layer: int, batch: Batch, k: np.ndarray, v: np.ndarray):
        """k, v: float32 [n, h_kv * hd] -> the rows of `batch` in layer `layer`, rounded to the cache type."""
        n, s = len(batch), self.shape
        for which, x in ((0, k), (1, v)):
            rows = encode_rows(np.asarray(x, np.float32).reshape(n * s.n_kv_heads, s.head_dim), s.type)
            heads = np.arange(s.n_kv_heads)
            self.data[layer, which, batch.seqs[:, None], heads, batch.positions[:, None]] = \
                rows.reshape(n, s.n_kv_heads, s.row_bytes)

    def rows(self, layer: int, which: int, seq: int, end: int) -> np.ndarray:
        """Keys (which=0) or values (1) of positions 0..end-1 of `seq`, decoded: float32 [end, h_kv, hd]."""
        s = self.shape
        raw = np.ascontiguousarray(self.data[layer, which, seq, :, :end].transpose(1, 0, 2)).reshape(-1)
        return dequantize(raw, s.type, (end * s.n_kv_heads, s.head_dim)).reshape(end, s.n_kv_heads, s.head_dim)

    def copy_sequence(self, src, dst, length):
        src, length = self.check_sequence(src, length)
        dst, _ = self.check_sequence(dst, length)
        self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]

    def read_sequence(self, seq, length):
        seq, length = self.check_sequence(seq, length)
        return self.data[:, :, seq, :, :length].copy()

    def write_sequence(self, seq, data):
        seq, _ = self.check_sequence(seq, 0)
        data = self.check_saved(data)
        self.data[:, :, seq, :, :data.shape[3]] = data


def encode_rows(x: np.ndarray, type: GGMLType) -> np.ndarray:
    """float32 [rows, width] -> uint8 [rows, row_bytes] in `type` (F32, F16 rounded to nearest
    even, or Q8_0 blocks rounded as zephyr.quants.quantize_q8_0 does)."""
    if type == GGMLType.F32:
        return np.ascontiguousarray(x, np.float32).view(np.uint8)
    if type == GGMLType.F16:
        return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)
    return quantize_q8_0(x).reshape(x.shape[0], -1)


# -- the backend --------------------------------------------------------------------------------

class Backend(ABC):
    """One compute backend. Subclasses set the class attributes and implement every abstract method.

    Lifetimes: a backend instance is created per model load; `load_weight` is called once per
    tensor at load; `new_kv_cache` once per model; the ops in the hot loop.
    """

    name: str = ""
    api_version: int = BACKEND_API_VERSION
    # "cpu" or "gpu": gpu_layers=N places layers on the best "gpu" backend, the rest on a "cpu" one.
    device: str = "cpu"
    # Higher wins when the user does not name a backend (among backends of the same device).
    score: int = 0
    # Weight types `matmul` and `embed` accept.
    supported_types: frozenset = frozenset()
    # KV cache types `new_kv_cache` accepts.
    kv_cache_types: frozenset = frozenset(KV_CACHE_TYPES.values())
    # Load options (zephyr.Config fields, e.g. "threads") the constructor takes as keyword arguments.
    options: tuple = ()
    # The block features (FEATURES) this backend runs natively: for each one listed, its op takes
    # loaded weights (add_bias, rms_norm_heads, geglu) or keyword arguments (rope, attention), and a
    # decoder_layer of its own handles it. Blocks needing a feature not listed run through the
    # default decoder_layer, with that feature's op on the host (see choose_decoder_layer).
    features: frozenset = frozenset()

    @classmethod
    def availability(cls) -> Availability:
        """Optional; default: always available."""
        return Availability(True)

    def memory_available(self) -> int:
        """Bytes this backend can still allocate (for weights and caches); checked before the KV cache
        is allocated. Default: the host's available memory."""
        return memory.available_memory()

    # -- memory ---------------------------------------------------------------------------
    @abstractmethod
    def load_weight(self, weight: Weight):
        """Make a weight usable by the ops (keep a view, or upload); return the handle ops take."""

    @abstractmethod
    def from_host(self, x: np.ndarray):
        """A float32 numpy array -> this backend's activation."""

    @abstractmethod
    def to_host(self, x) -> np.ndarray:
        """This backend's activation -> a float32 numpy array."""

    @abstractmethod
    def new_kv_cache(self, shape: CacheShape) -> KVCache:
        """A key/value cache of `shape` (layers numbered 0..n_layers-1 locally), of a type in
        `kv_cache_types`."""

    # -- ops --------------------------------------------------------------------------------
    # The runtime calls embed, decoder_layer (through choose_decoder_layer), rms_norm, matmul (the
    # output head), add_bias (its bias) and scale (Gemma's embedding); the others feed the
    # default decoder_layer below, and conformance tests each one.
    @abstractmethod
    def matmul(self, x, w):
        """x: [n, k] f32, w: weight [m, k] of any supported type -> [n, m] f32 (x @ w.T), x rounded
        to the weight's activation type first (see the module docstring)."""

    @abstractmethod
    def embed(self, w, ids: np.ndarray):
        """w: weight [vocab, d]; ids: int32 [n] -> rows [n, d] f32."""

    @abstractmethod
    def rms_norm(self, x, w, eps: float):
        """x: [n, d]; w: f32 weight [d] -> x / sqrt(mean(x^2) + eps) * w."""

    @abstractmethod
    def rope(self, x, positions: np.ndarray, head_dim: int, n_rot: int, base: float, neox: bool, **scaling):
        """Rotate x: [n, heads * head_dim]; row i sits at positions[i] (int32 [n]).

        The first n_rot dims of every head rotate; pairs are adjacent (2j, 2j+1) in llama's
        "normal" mode and (j, j + n_rot/2) when `neox`. theta = pos * base^(-2j/n_rot).
        With "rope_scaling" in `features`, also the keyword arguments scaling (a RopeScaling)
        and freq_factors (a loaded f32 weight [n_rot / 2], or None): see RopeScaling.
        """

    @abstractmethod
    def attention(self, cache, layer: int, q, k, v, batch: Batch, n_heads: int, n_kv_heads: int,
                  window: int = 0, **scores):
        """Causal grouped-query attention, storing k and v into the cache first (see Batch).

        q: [n, h * hd]; k, v: [n, h_kv * hd] -> [n, h * hd]. Scale 1/sqrt(hd). Query head j reads
        kv head j // (h / h_kv). With window > 0, token i sees positions > positions[i] - window.
        With "attn_scale" in `features`, also scale= (of the scores, instead of 1/sqrt(hd)); with
        "attn_softcap", softcap= (> 0: each score s becomes softcap * tanh(s / softcap)).
        """

    @abstractmethod
    def swiglu(self, gate, up):
        """silu(gate) * up, both [n, f]."""

    @abstractmethod
    def add(self, a, b):
        """a + b, both [n, d]."""

    # -- optional ops: these defaults run zephyr.host_ops on the host ---------------------------
    # A backend that lists an op's feature overrides it, taking weights from its load_weight;
    # otherwise the runtime gives these defaults zephyr.backend.Weights (host memory).
    def add_bias(self, x, b):
        """x: [n, m] + b: f32 vector [m] ("bias")."""
        x = self._host_activation(x, "add_bias input")
        return self.from_host(host_ops.add_bias(x, host_vector(b, x.shape[1], "bias")))

    def rms_norm_heads(self, x, w, head_dim: int, eps: float):
        """RMSNorm of every head of x: [n, heads * head_dim] on its own, weight w: f32 [head_dim]
        ("qk_norm")."""
        x = self._host_activation(x, "rms_norm_heads input")
        head_dim = as_index(head_dim, "head_dim", minimum=1)
        if x.shape[1] % head_dim:
            raise BackendError(f"rms_norm_heads: width {x.shape[1]} is not a whole number of heads of {head_dim}")
        return self.from_host(host_ops.rms_norm_heads(x, host_vector(w, head_dim, "head norm"), head_dim, eps))

    def geglu(self, gate, up):
        """gelu(gate) * up, both [n, f], GELU's tanh approximation ("gelu")."""
        gate, up = self._host_activation(gate, "gate"), self._host_activation(up, "up")
        if gate.shape != up.shape:
            raise BackendError(f"geglu: gate {gate.shape} and up {up.shape} differ in shape")
        return self.from_host(host_ops.geglu(gate, up))

    def scale(self, x, factor: float):
        """x: [n, d] * factor."""
        return self.from_host(host_ops.scale(self._host_activation(x, "scale input"), float(factor)))

    def _host_activation(self, x, name):
        return check_activation(self.to_host(x), name, np.ndarray, "numpy")

    # -- whole steps ------------------------------------------------------------------------
    def decoder_layer(self, x, w: LayerWeights, p: LayerParams, cache, layer: int, batch: Batch):
        """One pre-norm block on x: [n, d] -> [n, d]; token i sits where `batch` says.

        Optional: this default composes the ops above, each feature the backend does not list
        taken from the host (see `features`). A backend may override it with a fused
        implementation (one native call per layer) that must match this one; the runtime then
        gives it only blocks whose features it lists (choose_decoder_layer).
        """
        h = self.rms_norm(x, w.attn_norm, p.rms_eps)                                  # h: [n, d]
        q = self._projection(h, w.wq, w.q_bias)                                       # q: [n, h * hd]
        k = self._projection(h, w.wk, w.k_bias)                                       # k, v: [n, h_kv * hd]
        v = self._projection(h, w.wv, w.v_bias)
        if w.q_norm is not None:
            q = self.rms_norm_heads(q, w.q_norm, p.head_dim, p.rms_eps)
        if w.k_norm is not None:
            k = self.rms_norm_heads(k, w.k_norm, p.head_dim, p.rms_eps)
        q, k = self._rope(q, batch, p, w.rope_freqs), self._rope(k, batch, p, w.rope_freqs)
        attn = self._attention(cache, layer, q, k, v, batch, p)                       # attn: [n, h * hd]
        x = self.add(x, self._output(self._projection(attn, w.wo, w.o_bias), w.post_attn_norm, p))
        h = self.rms_norm(x, w.ffn_norm, p.rms_eps)
        gate, up = self._projection(h, w.w_gate, w.gate_bias), self._projection(h, w.w_up, w.up_bias)
        f = self.geglu(gate, up) if p.activation == "gelu" else self.swiglu(gate, up)  # f: [n, f]
        return self.add(x, self._output(self._projection(f, w.w_down, w.down_bias), w.post_ffn_norm, p))

    def _projection(self, x, w, bias):
        y = self.matmul(x, w)
        return y if bias is None else self.add_bias(y, bias)

    def _output(self, y, post_norm, p):
        """A sub-block's output before its residual add: normed again where the block says so."""
        return y if post_norm is None else self.rms_norm(y, post_norm, p.rms_eps)

    def _rope(self, x, batch, p, freq_factors):
        args = (batch.positions, p.head_dim, p.rope_dims, p.rope_base, p.rope_neox)
        if freq_factors is None and p.rope_scaling.plain:
            return self.rope(x, *args)
        if "rope_scaling" in self.features:
            return self.rope(x, *args, scaling=p.rope_scaling, freq_factors=freq_factors)
        x = self._host_activation(x, "rope input")
        check_rope_args(x.shape[1], p.head_dim, p.rope_dims)
        factors = None if freq_factors is None else host_vector(freq_factors, p.rope_dims // 2, "rope freq factors")
        return self.from_host(host_ops.rope(x, batch.positions, *args[1:], p.rope_scaling, factors))

    def _attention(self, cache, layer, q, k, v, batch, p):
        heads = (batch, p.n_heads, p.n_kv_heads, p.sliding_window)
        scores = {}
        if p.attn_scale and "attn_scale" in self.features:
            scores["scale"] = p.attn_scale
        elif p.attn_scale:   # the same scores, from queries scaled beforehand
            q = self.scale(q, p.attn_scale * math.sqrt(p.head_dim))
        if not p.attn_softcap:
            return self.attention(cache, layer, q, k, v, *heads, **scores)
        if "attn_softcap" in self.features:
            return self.attention(cache, layer, q, k, v, *heads, softcap=p.attn_softcap, **scores)
        # On the host, over a host cache (run on a backend of its own cache type, the runtime
        # gives such a layer one: needs_host_cache).
        if not isinstance(cache, HostKVCache):
            raise BackendError(f"the {self.name} backend cannot soft-cap attention scores over its own KV cache; "
                               f"this layer needs a HostKVCache (zephyr.backend.needs_host_cache)")
        check_cache_args(cache, HostKVCache, layer, batch, p.n_heads, p.n_kv_heads)
        q, k, v = (self._host_activation(a, name) for a, name in ((q, "q"), (k, "k"), (v, "v")))
        return self.from_host(host_ops.attention(cache, layer, q, k, v, batch, p.n_heads, p.n_kv_heads,
                                                 p.sliding_window, p.scores_scale, p.attn_softcap))


def choose_decoder_layer(backend: Backend, w: LayerWeights, p: LayerParams):
    """How `backend` runs a block of weights `w` and params `p`: its own decoder_layer when it lists
    every feature the block uses, else the default composition (the features it lacks on the host).
    Returns a callable taking decoder_layer's arguments."""
    if block_features(w, p) <= backend.features:
        return backend.decoder_layer
    return functools.partial(Backend.decoder_layer, backend)


def needs_host_cache(backend: Backend, p: LayerParams) -> bool:
    """Whether a layer of params `p` on `backend` keeps its keys and values in a HostKVCache of
    the runtime's: its attention runs on the host (soft-capped scores the backend cannot compute
    over a cache of its own kind)."""
    return bool(p.attn_softcap) and "attn_softcap" not in backend.features and not isinstance(backend, HostBackend)


def load_optional_weight(backend: Backend, feature, weight: Weight):
    """What the runtime gives a block for an optional weight of `feature` (None: a core op's):
    the backend's handle when it runs that feature natively, else the Weight itself, for the
    host default of the op."""
    return backend.load_weight(weight) if feature is None or feature in backend.features else weight


def load_layer_weights(backend: Backend, weights: LayerWeights) -> LayerWeights:
    """A block of zephyr.backend.Weights as the runtime hands it to `backend` (see load_optional_weight)."""
    return LayerWeights(**{name: load_optional_weight(backend, LayerWeights.FEATURE_OF.get(name), weight)
                           for name, weight in weights.present().items()})


def host_vector(w, length, what) -> np.ndarray:
    """An optional op's weight given to a host default (a zephyr.backend.Weight or a float32
    array of `length` values) as float32."""
    if isinstance(w, Weight):
        w = check_weight(w, "host", {GGMLType.F32})
        values = w.data.view(np.float32)
    elif isinstance(w, np.ndarray) and w.dtype == np.float32:
        values = w.reshape(-1)
    else:
        raise BackendError(f"the {what} weight of an op run on the host must be a zephyr.backend.Weight or a "
                           f"float32 array, got {type(w).__name__} (backends list the features whose weights "
                           f"they load: Backend.features)")
    if values.size != length:
        raise BackendError(f"the {what} weight has {values.size} values, expected {length}")
    return values


class HostBackend(Backend):
    """A backend whose activations are numpy arrays in host memory and whose KV cache is a
    HostKVCache: a CPU backend, or a library working on host memory, implements only the ops."""

    def from_host(self, x):
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_host(self, x):
        return np.asarray(x, dtype=np.float32)

    def new_kv_cache(self, shape: CacheShape) -> HostKVCache:
        if not isinstance(shape, CacheShape):
            raise BackendError(f"new_kv_cache takes a CacheShape, got {type(shape).__name__}")
        if shape.type not in self.kv_cache_types:
            raise BackendError(f"the {self.name} backend cannot keep a {shape.type.name} KV cache "
                               f"(it keeps {', '.join(sorted(t.name for t in self.kv_cache_types))})")
        return HostKVCache(shape)

