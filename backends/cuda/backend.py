"""CudaBackend: zephyr's ops on an NVIDIA GPU, through CuPy raw kernels (kernels/*.cu) and cuBLAS.

Activations are CuPy float32 arrays [n, width]. Weights are uploaded once at load, still quantised
(rearranged into planes, see layout.py). Every call checks its arguments here and raises
BackendError before a kernel sees a buffer.

Two matrix paths:
- n <= DECODE_MAX_TOKENS (decode): matrix-vector kernels. For quantised weights the activations are
  first rounded to 8-bit blocks exactly as the reference backend's matmul rounds them (Q8_0 style
  for Q4_0..Q8_0, Q8_K style for the k-quants), then meet the weights in integer dot products, so
  results differ from the reference only in float summation order.
- n > DECODE_MAX_TOKENS (prompts): weight rows are dequantised to f16 in bounded chunks and
  multiplied by cuBLAS with f16 activations (f32 accumulation and output); F32 weights stay f32.
  This path rounds x and the weights to f16 instead of rounding x to 8 bits.

The KV cache keeps f16 (the default) or f32 values; attention reads either into f32 sums. Kernels
find each token's position and sequence in device int32 arrays, so a batch may mix sequences and
one captured graph serves every batch of its size.

All work runs on one stream per backend instance. Decode steps of consecutive layers are captured
as one CUDA graph and replayed (graphs.py); `ZEPHYR_CUDA_GRAPHS=0` turns that off.
"""
import math
import os

import numpy as np

from zephyr.backend import (Backend, Batch, CacheShape, KVCache, LayerParams, LayerWeights, Weight, as_index,
                            as_positions, check_activation, check_cache_args, check_layer_shapes, check_rope_args,
                            check_weight)
from zephyr.errors import BackendError
from zephyr.quants import GGMLType, SUPPORTED_TYPES, TYPE_INFO

from . import layout, runtime
from .graphs import DecodeGraphs, LayerCall

DECODE_MAX_TOKENS = 8          # up to this many tokens: matrix-vector kernels with 8-bit activations
DEQUANT_CHUNK_VALUES = 1 << 25  # f16 scratch of the prompt path: 64 MiB
MAX_HEAD_DIM = 256             # attention.cu: a lane keeps head_dim / 32 output values in registers
ATTENTION_WARPS = 4            # warps per block of attention.cu
MATVEC_ROWS = 4                # rows per block of matvec.cu
ELEMENTWISE_BLOCKS = 4096      # grid-stride kernels: at most this many blocks of 256

_NULL = np.uint64(0)

# The 8-bit activation formats of the kernels (the q_format argument of norm.cu): as
# zephyr.quants.quantize_q8_0 rounds (blocks of 32) and as quantize_q8_k rounds (blocks of 256),
# by the weight type's activation type.
Q8_0_STYLE, Q8_K_STYLE = 0, 1
_STYLES = {GGMLType.Q8_0: Q8_0_STYLE, GGMLType.Q8_K: Q8_K_STYLE}


def _i32(v):
    return np.int32(v)


def _f32(v):
    return np.float32(v)


class DeviceWeight:
    """A weight on the device: one buffer holding its planes (layout.py), still quantised."""

    __slots__ = ("name", "type", "shape", "rows", "cols", "buffer", "planes")

    def __init__(self, name, type, shape, buffer, planes):
        self.name, self.type, self.shape = name, type, tuple(shape)
        self.rows = shape[0] if len(shape) == 2 else 1
        self.cols = shape[-1]
        self.buffer, self.planes = buffer, planes

    @property
    def quantised(self) -> bool:
        """Whether x meets this weight as 8-bit blocks (see activation_format)."""
        return self.activation_format is not None

    @property
    def activation_format(self):
        """How matmul rounds x for this weight on the decode path: Q8_0_STYLE, Q8_K_STYLE or None."""
        return _STYLES.get(TYPE_INFO[self.type].activation_type)

    def kernel_planes(self) -> tuple:
        """The four plane arguments of the quantised kernels (unused ones repeat plane 0)."""
        return tuple(self.planes) + (self.planes[0],) * (4 - len(self.planes))

    def matrix(self, dtype):
        """An F32 or F16 weight as a [rows, cols] array of `dtype` (no copy)."""
        return self.planes[0].view(dtype).reshape(self.rows, self.cols)

    def __repr__(self):
        return f"DeviceWeight({self.name!r}, {self.type.name}, {list(self.shape)})"


