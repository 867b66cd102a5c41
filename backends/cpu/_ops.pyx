# cython: language_level=3
"""The CPU backend's kernels: OpenMP loops (GIL released) around the C kernels in kernels/.

Callers (backend.py) validate every argument first; the checks here are a last line of defence
that turns a wrapper bug into a ValueError instead of an out-of-bounds read. Every function
writes into a caller-allocated `out` (OUT); every other array is read-only (IN).

Matmuls run on one of several instruction-set paths (scalar, AVX2, AVX-512 VNNI), chosen at
import as the best this CPU has; `set_isa` forces one (the tests run every path).
"""
from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t, uint8_t

import mmap

import numpy as np

cdef extern from "dequant.h" nogil:
    ctypedef void (*zd_decode_fn)(const uint8_t *src, float *dst, int64_t k) noexcept nogil
    zd_decode_fn zd_decoder(int type)
    int64_t zd_row_bytes(int type, int64_t k)

cdef extern from "quantize.h" nogil:
    ctypedef struct zd_act:
        int64_t n, k
    int zd_act_kind(int type)
    int64_t zd_act_bytes(int kind, int64_t n, int64_t k)
    void zd_act_init(zd_act *a, int kind, int64_t n, int64_t k, void *buffer, int isa)
    void zd_quantize_rows(const float *x, int64_t ldx, zd_act *a, int isa, int64_t lo, int64_t hi)
    void zd_act_pack_row(const zd_act *a, int64_t t, uint8_t *out)
    int ZD_ACT_F32, ZD_ACT_Q8_0, ZD_ACT_Q8_K

cdef extern from "matmul.h" nogil:
    int zd_isa_supported(int isa)
    int zd_best_isa()
    int64_t zd_cbuf_floats(int64_t k)
    void zd_matmul(int type, int isa, const uint8_t *w, int64_t m, int64_t k, const float *x, int64_t n,
                   float *out, void *act, float *cbuf, int nth)

cdef extern from "tile.h" nogil:
    ctypedef void (*zd_tile_fn)(const void *tile) noexcept nogil

cdef extern from "interleave.h" nogil:
    int ZD_X16, ZD_X16_ROWS
    int zd_x16_wanted(int type, int isa, int64_t k, int repack)
    int64_t zd_x16_bytes(int type, int64_t m, int64_t k)
    zd_tile_fn zd_x16_kernel(int type, int isa)
    void zd_x16_pack(int type, int isa, const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int64_t g0, int64_t g1)
    void zd_x16_decode_row(int type, const uint8_t *w, int64_t row, int64_t k, float *out)

cdef extern from "norm.h" nogil:
    void zd_rms_norm_row(const float *x, const float *w, float *out, int64_t d, float eps)

cdef extern from "rope.h" nogil:
    ctypedef struct zd_rope:
        int64_t n_rot
        double base, freq_scale, ext_factor, attn_factor, corr_lo, corr_hi
        const float *factors
    void zd_rope_angles(int64_t pos, const zd_rope *r, float *cos_out, float *sin_out)
    void zd_rope_head(const float *x, float *out, const float *cos_t, const float *sin_t,
                      int64_t head_dim, int64_t n_rot, int neox)

cdef extern from "attention.h" nogil:
    ctypedef struct zd_kv_layer:
        uint8_t *k
        uint8_t *v
        int type
        int64_t n_seqs, n_ctx, n_kv, hd, row_bytes
    ctypedef struct zd_att_item:
        pass
    ctypedef struct zd_att_job:
        const float *q
        float *out
        const int32_t *pos
        const int32_t *seq
        int64_t n, n_heads, n_kv, hd, window
        float scale, softcap
        const zd_kv_layer *cache
        zd_att_item *items
        int64_t n_items
        int32_t *splits
        float *partial
    int ZD_ATT_MAX_SPLITS
    int64_t zd_att_hdp(int64_t hd)
    int64_t zd_att_max_items(int64_t n, int64_t n_kv)
    int64_t zd_att_scratch_floats(int64_t hd, int64_t group)
    int64_t zd_kv_offset(const zd_kv_layer *c, int64_t seq, int64_t pos, int64_t kv)
    void zd_kv_encode(int type, const float *x, int64_t hd, uint8_t *row)
    void zd_attention(zd_att_job *job, float *scratch, int64_t stride, int isa, int nth)

cdef extern from "elementwise.h" nogil:
    void zd_glu(const float *gate, const float *up, float *out, int64_t count, int gelu, int isa)
    void zd_add(const float *a, const float *b, float *out, int64_t count)


