# cython: language_level=3
"""The CPU backend's kernels: OpenMP loops (GIL released) around the C kernels in kernels/.

Callers (backend.py) validate every argument first; the checks here are a last line of defence
that turns a wrapper bug into a ValueError instead of an out-of-bounds read. Every function
writes into a caller-allocated `out` (OUT); every other array is read-only (IN).
"""
from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memcpy

import numpy as np

cdef extern from "dequant.h" nogil:
    ctypedef void (*zd_decode_fn)(const uint8_t *src, float *dst, int64_t k) noexcept nogil
    zd_decode_fn zd_decoder(int type)
    int64_t zd_row_bytes(int type, int64_t k)

cdef extern from "matmul.h" nogil:
    void zd_dot_rows(const float *row, const float *x, float *out, int64_t n, int64_t k, int64_t m)

cdef extern from "norm.h" nogil:
    void zd_rms_norm_row(const float *x, const float *w, float *out, int64_t d, float eps)

cdef extern from "rope.h" nogil:
    void zd_rope_angles(int64_t pos, int64_t n_rot, double base, float *cos_out, float *sin_out)
    void zd_rope_head(const float *x, float *out, const float *cos_t, const float *sin_t,
                      int64_t head_dim, int64_t n_rot, int neox)

cdef extern from "attention.h" nogil:
    void zd_attend_head(const float *q, const float *k_cache, const float *v_cache, int64_t stride,
                        int64_t lo, int64_t hi, int64_t hd, float scale, float *scores, float *out)

cdef extern from "elementwise.h" nogil:
    void zd_swiglu(const float *gate, const float *up, float *out, int64_t count)
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


def matmul(const float[:, ::1] x, const uint8_t[::1] w, int wtype, int64_t m,
           float[:, ::1] out, int threads):
    """out[n, m] = x[n, k] @ W.T, W being `m` rows of `k` values of type `wtype` in `w`.

    Each thread decodes one weight row at a time into its own scratch row, then dots it with
    every activation row: the weight is read once, whatever n.
    """
    cdef int64_t n = x.shape[0], k = x.shape[1]
    cdef int64_t stride = zd_row_bytes(wtype, k)
    cdef zd_decode_fn decode = zd_decoder(wtype)
    _require(decode != NULL and stride > 0, f"cannot decode rows of {k} values of type {wtype}")
    _require(w.shape[0] >= m * stride, "weight buffer is smaller than its shape")
    _require(out.shape[0] == n and out.shape[1] == m, "output shape mismatch")
    _require(threads >= 1, "threads must be positive")
    if n == 0 or m == 0:
        return
    cdef float[:, ::1] scratch = np.empty((threads, k), dtype=np.float32)
    cdef int64_t row
    cdef float *decoded
    with nogil:
        for row in prange(m, schedule='static', num_threads=threads):
            decoded = &scratch[threadid(), 0]
            decode(&w[row * stride], decoded, k)
            zd_dot_rows(decoded, &x[0, 0], &out[0, row], n, k, m)


def embed(const uint8_t[::1] w, int wtype, int64_t vocab, const int32_t[::1] ids,
          float[:, ::1] out, int threads):
    """out[i] = decoded row ids[i] of the [vocab, d] weight `w` (d = out.shape[1])."""
    cdef int64_t n = ids.shape[0], d = out.shape[1]
    cdef int64_t stride = zd_row_bytes(wtype, d)
    cdef zd_decode_fn decode = zd_decoder(wtype)
    cdef int64_t i
    _require(decode != NULL and stride > 0, f"cannot decode rows of {d} values of type {wtype}")
    _require(w.shape[0] >= vocab * stride, "weight buffer is smaller than its shape")
    _require(out.shape[0] == n, "output shape mismatch")
    _require(threads >= 1, "threads must be positive")
    for i in range(n):
        _require(0 <= ids[i] < vocab, "token id out of range")
    if n == 0 or d == 0:
        return
    with nogil:
        for i in prange(n, schedule='static', num_threads=threads):
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


