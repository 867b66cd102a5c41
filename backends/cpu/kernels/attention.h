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
 * The inner loops are plain C that gcc vectorises for each instruction-set path (the three
 * zd_att_item_* functions below differ only in their target): scores for 64 keys at once from a
 * transposed key tile, values accumulated 64 dims at a time.
 */
#ifndef ZEPHYR_ATTENTION_H
#define ZEPHYR_ATTENTION_H

#include <math.h>
#include <string.h>
#include "common.h"
#include "dequant.h"
#include "quantize.h"

#define ZD_ATT_KEYS 64          /* keys per tile */
#define ZD_ATT_LANES 32         /* floats the inner loops keep in registers: 4 AVX2 or 8 SSE vectors */
#define ZD_ATT_ROWS 32          /* query rows per work item (at least one token's group) */
#define ZD_ATT_TRANSPOSE_ROWS 8 /* from this many rows, the key tile is transposed for the scores */
#define ZD_ATT_SPLIT_KEYS 512   /* a lone token's keys are shared out in runs of at least this many */
#define ZD_ATT_MAX_SPLITS 16

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
    return 3 * ZD_ATT_KEYS * hdp + 2 * rows * hdp + 2 * rows + (rows + 1) * ZD_ATT_KEYS;
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
            const int64_t shares = zd_min64(ZD_ATT_MAX_SPLITS, (keys + ZD_ATT_SPLIT_KEYS - 1) / ZD_ATT_SPLIT_KEYS);
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

/* e^x for finite x <= 0 (0 below about -87), to 3e-7 relative; plain arithmetic, so gcc
 * vectorises the loops that call it. x = n ln2 + r, e^r by its Taylor series to r^6. */
static inline float zd_att_exp(float x) {
    const int32_t ni = (int32_t)(x * 1.44269504f - 0.5f);
    const float n = (float)ni;
    const float r = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, x));
    float p = 1.0f / 720;
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    union { int32_t i; float f; } scale;
    scale.i = (ni > -127 ? ni + 127 : 0) << 23;
    return p * scale.f;
}

/* The three inner loops, written once in plain C and compiled for each instruction-set path
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
    for (int64_t i = 0; i < n; i++, rows += stride, out += hdp) {
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
#endif

/* A path's inner loops, bound together for zd_att_run_item. */
typedef struct {
    void (*lanes)(float *, const float *, float, const float *, const float *, int64_t, int64_t);
    void (*dots)(const float *, int64_t, const float *, int64_t, int64_t, int64_t, float *);
    void (*decode)(int, const uint8_t *, int64_t, int64_t, int64_t, float *, int64_t);
} zd_att_loops;

#define ZD_ATT_LOOPS(path, target, f16)                                                                        \
    target __attribute__((noinline)) static void zd_att_lanes_##path(float *out, const float *base, float scale, \
                                                                      const float *c, const float *rows,        \
                                                                      int64_t stride, int64_t n) {              \
        zd_att_lanes_body(out, base, scale, c, rows, stride, n);                                               \
    }                                                                                                          \
    target __attribute__((noinline)) static void zd_att_dots_##path(const float *q, int64_t rows, const float *k, \
                                                                     int64_t j0, int64_t j1, int64_t hdp,      \
                                                                     float *scores) {                          \
        zd_att_dots_body(q, rows, k, j0, j1, hdp, scores);                                                     \
    }                                                                                                          \
    target static void zd_att_decode_##path(int type, const uint8_t *rows, int64_t stride, int64_t n,         \
                                            int64_t hd, float *out, int64_t hdp) {                             \
        zd_att_decode_body(type, rows, stride, n, hd, out, hdp, f16);                                          \
    }                                                                                                          \
    static const zd_att_loops zd_att_loops_##path = {zd_att_lanes_##path, zd_att_dots_##path,                   \
                                                     zd_att_decode_##path};

ZD_ATT_LOOPS(scalar, , zd_att_f16_scalar)
#if ZD_X86
ZD_ATT_LOOPS(avx2, ZD_TARGET_AVX2, zd_att_f16_f16c)
ZD_ATT_LOOPS(avx512, ZD_TARGET_AVX512, zd_att_f16_f16c)
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
    float *ZD_RESTRICT scores = l + rows;                   /* [rows][KEYS] */
    float *ZD_RESTRICT p = scores + rows * ZD_ATT_KEYS;     /* [KEYS] */

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
    /* Rows past a short last tile and dims past hd stay zero: they meet zero weights or queries. */
    memset(scratch, 0, (size_t)3 * ZD_ATT_KEYS * hdp * sizeof(float));

    for (int64_t kb = it->k0; kb < it->k1; kb += ZD_ATT_KEYS) {
        const int64_t kn = zd_min64(ZD_ATT_KEYS, it->k1 - kb);
        L->decode(c->type, c->k + zd_kv_offset(c, seq, kb, it->kv), c->row_bytes, kn, hd, kf, hdp);
        L->decode(c->type, c->v + zd_kv_offset(c, seq, kb, it->kv), c->row_bytes, kn, hd, vt, hdp);
        if (transpose)
            for (int64_t d = 0; d < hd; d++)
                for (int64_t j = 0; j < ZD_ATT_KEYS; j++)
                    kt[d * ZD_ATT_KEYS + j] = j < kn ? kf[j * hdp + d] : 0.0f;
        else   /* every row's scores at once: the keys any row of the block sees */
            L->dots(qb, rows, kf, zd_max64(0, zd_att_lo(job, it->t0) - kb),
                    zd_min64(kn, job->pos[it->t1 - 1] - kb + 1), hdp, scores);
        for (int64_t r = 0; r < rows; r++) {
            const int64_t t = it->t0 + r / group, pos = job->pos[t], lo = zd_att_lo(job, t);
            if (kb > pos || kb + kn <= lo)
                continue;   /* every key of the tile is hidden from this row */
            const int64_t j0 = zd_max64(0, lo - kb), j1 = zd_min64(kn, pos - kb + 1);
            float *ZD_RESTRICT score = scores + r * ZD_ATT_KEYS;
            if (transpose)   /* ZD_ATT_LANES keys at a time */
                for (int64_t jb = 0; jb < j1; jb += ZD_ATT_LANES)
                    L->lanes(score + jb, NULL, 0.0f, qb + r * hdp, kt + jb, ZD_ATT_KEYS, hd);
            if (job->softcap > 0.0f)
                for (int64_t j = j0; j < j1; j++)
                    score[j] = job->softcap * tanhf(score[j] / job->softcap);
            float top = score[j0];
            for (int64_t j = j0 + 1; j < j1; j++)
                top = score[j] > top ? score[j] : top;
            const float m_new = top > m[r] ? top : m[r];
            const float correction = m[r] == -INFINITY ? 0.0f : zd_att_exp(m[r] - m_new);
            float total = 0.0f;
#pragma omp simd reduction(+:total)
            for (int64_t j = j0; j < j1; j++) {
                p[j] = zd_att_exp(score[j] - m_new);
                total += p[j];
            }
            l[r] = l[r] * correction + total;
            m[r] = m_new;
            for (int64_t c0 = 0; c0 < hdp; c0 += ZD_ATT_LANES)   /* ZD_ATT_LANES dims at a time */
                L->lanes(acc + r * hdp + c0, acc + r * hdp + c0, correction, p + j0, vt + j0 * hdp + c0, hdp, j1 - j0);
        }
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
                weight[s] = zd_att_exp(part[s * (hdp + 2)] - top);
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
