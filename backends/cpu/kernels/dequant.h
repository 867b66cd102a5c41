/* Block decoders: raw GGUF tensor bytes -> float32, one decoder per GGML type.
 *
 * zd_decoder(type) gives a function that decodes `k` consecutive values (k a multiple of the
 * type's block size) from `src` into `dst`; the matmul and embedding kernels decode one weight
 * row at a time with it. The numpy oracle for every layout is zephyr/quants.py.
 *
 * Blocks are packed (#pragma pack 1) because their sizes (18, 22, 110, 210 bytes...) put the
 * fields of consecutive blocks at arbitrary alignments.
 */
#ifndef ZEPHYR_DEQUANT_H
#define ZEPHYR_DEQUANT_H

#include <math.h>
#include <string.h>
#include "common.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* GGML type ids as stored in GGUF files (zephyr.quants.GGMLType). */
enum {
    ZD_F32 = 0, ZD_F16 = 1, ZD_Q4_0 = 2, ZD_Q4_1 = 3, ZD_Q5_0 = 6, ZD_Q5_1 = 7, ZD_Q8_0 = 8,
    ZD_Q2_K = 10, ZD_Q3_K = 11, ZD_Q4_K = 12, ZD_Q5_K = 13, ZD_Q6_K = 14, ZD_BF16 = 30,
};

#define ZD_QK 32     /* values per block, legacy formats */
#define ZD_QK_K 256  /* values per super-block, k-quants */

/* ---- scalar conversions ------------------------------------------------------------------ */

static inline float zd_f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float zd_f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1f)   /* inf / nan */
        return zd_f32_from_bits(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {    /* zero / subnormal: mantissa * 2^-24 */
        const float f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    return zd_f32_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

/* float -> IEEE half, rounding to nearest even (subnormals and overflow to inf included), as
 * numpy's astype(float16) and F16C's vcvtps2ph do. */
static inline uint16_t zd_f32_to_f16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u)            /* nan: keep it a (quiet) nan */
        return sign | 0x7e00u;
    if (magnitude >= 0x477ff000u)           /* >= 65520 rounds to inf */
        return sign | 0x7c00u;
    if (magnitude < 0x38800000u) {          /* below 2^-14: a subnormal half, units of 2^-24 */
        const float scaled = zd_f32_from_bits(magnitude) * 16777216.0f;   /* exact: a power of 2 */
        return sign | (uint16_t)nearbyintf(scaled);
    }
    /* Rebias the exponent, then round the 23-bit mantissa to 10 bits (ties to even); a carry
     * out of the mantissa correctly bumps the exponent. */
    const uint32_t rebiased = magnitude - ((uint32_t)(127 - 15) << 23);
    return sign | (uint16_t)((rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13);
}

static inline float zd_bf16_to_f32(uint16_t h) {
    return zd_f32_from_bits((uint32_t)h << 16);
}

/* ---- block layouts ----------------------------------------------------------------------- */

#pragma pack(push, 1)
typedef struct { uint16_t d; uint8_t qs[ZD_QK / 2]; } zd_block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[ZD_QK / 2]; } zd_block_q4_1;
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[ZD_QK / 2]; } zd_block_q5_0;
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[ZD_QK / 2]; } zd_block_q5_1;
typedef struct { uint16_t d; int8_t qs[ZD_QK]; } zd_block_q8_0;
/* k-quants: a super-block of 256 values in sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 values
 * (Q4_K, Q5_K), each sub-block with its own quantised scale (and min). */
typedef struct {
    uint8_t scales[ZD_QK_K / 16];   /* low nibble: scale, high nibble: min, per 16 values */
    uint8_t qs[ZD_QK_K / 4];        /* 2-bit quants */
    uint16_t d, dmin;
} zd_block_q2_k;
typedef struct {
    uint8_t hmask[ZD_QK_K / 8];     /* third bit of each quant */
    uint8_t qs[ZD_QK_K / 4];        /* low 2 bits */
    uint8_t scales[12];             /* 16 signed 6-bit scales */
    uint16_t d;
} zd_block_q3_k;
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];             /* 8 (scale, min) pairs of 6 bits */
    uint8_t qs[ZD_QK_K / 2];        /* 4-bit quants */
} zd_block_q4_k;
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[ZD_QK_K / 8];        /* fifth bit of each quant */
    uint8_t qs[ZD_QK_K / 2];
} zd_block_q5_k;
typedef struct {
    uint8_t ql[ZD_QK_K / 2];        /* low 4 bits */
    uint8_t qh[ZD_QK_K / 4];        /* high 2 bits */
    int8_t scales[ZD_QK_K / 16];
    uint16_t d;
} zd_block_q6_k;
#pragma pack(pop)

