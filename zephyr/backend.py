"""The backend interface: what every compute backend (built-in or third-party) implements.

The model graph (zephyr.model) only ever calls these operations; it never sees SIMD, CUDA or
quant block layouts. Arrays that a backend returns ("activations") are its own type (numpy for CPU
backends, device arrays for GPU ones); they cross to another backend only through `to_host` and
`from_host`.

Shapes: n = tokens in the batch, k = input width, m = output rows, d = model width,
hd = head dim, h = query heads, h_kv = key/value heads, T = cache length.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .errors import BackendError
from .quants import GGMLType

# Bumped whenever the abstract methods below change in an incompatible way.
BACKEND_API_VERSION = 1

OPS = ("matmul", "embed", "rms_norm", "rope", "attention", "swiglu", "add", "decoder_layer")


def check_activation(x, name, array_type, kind, cols=None, rows=None, contiguous_hint=""):
    """x itself, if it is a C-contiguous float32 [rows, cols] `array_type` (the backend's array
    class; `kind` names it in messages), else a BackendError saying what is wrong. The check every
    backend makes of the activations its ops are given."""
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


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on this machine, and if not, why not."""

    available: bool
    reason: str = ""

    def __bool__(self):
        return self.available


class Backend(ABC):
    """One compute backend. Subclasses set the class attributes and implement every op.

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
    # Optional: the ops this backend implements; all of OPS by default.
    supported_ops: frozenset = frozenset(OPS)

    @classmethod
    def availability(cls) -> Availability:
        """Optional; default: always available."""
        return Availability(True)

    def __init__(self, threads: int = 0):
        """`threads` <= 0 means: choose (honouring OMP_NUM_THREADS)."""
        self.threads = threads

    @classmethod
    def supports(cls, op: str, type: GGMLType = None) -> bool:
        """Whether `op` (one of OPS) runs here, for weights of `type` where that matters."""
        if op not in cls.supported_ops:
            return False
        return type is None or type in cls.supported_types

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
    def new_kv_cache(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int):
        """A key/value cache for `n_layers` layers (numbered 0..n_layers-1 locally)."""

    # -- ops --------------------------------------------------------------------------------
    @abstractmethod
    def matmul(self, x, w):
        """x: [n, k] f32, w: weight [m, k] of any supported type -> [n, m] f32 (x @ w.T)."""

    @abstractmethod
    def embed(self, w, ids: np.ndarray):
        """w: weight [vocab, d]; ids: int32 [n] -> rows [n, d] f32."""

    @abstractmethod
    def rms_norm(self, x, w, eps: float):
        """x: [n, d]; w: f32 weight [d] -> x / sqrt(mean(x^2) + eps) * w."""

    @abstractmethod
    def rope(self, x, start_pos: int, head_dim: int, n_rot: int, base: float, neox: bool):
        """Rotate x: [n, heads * head_dim] in place or not; token i sits at start_pos + i.

        The first n_rot dims of every head rotate; pairs are adjacent (2j, 2j+1) in llama's
        "normal" mode and (j, j + n_rot/2) when `neox`. theta = pos * base^(-2j/n_rot).
        """

    @abstractmethod
    def attention(self, cache, layer: int, q, k, v, start_pos: int, n_heads: int,
                  n_kv_heads: int, window: int = 0):
        """Causal grouped-query attention, storing k and v into the cache first.

        q: [n, h * hd]; k, v: [n, h_kv * hd]; token i sits at start_pos + i and attends to
        cache positions p <= start_pos + i (and p > start_pos + i - window when window > 0).
        Scale 1/sqrt(hd). Query head j reads kv head j // (h / h_kv). -> [n, h * hd]
        """

    @abstractmethod
    def swiglu(self, gate, up):
        """silu(gate) * up, both [n, f]."""

    @abstractmethod
    def add(self, a, b):
        """a + b, both [n, d]."""

    # -- whole steps ------------------------------------------------------------------------
    def decoder_layer(self, x, w: LayerWeights, p: LayerParams, cache, layer: int, start_pos: int):
        """One pre-norm llama block on x: [n, d] -> [n, d]; token i sits at start_pos + i.

        Optional: this default composes the ops above. A backend may override it with a fused
        implementation (one native call per layer) that must match this one.
        """
        h = self.rms_norm(x, w.attn_norm, p.rms_eps)                                  # h: [n, d]
        q = self.rope(self.matmul(h, w.wq), start_pos, p.head_dim, p.rope_dims, p.rope_base, p.rope_neox)
        k = self.rope(self.matmul(h, w.wk), start_pos, p.head_dim, p.rope_dims, p.rope_base, p.rope_neox)
        v = self.matmul(h, w.wv)                                                      # k, v: [n, h_kv * hd]
        attn = self.attention(cache, layer, q, k, v, start_pos, p.n_heads, p.n_kv_heads, p.sliding_window)
        x = self.add(x, self.matmul(attn, w.wo))
        h = self.rms_norm(x, w.ffn_norm, p.rms_eps)
        f = self.swiglu(self.matmul(h, w.w_gate), self.matmul(h, w.w_up))            # f: [n, f]
        return self.add(x, self.matmul(f, w.w_down))
