/* Activations for the integer matmul kernels: float rows rounded to 8-bit blocks once per matmul.
 *
 * Weights of the legacy types (Q4_0 ... Q8_0) meet activations quantised as Q8_0 (blocks of 32
 * values, one f16 scale); k-quant weights meet Q8_K (blocks of 256, one f32 scale). The rounding
 * is exactly that of zephyr.quants.quantize_q8_0 / quantize_q8_k (the reference backend rounds
 * its activations the same way), so the kernels differ from the reference only in float
 * summation order. Float weights (F32/F16/BF16) take the float rows as they are.
 *
 * The layout is not GGUF's: quants, scales and sums sit in separate arrays so that a vector load
 * takes 64 consecutive quants. Besides each block's scale d, the quantiser stores d * (sum of the
 * block's quants) per 16 and per 32 values: the kernels fold weight offsets and mins into one
 * float dot product with these sums instead of working them into the integer loop.
 */
#ifndef ZEPHYR_QUANTIZE_H
#define ZEPHYR_QUANTIZE_H

#include <math.h>
#include <string.h>
#include "common.h"
#include "dequant.h"

enum { ZD_ACT_F32 = 0, ZD_ACT_Q8_0 = 1, ZD_ACT_Q8_K = 2 };

/* Extra quants after each row, so a kernel may load a whole vector past a short row's end. */
#define ZD_ACT_PAD 64

/* n token rows of k values, prepared for the weights of one activation kind. */
typedef struct {
    int kind;
    int64_t n, k;
    const float *f;          /* ZD_ACT_F32: row t at f + t * f_stride */
    int64_t f_stride;
    int8_t *q;               /* quants: row t at q + t * q_stride */
    int64_t q_stride;
    float *d;                /* scale per block of 32 (Q8_0) or 256 (Q8_K) values */
    int64_t d_stride;
    float *s16, *s32;        /* d * sum of the quants, per 16 (Q8_K only) and per 32 values */
    int64_t s_stride;
    /* Q8_K: each super-block's 16 sums of 16 quants as bytes a dpbusd takes (row t at
     * zd_act_split16), 32 per super-block: 16 of (sum >> 4) + 128, then 16 of sum & 15 (exact:
     * sum = 16 (hi - 128) + lo, |sum| <= 16 * 127). */
    uint8_t *split16;
    /* Q8_K quants on the AVX-512 path are stored in "Q4_K order": each super-block's four
     * 64-value vectors hold its 32-value sub-blocks (0, 2), (1, 3), (4, 6), (5, 7), the pairs one
     * 64-byte load of Q4_K quants yields as low and high nibbles (dot_kquant.h). */
    int kq_order;
} zd_act;

/* Where value v (0..255) of a super-block sits in Q4_K order. */
static inline int zd_kq_order_at(int v) {
    const int sub = v / 32, half = sub / 4, e = sub % 2, second = (sub % 4) / 2;
    return 64 * (2 * half + e) + 32 * second + v % 32;
}

/* The activation kind weights of GGML type `type` take (-1 if none). */
static int zd_act_kind(int type) {
    switch (zd_x16_base(type)) {
    case ZD_F32: case ZD_F16: case ZD_BF16: return ZD_ACT_F32;
    case ZD_Q4_0: case ZD_Q4_1: case ZD_Q5_0: case ZD_Q5_1: case ZD_Q8_0: return ZD_ACT_Q8_0;
    case ZD_Q2_K: case ZD_Q3_K: case ZD_Q4_K: case ZD_Q5_K: case ZD_Q6_K: return ZD_ACT_Q8_K;
    default: return -1;
    }
}

static inline int64_t zd_round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* Bytes of buffer zd_act_init needs for n rows of k values of `kind` (0 for ZD_ACT_F32). */
static int64_t zd_act_bytes(int kind, int64_t n, int64_t k) {
    if (kind == ZD_ACT_F32)
        return 0;
    const int64_t q = zd_round_up(k + ZD_ACT_PAD, 64), d = zd_round_up(k / 32 + 16, 16);
    const int64_t s = zd_round_up(k / 16 + 16, 16);
    return 64 + n * (q + 4 * d + 10 * s);
}