/* ---- legacy formats: blocks of 32 --------------------------------------------------------- */

static void zd_decode_f32(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    memcpy(dst, src, (size_t)k * sizeof(float));
}

static void zd_decode_f16(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
#if defined(__F16C__) && defined(__FLT16_MAX__)
    /* The compiler's own half type lets gcc vectorise the conversion (vcvtph2ps). */
    const _Float16 *half = (const _Float16 *)src;
    for (int64_t i = 0; i < k; i++)
        dst[i] = (float)half[i];
#else
    for (int64_t i = 0; i < k; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, sizeof h);
        dst[i] = zd_f16_to_f32(h);
    }
#endif
}

static void zd_decode_bf16(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    for (int64_t i = 0; i < k; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, sizeof h);
        dst[i] = zd_bf16_to_f32(h);
    }
}

/* Quant j of a 32-block: low nibble of qs[j] for j < 16, high nibble of qs[j - 16] after. */
static void zd_decode_q4_0(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q4_0 *b = (const zd_block_q4_0 *)src;
    for (int64_t i = 0; i < k / ZD_QK; i++, b++, dst += ZD_QK) {
        const float d = zd_f16_to_f32(b->d);
        /* omp simd: without it gcc unrolls these 16 iterations and then fails to vectorise. */
#pragma omp simd
        for (int j = 0; j < ZD_QK / 2; j++) {
            const int lo = b->qs[j] & 0x0f, hi = b->qs[j] >> 4;
            dst[j] = d * (float)(lo - 8);
            dst[j + ZD_QK / 2] = d * (float)(hi - 8);
        }
    }
}

static void zd_decode_q4_1(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q4_1 *b = (const zd_block_q4_1 *)src;
    for (int64_t i = 0; i < k / ZD_QK; i++, b++, dst += ZD_QK) {
        const float d = zd_f16_to_f32(b->d), m = zd_f16_to_f32(b->m);
        /* omp simd: without it gcc unrolls these 16 iterations and then fails to vectorise. */
#pragma omp simd
        for (int j = 0; j < ZD_QK / 2; j++) {
            const int lo = b->qs[j] & 0x0f, hi = b->qs[j] >> 4;
            dst[j] = d * (float)lo + m;
            dst[j + ZD_QK / 2] = d * (float)hi + m;
        }
    }
}

/* Q5: as Q4, plus a fifth bit for quant j in bit j of the little-endian 32-bit qh. */
static void zd_decode_q5_0(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q5_0 *b = (const zd_block_q5_0 *)src;
    for (int64_t i = 0; i < k / ZD_QK; i++, b++, dst += ZD_QK) {
        const float d = zd_f16_to_f32(b->d);
        const uint32_t qh = (uint32_t)b->qh[0] | (uint32_t)b->qh[1] << 8
                          | (uint32_t)b->qh[2] << 16 | (uint32_t)b->qh[3] << 24;
        for (int j = 0; j < ZD_QK / 2; j++) {
            const int lo = (b->qs[j] & 0x0f) | (int)((qh >> j) & 1u) << 4;
            const int hi = (b->qs[j] >> 4) | (int)((qh >> (j + ZD_QK / 2)) & 1u) << 4;
            dst[j] = d * (float)(lo - 16);
            dst[j + ZD_QK / 2] = d * (float)(hi - 16);
        }
    }
}

