/* Attention over the KV cache, flash style: the keys a query block can see are walked in tiles
 * of ZD_ATT_KEYS, each tile decoded once (from f32, f16 or Q8_0) for every query row of the
 * block, and folded into the rows' outputs with an online softmax, so no [tokens, context]
 * score matrix is ever made. Blocks of many rows (prompts) transpose the key tile, so scores
 * come 32 keys at a time without horizontal sums; a decode token's few rows take dot products.
 *
 * Work items: a block of consecutive query tokens of one sequence (ZD_ATT_ROWS rows: tokens x
 * the query heads that read one kv head) x one kv head x a range of keys. A prompt chunk is cut
 * into such blocks (the tiles a causal mask or a sliding window hides entirely are never read);
 * a lone token (decode) with a long context has its keys split into shares, each an item of its
 * own, merged afterwards (flash-decoding), so two threads stay busy however few kv heads there
 * are. Where the shares fall depends on the context only, never on the thread count.
 *
 * The inner loops are plain C that gcc vectorises for each instruction-set path (ZD_ATT_LOOPS
 * below): scores for 32 keys at once from a transposed key tile, values accumulated 32 dims at a
 * time. The AVX-512 path replaces the score and value loops with intrinsics that keep more
 * independent sums in registers (the plain loops, latency-bound there, are their reference), and
 * reads an f16 cache tile in place instead of decoding it into floats first. Decode at a long
 * context reads the whole cache once per token: the tile is small (32 keys, so the tiles a thread
 * works on stay in L1) and the rows a few tiles on are prefetched while it computes, so the cache
 * streams at about the rate the matmuls stream weights.
 */
#ifndef ZEPHYR_ATTENTION_H
#define ZEPHYR_ATTENTION_H

#include <math.h>
#include <string.h>
#include "common.h"
#include "dequant.h"
#include "elementwise.h"
#include "quantize.h"

#define ZD_ATT_KEYS 32          /* keys per tile */
#define ZD_ATT_LANES 32         /* floats the inner loops keep in registers: 4 AVX2 or 8 SSE vectors */
#define ZD_ATT_ROWS 32          /* query rows per work item (at least one token's group) */
#define ZD_ATT_TRANSPOSE_ROWS 8 /* from this many rows, the key tile is transposed for the scores */
#define ZD_ATT_SPLIT_KEYS 512   /* a lone token's keys are shared out in runs of at least this many */
#define ZD_ATT_MAX_SPLITS 16
/* Each cache row read prefetches (into L2) the row ZD_ATT_AHEAD tiles on: without it a thread
 * waits for each tile, then computes on it with memory idle. Issued one or two lines at a time
 * between the arithmetic, not in a burst per tile (a burst stalls on the line fill buffers). */
#define ZD_ATT_AHEAD 4
#define ZD_ATT_PREFETCH(row, stride, offset) \
    __builtin_prefetch((row) + ZD_ATT_AHEAD * ZD_ATT_KEYS * (stride) + (offset), 0, 2)

/* One layer of the cache: keys at k and values at v, each [n_seqs][n_kv][n_ctx] rows of hd values
 * of `type` (ZD_F32, ZD_F16 or ZD_Q8_0), row_bytes each: a kv head's positions follow each other. */
typedef struct {
    uint8_t *k, *v;
    int type;
    int64_t n_seqs, n_ctx, n_kv, hd, row_bytes;
} zd_kv_layer;

static inline int64_t zd_kv_offset(const zd_kv_layer *c, int64_t seq, int64_t pos, int64_t kv) {
    return ((seq * c->n_kv + kv) * c->n_ctx + pos) * c->row_bytes;
}

/* hd floats -> a cache row of `type`, rounded as zephyr.backend.encode_rows rounds them. */
static void zd_kv_encode(int type, const float *ZD_RESTRICT x, int64_t hd, uint8_t *ZD_RESTRICT row) {
    if (type == ZD_F32) {
        memcpy(row, x, (size_t)hd * sizeof(float));
    } else if (type == ZD_F16) {
        for (int64_t i = 0; i < hd; i++) {
            const uint16_t h = zd_f32_to_f16(x[i]);
            memcpy(row + 2 * i, &h, 2);
        }
    } else {   /* Q8_0 */
        int8_t q[ZD_QK];
        float d, sum;
        for (int64_t b = 0; b < hd / ZD_QK; b++, row += 2 + ZD_QK) {
            zd_quantize_q8_0_scalar(x + b * ZD_QK, ZD_QK, q, &d, &sum);
            const uint16_t h = zd_f32_to_f16(d);
            memcpy(row, &h, 2);
            memcpy(row + 2, q, ZD_QK);
        }
    }
}

/* The keys [k0, k1) of kv head `kv` that query tokens [t0, t1) read; split >= 0 marks a share
 * of a lone token's keys. */