cdef inline void _require(bint condition, str message) except *:
    if not condition:
        raise ValueError(message)


def can_decode(int wtype):
    """Whether the C decoders know GGML type id `wtype`."""
    return zd_decoder(wtype) != NULL


def row_bytes(int wtype, int64_t k):
    """Bytes in a row of `k` values of `wtype` by the C block layouts; -1 if not a whole row."""
    return zd_row_bytes(wtype, k)


ISA_NAMES = ("scalar", "avx2", "avx512")
cdef int _isa = zd_best_isa()


def available_isas():
    """The matmul paths this CPU can run, slowest first."""
    return [name for i, name in enumerate(ISA_NAMES) if zd_isa_supported(i)]


def get_isa():
    """The path matmuls use now."""
    return ISA_NAMES[_isa]


def set_isa(name=None):
    """Force matmuls onto path `name` (one of available_isas()); None: the best one."""
    global _isa
    if name is None:
        _isa = zd_best_isa()
        return
    if name not in ISA_NAMES or not zd_isa_supported(ISA_NAMES.index(name)):
        raise ValueError(f"instruction set {name!r} is not available here; choose from {available_isas()}")
    _isa = ISA_NAMES.index(name)


def quantize_activations(const float[:, ::1] x, str kind):
    """x [n, k] -> its rounding as the matmul kernels see it, in GGUF bytes: kind "q8_0" gives
    uint8 [n, k / 32 * 34] (as zephyr.quants.quantize_q8_0), "q8_k" [n, k / 256 * 292]."""
    cdef int code = {"q8_0": ZD_ACT_Q8_0, "q8_k": ZD_ACT_Q8_K}.get(kind, -1)
    _require(code >= 0, f"unknown activation kind {kind!r}")
    cdef int64_t n = x.shape[0], k = x.shape[1], block = 32 if code == ZD_ACT_Q8_0 else 256
    _require(k % block == 0, f"rows of {k} values are not whole blocks of {block}")
    cdef uint8_t[::1] buffer = np.empty(zd_act_bytes(code, n, k), dtype=np.uint8)
    cdef uint8_t[:, ::1] out = np.empty((n, k // block * (34 if block == 32 else 292)), dtype=np.uint8)
    cdef zd_act a
    cdef int64_t t
    if n == 0 or k == 0:
        return np.asarray(out)
    zd_act_init(&a, code, n, k, &buffer[0], _isa)
    zd_quantize_rows(&x[0, 0], k, &a, _isa, 0, n)
    for t in range(n):
        zd_act_pack_row(&a, t, &out[t, 0])
    return np.asarray(out)


def matmul(const float[:, ::1] x, const uint8_t[::1] w, int wtype, int64_t m,
           float[:, ::1] out, int threads):
    """out[n, m] = x[n, k] @ W.T, W being `m` rows of `k` values of type `wtype` in `w`.

    x is rounded once to the 8-bit activation format of the weight type (none for float
    weights); each thread then computes a contiguous share of W's rows for every token.
    """
    cdef int64_t n = x.shape[0], k = x.shape[1]
    cdef int64_t stride = zd_row_bytes(wtype, k)
    cdef int kind = zd_act_kind(wtype)
    _require(kind >= 0 and stride > 0, f"cannot multiply rows of {k} values of type {wtype}")
    _require(_matrix_bytes(wtype, m, k) >= 0, f"cannot multiply rows of {k} values of type {wtype}")
    _require(w.shape[0] >= _matrix_bytes(wtype, m, k), "weight buffer is smaller than its shape")
    _require(out.shape[0] == n and out.shape[1] == m, "output shape mismatch")
    _require(threads >= 1, "threads must be positive")
    if n == 0 or m == 0:
        return
    if k == 0:
        out[:, :] = 0
        return
    cdef uint8_t[::1] act = np.empty(max(zd_act_bytes(kind, n, k), 1), dtype=np.uint8)
    cdef float[::1] cbuf = np.empty(threads * zd_cbuf_floats(k), dtype=np.float32)
    with nogil:
        zd_matmul(wtype, _isa, &w[0], m, k, &x[0, 0], n, &out[0, 0], &act[0], &cbuf[0], threads)


cdef int64_t _matrix_bytes(int wtype, int64_t m, int64_t k) noexcept:
    """Bytes the kernels read for an m x k matrix of `wtype` (interleaved: whole groups of rows);
    -1 for a type code no kernel reads (an interleaved code of a type never interleaved)."""
    if wtype & ZD_X16:
        return zd_x16_bytes(wtype, m, k) if zd_x16_kernel(wtype, 0) != NULL else -1
    return m * zd_row_bytes(wtype, k)


def _prefaulted(int64_t nbytes):
    """A zeroed uint8 array whose pages the kernel maps in one call (MAP_POPULATE): first
    touches page by page cost several times more, most of all in virtual machines."""
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
    return np.frombuffer(buffer, dtype=np.uint8)


cdef int _repack_mode(repack):
    """interleave.h's repack argument: None (this host's choice), True (always), False (never)."""
    return -1 if repack is None else int(bool(repack))


def interleaves(int wtype, int64_t k, repack=None):
    """Whether `interleave` copies matrices of GGML type `wtype` with rows of k values on the
    current path (`repack` as for interleave)."""
    return bool(zd_x16_wanted(wtype, _isa, k, _repack_mode(repack)))


def interleave(const uint8_t[::1] w, int wtype, int64_t m, int64_t k, int threads, repack=None):
    """The m x k GGUF matrix `w` of type `wtype` interleaved for the current path (interleave.h),
    as (type code, new uint8 array); None when this path keeps the type as it is. `repack`:
    None for this host's choice, True for every type with an interleaved kernel, False for none."""
    if not zd_x16_wanted(wtype, _isa, k, _repack_mode(repack)):
        return None
    return _interleaved(w, wtype, m, k, threads, _isa)


def _interleave_reference(const uint8_t[::1] w, int wtype, int64_t m, int64_t k):
    """interleave's result from the word-by-word scalar copy (for tests)."""
    return _interleaved(w, wtype, m, k, 1, ISA_NAMES.index("scalar"))


cdef _interleaved(const uint8_t[::1] w, int wtype, int64_t m, int64_t k, int threads, int isa):
    cdef int64_t stride = zd_row_bytes(wtype, k), groups = (m + ZD_X16_ROWS - 1) // ZD_X16_ROWS, g
    if m <= 0 or stride <= 0:
        return None
    _require(w.shape[0] >= m * stride, "weight buffer is smaller than its shape")
    cdef uint8_t[::1] out = _prefaulted(zd_x16_bytes(wtype, m, k))
    with nogil:
        for g in prange(groups, schedule='static', num_threads=threads):
            zd_x16_pack(wtype, isa, &w[0], m, k, &out[0], g, g + 1)
    return ZD_X16 | wtype, np.asarray(out)


def embed(const uint8_t[::1] w, int wtype, int64_t vocab, const int32_t[::1] ids,
          float[:, ::1] out, int threads):
    """out[i] = decoded row ids[i] of the [vocab, d] weight `w` (d = out.shape[1]); `wtype` may be
    an interleaved type code from `interleave`."""
    cdef int64_t n = ids.shape[0], d = out.shape[1]
    cdef int64_t stride = zd_row_bytes(wtype, d)
    cdef zd_decode_fn decode = zd_decoder(wtype)
    cdef bint interleaved = (wtype & ZD_X16) != 0
    cdef int64_t i
    _require((decode != NULL or interleaved) and stride > 0, f"cannot decode rows of {d} values of type {wtype}")
    _require(_matrix_bytes(wtype, vocab, d) >= 0, f"cannot decode rows of {d} values of type {wtype}")
    _require(w.shape[0] >= _matrix_bytes(wtype, vocab, d), "weight buffer is smaller than its shape")
    _require(out.shape[0] == n, "output shape mismatch")
    _require(threads >= 1, "threads must be positive")
    for i in range(n):
        _require(0 <= ids[i] < vocab, "token id out of range")
    if n == 0 or d == 0:
        return
    with nogil:
        for i in prange(n, schedule='static', num_threads=threads):
            if interleaved:
                zd_x16_decode_row(wtype, &w[0], ids[i], d, &out[i, 0])
            else:
                decode(&w[ids[i] * stride], &out[i, 0], d)


def rms_norm(const float[:, ::1] x, const float[::1] w, float eps, float[:, ::1] out, int threads):
    """out = x / sqrt(mean(x^2, axis=1) + eps) * w."""
    cdef int64_t n = x.shape[0], d = x.shape[1], i
    _require(w.shape[0] == d, "norm weight length mismatch")
    _require(out.shape[0] == n and out.shape[1] == d, "output shape mismatch")
    _require(threads >= 1, "threads must be positive")
    if n == 0 or d == 0:
        return
    with nogil:
        for i in prange(n, schedule='static', num_threads=threads):
            zd_rms_norm_row(&x[i, 0], &w[0], &out[i, 0], d, eps)


cdef zd_rope _rope(int64_t n_rot, double base, tuple scaling, factors) except *:
    """A zd_rope: `scaling` is (freq_scale, ext_factor, attn_factor, corr_lo, corr_hi) as
    zephyr.backend.RopeScaling and host_ops.yarn_corr_dims give them; `factors` float32
    [n_rot / 2] or None. The caller keeps `factors` alive while the rope is used."""
    cdef zd_rope r
    cdef const float[::1] f
    r.n_rot, r.base = n_rot, base
    r.freq_scale, r.ext_factor, r.attn_factor, r.corr_lo, r.corr_hi = scaling
    _require(r.freq_scale > 0, "rope freq_scale must be positive")
    r.factors = NULL
    if factors is not None:
        f = factors
        _require(f.shape[0] == n_rot // 2, "one rope frequency factor per rotated pair")
        if f.shape[0]:
            r.factors = &f[0]
    return r


def rope(const float[:, ::1] x, const int32_t[::1] positions, int64_t head_dim, int64_t n_rot, double base,
         bint neox, tuple scaling, factors, float[:, ::1] out, int threads):
    """out = x with the first n_rot dims of every head rotated; row i sits at positions[i]
    (scaling and factors: see _rope)."""
    cdef int64_t n = x.shape[0], width = x.shape[1]
    _require(positions.shape[0] == n, "one position per row")
    _require(head_dim > 0 and width % head_dim == 0, "width is not a whole number of heads")
    _require(0 <= n_rot <= head_dim and n_rot % 2 == 0, "n_rot must be even and <= head_dim")
    _require(out.shape[0] == n and out.shape[1] == width, "output shape mismatch")
    _require(threads >= 1, "threads must be positive")
    cdef zd_rope r = _rope(n_rot, base, scaling, factors)
    cdef int64_t heads = width // head_dim, half = n_rot // 2
    if n == 0 or width == 0:
        return
    # cos/sin per (row, pair): computed once, shared by every head.
    cdef float[:, ::1] cos_table = np.empty((n, max(half, 1)), dtype=np.float32)
    cdef float[:, ::1] sin_table = np.empty((n, max(half, 1)), dtype=np.float32)
    cdef int64_t i, item, token, head
    with nogil:
        for i in prange(n, schedule='static', num_threads=threads):
            zd_rope_angles(positions[i], &r, &cos_table[i, 0], &sin_table[i, 0])
        for item in prange(n * heads, schedule='static', num_threads=threads):
            token = item // heads
            head = item % heads
            zd_rope_head(&x[token, head * head_dim], &out[token, head * head_dim],
                         &cos_table[token, 0], &sin_table[token, 0], head_dim, n_rot, neox)


cdef zd_kv_layer _kv_layer(uint8_t[:, :, :, :, ::1] cache, int cache_type, int64_t head_dim) except *:
    """A layer of a HostKVCache ([2, n_seqs, n_kv, n_ctx, row_bytes] bytes) for the C kernels."""
    _require(cache.shape[0] == 2 and cache.shape[4] == zd_row_bytes(cache_type, head_dim) > 0,
             "cache rows do not hold head_dim values of the cache type")
    cdef zd_kv_layer c
    c.k = &cache[0, 0, 0, 0, 0]
    c.v = &cache[1, 0, 0, 0, 0]
    c.type = cache_type
    c.n_seqs, c.n_kv, c.n_ctx = cache.shape[1], cache.shape[2], cache.shape[3]
    c.hd = head_dim
    c.row_bytes = cache.shape[4]
    return c


cdef void _check_batch(const int32_t[::1] positions, const int32_t[::1] seqs, int64_t n, zd_kv_layer *c) except *:
    _require(positions.shape[0] == n and seqs.shape[0] == n, "one position and sequence per token")
    cdef int64_t i
    for i in range(n):
        _require(0 <= positions[i] < c.n_ctx and 0 <= seqs[i] < c.n_seqs, "batch position outside the cache")


def attention(const float[:, ::1] q, const float[:, ::1] k, const float[:, ::1] v,
              uint8_t[:, :, :, :, ::1] cache, int cache_type, const int32_t[::1] positions,
              const int32_t[::1] seqs, int64_t n_heads, int64_t window, float scale, float softcap,
              float[:, ::1] out, int threads):
    """Store k, v at the batch's rows of `cache` (IN/OUT, one layer of a HostKVCache), then causal
    GQA attention for q -> out (attention.h), scores scaled by `scale` and soft-capped where
    softcap > 0. Query head j reads kv head j // (h / h_kv)."""
    cdef int64_t n = q.shape[0], n_kv = cache.shape[2]
    _require(n_heads > 0 and n_kv > 0 and n_heads % n_kv == 0, "bad head counts")
    _require(q.shape[1] % n_heads == 0, "q width mismatch")
    cdef int64_t hd = q.shape[1] // n_heads
    cdef zd_kv_layer c = _kv_layer(cache, cache_type, hd)
    _check_batch(positions, seqs, n, &c)
    _require(k.shape[0] == n and v.shape[0] == n and k.shape[1] == n_kv * hd and v.shape[1] == n_kv * hd,
             "k/v shape mismatch")
    _require(out.shape[0] == n and out.shape[1] == n_heads * hd, "output shape mismatch")
    _require(window >= 0 and threads >= 1, "bad window or thread count")
    if n == 0 or hd == 0:
        return
    cdef int64_t stride = zd_att_scratch_floats(hd, n_heads // n_kv), i, kv, at
    cdef float[::1] scratch = np.empty(threads * stride, dtype=np.float32)
    cdef uint8_t[::1] items = np.empty(zd_att_max_items(n, n_kv) * sizeof(zd_att_item), dtype=np.uint8)
    cdef int32_t[::1] splits = np.empty(n, dtype=np.int32)
    cdef float[::1] partial = np.empty(n * n_heads * ZD_ATT_MAX_SPLITS * (zd_att_hdp(hd) + 2), dtype=np.float32)
    cdef zd_att_job job
    with nogil:
        for i in range(n):
            for kv in range(n_kv):
                at = zd_kv_offset(&c, seqs[i], positions[i], kv)
                zd_kv_encode(cache_type, &k[i, kv * hd], hd, c.k + at)
                zd_kv_encode(cache_type, &v[i, kv * hd], hd, c.v + at)
        job.q = &q[0, 0]
        job.out = &out[0, 0]
        job.pos = &positions[0]
        job.seq = &seqs[0]
        job.n, job.n_heads, job.n_kv, job.hd, job.window = n, n_heads, n_kv, hd, window
        job.scale, job.softcap = scale, softcap
        job.cache = &c
        job.items = <zd_att_item *>&items[0]
        job.splits = &splits[0]
        job.partial = &partial[0]
        zd_attention(&job, &scratch[0], stride, _isa, threads)


cdef void _split(int64_t count, int threads, int64_t *chunk, int64_t *chunks) noexcept nogil:
    """Cut `count` elements into at most `threads` contiguous chunks."""
    chunk[0] = (count + threads - 1) // threads
    chunks[0] = (count + chunk[0] - 1) // chunk[0]


ctypedef void (*zd_pairwise)(const float *a, const float *b, float *out, int64_t count) noexcept nogil


cdef void _pairwise(zd_pairwise fn, const float[::1] a, const float[::1] b, float[::1] out, int threads) except *:
    """out = fn(a, b) elementwise over flat arrays, in one contiguous chunk per thread."""
    cdef int64_t count = a.shape[0], chunk, chunks, c, start, stop
    _require(b.shape[0] == count and out.shape[0] == count, "length mismatch")
    _require(threads >= 1, "threads must be positive")
    if count == 0:
        return
    _split(count, threads, &chunk, &chunks)
    with nogil:
        for c in prange(chunks, schedule='static', num_threads=threads):
            start = c * chunk
            stop = min(start + chunk, count)
            fn(&a[start], &b[start], &out[start], stop - start)


cdef void _swiglu(const float *gate, const float *up, float *out, int64_t count) noexcept nogil:
    zd_glu(gate, up, out, count, 0, _isa)


cdef void _geglu(const float *gate, const float *up, float *out, int64_t count) noexcept nogil:
    zd_glu(gate, up, out, count, 1, _isa)


def swiglu(const float[::1] gate, const float[::1] up, float[::1] out, int threads):
    """out = silu(gate) * up, over flat arrays."""
    _pairwise(_swiglu, gate, up, out, threads)


def geglu(const float[::1] gate, const float[::1] up, float[::1] out, int threads):
    """out = gelu(gate) * up (GELU's tanh approximation), over flat arrays."""
    _pairwise(_geglu, gate, up, out, threads)


def add(const float[::1] a, const float[::1] b, float[::1] out, int threads):
    """out = a + b, over flat arrays."""
    _pairwise(zd_add, a, b, out, threads)


def add_bias(const float[:, ::1] x, const float[::1] b, float[:, ::1] out, int threads):
    """out = x + b, b added to every row."""
    cdef int64_t n = x.shape[0], m = x.shape[1], i
    _require(b.shape[0] == m and out.shape[0] == n and out.shape[1] == m, "shape mismatch")
    _require(threads >= 1, "threads must be positive")
    if n == 0 or m == 0:
        return
    with nogil:
        for i in prange(n, schedule='static', num_threads=threads):
            zd_add(&x[i, 0], &b[0], &out[i, 0], m)


def rms_norm_heads(const float[:, ::1] x, const float[::1] w, int64_t head_dim, float eps, float[:, ::1] out,
                   int threads):
    """out = rms_norm of every head (head_dim values) of x on its own, weight w [head_dim]."""
    cdef int64_t n = x.shape[0], width = x.shape[1], item, heads
    _require(head_dim > 0 and width % head_dim == 0 and w.shape[0] == head_dim, "shape mismatch")
    _require(out.shape[0] == n and out.shape[1] == width, "output shape mismatch")
    _require(threads >= 1, "threads must be positive")
    heads = width // head_dim
    if n == 0 or width == 0:
        return
    with nogil:
        for item in prange(n * heads, schedule='static', num_threads=threads):
            zd_rms_norm_row(&x[item // heads, (item % heads) * head_dim], &w[0],
                            &out[item // heads, (item % heads) * head_dim], head_dim, eps)


# -- the fused decoder layer ---------------------------------------------------------------------

cdef extern from "layer.h" nogil:
    ctypedef struct zd_matrix:
        int type
        const uint8_t *data
        int64_t rows, cols
    ctypedef struct zd_layer_weights:
        const float *attn_norm
        const float *ffn_norm
        zd_matrix wq, wk, wv, wo, w_gate, w_up, w_down
        const float *q_bias
        const float *k_bias
        const float *v_bias
        const float *o_bias
        const float *down_bias
        const float *gate_bias
        const float *up_bias
        const float *q_norm
        const float *k_norm
        const float *post_attn_norm
        const float *post_ffn_norm
    ctypedef struct zd_layer_params:
        int64_t d, f, n_heads, n_kv_heads, head_dim, window
        zd_rope rope
        int rope_neox
        float rms_eps, attn_scale, attn_softcap
        int gelu
    ctypedef struct zd_layer_scratch:
        int64_t n_max
        float *h
        float *q
        float *q_rot
        float *k
        float *v
        float *gate
        float *up
        float *y
        float *rope_cos
        float *rope_sin
        int32_t *rope_pos
        int64_t rope_n
        float *att
        int64_t att_stride
        zd_att_item *att_items
        int32_t *att_splits
        float *att_partial
        float *cbuf
        int64_t cbuf_stride
        void *act[3]
    int64_t zd_layer_width(const zd_layer_params *p)
    void zd_decoder_layer(const zd_layer_weights *w, const zd_layer_params *p, zd_layer_scratch *s,
                          const zd_kv_layer *cache, float *x, const int32_t *pos, const int32_t *seq, int64_t n,
                          int isa, int nth)


cdef zd_matrix _matrix(tuple spec, int64_t rows, int64_t cols, str name) except *:
    """(data, type, rows) -> a zd_matrix of rows x cols, checking the buffer covers it."""
    cdef const uint8_t[::1] data = spec[0]
    cdef int wtype = spec[1]
    cdef int64_t stride = zd_row_bytes(wtype, cols)
    _require(zd_act_kind(wtype) >= 0 and stride > 0, f"{name}: cannot multiply rows of {cols} values of type {wtype}")
    _require(_matrix_bytes(wtype, rows, cols) >= 0, f"{name}: cannot multiply rows of {cols} values of type {wtype}")
    _require(data.shape[0] >= _matrix_bytes(wtype, rows, cols), f"{name}: weight buffer is smaller than its shape")
    cdef zd_matrix m
    m.type = wtype
    m.data = &data[0]
    m.rows = rows
    m.cols = cols
    return m


cdef class Layer:
    """One block's weights, hyperparameters and cache layer, as pointers for zd_decoder_layer.

    Holds references to every array it points into, so they outlive it."""
    cdef zd_layer_weights w
    cdef zd_layer_params p
    cdef zd_kv_layer cache
    cdef object refs

    def __init__(self, dict matrices, dict vectors, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                 int64_t rope_dims, double rope_base, bint rope_neox, tuple rope_scaling, float rms_eps,
                 int64_t window, float attn_scale, float attn_softcap, bint gelu, uint8_t[:, :, :, :, ::1] cache,
                 int cache_type):
        """`matrices`: {wq, wk, wv, wo, w_gate, w_up, w_down: (flat uint8 data, GGML type)};
        `vectors`: float32 arrays, attn_norm and ffn_norm [d] and any of the optional ones of
        zd_layer_weights (rope_freqs: the frequency factors); rope_scaling as _rope takes it;
        `cache` one layer of a HostKVCache, [2, n_seqs, n_kv, n_ctx, row_bytes] bytes of type
        `cache_type`."""
        cdef int64_t d = vectors["attn_norm"].shape[0], f = _matrix_rows(matrices["w_gate"])
        _require(d > 0 and f > 0 and vectors["ffn_norm"].shape[0] == d, "norm weights must have d > 0 values")
        _require(n_heads > 0 and n_kv_heads > 0 and n_heads % n_kv_heads == 0, "bad head counts")
        _require(head_dim > 0 and 0 <= rope_dims <= head_dim and rope_dims % 2 == 0, "bad head_dim / rope_dims")
        _require(window >= 0, "window must be >= 0")
        _require(cache.shape[2] == n_kv_heads, "cache shape mismatch")
        cdef int64_t qd = n_heads * head_dim, kvd = n_kv_heads * head_dim
        self.w.wq = _matrix(matrices["wq"], qd, d, "wq")
        self.w.wk = _matrix(matrices["wk"], kvd, d, "wk")
        self.w.wv = _matrix(matrices["wv"], kvd, d, "wv")
        self.w.wo = _matrix(matrices["wo"], d, qd, "wo")
        self.w.w_gate = _matrix(matrices["w_gate"], f, d, "w_gate")
        self.w.w_up = _matrix(matrices["w_up"], f, d, "w_up")
        self.w.w_down = _matrix(matrices["w_down"], d, f, "w_down")
        lengths = dict(attn_norm=d, ffn_norm=d, q_bias=qd, k_bias=kvd, v_bias=kvd, o_bias=d, gate_bias=f, up_bias=f,
                       down_bias=d, q_norm=head_dim, k_norm=head_dim, post_attn_norm=d, post_ffn_norm=d,
                       rope_freqs=rope_dims // 2)
        for name, values in vectors.items():
            _require(name in lengths and values.shape[0] == lengths[name], f"{name}: wrong length")
        self.w.attn_norm = _floats(vectors, "attn_norm")
        self.w.ffn_norm = _floats(vectors, "ffn_norm")
        self.w.q_bias = _floats(vectors, "q_bias")
        self.w.k_bias = _floats(vectors, "k_bias")
        self.w.v_bias = _floats(vectors, "v_bias")
        self.w.o_bias = _floats(vectors, "o_bias")
        self.w.gate_bias = _floats(vectors, "gate_bias")
        self.w.up_bias = _floats(vectors, "up_bias")
        self.w.down_bias = _floats(vectors, "down_bias")
        self.w.q_norm = _floats(vectors, "q_norm")
        self.w.k_norm = _floats(vectors, "k_norm")
        self.w.post_attn_norm = _floats(vectors, "post_attn_norm")
        self.w.post_ffn_norm = _floats(vectors, "post_ffn_norm")
        self.p.d = d
        self.p.f = f
        self.p.n_heads = n_heads
        self.p.n_kv_heads = n_kv_heads
        self.p.head_dim = head_dim
        self.p.window = window
        self.p.rope = _rope(rope_dims, rope_base, rope_scaling, vectors.get("rope_freqs"))
        self.p.rope_neox = rope_neox
        self.p.rms_eps = rms_eps
        self.p.attn_scale = attn_scale
        self.p.attn_softcap = attn_softcap
        self.p.gelu = gelu
        self.cache = _kv_layer(cache, cache_type, head_dim)
        self.refs = (matrices, vectors, cache)


cdef int64_t _matrix_rows(tuple spec) except -1:
    """Rows of a matrix spec (data, type, rows)."""
    return spec[2]


cdef const float *_floats(dict vectors, str name) except? NULL:
    """The values of vectors[name] (a float32 array), or NULL when the block has none."""
    cdef const float[::1] values
    if name not in vectors:
        return NULL
    values = vectors[name]
    return &values[0]


cdef class LayerScratch:
    """Run-state buffers for zd_decoder_layer, grown on demand and reused by every layer."""
    cdef zd_layer_scratch s
    cdef object arrays
    cdef tuple shape

    def __init__(self):
        self.shape = ()
        self.s.rope_n = 0

    cdef void reserve(self, Layer layer, int64_t n, int threads) except *:
        cdef const zd_layer_params *p = &layer.p
        cdef int64_t width = zd_layer_width(p), qd = p.n_heads * p.head_dim, kvd = p.n_kv_heads * p.head_dim
        cdef tuple want = (width, qd, kvd, p.f, p.rope.n_rot // 2, p.n_heads, p.n_kv_heads,
                           zd_att_scratch_floats(p.head_dim, p.n_heads // p.n_kv_heads), zd_att_hdp(p.head_dim),
                           threads)
        if self.shape and n <= self.s.n_max and all(a >= b for a, b in zip(self.shape, want)):
            return
        if self.shape:
            n = max(n, self.s.n_max)
            want = tuple(max(a, b) for a, b in zip(self.shape, want))
        width, qd, kvd, f, half, n_heads, n_kv, att_floats, hdp, threads = want
        cdef int64_t act_bytes = max(zd_act_bytes(ZD_ACT_Q8_0, n, width), zd_act_bytes(ZD_ACT_Q8_K, n, width))
        arrays = dict(h=np.empty(n * width, np.float32), q=np.empty(n * qd, np.float32),
                      q_rot=np.empty(n * qd, np.float32), k=np.empty(n * kvd, np.float32),
                      v=np.empty(n * kvd, np.float32), gate=np.empty(n * f, np.float32),
                      up=np.empty(n * f, np.float32), y=np.empty(n * width, np.float32),
                      rope_cos=np.empty(n * max(half, 1), np.float32),
                      rope_sin=np.empty(n * max(half, 1), np.float32), rope_pos=np.empty(n, np.int32),
                      att=np.empty(threads * att_floats, np.float32),
                      att_items=np.empty(zd_att_max_items(n, n_kv) * sizeof(zd_att_item), np.uint8),
                      att_splits=np.empty(n, np.int32),
                      att_partial=np.empty(n * n_heads * ZD_ATT_MAX_SPLITS * (hdp + 2), np.float32),
                      cbuf=np.empty(threads * zd_cbuf_floats(width), np.float32),
                      act=[np.empty(act_bytes + 64, np.uint8) for _ in range(3)])
        cdef float[::1] view
        cdef int32_t[::1] ints
        cdef uint8_t[::1] raw
        view = arrays["h"]; self.s.h = &view[0]
        view = arrays["q"]; self.s.q = &view[0]
        view = arrays["q_rot"]; self.s.q_rot = &view[0]
        view = arrays["k"]; self.s.k = &view[0]
        view = arrays["v"]; self.s.v = &view[0]
        view = arrays["gate"]; self.s.gate = &view[0]
        view = arrays["up"]; self.s.up = &view[0]
        view = arrays["y"]; self.s.y = &view[0]
        view = arrays["rope_cos"]; self.s.rope_cos = &view[0]
        view = arrays["rope_sin"]; self.s.rope_sin = &view[0]
        ints = arrays["rope_pos"]; self.s.rope_pos = &ints[0]
        view = arrays["att"]; self.s.att = &view[0]
        self.s.att_stride = att_floats
        raw = arrays["att_items"]; self.s.att_items = <zd_att_item *>&raw[0]
        ints = arrays["att_splits"]; self.s.att_splits = &ints[0]
        view = arrays["att_partial"]; self.s.att_partial = &view[0]
        view = arrays["cbuf"]; self.s.cbuf = &view[0]
        self.s.cbuf_stride = zd_cbuf_floats(width)
        for i in range(3):
            raw = arrays["act"][i]
            self.s.act[i] = &raw[0]
        self.s.n_max = n
        self.s.rope_n = 0
        self.arrays = arrays
        self.shape = want


def decoder_layer(Layer layer, LayerScratch scratch, float[:, ::1] x, const int32_t[::1] positions,
                  const int32_t[::1] seqs, int threads):
    """One whole block on x [n, d] in place (IN/OUT); token t sits at positions[t] of sequence seqs[t]."""
    cdef int64_t n = x.shape[0]
    _require(x.shape[1] == layer.p.d, "input width mismatch")
    _check_batch(positions, seqs, n, &layer.cache)
    _require(threads >= 1, "threads must be positive")
    if n == 0:
        return
    scratch.reserve(layer, n, threads)
    with nogil:
        zd_decoder_layer(&layer.w, &layer.p, &scratch.s, &layer.cache, &x[0, 0], &positions[0], &seqs[0], n,
                         _isa, threads)