static void zd_decode_q5_1(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q5_1 *b = (const zd_block_q5_1 *)src;
    for (int64_t i = 0; i < k / ZD_QK; i++, b++, dst += ZD_QK) {
        const float d = zd_f16_to_f32(b->d), m = zd_f16_to_f32(b->m);
        const uint32_t qh = (uint32_t)b->qh[0] | (uint32_t)b->qh[1] << 8
                          | (uint32_t)b->qh[2] << 16 | (uint32_t)b->qh[3] << 24;
        for (int j = 0; j < ZD_QK / 2; j++) {
            const int lo = (b->qs[j] & 0x0f) | (int)((qh >> j) & 1u) << 4;
            const int hi = (b->qs[j] >> 4) | (int)((qh >> (j + ZD_QK / 2)) & 1u) << 4;
            dst[j] = d * (float)lo + m;
            dst[j + ZD_QK / 2] = d * (float)hi + m;
        }
    }
}

static void zd_decode_q8_0(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q8_0 *b = (const zd_block_q8_0 *)src;
    for (int64_t i = 0; i < k / ZD_QK; i++, b++, dst += ZD_QK) {
        const float d = zd_f16_to_f32(b->d);
        for (int j = 0; j < ZD_QK; j++)
            dst[j] = d * (float)b->qs[j];
    }
}

/* ---- k-quants: super-blocks of 256 -------------------------------------------------------- */

/* Q2_K: each half (128 values) reads 32 bytes of qs four times, at bit shifts 0, 2, 4, 6;
 * each pass yields 32 values in two sub-blocks of 16, every sub-block with its own
 * 4-bit scale and 4-bit min. */
static void zd_decode_q2_k(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q2_k *b = (const zd_block_q2_k *)src;
    for (int64_t i = 0; i < k / ZD_QK_K; i++, b++) {
        const float d = zd_f16_to_f32(b->d), dmin = zd_f16_to_f32(b->dmin);
        int sub = 0;
        for (int half = 0; half < 2; half++) {
            const uint8_t *q = b->qs + 32 * half;
            for (int shift = 0; shift < 8; shift += 2) {
                for (int part = 0; part < 2; part++, sub++, dst += 16) {
                    const float scale = d * (float)(b->scales[sub] & 0x0f);
                    const float min = dmin * (float)(b->scales[sub] >> 4);
                    for (int j = 0; j < 16; j++)
                        dst[j] = scale * (float)((q[16 * part + j] >> shift) & 3) - min;
                }
            }
        }
    }
}

/* Q3_K scale s (0..15) has 6 bits: the low 4 from a nibble of scales[0..7], the high 2 from
 * scales[8..11]; stored with an offset of 32. */
static inline int zd_q3_k_scale(const uint8_t *scales, int s) {
    const int low = s < 8 ? scales[s] & 0x0f : scales[s - 8] >> 4;
    const int high = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
    return (low | high << 4) - 32;
}

/* Q3_K: same walk as Q2_K (16-value sub-blocks, shifts 0..6 over 32 bytes per half); the
 * third bit sits in hmask[j] at bit (pass number); a clear bit means the quant is minus 4. */
static void zd_decode_q3_k(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q3_k *b = (const zd_block_q3_k *)src;
    for (int64_t i = 0; i < k / ZD_QK_K; i++, b++) {
        const float d = zd_f16_to_f32(b->d);
        int sub = 0, pass = 0;
        for (int half = 0; half < 2; half++) {
            const uint8_t *q = b->qs + 32 * half;
            for (int shift = 0; shift < 8; shift += 2, pass++) {
                for (int part = 0; part < 2; part++, sub++, dst += 16) {
                    const float scale = d * (float)zd_q3_k_scale(b->scales, sub);
                    const uint8_t *low = q + 16 * part, *hmask = b->hmask + 16 * part;
                    for (int j = 0; j < 16; j++) {
                        const int high = (hmask[j] >> pass) & 1;
                        dst[j] = scale * (float)(((low[j] >> shift) & 3) - 4 + 4 * high);
                    }
                }
            }
        }
    }
}

/* Q4_K/Q5_K: 8 (scale, min) pairs of 6 bits packed in 12 bytes. Pairs 0..3: low 6 bits of
 * bytes 0..3 (scale) and 4..7 (min). Pairs 4..7: a nibble of bytes 8..11 plus the top 2 bits
 * of bytes 0..3 (scale) and 4..7 (min). */