typedef struct {
    int64_t t0, t1, kv, k0, k1;
    int split;
} zd_att_item;

/* One batch's attention over one layer: what the items read and write. */
typedef struct {
    const float *q;           /* [n, h * hd], rotated, not yet scaled */
    float *out;               /* [n, h * hd] */
    const int32_t *pos, *seq; /* [n] */
    int64_t n, n_heads, n_kv, hd, window;
    float scale;              /* of the scores (applied to q) */
    float softcap;            /* > 0: scores s become softcap * tanh(s / softcap) */
    const zd_kv_layer *cache;
    zd_att_item *items;       /* [zd_att_max_items] */
    int64_t n_items;
    int32_t *splits;          /* [n]: shares of each token's keys */
    float *partial;           /* [n, h, ZD_ATT_MAX_SPLITS, hdp + 2]: (max, sum, acc) of each share */
} zd_att_job;

/* Rows of hd values are padded with zeros to whole ZD_ATT_LANES in the tiles. */
static inline int64_t zd_att_hdp(int64_t hd) { return (hd + ZD_ATT_LANES - 1) / ZD_ATT_LANES * ZD_ATT_LANES; }

static inline int64_t zd_att_tokens_per_item(int64_t group) {
    return group >= ZD_ATT_ROWS ? 1 : ZD_ATT_ROWS / group;
}

static inline int64_t zd_att_max_items(int64_t n, int64_t n_kv) { return n * n_kv * ZD_ATT_MAX_SPLITS; }

/* Floats of one thread's scratch for head size hd and `group` query heads per kv head. */
static inline int64_t zd_att_scratch_floats(int64_t hd, int64_t group) {
    const int64_t hdp = zd_att_hdp(hd), rows = zd_att_tokens_per_item(group) * group;
    return 3 * ZD_ATT_KEYS * hdp + 2 * rows * hdp + 3 * rows + rows * ZD_ATT_KEYS + hdp;
}

/* The first key token t may see. */
static inline int64_t zd_att_lo(const zd_att_job *job, int64_t t) {
    return job->window > 0 ? zd_max64(0, job->pos[t] - job->window + 1) : 0;
}

/* Cut the batch into work items (job->items, n_items) and record each token's shares. Later
 * blocks of a prompt come first: they see the most keys, and are best started early. */
static void zd_att_plan(zd_att_job *job) {
    const int64_t per = zd_att_tokens_per_item(job->n_heads / job->n_kv);
    int64_t count = 0, t = 0;
    while (t < job->n) {
        int64_t end = t + 1;   /* the run of tokens that follow each other in one sequence */
        while (end < job->n && job->seq[end] == job->seq[t] && job->pos[end] == job->pos[end - 1] + 1)
            end++;
        if (end - t == 1 && job->pos[t] + 1 - zd_att_lo(job, t) > ZD_ATT_SPLIT_KEYS) {
            const int64_t lo = zd_att_lo(job, t), keys = job->pos[t] + 1 - lo;
            /* enough shares for 16 threads across the kv heads, no more: each share starts a
             * new stream of cache rows, whose first tiles are read before any prefetch */
            const int64_t most = zd_min64(ZD_ATT_MAX_SPLITS, (ZD_ATT_MAX_SPLITS + job->n_kv - 1) / job->n_kv);
            const int64_t shares = zd_min64(most, (keys + ZD_ATT_SPLIT_KEYS - 1) / ZD_ATT_SPLIT_KEYS);
            const int64_t chunk = (keys + shares - 1) / shares;
            job->splits[t] = (int32_t)shares;
            for (int64_t s = 0; s < shares; s++)
                for (int64_t kv = 0; kv < job->n_kv; kv++) {
                    zd_att_item it = {t, t + 1, kv, lo + s * chunk, zd_min64(job->pos[t] + 1, lo + (s + 1) * chunk),
                                      (int)s};
                    job->items[count++] = it;
                }
        } else {
            for (int64_t b1 = end; b1 > t; b1 -= per) {
                const int64_t b0 = zd_max64(t, b1 - per);
                for (int64_t i = b0; i < b1; i++)
                    job->splits[i] = 1;
                for (int64_t kv = 0; kv < job->n_kv; kv++) {
                    zd_att_item it = {b0, b1, kv, zd_att_lo(job, b0), job->pos[b1 - 1] + 1, -1};
                    job->items[count++] = it;
                }
            }
        }
        t = end;
    }
    job->n_items = count;
}

/* The inner loops, written once in plain C and compiled for each instruction-set path
 * (ZD_ATT_LOOPS below): small functions of their own, so the compiler keeps their ZD_ATT_LANES
 * accumulators in registers. */