/* Row t of a Q8_K activation's split16 (2 bytes per 16 values, within s_stride's room). */
static inline uint8_t *zd_act_split16(const zd_act *a, int64_t t) { return a->split16 + 2 * t * a->s_stride; }

/* Lay out a quantised activation of n rows of k values over `buffer` (zd_act_bytes long), for
 * the kernels of path `isa`. */
static void zd_act_init(zd_act *a, int kind, int64_t n, int64_t k, void *buffer, int isa) {
    memset(a, 0, sizeof *a);
    a->kind = kind;
    a->kq_order = kind == ZD_ACT_Q8_K && isa == ZD_ISA_AVX512;
    a->n = n;
    a->k = k;
    if (kind == ZD_ACT_F32)
        return;
    uint8_t *p = (uint8_t *)(((uintptr_t)buffer + 63) & ~(uintptr_t)63);
    a->q_stride = zd_round_up(k + ZD_ACT_PAD, 64);
    a->d_stride = zd_round_up(k / 32 + 16, 16);
    a->s_stride = zd_round_up(k / 16 + 16, 16);
    a->q = (int8_t *)p;
    p += n * a->q_stride;
    a->d = (float *)p;
    p += n * a->d_stride * 4;
    a->s16 = (float *)p;
    p += n * a->s_stride * 4;
    a->s32 = (float *)p;
    p += n * a->s_stride * 4;
    a->split16 = p;
}

/* ---- Q8_0: per 32 values d = max|x| / 127 (stored as f16), q = roundf(x / d) ------------------- */

static void zd_quantize_q8_0_scalar(const float *ZD_RESTRICT x, int64_t k, int8_t *ZD_RESTRICT q,
                                    float *ZD_RESTRICT d, float *ZD_RESTRICT s32) {
    for (int64_t b = 0; b < k / 32; b++, x += 32, q += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++)
            amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
        const float scale = amax / 127.0f;
        const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            const int v = (int)roundf(x[j] * inverse);
            q[j] = (int8_t)v;
            sum += v;
        }
        d[b] = zd_f16_to_f32(zd_f32_to_f16(scale));
        s32[b] = d[b] * (float)sum;
    }
}

/* ---- Q8_K: per 256 values, with `peak` the first value of largest magnitude, iscale =
 * -127 / peak, q = min(127, rint(iscale * x)), d = 1 / iscale ---------------------------------- */

/* A super-block's s16, s32 and split16 from its sums of quants per 16 values. */
static inline void zd_q8_k_put_sums(const int sums[16], float d, float *ZD_RESTRICT s16, float *ZD_RESTRICT s32,
                                    uint8_t *ZD_RESTRICT split16) {
    for (int g = 0; g < 16; g++) {
        s16[g] = d * (float)sums[g];
        split16[g] = (uint8_t)((sums[g] >> 4) + 128);
        split16[16 + g] = (uint8_t)(sums[g] & 15);
    }
    for (int j = 0; j < 8; j++)
        s32[j] = d * (float)(sums[2 * j] + sums[2 * j + 1]);
}

/* A super-block of zeros: quants, scale and sums. */
static inline void zd_q8_k_zero(int8_t *q, float *d, float *ZD_RESTRICT s16, float *ZD_RESTRICT s32,
                                uint8_t *ZD_RESTRICT split16) {
    static const int none[16];
    memset(q, 0, 256);
    *d = 0.0f;
    zd_q8_k_put_sums(none, 0.0f, s16, s32, split16);
}

static void zd_q8_k_sums(const int8_t *q, float d, float *ZD_RESTRICT s16, float *ZD_RESTRICT s32,
                         uint8_t *ZD_RESTRICT split16) {
    int sums[16] = {0};
    for (int v = 0; v < 256; v++)
        sums[v / 16] += q[v];
    zd_q8_k_put_sums(sums, d, s16, s32, split16);
}