static inline void zd_k4_scale_min(const uint8_t *scales, int s, int *scale, int *min) {
    if (s < 4) {
        *scale = scales[s] & 63;
        *min = scales[s + 4] & 63;
    } else {
        *scale = (scales[s + 4] & 0x0f) | (scales[s - 4] >> 6) << 4;
        *min = (scales[s + 4] >> 4) | (scales[s] >> 6) << 4;
    }
}

/* Q4_K: four chunks of 64 values; chunk c reads qs[32c .. 32c+31]: low nibbles are sub-block
 * 2c, high nibbles sub-block 2c+1 (32 values each). Value = d*scale*q - dmin*min. */
static void zd_decode_q4_k(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q4_k *b = (const zd_block_q4_k *)src;
    for (int64_t i = 0; i < k / ZD_QK_K; i++, b++) {
        const float d = zd_f16_to_f32(b->d), dmin = zd_f16_to_f32(b->dmin);
        for (int c = 0; c < 4; c++, dst += 64) {
            const uint8_t *q = b->qs + 32 * c;
            int sc_lo, m_lo, sc_hi, m_hi;
            zd_k4_scale_min(b->scales, 2 * c, &sc_lo, &m_lo);
            zd_k4_scale_min(b->scales, 2 * c + 1, &sc_hi, &m_hi);
            const float d_lo = d * (float)sc_lo, min_lo = dmin * (float)m_lo;
            const float d_hi = d * (float)sc_hi, min_hi = dmin * (float)m_hi;
            for (int j = 0; j < 32; j++) {
                dst[j] = d_lo * (float)(q[j] & 0x0f) - min_lo;
                dst[j + 32] = d_hi * (float)(q[j] >> 4) - min_hi;
            }
        }
    }
}

/* Q5_K: Q4_K plus a fifth bit: for sub-block s (0..7), bit s of qh[j] belongs to value j. */
static void zd_decode_q5_k(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q5_k *b = (const zd_block_q5_k *)src;
    for (int64_t i = 0; i < k / ZD_QK_K; i++, b++) {
        const float d = zd_f16_to_f32(b->d), dmin = zd_f16_to_f32(b->dmin);
        for (int c = 0; c < 4; c++, dst += 64) {
            const uint8_t *q = b->qs + 32 * c;
            int sc_lo, m_lo, sc_hi, m_hi;
            zd_k4_scale_min(b->scales, 2 * c, &sc_lo, &m_lo);
            zd_k4_scale_min(b->scales, 2 * c + 1, &sc_hi, &m_hi);
            const float d_lo = d * (float)sc_lo, min_lo = dmin * (float)m_lo;
            const float d_hi = d * (float)sc_hi, min_hi = dmin * (float)m_hi;
            for (int j = 0; j < 32; j++) {
                const int lo = (q[j] & 0x0f) | ((b->qh[j] >> (2 * c)) & 1) << 4;
                const int hi = (q[j] >> 4) | ((b->qh[j] >> (2 * c + 1)) & 1) << 4;
                dst[j] = d_lo * (float)lo - min_lo;
                dst[j + 32] = d_hi * (float)hi - min_hi;
            }
        }
    }
}

/* Q6_K: two halves of 128 values; half h reads ql[64h .. 64h+63] and qh[32h .. 32h+31].
 * Value group g (0..3) of 32: low nibble of ql[j] (g=0), of ql[j+32] (g=1), high nibble of
 * ql[j] (g=2), of ql[j+32] (g=3); its top 2 bits are bits 2g, 2g+1 of qh[j]. Offset 32;
 * one signed 8-bit scale per 16 values. */