/* out[0..LANES) = base * scale + sum_t c[t] * rows[t * stride ..]: a weighted sum of n rows, LANES
 * wide, kept in registers; base NULL is zero. With c a query and rows a transposed key tile, the
 * scores of LANES keys; with c the softmax weights and rows the value tile, LANES dims of an output. */
ZD_INLINE void zd_att_lanes_body(float *ZD_RESTRICT out, const float *base, float scale, const float *ZD_RESTRICT c,
                                 const float *ZD_RESTRICT rows, int64_t stride, int64_t n) {
    float lanes[ZD_ATT_LANES];
    for (int i = 0; i < ZD_ATT_LANES; i++)
        lanes[i] = base ? base[i] * scale : 0.0f;
    for (int64_t t = 0; t < n; t++) {
        const float ct = c[t];
        const float *ZD_RESTRICT row = rows + t * stride;
#pragma omp simd
        for (int i = 0; i < ZD_ATT_LANES; i++)
            lanes[i] = fmaf(ct, row[i], lanes[i]);
    }
    for (int i = 0; i < ZD_ATT_LANES; i++)
        out[i] = lanes[i];
}

/* scores[r * KEYS + j] = q_r . k_j for the `rows` queries (hdp apart) and keys j0 <= j < j1 of a
 * tile (hdp apart): a decode token's few rows, where transposing the tile would cost more. */
ZD_INLINE void zd_att_dots_body(const float *ZD_RESTRICT q, int64_t rows, const float *ZD_RESTRICT k, int64_t j0,
                                int64_t j1, int64_t hdp, float *ZD_RESTRICT scores) {
    for (int64_t r = 0; r < rows; r++) {
        const float *ZD_RESTRICT qr = q + r * hdp;
        float *ZD_RESTRICT out = scores + r * ZD_ATT_KEYS;
        int64_t j = j0;
        for (; j + 4 <= j1; j += 4) {   /* four keys at once: four independent sums */
            const float *ZD_RESTRICT k0 = k + j * hdp, *ZD_RESTRICT k1 = k0 + hdp, *ZD_RESTRICT k2 = k1 + hdp,
                        *ZD_RESTRICT k3 = k2 + hdp;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+:s0, s1, s2, s3)
            for (int64_t d = 0; d < hdp; d++) {
                s0 = fmaf(qr[d], k0[d], s0);
                s1 = fmaf(qr[d], k1[d], s1);
                s2 = fmaf(qr[d], k2[d], s2);
                s3 = fmaf(qr[d], k3[d], s3);
            }
            out[j] = s0;
            out[j + 1] = s1;
            out[j + 2] = s2;
            out[j + 3] = s3;
        }
        for (; j < j1; j++) {
            const float *ZD_RESTRICT kj = k + j * hdp;
            float dot = 0.0f;
#pragma omp simd reduction(+:dot)
            for (int64_t d = 0; d < hdp; d++)
                dot = fmaf(qr[d], kj[d], dot);
            out[j] = dot;
        }
    }
}

/* n cache rows (hd values of `type`, `stride` bytes apart) as float rows hdp apart. `f16`
 * converts halves on this path. */
ZD_INLINE void zd_att_decode_body(int type, const uint8_t *ZD_RESTRICT rows, int64_t stride, int64_t n, int64_t hd,
                                  float *ZD_RESTRICT out, int64_t hdp, void (*f16)(const uint8_t *, float *, int64_t)) {
    const int64_t bytes = zd_min64(stride, zd_row_bytes(type, hd));
    for (int64_t i = 0; i < n; i++, rows += stride, out += hdp) {
        for (int64_t o = 0; o < bytes; o += 64)
            ZD_ATT_PREFETCH(rows, stride, o);
        if (type == ZD_F32) {
            memcpy(out, rows, (size_t)hd * sizeof(float));
        } else if (type == ZD_F16) {
            f16(rows, out, hd);
        } else {   /* Q8_0: per 32 values an f16 scale and 32 int8 */
            const uint8_t *block = rows;
            for (int64_t b = 0; b < hd / ZD_QK; b++, block += 2 + ZD_QK) {
                uint16_t h;
                memcpy(&h, block, 2);
                const float d = zd_f16_to_f32(h);
                const int8_t *ZD_RESTRICT q = (const int8_t *)(block + 2);
                float *ZD_RESTRICT o = out + b * ZD_QK;
#pragma omp simd
                for (int i = 0; i < ZD_QK; i++)
                    o[i] = d * (float)q[i];
            }
        }
    }
}

static void zd_att_f16_scalar(const uint8_t *row, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, row + 2 * i, 2);
        out[i] = zd_f16_to_f32(h);
    }
}

#if ZD_X86
ZD_TARGET_AVX2 static void zd_att_f16_f16c(const uint8_t *row, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))));
    zd_att_f16_scalar(row + 2 * i, out + i, n - i);
}