static void zd_quantize_q8_k_scalar(const float *ZD_RESTRICT x, int64_t k, int8_t *ZD_RESTRICT q,
                                    float *ZD_RESTRICT d, float *ZD_RESTRICT s16, float *ZD_RESTRICT s32,
                                    uint8_t *ZD_RESTRICT split16) {
    for (int64_t b = 0; b < k / 256; b++, x += 256, q += 256) {
        float amax = 0.0f, peak = 0.0f;
        for (int j = 0; j < 256; j++)
            if (fabsf(x[j]) > amax) {
                amax = fabsf(x[j]);
                peak = x[j];
            }
        const float iscale = amax != 0.0f ? -127.0f / peak : 0.0f;
        for (int j = 0; j < 256; j++) {
            const int v = (int)nearbyintf(iscale * x[j]);
            q[j] = (int8_t)(v < 127 ? v : 127);
        }
        d[b] = amax != 0.0f ? 1.0f / iscale : 0.0f;
        zd_q8_k_sums(q, d[b], s16 + 16 * b, s32 + 8 * b, split16 + 32 * b);
    }
}

#if ZD_X86
/* roundf on floats below 2^23: truncate x + copysign(0.49999997, x). The asm barrier keeps the
 * compiler from fusing the product that made x into that addition (which would skip a rounding
 * numpy performs). */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_round_away_512(__m512 x) {
    __asm__("" : "+v"(x));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    const __m512 half = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(0.49999997f))));
    return _mm512_cvttps_epi32(_mm512_add_ps(x, half));
}

ZD_TARGET_AVX2 ZD_INLINE __m256i zd_round_away_256(__m256 x) {
    __asm__("" : "+x"(x));
    const __m256 sign = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)));
    return _mm256_cvttps_epi32(_mm256_add_ps(x, _mm256_or_ps(sign, _mm256_set1_ps(0.49999997f))));
}

ZD_TARGET_AVX2 ZD_INLINE float zd_hmax_256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

ZD_TARGET_AVX2 ZD_INLINE int zd_hsum_epi32_256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* Four vectors of 8 int32 (each within int8 range) -> 32 int8 in order. */
ZD_TARGET_AVX2 ZD_INLINE __m256i zd_pack_epi32_epi8_256(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

ZD_TARGET_AVX512 static void zd_quantize_q8_0_avx512(const float *ZD_RESTRICT x, int64_t k, int8_t *ZD_RESTRICT q,
                                                     float *ZD_RESTRICT d, float *ZD_RESTRICT s32) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < k / 32; b++, x += 32, q += 32) {
        const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, abs_mask), _mm512_and_ps(v1, abs_mask)));
        const float scale = amax / 127.0f;
        const __m512 inverse = _mm512_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
        const __m512i q0 = zd_round_away_512(_mm512_mul_ps(v0, inverse));
        const __m512i q1 = zd_round_away_512(_mm512_mul_ps(v1, inverse));
        _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
        d[b] = _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT));
        s32[b] = d[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

ZD_TARGET_AVX2 static void zd_quantize_q8_0_avx2(const float *ZD_RESTRICT x, int64_t k, int8_t *ZD_RESTRICT q,
                                                 float *ZD_RESTRICT d, float *ZD_RESTRICT s32) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < k / 32; b++, x += 32, q += 32) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
        }
        const float scale = zd_hmax_256(m) / 127.0f;
        const __m256 inverse = _mm256_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
        __m256i r[4];
        for (int i = 0; i < 4; i++)
            r[i] = zd_round_away_256(_mm256_mul_ps(v[i], inverse));
        _mm256_storeu_si256((__m256i *)q, zd_pack_epi32_epi8_256(r[0], r[1], r[2], r[3]));
        d[b] = _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        s32[b] = d[b] * (float)zd_hsum_epi32_256(sum);
    }
}