class CudaKVCache(KVCache):
    """Keys and values of every layer on the device: `data` [n_layers, 2 (keys, values), n_seqs,
    h_kv, n_ctx, hd] of float16 or float32 (head-major: the keys one kv head reads lie in one run),
    the bytes a HostKVCache of the same shape holds, so read_sequence's bytes move between backends.

    `splits`: how many shares of the visible keys a decode query is spread over (flash-decoding):
    enough warps to keep a large GPU busy with one token's attention (64 splits x 8 kv heads of a
    7B model), a few keys each at short contexts.
    """

    def __init__(self, gpu, shape: CacheShape):
        self.shape = shape
        self._cp, self._stream = gpu.cp, gpu.stream
        dtype = gpu.cp.float16 if shape.type == GGMLType.F16 else gpu.cp.float32
        with self._stream:
            self.data = self._cp.zeros((shape.n_layers, 2, shape.n_seqs, shape.n_kv_heads, shape.n_ctx,
                                        shape.head_dim), dtype=dtype)
        self.splits = max(1, min(64, shape.n_ctx // 16))
        self.kernel_type = shape.type.name.lower()   # names the attention_* and rope_store_* kernels

    def layer(self, layer: int) -> tuple:
        """The keys and values of one layer: [n_seqs, h_kv, n_ctx, hd] each (contiguous)."""
        return self.data[layer, 0], self.data[layer, 1]

    def copy_sequence(self, src, dst, length):
        src, length = self.check_sequence(src, length)
        dst, _ = self.check_sequence(dst, length)
        with self._stream:
            self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]

    def read_sequence(self, seq, length):
        seq, length = self.check_sequence(seq, length)
        with self._stream:
            host = self._cp.ascontiguousarray(self.data[:, :, seq, :, :length]).get(stream=self._stream)
        self._stream.synchronize()
        return host.view(np.uint8)   # [n_layers, 2, h_kv, length, row_bytes]

    def write_sequence(self, seq, data):
        seq, _ = self.check_sequence(seq, 0)
        data = self.check_saved(data)
        if not data.shape[3]:
            return
        values = np.ascontiguousarray(data).view(self.data.dtype)
        with self._stream:
            staged = self._cp.empty(values.shape, dtype=self.data.dtype)
            staged.set(values, stream=self._stream)
            self.data[:, :, seq, :, :values.shape[3]] = staged


class _Scratch:
    """Fixed intermediate buffers of a decode-path layer for n tokens (reused; a captured graph
    points into them)."""

    def __init__(self, cp, n, d, q_width, kv_width, ffn, n_heads, head_dim, splits):
        f32 = cp.float32
        self.h = cp.empty((n, d), f32)                    # normed hidden state
        # ... as 8-bit blocks of each style, and their (d, d * sum) pairs
        self.hq = [cp.empty((n, d), cp.int8) for _ in (Q8_0_STYLE, Q8_K_STYLE)]
        self.hs = [cp.empty((n, d // 16), f32) for _ in (Q8_0_STYLE, Q8_K_STYLE)]
        self.q = cp.empty((n, q_width), f32)
        self.k = cp.empty((n, kv_width), f32)
        self.v = cp.empty((n, kv_width), f32)
        self.attn = cp.empty((n, q_width), f32)
        self.attn_q = cp.empty((n, q_width), cp.int8)
        self.attn_s = cp.empty((n, q_width // 16), f32)
        self.mid = cp.empty((n, d), f32)                  # residual stream after attention
        self.gate = cp.empty((n, ffn), f32)
        self.up = cp.empty((n, ffn), f32)
        self.f = cp.empty((n, ffn), f32)
        self.f_q = cp.empty((n, ffn), cp.int8)
        self.f_s = cp.empty((n, ffn // 16), f32)
        self.part = cp.empty(n * n_heads * splits * (head_dim + 2), f32)


class CudaBackend(Backend):
    name = "cuda"
    device = "gpu"
    score = 100
    supported_types = SUPPORTED_TYPES
    kv_cache_types = frozenset({GGMLType.F16, GGMLType.F32})

    @classmethod
    def availability(cls):
        return runtime.availability()

    def __init__(self, gpu=None):
        """gpu: what runs the work (default: runtime.CupyGPU(), CuPy on the current device)."""
        if gpu is None:
            usable = runtime.availability()
            if not usable:
                raise BackendError(f"the cuda backend cannot run here: {usable.reason}")
            gpu = runtime.CupyGPU()
        self.gpu = gpu
        self.cp, self.stream, self.kernels = gpu.cp, gpu.stream, gpu.kernels
        with self.stream:
            # positions (row 0) and sequences (row 1) of the tokens of a decode-path batch, read by its kernels
            self._batch = self.cp.zeros((2, DECODE_MAX_TOKENS), dtype=self.cp.int32)
        self._batch_value = Batch.of(0, 0)
        self._scratch = {}
        self.cuda_graphs = os.environ.get("ZEPHYR_CUDA_GRAPHS", "1") != "0"
        self.graphs = DecodeGraphs(self)

    # -- memory ---------------------------------------------------------------------------
    def memory_available(self):
        """Free device memory (what the model checks a KV cache against before allocating it)."""
        return self.gpu.memory_available()

    def load_weight(self, weight: Weight):
        """Check the weight, upload its bytes once and rearrange them into planes on the device."""
        weight = check_weight(weight, self.name, self.supported_types)
        cp = self.cp
        with self.stream:
            raw = cp.empty(weight.data.size, dtype=cp.uint8)
            raw.set(np.ascontiguousarray(weight.data), stream=self.stream)
            buffer, planes = layout.pack(cp, raw, weight.type, weight.rows, weight.cols)
        return DeviceWeight(weight.name, weight.type, weight.shape, buffer, planes)

    def from_host(self, x):
        host = np.ascontiguousarray(x, dtype=np.float32)
        with self.stream:
            out = self.cp.empty(host.shape, dtype=self.cp.float32)
            if host.size:
                out.set(host, stream=self.stream)
        return out

    def to_host(self, x):
        if isinstance(x, np.ndarray):
            return np.asarray(x, dtype=np.float32)
        host = x.get(stream=self.stream)
        self.stream.synchronize()
        return np.asarray(host, dtype=np.float32)

    def new_kv_cache(self, shape: CacheShape) -> CudaKVCache:
        if not isinstance(shape, CacheShape):
            raise BackendError(f"new_kv_cache takes a CacheShape, got {type(shape).__name__}")
        if shape.type not in self.kv_cache_types:
            raise BackendError(f"the cuda backend cannot keep a {shape.type.name} KV cache "
                               f"(it keeps {', '.join(sorted(t.name for t in self.kv_cache_types))})")
        if shape.head_dim > MAX_HEAD_DIM or shape.head_dim % 4:
            raise BackendError(f"the cuda backend needs a head size that is a multiple of 4 and at most "
                               f"{MAX_HEAD_DIM}, got {shape.head_dim}")
        return CudaKVCache(self.gpu, shape)

    # -- checks ---------------------------------------------------------------------------
    def _activation(self, x, name, cols=None, rows=None):
        """x itself, if it is a C-contiguous float32 [rows, cols] CuPy array."""
        return check_activation(x, name, self.cp.ndarray, "CuPy", cols, rows)

    def _matrix(self, w, op):
        if not isinstance(w, DeviceWeight):
            raise BackendError(f"{op} takes a weight from the cuda backend's load_weight, got {type(w).__name__}")
        return w

    def _vector(self, w, d):
        """A norm weight (handle, or float32 array) as a float32 [d] device array."""
        if isinstance(w, DeviceWeight):
            if w.type != GGMLType.F32 or w.rows != 1:
                raise BackendError(f"{w.name!r}: a norm weight must be an F32 vector, got {w.type.name} {list(w.shape)}")
            values = w.planes[0].view(np.float32)
        elif isinstance(w, self.cp.ndarray):
            values = self.cp.ascontiguousarray(w.reshape(-1), dtype=self.cp.float32)
        else:
            values = self.from_host(np.asarray(w, dtype=np.float32).reshape(-1))
        if values.shape[0] != d:
            raise BackendError(f"norm weight has {values.shape[0]} values, expected {d}")
        return values

    # -- launches ---------------------------------------------------------------------------
    def _launch(self, name, grid, block, *args):
        self.kernels[name](grid, block, args)

    def _elementwise(self, name, count, *args):
        blocks = max(1, min(ELEMENTWISE_BLOCKS, -(-count // 256)))
        self._launch(name, (blocks,), (256,), *args, np.int64(count))

    def _quantize(self, x, q, s, style):
        """x: [n, k] f32 -> q: int8 [n, k], s: f32 [n, k / 16] (the 8-bit blocks of quantize.cu)."""
        n, k = x.shape
        if style == Q8_K_STYLE:
            self._launch("quantize_q8_k", (-(-k // 2048), n), (256,), x, _i32(k), q, s)
        else:
            self._launch("quantize_q8_0", (-(-k // 256), n), (256,), x, _i32(k), q, s)

    def _rms_norm(self, x, w, eps, y=None, q=None, s=None, style=Q8_0_STYLE):
        n, d = x.shape
        threads = min(1024, max(256, -(-d // 128) * 32))   # about 4 values a thread: one row is the whole grid at n = 1
        self._launch("rms_norm", (n,), (threads,), x, w, _f32(eps), _i32(d), _NULL if y is None else y,
                     _NULL if q is None else q, _NULL if s is None else s, _i32(style))

    def _norm_for(self, x, w, eps, consumers, h, hq, hs):
        """RMSNorm of x into h, plus the 8-bit forms (hq[style], hs[style]) the consumers need."""
        styles = sorted({m.activation_format for m in consumers} - {None})
        first = styles[0] if styles else None
        if first is None:
            self._rms_norm(x, w, eps, y=h)
        else:
            self._rms_norm(x, w, eps, y=h, q=hq[first], s=hs[first], style=first)
        for style in styles[1:]:
            self._quantize(h, hq[style], hs[style], style)

    def _matvec(self, w, x, xq, xs, y, resid=None):
        """Decode path, n <= DECODE_MAX_TOKENS: y = x w^T (+ resid). xq, xs: x as 8-bit blocks
        (used, and needed, for quantised weights only)."""
        n = x.shape[0]
        name = f"mv_{w.type.name.lower()}_{1 if n == 1 else DECODE_MAX_TOKENS}"
        grid = (-(-w.rows // MATVEC_ROWS),)
        r = _NULL if resid is None else resid
        if w.quantised:
            self._launch(name, grid, (32 * MATVEC_ROWS,), *w.kernel_planes(), _i32(w.rows), _i32(w.cols), _i32(n),
                         xq, xs, y, r)
        else:
            self._launch(name, grid, (32 * MATVEC_ROWS,), w.planes[0], _i32(w.rows), _i32(w.cols), _i32(n), x, y, r)

    def _matvec_glu(self, gate, up, x, xq, xs, y):
        """Decode path: y = silu(x gate^T) * (x up^T), gate and up of one type."""
        n = x.shape[0]
        name = f"mvglu_{gate.type.name.lower()}_{1 if n == 1 else DECODE_MAX_TOKENS}"
        grid = (-(-gate.rows // MATVEC_ROWS),)
        if gate.quantised:
            self._launch(name, grid, (32 * MATVEC_ROWS,), *gate.kernel_planes(), *up.kernel_planes(),
                         _i32(gate.rows), _i32(gate.cols), _i32(n), xq, xs, y)
        else:
            self._launch(name, grid, (32 * MATVEC_ROWS,), gate.planes[0], up.planes[0], _i32(gate.rows),
                         _i32(gate.cols), _i32(n), x, y)

    def _gemm(self, x, w, y, resid=None, x16=None):
        """Prompt path: y = x w^T (+ resid) through cuBLAS. x16: x already as f16, if at hand."""
        cp = self.cp
        n, k = x.shape
        m = w.rows
        if resid is not None:
            y[...] = resid
        accumulate = resid is not None
        if w.type == GGMLType.F32:
            self.gpu.gemm(w.matrix(cp.float32), x, y, 0, accumulate)
            return
        if x16 is None:
            x16 = cp.empty((n, k), dtype=cp.float16)
            self._elementwise("to_f16", n * k, x, x16)
        if w.type == GGMLType.F16:
            self.gpu.gemm(w.matrix(cp.float16), x16, y, 0, accumulate)
            return
        chunk = max(1, min(m, DEQUANT_CHUNK_VALUES // k))
        tile = cp.empty((chunk, k), dtype=cp.float16)
        planes = w.kernel_planes()
        for row0 in range(0, m, chunk):
            rows = min(chunk, m - row0)
            blocks = max(1, min(ELEMENTWISE_BLOCKS, -(-rows * k // 256)))
            self._launch(f"dequant_f16_{w.type.name.lower()}", (blocks,), (256,), *planes, _i32(row0), _i32(rows),
                         _i32(k), tile)
            self.gpu.gemm(tile[:rows], x16, y, row0, accumulate)

    def _matmul_into(self, x, w, y, resid=None, xq=None, xs=None, x16=None):
        """y = x w^T (+ resid), choosing the decode or the prompt path by n."""
        n = x.shape[0]
        if n == 0:
            return
        if n > DECODE_MAX_TOKENS:
            self._gemm(x, w, y, resid, x16)
            return
        if w.quantised and xq is None:
            xq = self.cp.empty(x.shape, dtype=self.cp.int8)
            xs = self.cp.empty((n, x.shape[1] // 16), dtype=self.cp.float32)
            self._quantize(x, xq, xs, w.activation_format)
        self._matvec(w, x, xq, xs, y, resid)

    def _rope_store(self, cache, layer, q, k, v, n, n_heads, n_rot, base, neox, pos, seq):
        """Rotate q [n, n_heads * hd] in place and k [n, h_kv * hd] into the cache, v beside it:
        token t at row pos[t] of sequence seq[t] of layer `layer` (pos, seq: device int32 [n])."""
        s = cache.shape
        keys, values = cache.layer(layer)
        self._launch(f"rope_store_{cache.kernel_type}", (n, n_heads + s.n_kv_heads), (64,), q, k, v, keys, values,
                     _i32(n_heads), _i32(s.n_kv_heads), _i32(s.head_dim), _i32(n_rot), _f32(base), _i32(bool(neox)),
                     pos, seq, _i32(s.n_ctx))

    def _attend(self, q, cache, layer, out, n, n_heads, window, pos, seq, part=None):
        """Attention of q [n, h * hd] over layer `layer` of the cache (keys already stored) -> out;
        token t at row pos[t] of sequence seq[t] (device int32 [n])."""
        cp = self.cp
        s = cache.shape
        hd, n_kv = s.head_dim, s.n_kv_heads
        splits = cache.splits if n <= DECODE_MAX_TOKENS else 1
        if splits > 1 and part is None:
            part = cp.empty(n * n_heads * splits * (hd + 2), dtype=cp.float32)
        pieces = -(-(n_heads // n_kv) // 8)
        grid = (-(-n * splits // ATTENTION_WARPS), n_kv * pieces)
        keys, values = cache.layer(layer)
        self._launch(f"attention_{cache.kernel_type}", grid, (32 * ATTENTION_WARPS,), q, keys, values, out,
                     part if splits > 1 else _NULL, _i32(n), _i32(n_heads), _i32(n_kv), _i32(hd),
                     _f32(1.0 / math.sqrt(hd)), _i32(window), pos, seq, _i32(s.n_ctx), _i32(splits))
        if splits > 1:
            self._launch("attention_combine", (n * n_heads,), (128,), part, out, _i32(hd), _i32(splits))

    def _set_batch(self, batch: Batch):
        """Write the decode kernels' token positions and sequences to the device (stream-ordered)."""
        if batch is self._batch_value or batch == self._batch_value:
            return
        host = np.zeros((2, DECODE_MAX_TOKENS), dtype=np.int32)
        host[0, :len(batch)], host[1, :len(batch)] = batch.positions, batch.seqs
        self._batch.set(host, stream=self.stream)
        self._batch_value = batch

    def _upload_ints(self, values):
        """An int32 host array as a new device array (stream-ordered)."""
        device = self.cp.empty(values.shape, dtype=self.cp.int32)
        device.set(np.ascontiguousarray(values, dtype=np.int32), stream=self.stream)
        return device

    # -- ops --------------------------------------------------------------------------------
    def matmul(self, x, w):
        w = self._matrix(w, "matmul")
        x = self._activation(x, "matmul input", cols=w.cols)
        with self.stream:
            y = self.cp.empty((x.shape[0], w.rows), dtype=self.cp.float32)
            self._matmul_into(x, w, y)
        return y

    def embed(self, w, ids):
        w = self._matrix(w, "embed")
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (
                ids.size and (ids.min() < 0 or ids.max() >= w.rows)):
            raise BackendError(f"token ids must be a 1-D integer array in [0, {w.rows}), got {ids!r}")
        with self.stream:
            out = self.cp.empty((ids.size, w.cols), dtype=self.cp.float32)
            if ids.size:
                device_ids = self.cp.empty(ids.size, dtype=self.cp.int32)
                device_ids.set(ids.astype(np.int32), stream=self.stream)
                self._launch(f"embed_{w.type.name.lower()}", (ids.size, -(-w.cols // 256)), (256,),
                             *w.kernel_planes(), _i32(w.cols), device_ids, out)
        return out

    def rms_norm(self, x, w, eps):
        x = self._activation(x, "rms_norm input")
        with self.stream:
            weight = self._vector(w, x.shape[1])
            y = self.cp.empty_like(x)
            if x.shape[0]:
                self._rms_norm(x, weight, eps, y=y)
        return y

    def rope(self, x, positions, head_dim, n_rot, base, neox):
        x = self._activation(x, "rope input")                    # [n, heads * head_dim]
        n, width = x.shape
        check_rope_args(width, head_dim, n_rot)
        positions = as_positions(positions, n)
        with self.stream:
            y = self.cp.empty_like(x)
            if n:
                self._launch("rope", (n, width // head_dim), (64,), x, y, _i32(width // head_dim), _i32(head_dim),
                             _i32(n_rot), _f32(base), _i32(bool(neox)), self._upload_ints(positions))
        return y

    def attention(self, cache, layer, q, k, v, batch, n_heads, n_kv_heads, window=0):
        check_cache_args(cache, CudaKVCache, layer, batch, n_heads, n_kv_heads)
        n, hd = len(batch), cache.shape.head_dim
        q = self._activation(q, "q", cols=n_heads * hd, rows=n)          # [n, h * hd]
        k = self._activation(k, "k", cols=n_kv_heads * hd, rows=n)       # [n, h_kv * hd]
        v = self._activation(v, "v", cols=n_kv_heads * hd, rows=n)
        window = as_index(window, "window")
        with self.stream:
            out = self.cp.empty_like(q)
            if n:
                pos, seq = self._upload_ints(np.stack([batch.positions, batch.seqs]))
                self._rope_store(cache, layer, _NULL, k, v, n, 0, 0, 0.0, False, pos, seq)   # no rotation: a store
                self._attend(q, cache, layer, out, n, n_heads, window, pos, seq)
        return out

    def swiglu(self, gate, up):
        gate = self._activation(gate, "gate")
        up = self._activation(up, "up")
        if gate.shape != up.shape:
            raise BackendError(f"gate {gate.shape} and up {up.shape} differ in shape")
        with self.stream:
            y = self.cp.empty_like(gate)
            if gate.size:
                self._elementwise("swiglu", gate.size, gate, up, y, _NULL)
        return y

    def add(self, a, b):
        a, b = self._activation(a, "a"), self._activation(b, "b")
        if a.shape != b.shape:
            raise BackendError(f"cannot add arrays of shapes {a.shape} and {b.shape}")
        with self.stream:
            y = self.cp.empty_like(a)
            if a.size:
                self._elementwise("add", a.size, a, b, y)
        return y

    # -- whole layers -------------------------------------------------------------------------
    def decoder_layer(self, x, w: LayerWeights, p: LayerParams, cache, layer: int, batch: Batch):
        """The default block graph, fused: norms write 8-bit activations, residual adds ride on the
        output projections, rope writes the cache, gate and up share one kernel. Decode steps of
        consecutive layers run as a CUDA graph once a step has been seen (graphs.py)."""
        if self.cuda_graphs:
            out = self.graphs.follow(x, w, p, cache, layer, batch)   # a layer of the step being replayed
            if out is not None:
                return out
        d = self._check_layer(w, p)
        check_cache_args(cache, CudaKVCache, layer, batch, p.n_heads, p.n_kv_heads)
        if cache.shape.head_dim != p.head_dim:
            raise BackendError(f"head size {p.head_dim} does not match the cache's {cache.shape.head_dim}")
        n = len(batch)
        x = self._activation(x, "decoder_layer input", cols=d, rows=n)   # [n, d]
        if n == 0:
            return x
        call = LayerCall(w, p, cache, int(layer))
        decode = n <= DECODE_MAX_TOKENS
        if decode and self.cuda_graphs:
            out = self.graphs.run(x, call, batch)
            if out is not None:
                return out
        with self.stream:
            out = self.cp.empty_like(x)
            if decode:
                self._set_batch(batch)
                self.layer_decode(x, out, call)
            else:
                self._layer_prompt(x, out, call, batch)
        if decode and self.cuda_graphs:
            self.graphs.record(call, out, batch)
        return out

    def _check_layer(self, w: LayerWeights, p: LayerParams) -> int:
        """Check that the layer's weights fit each other and the params; return the model width."""
        if not isinstance(w, LayerWeights):
            raise BackendError(f"decoder_layer takes LayerWeights, got {type(w).__name__}")
        matrices = {name: self._matrix(getattr(w, name), "decoder_layer") for name in LayerWeights.MATRICES}
        return check_layer_shapes(lambda name: (matrices[name].rows, matrices[name].cols), p)

    def scratch(self, n, call: LayerCall):
        """The decode-path buffers for n tokens of this layer's shapes (made once)."""
        w, p = call.weights, call.params
        key = (n, w.wq.cols, w.wq.rows, w.wk.rows, w.w_gate.rows, p.n_heads, p.head_dim, call.cache.splits)
        scratch = self._scratch.get(key)
        if scratch is None:
            with self.stream:
                scratch = _Scratch(self.cp, n, w.wq.cols, w.wq.rows, w.wk.rows, w.w_gate.rows, p.n_heads,
                                   p.head_dim, call.cache.splits)
            self._scratch[key] = scratch
        return scratch

    def layer_decode(self, x, out, call: LayerCall):
        """One layer for n <= DECODE_MAX_TOKENS tokens placed by the device batch (_set_batch): x -> out.
        Launches kernels only (no allocation, no host transfer), so it can be captured in a graph."""
        w, p, cache, layer = call.weights, call.params, call.cache, call.layer
        n = x.shape[0]
        s = self.scratch(n, call)
        wq, wk, wv, wo = w.wq, w.wk, w.wv, w.wo
        h, hq, hs = s.h[:n], [a[:n] for a in s.hq], [a[:n] for a in s.hs]
        self._norm_for(x, self._vector(w.attn_norm, x.shape[1]), p.rms_eps, (wq, wk, wv), h, hq, hs)
        q, k, v = s.q[:n], s.k[:n], s.v[:n]
        if n == 1 and wq.quantised and wq.type == wk.type == wv.type:
            style = wq.activation_format
            rows = wq.rows + wk.rows + wv.rows
            self._launch(f"mv3_{wq.type.name.lower()}", (-(-rows // MATVEC_ROWS),), (32 * MATVEC_ROWS,),
                         *wq.kernel_planes(), *wk.kernel_planes(), *wv.kernel_planes(), _i32(wq.rows),
                         _i32(wk.rows), _i32(wv.rows), _i32(wq.cols), hq[style], hs[style], q, k, v)
        else:
            for m, y in ((wq, q), (wk, k), (wv, v)):
                style = m.activation_format
                self._matvec(m, h, hq[style or 0], hs[style or 0], y)
        pos, seq = self._batch
        self._rope_store(cache, layer, q, k, v, n, p.n_heads, p.rope_dims, p.rope_base, p.rope_neox, pos, seq)
        attn = s.attn[:n]
        self._attend(q, cache, layer, attn, n, p.n_heads, p.sliding_window, pos, seq, s.part)
        if wo.quantised:
            self._quantize(attn, s.attn_q[:n], s.attn_s[:n], wo.activation_format)
        mid = s.mid[:n]
        self._matvec(wo, attn, s.attn_q[:n], s.attn_s[:n], mid, resid=x)

        gate, up, down = w.w_gate, w.w_up, w.w_down
        self._norm_for(mid, self._vector(w.ffn_norm, mid.shape[1]), p.rms_eps, (gate, up), h, hq, hs)
        f = s.f[:n]
        if gate.type == up.type:
            style = gate.activation_format or 0
            self._matvec_glu(gate, up, h, hq[style], hs[style], f)
        else:
            for m, y in ((gate, s.gate[:n]), (up, s.up[:n])):
                style = m.activation_format or 0
                self._matvec(m, h, hq[style], hs[style], y)
            self._elementwise("swiglu", f.size, s.gate[:n], s.up[:n], f, _NULL)
        if down.quantised:
            self._quantize(f, s.f_q[:n], s.f_s[:n], down.activation_format)
        self._matvec(down, f, s.f_q[:n], s.f_s[:n], out, resid=mid)

    def _layer_prompt(self, x, out, call: LayerCall, batch: Batch):
        """One layer for a prompt chunk (n > DECODE_MAX_TOKENS): cuBLAS matrix products."""
        cp = self.cp
        w, p, cache, layer = call.weights, call.params, call.cache, call.layer
        n, d = x.shape
        f32 = cp.float32
        h = cp.empty_like(x)
        self._rms_norm(x, self._vector(w.attn_norm, d), p.rms_eps, y=h)
        h16 = self._f16(h, (w.wq, w.wk, w.wv))
        q = cp.empty((n, w.wq.rows), f32)
        k = cp.empty((n, w.wk.rows), f32)
        v = cp.empty((n, w.wv.rows), f32)
        for m, y in ((w.wq, q), (w.wk, k), (w.wv, v)):
            self._gemm(h, m, y, x16=h16)
        pos, seq = self._upload_ints(np.stack([batch.positions, batch.seqs]))
        self._rope_store(cache, layer, q, k, v, n, p.n_heads, p.rope_dims, p.rope_base, p.rope_neox, pos, seq)
        attn = cp.empty_like(q)
        self._attend(q, cache, layer, attn, n, p.n_heads, p.sliding_window, pos, seq)
        mid = cp.empty_like(x)
        self._gemm(attn, w.wo, mid, resid=x)
        self._rms_norm(mid, self._vector(w.ffn_norm, d), p.rms_eps, y=h)
        h16 = self._f16(h, (w.w_gate, w.w_up))
        gate = cp.empty((n, w.w_gate.rows), f32)
        up = cp.empty_like(gate)
        self._gemm(h, w.w_gate, gate, x16=h16)
        self._gemm(h, w.w_up, up, x16=h16)
        f = cp.empty_like(gate)
        f16 = cp.empty(gate.shape, cp.float16) if w.w_down.type != GGMLType.F32 else None
        self._elementwise("swiglu", f.size, gate, up, f, _NULL if f16 is None else f16)
        self._gemm(f, w.w_down, out, resid=mid, x16=f16)

    def _f16(self, x, weights):
        """x as f16 when one of `weights` is multiplied in f16 (all but F32), else None."""
        if all(m.type == GGMLType.F32 for m in weights):
            return None
        x16 = self.cp.empty(x.shape, dtype=self.cp.float16)
        self._elementwise("to_f16", x.size, x, x16)
        return x16