ZD_TARGET_AVX512 static void zd_att_f16_avx512(const uint8_t *row, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * i))));
    zd_att_f16_f16c(row + 2 * i, out + i, n - i);
}
#endif

/* A path's inner loops, bound together for zd_att_run_item. pv folds a tile's values into every
 * row: acc[r] = acc[r] * corr[r] + sum_{j0 <= j < j1} p[r * KEYS + j] * v_j (rows hdp apart).
 * dots_f16 and pv_f16 (NULL where a path has none) read an f16 cache tile in place, for head
 * sizes that are a multiple of 16. */
typedef struct {
    void (*lanes)(float *, const float *, float, const float *, const float *, int64_t, int64_t);
    void (*dots)(const float *, int64_t, const float *, int64_t, int64_t, int64_t, float *);
    void (*decode)(int, const uint8_t *, int64_t, int64_t, int64_t, float *, int64_t);
    void (*pv)(float *, const float *, const float *, const float *, int64_t, int64_t, int64_t, int64_t);
    void (*dots_f16)(const float *, int64_t, const uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t,
                     const uint8_t *, float *);
    void (*pv_f16)(float *, const float *, const float *, const uint8_t *, int64_t, int64_t, int64_t, int64_t,
                   int64_t, int64_t);
} zd_att_loops;

#define ZD_ATT_LOOPS(path, target, f16)                                                                        \
    target __attribute__((noinline)) static void zd_att_lanes_##path(float *out, const float *base, float scale, \
                                                                      const float *c, const float *rows,       \
                                                                      int64_t stride, int64_t n) {             \
        zd_att_lanes_body(out, base, scale, c, rows, stride, n);                                               \
    }                                                                                                          \
    /* dots and pv: unused on the AVX-512 path, which has its own */                                           \
    target __attribute__((noinline, unused)) static void zd_att_dots_##path(const float *q, int64_t rows,      \
                                                                             const float *k, int64_t j0,       \
                                                                             int64_t j1, int64_t hdp,          \
                                                                             float *scores) {                  \
        zd_att_dots_body(q, rows, k, j0, j1, hdp, scores);                                                     \
    }                                                                                                          \
    target static void zd_att_decode_##path(int type, const uint8_t *rows, int64_t stride, int64_t n,          \
                                            int64_t hd, float *out, int64_t hdp) {                             \
        zd_att_decode_body(type, rows, stride, n, hd, out, hdp, f16);                                          \
    }                                                                                                          \
    __attribute__((unused)) static void zd_att_pv_##path(float *acc, const float *corr, const float *p,        \
                                                         const float *vt, int64_t j0, int64_t j1, int64_t rows, \
                                                         int64_t hdp) {                                        \
        for (int64_t r = 0; r < rows; r++)                                                                     \
            for (int64_t c0 = 0; c0 < hdp; c0 += ZD_ATT_LANES)                                                 \
                zd_att_lanes_##path(acc + r * hdp + c0, acc + r * hdp + c0, corr[r], p + r * ZD_ATT_KEYS + j0, \
                                    vt + j0 * hdp + c0, hdp, j1 - j0);                                         \
    }

ZD_ATT_LOOPS(scalar, , zd_att_f16_scalar)
static const zd_att_loops zd_att_loops_scalar = {zd_att_lanes_scalar, zd_att_dots_scalar, zd_att_decode_scalar,
                                                 zd_att_pv_scalar, NULL, NULL};
#if ZD_X86
ZD_ATT_LOOPS(avx2, ZD_TARGET_AVX2, zd_att_f16_f16c)
static const zd_att_loops zd_att_loops_avx2 = {zd_att_lanes_avx2, zd_att_dots_avx2, zd_att_decode_avx2,
                                               zd_att_pv_avx2, NULL, NULL};

/* AVX-512 dots and pv (the plain loops above are their reference). */

/* One vector of the 16 sums of s[0..16) (16 lanes each): s[i]'s sum in lane i. Halves, quarters,
 * pairs and singles of lanes are added pairwise; the last step leaves key 4k + m in lane 4m + k. */
ZD_TARGET_AVX512 ZD_INLINE __m512 zd_att_sum16_avx512(const __m512 s[16]) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)   /* b[i]: s[2i] in lanes 0-7, s[2i+1] in 8-15 */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)   /* c[i]: s[4i + m] in lanes 4m..4m+3 */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)   /* d[i]: in lanes 4m, 4m+1: s[8i + m]; 4m+2, 4m+3: s[8i + 4 + m] */
        d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
    const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), e);
}

/* zd_att_dots_body, 16 keys of one row at a time: 16 independent sums, one horizontal add for all.
 * Whole runs of 16 keys are computed (the tile's rows up to the next multiple of 16 are zero or
 * earlier keys, and the scores past j1 are never read). */
