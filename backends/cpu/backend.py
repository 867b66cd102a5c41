"""CPUBackend: the checks in Python, the loops in _ops (Cython, OpenMP, GIL released).

Weights are checked once, in load_weight, which returns a _CPUWeight handle; the hot path only
checks that it was given one. Every op validates its other arguments here (with the checks
zephyr.backend shares between backends) and raises BackendError before native code sees a
buffer; _ops trusts shapes, dtypes and contiguity it has been given. `decoder_layer` runs a
whole block as one native call (kernels/layer.h), every block feature included.
"""
import weakref

import numpy as np

from zephyr import host_ops
from zephyr.backend import (FEATURES, Availability, Batch, HostBackend, HostKVCache, LayerParams, LayerWeights,
                            RopeScaling, Weight, as_index, as_positions, check_activation, check_block_params,
                            check_cache_args, check_layer_shapes, check_rope_args, check_weight)
from zephyr.errors import BackendError
from zephyr.memory import release_pages, require
from zephyr.quants import GGMLType, SUPPORTED_TYPES

try:
    from . import _ops, _openmp
    _IMPORT_ERROR = None
except ImportError as exc:  # a broken install: report it through availability()
    _ops = _openmp = None
    _IMPORT_ERROR = exc


class _CPUWeight:
    """A weight load_weight has checked: the flat bytes the kernels read, as type code `code` (the
    GGML type, or an interleaved layout of it, see kernels/interleave.h), and for a vector (a
    norm weight) its values decoded once as float32."""

    __slots__ = ("name", "type", "shape", "rows", "cols", "data", "code", "values", "source", "__weakref__")

    def __init__(self, name, type, shape, data, values=None):
        self.name, self.type, self.shape, self.data, self.values = name, type, shape, data, values
        self.code = int(type)
        self.rows = shape[0] if len(shape) == 2 else 1
        self.cols = shape[-1]

    def __repr__(self):
        return f"_CPUWeight({self.name!r}, {self.type.name}, {self.shape})"


def _activation(x, name, cols=None, rows=None):
    """x itself, if it is a C-contiguous float32 [rows, cols] numpy array."""
    return check_activation(x, name, np.ndarray, "numpy", cols, rows, " (use np.ascontiguousarray)")


def _same_shape(a, b, what):
    if a.shape != b.shape:
        raise BackendError(f"{what}: shapes {a.shape} and {b.shape} differ")