static void zd_decode_q6_k(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k) {
    const zd_block_q6_k *b = (const zd_block_q6_k *)src;
    for (int64_t i = 0; i < k / ZD_QK_K; i++, b++) {
        const float d = zd_f16_to_f32(b->d);
        for (int half = 0; half < 2; half++, dst += 128) {
            const uint8_t *ql = b->ql + 64 * half;
            const uint8_t *qh = b->qh + 32 * half;
            const int8_t *sc = b->scales + 8 * half;
            for (int g = 0; g < 4; g++) {
                const uint8_t *low = ql + 32 * (g & 1);
                const int nibble_shift = 4 * (g >> 1), high_shift = 2 * g;
                for (int part = 0; part < 2; part++) {
                    const float scale = d * (float)sc[2 * g + part];
#pragma omp simd
                    for (int j = 16 * part; j < 16 * part + 16; j++) {
                        const int q = ((low[j] >> nibble_shift) & 0x0f) | ((qh[j] >> high_shift) & 3) << 4;
                        dst[32 * g + j] = scale * (float)(q - 32);
                    }
                }
            }
        }
    }
}

/* ---- dispatch ----------------------------------------------------------------------------- */

typedef void (*zd_decode_fn)(const uint8_t *src, float *ZD_RESTRICT dst, int64_t k);

/* The decoder for `type`, or NULL when this backend cannot decode it. */
static zd_decode_fn zd_decoder(int type) {
    switch (type) {
    case ZD_F32: return zd_decode_f32;
    case ZD_F16: return zd_decode_f16;
    case ZD_BF16: return zd_decode_bf16;
    case ZD_Q4_0: return zd_decode_q4_0;
    case ZD_Q4_1: return zd_decode_q4_1;
    case ZD_Q5_0: return zd_decode_q5_0;
    case ZD_Q5_1: return zd_decode_q5_1;
    case ZD_Q8_0: return zd_decode_q8_0;
    case ZD_Q2_K: return zd_decode_q2_k;
    case ZD_Q3_K: return zd_decode_q3_k;
    case ZD_Q4_K: return zd_decode_q4_k;
    case ZD_Q5_K: return zd_decode_q5_k;
    case ZD_Q6_K: return zd_decode_q6_k;
    default: return NULL;
    }
}

/* Type codes of weights the backend has interleaved (interleave.h): ZD_X16 | the GGML type.
 * Sizes are those of the GGML type; only the order of the bytes differs. */
#define ZD_X16 0x100
static inline int zd_x16_base(int type) { return type & ~ZD_X16; }

/* Values per block of `type` (0 if unsupported). */
static int64_t zd_block_size(int type) {
    switch (zd_x16_base(type)) {
    case ZD_F32: case ZD_F16: case ZD_BF16: return 1;
    case ZD_Q4_0: case ZD_Q4_1: case ZD_Q5_0: case ZD_Q5_1: case ZD_Q8_0: return ZD_QK;
    case ZD_Q2_K: case ZD_Q3_K: case ZD_Q4_K: case ZD_Q5_K: case ZD_Q6_K: return ZD_QK_K;
    default: return 0;
    }
}

/* Bytes per block of `type` (0 if unsupported). */
static int64_t zd_block_bytes(int type) {
    switch (zd_x16_base(type)) {
    case ZD_F32: return 4;
    case ZD_F16: case ZD_BF16: return 2;
    case ZD_Q4_0: return sizeof(zd_block_q4_0);
    case ZD_Q4_1: return sizeof(zd_block_q4_1);
    case ZD_Q5_0: return sizeof(zd_block_q5_0);
    case ZD_Q5_1: return sizeof(zd_block_q5_1);
    case ZD_Q8_0: return sizeof(zd_block_q8_0);
    case ZD_Q2_K: return sizeof(zd_block_q2_k);
    case ZD_Q3_K: return sizeof(zd_block_q3_k);
    case ZD_Q4_K: return sizeof(zd_block_q4_k);
    case ZD_Q5_K: return sizeof(zd_block_q5_k);
    case ZD_Q6_K: return sizeof(zd_block_q6_k);
    default: return 0;
    }
}

/* Bytes in a row of `k` values of `type`; -1 if unsupported or k is not a whole number of blocks. */
static int64_t zd_row_bytes(int type, int64_t k) {
    const int64_t block = zd_block_size(type);
    if (block == 0 || k < 0 || k % block != 0)
        return -1;
    return k / block * zd_block_bytes(type);
}

#endif