ZD_TARGET_AVX512 __attribute__((noinline)) static void zd_att_dots_floats_avx512(const float *q, int64_t rows,
                                                                             const float *k, int64_t j0, int64_t j1,
                                                                             int64_t hdp, float *scores) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t jb = j0 / 16 * 16; jb < j1; jb += 16) {
            __m512 s[16];
            for (int i = 0; i < 16; i++)
                s[i] = _mm512_setzero_ps();
            for (int64_t d = 0; d < hdp; d += 16) {
                const __m512 qd = _mm512_loadu_ps(q + r * hdp + d);
                for (int i = 0; i < 16; i++)
                    s[i] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + (jb + i) * hdp + d), s[i]);
            }
            _mm512_storeu_ps(scores + r * ZD_ATT_KEYS + jb, zd_att_sum16_avx512(s));
        }
}

/* pv for NR rows x NC vectors of 16 dims from dim c0, the NR * NC sums kept in registers. The
 * value rows are `stride` bytes apart at v: floats, or halves when `half` (an f16 cache tile read
 * in place). */
ZD_TARGET_AVX512 ZD_INLINE void zd_att_pv_block_avx512(float *acc, int64_t hdp, const float *corr, const float *p,
                                                       const uint8_t *v, int64_t stride, int64_t j0, int64_t j1,
                                                       int64_t c0, const int nr, const int nc, const int half,
                                                       const int first_rows) {
    __m512 a[4][4];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++)
            a[r][c] = _mm512_mul_ps(_mm512_set1_ps(corr[r]), _mm512_loadu_ps(acc + r * hdp + c0 + 16 * c));
    for (int64_t j = j0; j < j1; j++) {
        __m512 x[4];
        if (half && first_rows)   /* this block's two lines of the row ahead */
            for (int c = 0; c < nc; c += 2)
                ZD_ATT_PREFETCH(v + j * stride, stride, 2 * (c0 + 16 * c));
        for (int c = 0; c < nc; c++)
            x[c] = half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + j * stride) + (c0 / 16 + c)))
                        : _mm512_loadu_ps((const float *)(v + j * stride) + c0 + 16 * c);
        for (int r = 0; r < nr; r++) {
            const __m512 w = _mm512_set1_ps(p[r * ZD_ATT_KEYS + j]);
            for (int c = 0; c < nc; c++)
                a[r][c] = _mm512_fmadd_ps(w, x[c], a[r][c]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++)
            _mm512_storeu_ps(acc + r * hdp + c0 + 16 * c, a[r][c]);
}

/* pv in blocks of up to 4 rows x 64 of the `width` dims (a multiple of 16). */
ZD_TARGET_AVX512 ZD_INLINE void zd_att_pv_blocks_avx512(float *acc, const float *corr, const float *p,
                                                        const uint8_t *v, int64_t stride, int64_t j0, int64_t j1,
                                                        int64_t rows, int64_t width, int64_t hdp, const int half) {
#define ZD_ATT_PV_CASE(nr, nc)                                                                                 \
    case 4 * nr + nc:                                                                                          \
        zd_att_pv_block_avx512(acc + r0 * hdp, hdp, corr + r0, p + r0 * ZD_ATT_KEYS, v, stride, j0, j1, c0, nr, \
                               nc, half, r0 == 0);                                                             \
        break;
    for (int64_t r0 = 0; r0 < rows; r0 += 4)
        for (int64_t c0 = 0; c0 < width; c0 += 64)
            switch (4 * zd_min64(4, rows - r0) + zd_min64(4, (width - c0) / 16)) {
                ZD_ATT_PV_CASE(1, 1) ZD_ATT_PV_CASE(1, 2) ZD_ATT_PV_CASE(1, 3) ZD_ATT_PV_CASE(1, 4)
                ZD_ATT_PV_CASE(2, 1) ZD_ATT_PV_CASE(2, 2) ZD_ATT_PV_CASE(2, 3) ZD_ATT_PV_CASE(2, 4)
                ZD_ATT_PV_CASE(3, 1) ZD_ATT_PV_CASE(3, 2) ZD_ATT_PV_CASE(3, 3) ZD_ATT_PV_CASE(3, 4)
                ZD_ATT_PV_CASE(4, 1) ZD_ATT_PV_CASE(4, 2) ZD_ATT_PV_CASE(4, 3) ZD_ATT_PV_CASE(4, 4)
            }
#undef ZD_ATT_PV_CASE
}

ZD_TARGET_AVX512 __attribute__((noinline)) static void zd_att_pv_floats_avx512(float *acc, const float *corr,
                                                                             const float *p, const float *vt,
                                                                             int64_t j0, int64_t j1, int64_t rows,
                                                                             int64_t hdp) {
    zd_att_pv_blocks_avx512(acc, corr, p, (const uint8_t *)vt, hdp * (int64_t)sizeof(float), j0, j1, rows, hdp, hdp, 0);
}