class CPUBackend(HostBackend):
    name = "cpu"
    device = "cpu"
    score = 10
    supported_types = SUPPORTED_TYPES
    options = ("threads", "repack")
    features = frozenset(FEATURES)

    @classmethod
    def availability(cls):
        if _IMPORT_ERROR is not None:
            return Availability(False, f"the compiled CPU kernels failed to import ({_IMPORT_ERROR}); "
                                       f"reinstall zephyr")
        return Availability(True)

    def __init__(self, threads: int = 0, repack=None):
        """threads <= 0: choose (OMP_NUM_THREADS, else every core this process may use).
        repack: interleave at load every matrix whose type has an interleaved kernel (True), none
        (False), or those that are faster so on this host (None; kernels/interleave.h)."""
        if _IMPORT_ERROR is not None:
            raise BackendError(self.availability().reason)
        if repack not in (None, True, False):
            raise BackendError(f"repack must be True, False or None (this host's choice), got {repack!r}")
        self.threads = _openmp.resolve_threads(int(threads))
        self.repack = repack
        self._layers = {}                      # (id(weights), id(cache), layer, params) -> _LayerPlan
        self._scratch = _ops.LayerScratch()    # run state shared by every layer, grown on demand
        self._loaded = weakref.WeakValueDictionary()   # (address, size, type, shape) -> handle

    # -- memory ---------------------------------------------------------------------------
    def load_weight(self, weight: Weight):
        """Check the weight once and keep a flat view of its bytes; matrices the current path
        interleaves (on AVX-512: Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, and Q8_0 and the other
        k-quants with short rows or on Intel, all of them with repack=True; on AVX2: all of these
        types; none with repack=False; kernels/interleave.h) are copied into that layout instead,
        and the file pages they came from are released (they would otherwise count twice in RSS)."""
        if type(weight) is _CPUWeight:
            return weight
        weight = check_weight(weight, self.name, self.supported_types)
        if not _ops.can_decode(int(weight.type)):
            raise BackendError(f"the cpu backend cannot use {weight.name!r}: type {weight.type.name} is not supported")
        data, rows = weight.data, weight.rows
        if not data.flags.c_contiguous:
            raise BackendError(f"{weight.name!r}: data must be a C-contiguous uint8 array")
        key = (data.ctypes.data, data.size, int(weight.type), tuple(weight.shape))
        loaded = self._loaded.get(key)
        if loaded is not None:   # the same tensor twice (tied embeddings): one copy
            return loaded
        handle = _CPUWeight(weight.name, GGMLType(weight.type), tuple(weight.shape), data.reshape(-1))
        interleaved = None
        if rows > 1 and _ops.interleaves(handle.code, handle.cols, self.repack):
            require(data.size, f"an interleaved copy of {weight.name!r}",
                    "free some memory, load a smaller model or turn repacking off (repack=False)")
            interleaved = _ops.interleave(handle.data, handle.code, rows, handle.cols, self.threads, self.repack)
        if interleaved is not None:
            handle.code, handle.data = interleaved
            release_pages(data)
        handle.source = data   # while the handle lives, no other tensor can take this address
        self._loaded[key] = handle
        if rows == 1:
            handle.values = np.empty((1, handle.cols), np.float32)
            _ops.embed(handle.data, int(handle.type), 1, np.zeros(1, np.int32), handle.values, 1)
            handle.values = handle.values[0]
        return handle

    # -- helpers --------------------------------------------------------------------------
    def _matrix(self, w, op):
        """A weight handle from load_weight (a bare Weight is checked now, at a cost)."""
        if type(w) is _CPUWeight:
            return w
        if isinstance(w, Weight):
            return self.load_weight(w)
        raise BackendError(f"{op} takes a weight from load_weight, got {type(w).__name__}")

    def _vector(self, w, d, op="rms_norm"):
        """A vector weight (handle or float32 array: a norm, a bias) as float32 [d]."""
        if isinstance(w, (_CPUWeight, Weight)):
            w = self._matrix(w, op)
            if w.values is None:
                raise BackendError(f"{w.name!r}: expected a vector, got shape {w.shape}")
            w = w.values
        if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 1:
            raise BackendError(f"{op}: the vector weight must be a weight handle or a 1-D float32 array")
        if w.shape[0] != d:
            raise BackendError(f"{op}: the vector weight has {w.shape[0]} values, expected {d}")
        return np.ascontiguousarray(w)

    # -- ops --------------------------------------------------------------------------------
    def matmul(self, x, w):
        w = self._matrix(w, "matmul")                        # [m, k]
        x = _activation(x, "matmul input", cols=w.cols)      # [n, k]
        out = np.empty((x.shape[0], w.rows), np.float32)     # [n, m]
        _ops.matmul(x, w.data, w.code, w.rows, out, self.threads)
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
        _ops.embed(w.data, w.code, w.rows, ids, out, self.threads)
        return out

    def rms_norm(self, x, w, eps):
        x = _activation(x, "rms_norm input")                 # [n, d]
        weight = self._vector(w, x.shape[1])                 # [d]
        out = np.empty_like(x)
        _ops.rms_norm(x, weight, float(eps), out, self.threads)
        return out

    def rope(self, x, positions, head_dim, n_rot, base, neox, scaling=RopeScaling(), freq_factors=None):
        x = _activation(x, "rope input")                     # [n, heads * head_dim]
        check_rope_args(x.shape[1], head_dim, n_rot)
        positions = as_positions(positions, x.shape[0])
        factors = None if freq_factors is None else self._vector(freq_factors, n_rot // 2, "rope")
        out = np.empty_like(x)
        _ops.rope(x, positions, int(head_dim), int(n_rot), float(base), bool(neox), _rope_scaling(scaling, n_rot, base),
                  factors, out, self.threads)
        return out

    def attention(self, cache, layer, q, k, v, batch, n_heads, n_kv_heads, window=0, scale=None, softcap=0.0):
        check_cache_args(cache, HostKVCache, layer, batch, n_heads, n_kv_heads)
        hd, n = cache.shape.head_dim, len(batch)
        q = _activation(q, "q", cols=n_heads * hd, rows=n)            # [n, h * hd]
        k = _activation(k, "k", cols=n_kv_heads * hd, rows=n)         # [n, h_kv * hd]
        v = _activation(v, "v", cols=n_kv_heads * hd, rows=n)
        scale = 1.0 / np.sqrt(hd) if scale is None else scale
        check_block_params(LayerParams(n_heads, n_kv_heads, hd, 0, 1.0, False, 1.0, 0, attn_scale=scale,
                                       attn_softcap=softcap))
        out = np.empty_like(q)
        _ops.attention(q, k, v, cache.data[layer], int(cache.shape.type), batch.positions, batch.seqs, n_heads,
                       as_index(window, "window"), float(scale), float(softcap), out, self.threads)
        return out

    def swiglu(self, gate, up):
        return self._pairwise(_ops.swiglu, "swiglu", gate, up, ("gate", "up"))   # [n, f]

    def add(self, a, b):
        return self._pairwise(_ops.add, "add", a, b, ("a", "b"))                 # [n, d]

    def add_bias(self, x, b):
        x = _activation(x, "add_bias input")                 # [n, m]
        out = np.empty_like(x)
        _ops.add_bias(x, self._vector(b, x.shape[1], "add_bias"), out, self.threads)
        return out

    def rms_norm_heads(self, x, w, head_dim, eps):
        x = _activation(x, "rms_norm_heads input")           # [n, heads * head_dim]
        head_dim = as_index(head_dim, "head_dim", minimum=1)
        if x.shape[1] % head_dim:
            raise BackendError(f"rms_norm_heads: width {x.shape[1]} is not a whole number of heads of {head_dim}")
        out = np.empty_like(x)
        _ops.rms_norm_heads(x, self._vector(w, head_dim, "rms_norm_heads"), head_dim, float(eps), out, self.threads)
        return out

    def geglu(self, gate, up):
        return self._pairwise(_ops.geglu, "geglu", gate, up, ("gate", "up"))     # [n, f]

    def _pairwise(self, kernel, op, a, b, names):
        """kernel(a, b) elementwise, over two activations of one shape."""
        a, b = _activation(a, names[0]), _activation(b, names[1])
        _same_shape(a, b, op)
        out = np.empty_like(a)
        kernel(a.reshape(-1), b.reshape(-1), out.reshape(-1), self.threads)
        return out

    # -- whole steps ------------------------------------------------------------------------
    def decoder_layer(self, x, w, p, cache, layer, batch):
        """The fused block: one native call, same values as the ops composed (kernels/layer.h)."""
        try:
            plan = self._layers.get((id(w), id(cache), layer, p))
        except TypeError:
            raise BackendError(f"layer params must be a LayerParams, got {type(p).__name__}") from None
        if plan is None:
            plan = _LayerPlan(self, w, p, cache, layer)
            self._layers[(id(w), id(cache), layer, p)] = plan
        check_cache_args(cache, HostKVCache, layer, batch, p.n_heads, p.n_kv_heads)
        x = _activation(x, "decoder_layer input", cols=plan.d, rows=len(batch))   # [n, d]
        out = x.copy()
        _ops.decoder_layer(plan.native, self._scratch, out, batch.positions, batch.seqs, self.threads)
        return out


class _LayerPlan:
    """One block's checked weights, params and cache layer, bound for _ops.decoder_layer.

    Keeps the objects its key names alive, so their ids cannot be reused while it exists."""

    def __init__(self, backend, w, p, cache, layer):
        if not isinstance(w, LayerWeights):
            raise BackendError(f"decoder_layer takes LayerWeights, got {type(w).__name__}")
        matrices = {name: backend._matrix(getattr(w, name), "decoder_layer") for name in LayerWeights.MATRICES}
        vectors = {name: backend._matrix(v, "decoder_layer") if isinstance(v, Weight) else v
                   for name, v in w.present().items() if name in LayerWeights.VECTORS}
        lengths = {name: (v.cols if isinstance(v, _CPUWeight) else np.shape(v)[-1]) for name, v in vectors.items()}
        self.d = check_layer_shapes(lambda name: matrices[name].shape, p, lengths)
        check_cache_args(cache, HostKVCache, layer, Batch.of(0, 0), p.n_heads, p.n_kv_heads)
        if cache.shape.head_dim != p.head_dim:
            raise BackendError(f"head size {p.head_dim} does not match the cache's {cache.shape.head_dim}")
        self.keep = (w, cache)
        spec = {name: (m.data, m.code, m.rows) for name, m in matrices.items()}
        values = {name: backend._vector(v, lengths[name], "decoder_layer") for name, v in vectors.items()}
        self.native = _ops.Layer(spec, values, p.n_heads, p.n_kv_heads, p.head_dim, p.rope_dims, float(p.rope_base),
                                 bool(p.rope_neox), _rope_scaling(p.rope_scaling, p.rope_dims, p.rope_base),
                                 float(p.rms_eps), p.sliding_window, float(p.scores_scale), float(p.attn_softcap),
                                 p.activation == "gelu", cache.data[layer], int(cache.shape.type))


def _rope_scaling(scaling, n_rot, base) -> tuple:
    """A RopeScaling as _ops takes it: (freq_scale, ext_factor, attn_factor, YaRN's first and last pair)."""
    if not isinstance(scaling, RopeScaling):
        raise BackendError(f"rope scaling must be a zephyr.backend.RopeScaling, got {type(scaling).__name__}")
    check_block_params(LayerParams(1, 1, 1, 0, 1.0, False, 1.0, 0, rope_scaling=scaling))
    corr = host_ops.yarn_corr_dims(n_rot, scaling.n_ctx_orig, base, scaling.beta_fast, scaling.beta_slow) \
        if scaling.ext_factor else (0.0, 0.0)
    return (float(scaling.freq_scale), float(scaling.ext_factor), float(scaling.attn_factor), *map(float, corr))
