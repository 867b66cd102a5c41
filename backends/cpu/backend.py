"""CPUBackend: the checks in Python, the loops in _ops (Cython, OpenMP, GIL released).

Every op validates its arguments here and raises BackendError before native code sees a
buffer; _ops trusts shapes, dtypes and contiguity it has been given.
"""
import numpy as np

from zephyr.backend import Availability, Backend, Weight
from zephyr.errors import BackendError
from zephyr.quants import SUPPORTED_TYPES, TYPE_INFO

try:
    from . import _ops, _openmp
    _IMPORT_ERROR = None
except ImportError as exc:  # a broken install: report it through availability()
    _ops = _openmp = None
    _IMPORT_ERROR = exc


class KVCache:
    """Per-layer key and value arrays, each [n_ctx, h_kv, hd] float32, C-contiguous."""

    def __init__(self, n_layers, n_ctx, n_kv_heads, head_dim):
        self.n_ctx, self.n_kv_heads, self.head_dim = n_ctx, n_kv_heads, head_dim
        self.k = [np.zeros((n_ctx, n_kv_heads, head_dim), np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((n_ctx, n_kv_heads, head_dim), np.float32) for _ in range(n_layers)]


def _activation(x, name, cols=None, rows=None):
    """x itself, if it is a C-contiguous float32 [rows, cols] numpy array."""
    if not isinstance(x, np.ndarray):
        raise BackendError(f"{name} must be a numpy array (use from_host), got {type(x).__name__}")
    if x.dtype != np.float32:
        raise BackendError(f"{name} must be float32, got {x.dtype}")
    if x.ndim != 2:
        raise BackendError(f"{name} must be 2-D [n, width], got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise BackendError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if cols is not None and x.shape[1] != cols:
        raise BackendError(f"{name} has width {x.shape[1]}, expected {cols}")
    if rows is not None and x.shape[0] != rows:
        raise BackendError(f"{name} has {x.shape[0]} rows, expected {rows}")
    return x


def _same_shape(a, b, what):
    if a.shape != b.shape:
        raise BackendError(f"{what}: shapes {a.shape} and {b.shape} differ")


def _index(value, name, minimum=0):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BackendError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class CPUBackend(Backend):
    name = "cpu"
    device = "cpu"
    score = 10
    supported_types = SUPPORTED_TYPES

    @classmethod
    def availability(cls):
        if _IMPORT_ERROR is not None:
            return Availability(False, f"the compiled CPU kernels failed to import ({_IMPORT_ERROR}); "
                                       f"reinstall zephyr")
        return Availability(True)

    def __init__(self, threads: int = 0):
        if _IMPORT_ERROR is not None:
            raise BackendError(self.availability().reason)
        super().__init__(_openmp.resolve_threads(int(threads)))

    # -- memory ---------------------------------------------------------------------------
    def load_weight(self, weight: Weight):
        """Check the weight once and keep a flat view of its bytes (no copy)."""
        if not isinstance(weight, Weight):
            raise BackendError(f"expected a zephyr.backend.Weight, got {type(weight).__name__}")
        if weight.type not in self.supported_types or not _ops.can_decode(int(weight.type)):
            raise BackendError(f"the cpu backend cannot use {weight.name!r}: type "
                               f"{getattr(weight.type, 'name', weight.type)} is not supported")
        if len(weight.shape) not in (1, 2) or min(weight.shape) <= 0:
            raise BackendError(f"{weight.name!r}: shape {weight.shape} is not a vector or matrix")
        block = TYPE_INFO[weight.type].block_size
        if weight.cols % block:
            raise BackendError(f"{weight.name!r}: {weight.cols} columns is not a whole number of "
                               f"{weight.type.name} blocks of {block}")
        data = weight.data
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or not data.flags.c_contiguous:
            raise BackendError(f"{weight.name!r}: data must be a C-contiguous uint8 array")
        needed = weight.rows * _ops.row_bytes(int(weight.type), weight.cols)
        if data.size != needed:
            raise BackendError(f"{weight.name!r}: {data.size} bytes of data, but shape {weight.shape} "
                               f"of {weight.type.name} takes {needed}")
        if data.ndim == 1:
            return weight
        return Weight(weight.name, weight.type, tuple(weight.shape), data.reshape(-1))

    def from_host(self, x):
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_host(self, x):
        return np.asarray(x, dtype=np.float32)

    def new_kv_cache(self, n_layers, n_ctx, n_kv_heads, head_dim):
        for name, value in (("n_layers", n_layers), ("n_ctx", n_ctx), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim)):
            _index(value, name, minimum=1)
        return KVCache(n_layers, n_ctx, n_kv_heads, head_dim)

    # -- helpers --------------------------------------------------------------------------
    def _matrix(self, w, op):
        """A weight handle from load_weight, re-checked cheaply (it may be a bare Weight)."""
        if not isinstance(w, Weight):
            raise BackendError(f"{op} takes a weight from load_weight, got {type(w).__name__}")
        return self.load_weight(w)

    def _vector(self, w, d):
        """A norm weight (handle or float32 array) as float32 [d]."""
        if isinstance(w, Weight):
            w = self.load_weight(w)
            if w.rows != 1:
                raise BackendError(f"{w.name!r}: expected a vector, got shape {w.shape}")
            values = np.empty((1, w.cols), np.float32)
            _ops.embed(w.data, int(w.type), 1, np.zeros(1, np.int32), values, self.threads)
            w = values[0]
        if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 1:
            raise BackendError("norm weight must be a weight handle or a 1-D float32 array")
        if w.shape[0] != d:
            raise BackendError(f"norm weight has {w.shape[0]} values, input rows have {d}")
        return np.ascontiguousarray(w)

    # -- ops --------------------------------------------------------------------------------
    def matmul(self, x, w):
        w = self._matrix(w, "matmul")                        # [m, k]
        x = _activation(x, "matmul input", cols=w.cols)      # [n, k]
        out = np.empty((x.shape[0], w.rows), np.float32)     # [n, m]
        _ops.matmul(x, w.data, int(w.type), w.rows, out, self.threads)
        return out

    def embed(self, w, ids):
        w = self._matrix(w, "embed")                         # [vocab, d]
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.dtype.kind in "iu" or ids.size == 0):
            raise BackendError(f"token ids must be a 1-D integer array, got {ids.dtype} shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= w.rows):
            raise BackendError(f"token ids must lie in [0, {w.rows}), got {ids.min()}..{ids.max()}")
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        out = np.empty((ids.size, w.cols), np.float32)       # [n, d]
        _ops.embed(w.data, int(w.type), w.rows, ids, out, self.threads)
        return out

    def rms_norm(self, x, w, eps):
        x = _activation(x, "rms_norm input")                 # [n, d]
        weight = self._vector(w, x.shape[1])                 # [d]
        out = np.empty_like(x)
        _ops.rms_norm(x, weight, float(eps), out, self.threads)
        return out

    def rope(self, x, start_pos, head_dim, n_rot, base, neox):
        x = _activation(x, "rope input")                     # [n, heads * head_dim]
        start_pos = _index(start_pos, "start_pos")
        head_dim = _index(head_dim, "head_dim", minimum=1)
        n_rot = _index(n_rot, "n_rot")
        if x.shape[1] % head_dim:
            raise BackendError(f"rope input width {x.shape[1]} is not a multiple of head_dim {head_dim}")
        if n_rot % 2 or n_rot > head_dim:
            raise BackendError(f"n_rot must be even and at most head_dim {head_dim}, got {n_rot}")
        out = np.empty_like(x)
        _ops.rope(x, start_pos, head_dim, n_rot, float(base), bool(neox), out, self.threads)
        return out

    def attention(self, cache, layer, q, k, v, start_pos, n_heads, n_kv_heads, window=0):
        if not isinstance(cache, KVCache):
            raise BackendError(f"attention takes a cache from new_kv_cache, got {type(cache).__name__}")
        layer = _index(layer, "layer")
        if layer >= len(cache.k):
            raise BackendError(f"layer {layer} is outside the cache's {len(cache.k)} layers")
        n_heads = _index(n_heads, "n_heads", minimum=1)
        n_kv_heads = _index(n_kv_heads, "n_kv_heads", minimum=1)
        if n_kv_heads != cache.n_kv_heads or n_heads % n_kv_heads:
            raise BackendError(f"{n_heads} query heads over {n_kv_heads} kv heads do not fit a cache "
                               f"of {cache.n_kv_heads} kv heads")
        start_pos = _index(start_pos, "start_pos")
        window = _index(window, "window")
        hd = cache.head_dim
        q = _activation(q, "q", cols=n_heads * hd)           # [n, h * hd]
        n = q.shape[0]
        k = _activation(k, "k", cols=n_kv_heads * hd, rows=n)  # [n, h_kv * hd]
        v = _activation(v, "v", cols=n_kv_heads * hd, rows=n)
        if start_pos + n > cache.n_ctx:
            raise BackendError(f"positions {start_pos}..{start_pos + n - 1} do not fit a cache of "
                               f"{cache.n_ctx} positions")
        out = np.empty_like(q)
        _ops.attention(q, k, v, cache.k[layer], cache.v[layer], start_pos, n_heads, n_kv_heads,
                       window, out, self.threads)
        return out

    def swiglu(self, gate, up):
        gate = _activation(gate, "gate")                     # [n, f]
        up = _activation(up, "up")
        _same_shape(gate, up, "swiglu")
        out = np.empty_like(gate)
        _ops.swiglu(gate.reshape(-1), up.reshape(-1), out.reshape(-1), self.threads)
        return out

    def add(self, a, b):
        a = _activation(a, "a")                              # [n, d]
        b = _activation(b, "b")
        _same_shape(a, b, "add")
        out = np.empty_like(a)
        _ops.add(a.reshape(-1), b.reshape(-1), out.reshape(-1), self.threads)
        return out