ZD_TARGET_AVX512 __attribute__((noinline)) static void zd_att_pv_f16_avx512(float *acc, const float *corr,
                                                                            const float *p, const uint8_t *v,
                                                                            int64_t stride, int64_t j0, int64_t j1,
                                                                            int64_t rows, int64_t hd, int64_t hdp) {
    zd_att_pv_blocks_avx512(acc, corr, p, v, stride, j0, j1, rows, hd, hdp, 1);
}

/* Scores of up to 4 rows x keys jb..jb+3 (those from j1 on read `zero`) straight from an f16 key
 * tile: each 16 dims of a key converted once for all the rows, the 16 sums added across lanes at
 * once (row r's four in lanes 4r..4r+3). */
ZD_TARGET_AVX512 ZD_INLINE void zd_att_dots_f16_block(const float *q, int64_t hdp, const uint8_t *k, int64_t stride,
                                                      int64_t jb, int64_t j1, int64_t hd, const uint8_t *zero,
                                                      float *scores, const int nr, const int first_rows) {
    const __m256i *key[4];
    for (int i = 0; i < 4; i++)
        key[i] = (const __m256i *)(jb + i < j1 ? k + (jb + i) * stride : zero);
    __m512 s[16];
    for (int i = 0; i < 16; i++)
        s[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd / 16; d++) {
        __m512 x[4];
        if (first_rows && d % 2 == 0)   /* the keys' lines of the rows ahead */
            for (int i = 0; i < 4; i++)
                ZD_ATT_PREFETCH((const uint8_t *)key[i], stride, 32 * d);
        for (int i = 0; i < 4; i++)
            x[i] = _mm512_cvtph_ps(_mm256_loadu_si256(key[i] + d));
        for (int r = 0; r < nr; r++) {
            const __m512 qr = _mm512_loadu_ps(q + r * hdp + 16 * d);
            for (int i = 0; i < 4; i++)
                s[4 * r + i] = _mm512_fmadd_ps(qr, x[i], s[4 * r + i]);
        }
    }
    float sums[16];
    _mm512_storeu_ps(sums, zd_att_sum16_avx512(s));
    for (int r = 0; r < nr; r++)
        memcpy(scores + r * ZD_ATT_KEYS + jb, sums + 4 * r, 4 * sizeof(float));
}

/* zd_att_dots_body straight from an f16 key tile (rows `stride` bytes apart, hd a multiple of 16):
 * scores of whole runs of 4 keys from j0 / 4 * 4 (those past j1 are never read). `zero`: hd
 * zero halves. */
ZD_TARGET_AVX512 __attribute__((noinline)) static void zd_att_dots_f16_avx512(const float *q, int64_t rows,
                                                                              const uint8_t *k, int64_t stride,
                                                                              int64_t j0, int64_t j1, int64_t hd,
                                                                              int64_t hdp, const uint8_t *zero,
                                                                              float *scores) {
    for (int64_t r0 = 0; r0 < rows; r0 += 4)
        for (int64_t jb = j0 / 4 * 4; jb < j1; jb += 4) {
            const float *qr = q + r0 * hdp;
            float *out = scores + r0 * ZD_ATT_KEYS;
            switch (zd_min64(4, rows - r0)) {
            case 4: zd_att_dots_f16_block(qr, hdp, k, stride, jb, j1, hd, zero, out, 4, r0 == 0); break;
            case 3: zd_att_dots_f16_block(qr, hdp, k, stride, jb, j1, hd, zero, out, 3, r0 == 0); break;
            case 2: zd_att_dots_f16_block(qr, hdp, k, stride, jb, j1, hd, zero, out, 2, r0 == 0); break;
            default: zd_att_dots_f16_block(qr, hdp, k, stride, jb, j1, hd, zero, out, 1, r0 == 0); break;
            }
        }
}

ZD_ATT_LOOPS(avx512, ZD_TARGET_AVX512, zd_att_f16_avx512)
static const zd_att_loops zd_att_loops_avx512 = {zd_att_lanes_avx512,    zd_att_dots_floats_avx512,
                                                 zd_att_decode_avx512,   zd_att_pv_floats_avx512,
                                                 zd_att_dots_f16_avx512, zd_att_pv_f16_avx512};
#endif

/* One work item (see the header comment), with path `L`'s inner loops. `scratch`:
 * zd_att_scratch_floats of this thread. */