ZD_TARGET_AVX512 static void zd_quantize_q8_k_avx512(const float *ZD_RESTRICT x, int64_t k, int8_t *ZD_RESTRICT q,
                                                     float *ZD_RESTRICT d, float *ZD_RESTRICT s16,
                                                     float *ZD_RESTRICT s32, uint8_t *ZD_RESTRICT split16) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < k / 256; b++, x += 256, q += 256, s16 += 16, s32 += 8, split16 += 32) {
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < 16; i++)
            m = _mm512_max_ps(m, _mm512_and_ps(_mm512_loadu_ps(x + 16 * i), abs_mask));
        const float amax = _mm512_reduce_max_ps(m);
        if (amax == 0.0f) {
            zd_q8_k_zero(q, &d[b], s16, s32, split16);
            continue;
        }
        float peak = 0.0f;
        const __m512 target = _mm512_set1_ps(amax);
        for (int i = 0; i < 16; i++) {
            const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_and_ps(_mm512_loadu_ps(x + 16 * i), abs_mask), target, _CMP_EQ_OQ);
            if (hit) {
                peak = x[16 * i + __builtin_ctz(hit)];
                break;
            }
        }
        const float iscale = -127.0f / peak;
        const __m512 scale = _mm512_set1_ps(iscale);
        d[b] = 1.0f / iscale;
        int sums[16];
        for (int i = 0; i < 16; i++) {
            const __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * i), scale),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i v = _mm512_min_epi32(_mm512_cvttps_epi32(t), _mm512_set1_epi32(127));
            _mm_storeu_si128((__m128i *)(q + zd_kq_order_at(16 * i)), _mm512_cvtepi32_epi8(v));
            sums[i] = _mm512_reduce_add_epi32(v);
        }
        zd_q8_k_put_sums(sums, d[b], s16, s32, split16);
    }
}

ZD_TARGET_AVX2 static void zd_quantize_q8_k_avx2(const float *ZD_RESTRICT x, int64_t k, int8_t *ZD_RESTRICT q,
                                                 float *ZD_RESTRICT d, float *ZD_RESTRICT s16,
                                                 float *ZD_RESTRICT s32, uint8_t *ZD_RESTRICT split16) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < k / 256; b++, x += 256, q += 256, s16 += 16, s32 += 8, split16 += 32) {
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < 32; i++)
            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + 8 * i), abs_mask));
        const float amax = zd_hmax_256(m);
        if (amax == 0.0f) {
            zd_q8_k_zero(q, &d[b], s16, s32, split16);
            continue;
        }
        float peak = 0.0f;
        const __m256 target = _mm256_set1_ps(amax);
        for (int i = 0; i < 32; i++) {
            const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + 8 * i), abs_mask),
                                                             target, _CMP_EQ_OQ));
            if (hit) {
                peak = x[8 * i + __builtin_ctz(hit)];
                break;
            }
        }
        const float iscale = -127.0f / peak;
        const __m256 scale = _mm256_set1_ps(iscale);
        d[b] = 1.0f / iscale;
        int sums[16];
        for (int i = 0; i < 8; i++) {
            __m256i r[4];
            for (int j = 0; j < 4; j++) {
                const __m256 t = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * i + 8 * j), scale),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                r[j] = _mm256_min_epi32(_mm256_cvttps_epi32(t), _mm256_set1_epi32(127));
            }
            _mm256_storeu_si256((__m256i *)(q + 32 * i), zd_pack_epi32_epi8_256(r[0], r[1], r[2], r[3]));
            sums[2 * i] = zd_hsum_epi32_256(_mm256_add_epi32(r[0], r[1]));
            sums[2 * i + 1] = zd_hsum_epi32_256(_mm256_add_epi32(r[2], r[3]));
        }
        zd_q8_k_put_sums(sums, d[b], s16, s32, split16);
    }
}
#endif

/* Values per block of an activation kind (1 for floats). */
static inline int64_t zd_act_block(int kind) {
    return kind == ZD_ACT_Q8_0 ? 32 : kind == ZD_ACT_Q8_K ? 256 : 1;
}