def rope(const float[:, ::1] x, int64_t start_pos, int64_t head_dim, int64_t n_rot, double base,
         bint neox, float[:, ::1] out, int threads):
    """out = x with the first n_rot dims of every head rotated; token i sits at start_pos + i."""
    cdef int64_t n = x.shape[0], width = x.shape[1]
    _require(head_dim > 0 and width % head_dim == 0, "width is not a whole number of heads")
    _require(0 <= n_rot <= head_dim and n_rot % 2 == 0, "n_rot must be even and <= head_dim")
    _require(out.shape[0] == n and out.shape[1] == width, "output shape mismatch")
    _require(threads >= 1, "threads must be positive")
    cdef int64_t heads = width // head_dim, half = n_rot // 2
    if n == 0 or width == 0:
        return
    # cos/sin per (token, pair): computed once, shared by every head.
    cdef float[:, ::1] cos_table = np.empty((n, max(half, 1)), dtype=np.float32)
    cdef float[:, ::1] sin_table = np.empty((n, max(half, 1)), dtype=np.float32)
    cdef int64_t i, item, token, head
    with nogil:
        for i in prange(n, schedule='static', num_threads=threads):
            zd_rope_angles(start_pos + i, n_rot, base, &cos_table[i, 0], &sin_table[i, 0])
        for item in prange(n * heads, schedule='static', num_threads=threads):
            token = item // heads
            head = item % heads
            zd_rope_head(&x[token, head * head_dim], &out[token, head * head_dim],
                         &cos_table[token, 0], &sin_table[token, 0], head_dim, n_rot, neox)


def attention(const float[:, ::1] q, const float[:, ::1] k, const float[:, ::1] v,
              float[:, :, ::1] k_cache, float[:, :, ::1] v_cache, int64_t start_pos,
              int64_t n_heads, int64_t n_kv_heads, int64_t window, float[:, ::1] out, int threads):
    """Store k, v at cache positions start_pos.., then causal GQA attention for q -> out.

    k_cache, v_cache: [n_ctx, h_kv, hd] (IN/OUT). Query head j reads kv head j // (h / h_kv);
    token i attends to positions max(0, pos - window + 1) (or 0) .. pos, pos = start_pos + i.
    """
    cdef int64_t n = q.shape[0], n_ctx = k_cache.shape[0], hd = k_cache.shape[2]
    _require(n_heads > 0 and n_kv_heads > 0 and n_heads % n_kv_heads == 0, "bad head counts")
    _require(k_cache.shape[1] == n_kv_heads and v_cache.shape[0] == n_ctx
             and v_cache.shape[1] == n_kv_heads and v_cache.shape[2] == hd, "cache shape mismatch")
    _require(q.shape[1] == n_heads * hd, "q width mismatch")
    _require(k.shape[0] == n and v.shape[0] == n and k.shape[1] == n_kv_heads * hd
             and v.shape[1] == n_kv_heads * hd, "k/v shape mismatch")
    _require(0 <= start_pos and start_pos + n <= n_ctx, "cache positions out of range")
    _require(out.shape[0] == n and out.shape[1] == n_heads * hd, "output shape mismatch")
    _require(window >= 0 and threads >= 1, "bad window or thread count")
    if n == 0 or hd == 0:
        return
    cdef int64_t group = n_heads // n_kv_heads, stride = n_kv_heads * hd
    cdef float scale = 1.0 / np.sqrt(hd)
    cdef float[:, ::1] scores = np.empty((threads, start_pos + n), dtype=np.float32)
    cdef int64_t i, item, token, head, kv_head, pos, lo
    with nogil:
        for i in range(n):
            memcpy(&k_cache[start_pos + i, 0, 0], &k[i, 0], stride * sizeof(float))
            memcpy(&v_cache[start_pos + i, 0, 0], &v[i, 0], stride * sizeof(float))
        for item in prange(n * n_heads, schedule='static', num_threads=threads):
            token = item // n_heads
            head = item % n_heads
            kv_head = head // group
            pos = start_pos + token
            lo = pos - window + 1 if window > 0 else 0
            if lo < 0:
                lo = 0
            zd_attend_head(&q[token, head * hd], &k_cache[0, kv_head, 0], &v_cache[0, kv_head, 0],
                           stride, lo, pos, hd, scale, &scores[threadid(), 0], &out[token, head * hd])


cdef void _split(int64_t count, int threads, int64_t *chunk, int64_t *chunks) noexcept nogil:
    """Cut `count` elements into at most `threads` contiguous chunks."""
    chunk[0] = (count + threads - 1) // threads
    chunks[0] = (count + chunk[0] - 1) // chunk[0]


def swiglu(const float[::1] gate, const float[::1] up, float[::1] out, int threads):
    """out = silu(gate) * up, over flat arrays."""
    cdef int64_t count = gate.shape[0], chunk, chunks, c, start, stop
    _require(up.shape[0] == count and out.shape[0] == count, "length mismatch")
    _require(threads >= 1, "threads must be positive")
    if count == 0:
        return
    _split(count, threads, &chunk, &chunks)
    with nogil:
        for c in prange(chunks, schedule='static', num_threads=threads):
            start = c * chunk
            stop = min(start + chunk, count)
            zd_swiglu(&gate[start], &up[start], &out[start], stop - start)


def add(const float[::1] a, const float[::1] b, float[::1] out, int threads):
    """out = a + b, over flat arrays."""
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
            zd_add(&a[start], &b[start], &out[start], stop - start)