static void zd_att_run_item(const zd_att_job *job, const zd_att_item *it, float *ZD_RESTRICT scratch,
                        const zd_att_loops *L) {
    const zd_kv_layer *c = job->cache;
    const int64_t hd = job->hd, hdp = zd_att_hdp(hd), group = job->n_heads / job->n_kv;
    const int64_t rows = (it->t1 - it->t0) * group, seq = job->seq[it->t0];
    const int transpose = rows >= ZD_ATT_TRANSPOSE_ROWS;
    float *ZD_RESTRICT kf = scratch;                        /* [KEYS][hdp]: the key tile */
    float *ZD_RESTRICT kt = kf + ZD_ATT_KEYS * hdp;         /* [hdp][KEYS]: the key tile, transposed */
    float *ZD_RESTRICT vt = kt + hdp * ZD_ATT_KEYS;         /* [KEYS][hdp]: the value tile */
    float *ZD_RESTRICT qb = vt + ZD_ATT_KEYS * hdp;         /* [rows][hdp]: scaled queries */
    float *ZD_RESTRICT acc = qb + rows * hdp;               /* [rows][hdp] */
    float *ZD_RESTRICT m = acc + rows * hdp, *ZD_RESTRICT l = m + rows;
    float *ZD_RESTRICT corr = l + rows;                     /* [rows]: each row's rescale in this tile */
    float *ZD_RESTRICT scores = corr + rows;                /* [rows][KEYS]: scores, then softmax weights */
    float *ZD_RESTRICT zero = scores + rows * ZD_ATT_KEYS;  /* [hdp]: a zero row, for keys past a tile's end */
    /* f16 tiles read in place where the path can (no float copy), else decoded into kf, vt */
    const int f16 = c->type == ZD_F16 && hd % 16 == 0;
    const int keys_in_place = f16 && L->dots_f16 && !transpose, values_in_place = f16 && L->pv_f16;

    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = it->t0 + r / group, head = it->kv * group + r % group;
        const float *src = job->q + (t * job->n_heads + head) * hd;
        for (int64_t d = 0; d < hdp; d++) {
            qb[r * hdp + d] = d < hd ? src[d] * job->scale : 0.0f;
            acc[r * hdp + d] = 0.0f;
        }
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    if (hd < hdp)   /* dims past hd stay zero in every tile: they meet zero queries and weights */
        memset(scratch, 0, (size_t)3 * ZD_ATT_KEYS * hdp * sizeof(float));
    memset(zero, 0, (size_t)hdp * sizeof(float));

    for (int64_t kb = it->k0; kb < it->k1; kb += ZD_ATT_KEYS) {
        const int64_t kn = zd_min64(ZD_ATT_KEYS, it->k1 - kb);
        /* the keys any row of the block sees: [j_lo, j_hi) */
        const int64_t j_lo = zd_max64(0, zd_att_lo(job, it->t0) - kb);
        const int64_t j_hi = zd_min64(kn, job->pos[it->t1 - 1] - kb + 1);
        const uint8_t *ks = c->k + zd_kv_offset(c, seq, kb, it->kv), *vs = c->v + zd_kv_offset(c, seq, kb, it->kv);
        if (!keys_in_place) {
            L->decode(c->type, ks, c->row_bytes, kn, hd, kf, hdp);
            if (kn % 16)   /* keys up to the next 16 are zero: the AVX-512 dots read whole runs of 16 */
                memset(kf + kn * hdp, 0, (size_t)((kn + 15) / 16 * 16 - kn) * hdp * sizeof(float));
        }
        if (!values_in_place)
            L->decode(c->type, vs, c->row_bytes, kn, hd, vt, hdp);
        if (transpose)
            for (int64_t d = 0; d < hd; d++)
                for (int64_t j = 0; j < ZD_ATT_KEYS; j++)
                    kt[d * ZD_ATT_KEYS + j] = j < kn ? kf[j * hdp + d] : 0.0f;
        else if (keys_in_place)   /* every row's scores at once */
            L->dots_f16(qb, rows, ks, c->row_bytes, j_lo, j_hi, hd, hdp, (const uint8_t *)zero, scores);
        else
            L->dots(qb, rows, kf, j_lo, j_hi, hdp, scores);
        for (int64_t r = 0; r < rows; r++) {
            const int64_t t = it->t0 + r / group, pos = job->pos[t], lo = zd_att_lo(job, t);
            float *ZD_RESTRICT p = scores + r * ZD_ATT_KEYS;
            const int64_t j0 = zd_max64(j_lo, lo - kb), j1 = zd_min64(j_hi, pos - kb + 1);
            if (j0 >= j1) {   /* every key of the tile is hidden from this row */
                corr[r] = 1.0f;
                memset(p + j_lo, 0, (size_t)(j_hi - j_lo) * sizeof(float));
                continue;
            }
            if (transpose)   /* ZD_ATT_LANES keys at a time */
                for (int64_t jb = 0; jb < j1; jb += ZD_ATT_LANES)
                    L->lanes(p + jb, NULL, 0.0f, qb + r * hdp, kt + jb, ZD_ATT_KEYS, hd);
            if (job->softcap > 0.0f) {
                const float cap = job->softcap;
                for (int64_t j = j0; j < j1; j++)
                    p[j] = cap * zd_tanh(p[j] / cap);
            }
            float top = -INFINITY;
#pragma omp simd reduction(max:top)
            for (int64_t j = j0; j < j1; j++)
                top = p[j] > top ? p[j] : top;
            const float m_new = top > m[r] ? top : m[r];
            float total = 0.0f;
#pragma omp simd reduction(+:total)
            for (int64_t j = j0; j < j1; j++) {
                p[j] = zd_exp_nonpos(p[j] - m_new);
                total += p[j];
            }
            for (int64_t j = j_lo; j < j0; j++)   /* keys other rows see, this one not */
                p[j] = 0.0f;
            for (int64_t j = j1; j < j_hi; j++)
                p[j] = 0.0f;
            corr[r] = m[r] == -INFINITY ? 0.0f : zd_exp_nonpos(m[r] - m_new);
            l[r] = l[r] * corr[r] + total;
            m[r] = m_new;
        }
        if (values_in_place)
            L->pv_f16(acc, corr, scores, vs, c->row_bytes, j_lo, j_hi, rows, hd, hdp);
        else
            L->pv(acc, corr, scores, vt, j_lo, j_hi, rows, hdp);
    }

    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = it->t0 + r / group, head = it->kv * group + r % group;
        const float *a = acc + r * hdp;
        if (it->split < 0) {
            float *dst = job->out + (t * job->n_heads + head) * hd;
            const float inverse = 1.0f / l[r];
            for (int64_t d = 0; d < hd; d++)
                dst[d] = a[d] * inverse;
        } else {
            float *dst = job->partial + ((t * job->n_heads + head) * ZD_ATT_MAX_SPLITS + it->split) * (hdp + 2);
            dst[0] = m[r];
            dst[1] = l[r];
            memcpy(dst + 2, a, (size_t)hd * sizeof(float));
        }
    }
}