/* Quantise blocks [b0, b1) of row t of `a` from `row` (the whole float row t) with path `isa`.
 * The span that ends the row also zeroes the padding after it: kernels read it (multiplying
 * it by zero weights), so it must hold finite values. */
static void zd_quantize_blocks(const float *row, zd_act *a, int isa, int64_t t, int64_t b0, int64_t b1) {
    if (a->kind == ZD_ACT_F32 || b1 <= b0)
        return;
    const int64_t block = zd_act_block(a->kind), k = (b1 - b0) * block;
    if (b1 * block == a->k) {
        memset(a->q + t * a->q_stride + a->k, 0, (size_t)(a->q_stride - a->k));
        memset(a->d + t * a->d_stride + b1, 0, (size_t)(a->d_stride - b1) * sizeof(float));
    }
    const float *x = row + b0 * block;
    int8_t *q = a->q + t * a->q_stride + b0 * block;
    float *d = a->d + t * a->d_stride + b0;
    if (a->kind == ZD_ACT_Q8_0) {
        float *s32 = a->s32 + t * a->s_stride + b0;
#if ZD_X86
        if (isa == ZD_ISA_AVX512) { zd_quantize_q8_0_avx512(x, k, q, d, s32); return; }
        if (isa == ZD_ISA_AVX2) { zd_quantize_q8_0_avx2(x, k, q, d, s32); return; }
#endif
        zd_quantize_q8_0_scalar(x, k, q, d, s32);
    } else {
        float *s16 = a->s16 + t * a->s_stride + 16 * b0, *s32 = a->s32 + t * a->s_stride + 8 * b0;
        uint8_t *split16 = zd_act_split16(a, t) + 32 * b0;
#if ZD_X86
        if (isa == ZD_ISA_AVX512) { zd_quantize_q8_k_avx512(x, k, q, d, s16, s32, split16); return; }
        if (isa == ZD_ISA_AVX2) { zd_quantize_q8_k_avx2(x, k, q, d, s16, s32, split16); return; }
#endif
        zd_quantize_q8_k_scalar(x, k, q, d, s16, s32, split16);
    }
}

/* Quantise float rows [lo, hi) of x (row t at x + t * ldx) into `a` with path `isa`. */
static void zd_quantize_rows(const float *x, int64_t ldx, zd_act *a, int isa, int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; t++)
        zd_quantize_blocks(x + t * ldx, a, isa, t, 0, a->k / zd_act_block(a->kind));
}

/* Point a ZD_ACT_F32 activation at float rows. */
static void zd_act_use_floats(zd_act *a, const float *x, int64_t ldx) {
    a->f = x;
    a->f_stride = ldx;
}

/* Row t of a quantised activation in GGUF's byte layout (Q8_0: 34 bytes per 32 values; Q8_K:
 * 292 per 256), for comparison with zephyr.quants. */
static void zd_act_pack_row(const zd_act *a, int64_t t, uint8_t *out) {
    const int8_t *q = a->q + t * a->q_stride;
    const float *d = a->d + t * a->d_stride;
    if (a->kind == ZD_ACT_Q8_0) {
        for (int64_t b = 0; b < a->k / 32; b++, out += 34) {
            const uint16_t h = zd_f32_to_f16(d[b]);
            memcpy(out, &h, 2);
            memcpy(out + 2, q + 32 * b, 32);
        }
    } else if (a->kind == ZD_ACT_Q8_K) {
        for (int64_t b = 0; b < a->k / 256; b++, out += 292) {
            memcpy(out, &d[b], 4);
            for (int v = 0; v < 256; v++)
                out[4 + v] = (uint8_t)q[256 * b + (a->kq_order ? zd_kq_order_at(v) : v)];
            /* GGML's sums per 16 values, from the kernels' own copy (split16) */
            const uint8_t *split = zd_act_split16(a, t) + 32 * b;
            for (int g = 0; g < 16; g++) {
                const int16_t sum = (int16_t)(16 * (split[g] - 128) + split[16 + g]);
                memcpy(out + 260 + 2 * g, &sum, 2);
            }
        }
    }
}

#endif