/* This thread's part of the items: taken one by one from the shared counter `next`. */
static void zd_att_work(const zd_att_job *job, int64_t *next, float *scratch, int isa) {
    const zd_att_loops *loops = &zd_att_loops_scalar;
#if ZD_X86
    if (isa == ZD_ISA_AVX512)
        loops = &zd_att_loops_avx512;
    else if (isa == ZD_ISA_AVX2)
        loops = &zd_att_loops_avx2;
#endif
    (void)isa;
    for (int64_t i; (i = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) < job->n_items;)
        zd_att_run_item(job, &job->items[i], scratch, loops);
}

/* Merge the shares of split tokens into their outputs: thread ith of nth's part (after every
 * item has finished). */
static void zd_att_merge(const zd_att_job *job, int ith, int nth) {
    const int64_t hd = job->hd, hdp = zd_att_hdp(hd);
    zd_spans spans = zd_spans_of(job->n, job->n_heads, ith, nth);
    int64_t t, h0, h1;
    while (zd_spans_next(&spans, &t, &h0, &h1)) {
        const int64_t shares = job->splits[t];
        if (shares <= 1)
            continue;
        for (int64_t head = h0; head < h1; head++) {
            const float *part = job->partial + (t * job->n_heads + head) * ZD_ATT_MAX_SPLITS * (hdp + 2);
            float top = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < shares; s++)
                top = part[s * (hdp + 2)] > top ? part[s * (hdp + 2)] : top;
            float weight[ZD_ATT_MAX_SPLITS];
            for (int64_t s = 0; s < shares; s++) {
                weight[s] = zd_exp_nonpos(part[s * (hdp + 2)] - top);
                total += weight[s] * part[s * (hdp + 2) + 1];
            }
            float *dst = job->out + (t * job->n_heads + head) * hd;
            for (int64_t d = 0; d < hd; d++) {
                float v = 0.0f;
                for (int64_t s = 0; s < shares; s++)
                    v = fmaf(weight[s], part[s * (hdp + 2) + 2 + d], v);
                dst[d] = v / total;
            }
        }
    }
}

/* The attention op on its own: job planned and run by a team of nth threads, each with
 * `stride` floats of `scratch`. The batch's keys and values are in the cache already. */
static void zd_attention(zd_att_job *job, float *scratch, int64_t stride, int isa, int nth) {
    zd_att_plan(job);
    int64_t next = 0;
    zd_barrier barrier = {0, 0};
#pragma omp parallel num_threads(nth)
    {
        const int ith = zd_thread_num(), team = zd_team_size();
        int sense = 0;
        zd_att_work(job, &next, scratch + ith * stride, isa);
        zd_barrier_wait(&barrier, &sense, team);
        zd_att_merge(job, ith, team);
    }
}

#endif
