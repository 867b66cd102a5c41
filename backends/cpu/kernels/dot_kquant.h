/* k-quant weights (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) times Q8_K activations, in integers.
 *
 * Every k-quant value is d * sc * u - corr, with u an unsigned integer of 2 to 6 bits, sc a small
 * integer scale per 16 or 32 values and corr a per-sub-block offset (dmin * min for Q2_K, Q4_K,
 * Q5_K; 4 * d * sc for Q3_K's signed 3-bit quants; 32 * d * sc for Q6_K's). Against activations
 * x = dx * q, a super-block contributes d * dx * sum(sc * sum(u * q)) - sum(corr * dx * sum(q)):
 * the first sum is exact integer arithmetic (u8 x s8 products, no saturation since u < 64 and
 * |q| <= 127), the second is the correction dot product with the activation sums (tile.h).
 *
 * Per super-block a kernel "preps" a row (scales, d, corrections) and then "unpacks" u, 64
 * (AVX-512) or 32 (AVX2) values per step, in the activation's natural value order.
 */
#ifndef ZEPHYR_DOT_KQUANT_H
#define ZEPHYR_DOT_KQUANT_H

#include "common.h"
#include "dequant.h"
#include "tile.h"

/* Corrections per super-block: per sub-block of 32 values (Q4_K, Q5_K) or 16 (the others). */
static inline int zd_kq_corrections(int type) {
    return type == ZD_Q4_K || type == ZD_Q5_K ? 8 : 16;
}

/* Q4_K/Q5_K's 8 (scale, min) pairs of 6 bits from their 12 packed bytes, 8 bytes each. */
static inline void zd_k4_scales_mins(const uint8_t *packed, uint64_t *scales, uint64_t *mins) {
    uint32_t a, b, c;
    memcpy(&a, packed, 4);
    memcpy(&b, packed + 4, 4);
    memcpy(&c, packed + 8, 4);
    const uint32_t sc_high = (c & 0x0f0f0f0fu) | ((a >> 6) & 0x03030303u) << 4;
    const uint32_t mn_high = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 6) & 0x03030303u) << 4;
    *scales = (uint64_t)(a & 0x3f3f3f3fu) | (uint64_t)sc_high << 32;
    *mins = (uint64_t)(b & 0x3f3f3f3fu) | (uint64_t)mn_high << 32;
}

/* Q3_K's 16 6-bit scales from their 12 packed bytes, biased by 32 (0..63): scales 0-7 in the
 * bytes of *lo, 8-15 in *hi. In registers, so the SIMD paths can move them into a vector whole
 * (16 byte stores read back as one vector would stall on store forwarding). */
static inline void zd_q3k_scale_bytes(const uint8_t *packed, uint64_t *lo, uint64_t *hi) {
    uint64_t low;
    uint32_t high;
    memcpy(&low, packed, 8);
    memcpy(&high, packed + 8, 4);
    const uint64_t nibble = 0x0f0f0f0f0f0f0f0full;
    *lo = (low & nibble)
        | ((uint64_t)(high & 0x03030303u) | (uint64_t)((high >> 2) & 0x03030303u) << 32) << 4;
    *hi = ((low >> 4) & nibble)
        | ((uint64_t)((high >> 4) & 0x03030303u) | (uint64_t)((high >> 6) & 0x03030303u) << 32) << 4;
}

/* Q3_K's 16 signed 6-bit scales. */
static inline void zd_q3k_scales(const uint8_t *packed, int8_t out[16]) {
    uint64_t biased[2];
    zd_q3k_scale_bytes(packed, &biased[0], &biased[1]);
    for (int i = 0; i < 16; i++)
        out[i] = (int8_t)((int)((biased[i / 8] >> (8 * (i % 8))) & 0xff) - 32);
}

#if ZD_X86
/* The same as 16 int8 lanes. */
static inline __m128i zd_q3k_scales_128(const uint8_t *packed) {
    uint64_t lo, hi;
    zd_q3k_scale_bytes(packed, &lo, &hi);
    return _mm_sub_epi8(_mm_set_epi64x((long long)hi, (long long)lo), _mm_set1_epi8(32));
}
#endif

/* ---- scalar path ------------------------------------------------------------------------------- */

/* One super-block's integer scale per 16 values and corrections (zd_kq_corrections of them);
 * returns d. */
static float zd_kq_scales_scalar(int type, const uint8_t *block, int sc[16], float *corr) {
    switch (type) {
    case ZD_Q2_K: {
        const zd_block_q2_k *b = (const zd_block_q2_k *)block;
        const float dmin = zd_f16_to_f32(b->dmin);
        for (int i = 0; i < 16; i++) {
            sc[i] = b->scales[i] & 0x0f;
            corr[i] = -dmin * (float)(b->scales[i] >> 4);
        }
        return zd_f16_to_f32(b->d);
    }
    case ZD_Q3_K: {
        const zd_block_q3_k *b = (const zd_block_q3_k *)block;
        const float d = zd_f16_to_f32(b->d);
        int8_t scales[16];
        zd_q3k_scales(b->scales, scales);
        for (int i = 0; i < 16; i++) {
            sc[i] = scales[i];
            corr[i] = -4.0f * d * (float)scales[i];
        }
        return d;
    }
    case ZD_Q4_K:
    case ZD_Q5_K: {
        const zd_block_q4_k *b = (const zd_block_q4_k *)block;
        uint64_t scales, mins;
        zd_k4_scales_mins(b->scales, &scales, &mins);
        const float dmin = zd_f16_to_f32(b->dmin);
        for (int j = 0; j < 8; j++) {
            sc[2 * j] = sc[2 * j + 1] = (int)((scales >> (8 * j)) & 0xff);
            corr[j] = -dmin * (float)((mins >> (8 * j)) & 0xff);
        }
        return zd_f16_to_f32(b->d);
    }
    default: {   /* ZD_Q6_K */
        const zd_block_q6_k *b = (const zd_block_q6_k *)block;
        const float d = zd_f16_to_f32(b->d);
        for (int i = 0; i < 16; i++) {
            sc[i] = b->scales[i];
            corr[i] = -32.0f * d * (float)b->scales[i];
        }
        return d;
    }
    }
}

/* One super-block -> u[256] in natural order, integer scale per 16 values, corrections; returns d. */
static float zd_kq_unpack_scalar(int type, const uint8_t *block, uint8_t u[256], int sc[16], float *corr) {
    switch (type) {
    case ZD_Q2_K:
    case ZD_Q3_K: {
        const uint8_t *qs = type == ZD_Q2_K ? ((const zd_block_q2_k *)block)->qs : ((const zd_block_q3_k *)block)->qs;
        for (int g = 0; g < 8; g++)
            for (int l = 0; l < 32; l++) {
                u[32 * g + l] = (qs[32 * (g / 4) + l] >> (2 * (g % 4))) & 3;
                if (type == ZD_Q3_K)
                    u[32 * g + l] |= ((((const zd_block_q3_k *)block)->hmask[l] >> g) & 1) << 2;
            }
        break;
    }
    case ZD_Q4_K:
    case ZD_Q5_K: {
        const zd_block_q4_k *b4 = (const zd_block_q4_k *)block;
        const zd_block_q5_k *b5 = (const zd_block_q5_k *)block;
        const uint8_t *qs = type == ZD_Q4_K ? b4->qs : b5->qs;
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                int lo = qs[32 * c + l] & 0x0f, hi = qs[32 * c + l] >> 4;
                if (type == ZD_Q5_K) {
                    lo |= ((b5->qh[l] >> (2 * c)) & 1) << 4;
                    hi |= ((b5->qh[l] >> (2 * c + 1)) & 1) << 4;
                }
                u[64 * c + l] = (uint8_t)lo;
                u[64 * c + 32 + l] = (uint8_t)hi;
            }
        break;
    }
    default: {   /* ZD_Q6_K */
        const zd_block_q6_k *b = (const zd_block_q6_k *)block;
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < 32; l++)
                    u[128 * h + 32 * k + l] = (uint8_t)(((b->ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0f)
                                                        | ((b->qh[32 * h + l] >> (2 * k)) & 3) << 4);
        break;
    }
    }
    return zd_kq_scales_scalar(type, block, sc, corr);
}

/* A super-block's integer sum: each 16-value group's u . q times its scale. */
static inline int zd_kq_int_dot_scalar(const uint8_t u[256], const int sc[16], const int8_t *q) {
    int acc = 0;
    for (int g = 0; g < 16; g++)
        acc += sc[g] * zd_dot_u8_s8_scalar(u + 16 * g, q + 16 * g, 16);
    return acc;
}

/* R = 1 row, up to T = 4 tokens. */
static inline void zd_kq_tile_scalar(int type, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t nsb = x->k / 256, bytes = zd_block_bytes(type);
    const int nc = zd_kq_corrections(type);
    float total[ZD_TILE_MAX_T] = {0.0f};
    uint8_t u[256];
    int sc[16];
    for (int64_t sb = 0; sb < nsb; sb++) {
        const float d = zd_kq_unpack_scalar(type, tile->w + sb * bytes, u, sc, tile->cbuf + sb * nc);
        for (int64_t j = 0; j < tile->nt; j++) {
            const int8_t *q = x->q + (tile->t0 + j) * x->q_stride + 256 * sb;
            total[j] += d * x->d[(tile->t0 + j) * x->d_stride + sb] * (float)zd_kq_int_dot_scalar(u, sc, q);
        }
    }
    for (int64_t j = 0; j < tile->nt; j++) {
        const float *s = (nc == 8 ? x->s32 : x->s16) + (tile->t0 + j) * x->s_stride;
        zd_tile_store(tile, 0, j, total[j] + zd_dot_f32_scalar(tile->cbuf, s, nsb * nc));
    }
}

#if ZD_X86
/* ---- AVX-512 path -------------------------------------------------------------------------------
 *
 * Activations come in Q4_K order (zd_act.kq_order): vector v = 2h + e (h, e in 0..1) of a
 * super-block holds its 32-value sub-blocks 4h + e and 4h + 2 + e. Weights are unpacked to the
 * same order, four 64-byte vectors of unsigned quants per super-block (zd_kq_unpack4_512).
 *
 * Per row and token a super-block costs four vpdpbusd (u8 x s8, 4 products per int32 lane, so
 * lanes 0-7 belong to the vector's first sub-block and 8-15 to its second), two vpackssdw that
 * narrow vectors (0, 1) and (2, 3) to int16 (exact: |lane| <= 4 * 63 * 127 < 2^15), and one
 * vpmaddwd + one vpdpwssd that weight the lanes with the integer sub-block scales, widened to
 * int16 vectors in the same lane order (zd_kq_prep_512, once per row and super-block for all the
 * tile's tokens). Then one float multiply-add by d * dx.
 */

/* A zeroed register by the xor idiom (which the core executes for free), where gcc would copy
 * one zeroed register into every accumulator. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_zero_512(void) {
    __m512i z;
    __asm__ volatile("vpxord %0, %0, %0" : "=v"(z));
    return z;
}

/* Word indices of the two scale vectors of a super-block with a scale per 16 values (16 int16
 * scales): vector h weights vectors (2h, 2h + 1), whose packed 128-bit lanes hold 16-value
 * sub-blocks (8h, 8h+2), (8h+1, 8h+3), (8h+4, 8h+6), (8h+5, 8h+7), four lanes each. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_scale16_index_512(int h) {
    const int a = 8 * h;
    return _mm512_set_epi16(a + 7, a + 7, a + 7, a + 7, a + 5, a + 5, a + 5, a + 5, a + 6, a + 6, a + 6, a + 6, a + 4, a + 4, a + 4, a + 4,
                            a + 3, a + 3, a + 3, a + 3, a + 1, a + 1, a + 1, a + 1, a + 2, a + 2, a + 2, a + 2, a + 0, a + 0, a + 0, a + 0);
}

/* The same for a scale per 32 values (8 int16 scales): vector h pairs sub-blocks (4h, 4h+1) in
 * its 128-bit lanes 0-1 and (4h+2, 4h+3) in lanes 2-3. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_scale32_index_512(int h) {
    const int a = 4 * h;
    return _mm512_set_epi16(a + 3, a + 3, a + 3, a + 3, a + 2, a + 2, a + 2, a + 2, a + 3, a + 3, a + 3, a + 3, a + 2, a + 2, a + 2, a + 2,
                            a + 1, a + 1, a + 1, a + 1, a + 0, a + 0, a + 0, a + 0, a + 1, a + 1, a + 1, a + 1, a + 0, a + 0, a + 0, a + 0);
}

/* One super-block's integer scales as bytes (16, one per 16 values; Q4_K, Q5_K: 8, one per 32,
 * in the low half; all signed or below 64, so sign extension widens any of them), its corrections
 * in *corr (8 for Q4_K, Q5_K, the other lanes zero) and d in *d, all in registers. */
ZD_TARGET_AVX512 ZD_INLINE __m128i zd_kq_scale_bytes_512(int type, const uint8_t *block, __m512 *corr, float *d) {
    switch (type) {
    case ZD_Q4_K:
    case ZD_Q5_K: {
        const zd_block_q4_k *b = (const zd_block_q4_k *)block;
        uint64_t scales, mins;
        zd_k4_scales_mins(b->scales, &scales, &mins);
        const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mins)));
        *corr = _mm512_zextps256_ps512(_mm256_mul_ps(m, _mm256_set1_ps(-_cvtsh_ss(b->dmin))));
        *d = _cvtsh_ss(b->d);
        return _mm_cvtsi64_si128((long long)scales);
    }
    case ZD_Q2_K: {
        const zd_block_q2_k *b = (const zd_block_q2_k *)block;
        const __m128i packed = _mm_loadu_si128((const __m128i *)b->scales);
        const __m128i mins = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f));
        *corr = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mins)), _mm512_set1_ps(-_cvtsh_ss(b->dmin)));
        *d = _cvtsh_ss(b->d);
        return _mm_and_si128(packed, _mm_set1_epi8(0x0f));
    }
    default: {   /* Q3_K, Q6_K: signed scales, corrections -offset * d * scale */
        __m128i packed;
        float offset;
        if (type == ZD_Q3_K) {
            packed = zd_q3k_scales_128(((const zd_block_q3_k *)block)->scales);
            *d = _cvtsh_ss(((const zd_block_q3_k *)block)->d);
            offset = 4.0f;
        } else {
            packed = _mm_loadu_si128((const __m128i *)((const zd_block_q6_k *)block)->scales);
            *d = _cvtsh_ss(((const zd_block_q6_k *)block)->d);
            offset = 32.0f;
        }
        *corr = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(packed)), _mm512_set1_ps(-offset * *d));
        return packed;
    }
    }
}

/* The two scale vectors and the corrections of one super-block; returns d. */
ZD_TARGET_AVX512 ZD_INLINE float zd_kq_prep_512(int type, const uint8_t *block, __m512i S[2], float *corr) {
    float d;
    __m512 c;
    const __m128i bytes = zd_kq_scale_bytes_512(type, block, &c, &d);
    if (type == ZD_Q4_K || type == ZD_Q5_K) {
        _mm256_storeu_ps(corr, _mm512_castps512_ps256(c));
        const __m512i wide = _mm512_castsi128_si512(_mm_cvtepu8_epi16(bytes));
        ZD_UNROLL
        for (int h = 0; h < 2; h++)
            S[h] = _mm512_permutexvar_epi16(zd_scale32_index_512(h), wide);
    } else {
        _mm512_storeu_ps(corr, c);
        const __m512i wide = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(bytes));
        ZD_UNROLL
        for (int h = 0; h < 2; h++)
            S[h] = _mm512_permutexvar_epi16(zd_scale16_index_512(h), wide);
    }
    return d;
}

/* Bytes [lo x 32, hi x 32]. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_halves_epi8_512(int lo, int hi) {
    return _mm512_inserti64x4(_mm512_set1_epi8((char)lo), _mm256_set1_epi8((char)hi), 1);
}

/* 16-bit lanes [a x 16, b x 16]. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_halves_epi16_512(int a, int b) {
    return _mm512_inserti64x4(_mm512_set1_epi16((short)a), _mm256_set1_epi16((short)b), 1);
}

ZD_TARGET_AVX512 ZD_INLINE __m512i zd_broadcast_256_512(const uint8_t *p) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
}

/* A super-block's unsigned quants in Q4_K order: W[2h + e] = sub-blocks (4h + e, 4h + 2 + e). */
ZD_TARGET_AVX512 ZD_INLINE void zd_kq_unpack4_512(int type, const uint8_t *block, __m512i W[4]) {
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    switch (type) {
    case ZD_Q2_K:
    case ZD_Q3_K: {
        /* group g of 32: crumbs (qs[32 (g/4) + l] >> 2 (g%4)) & 3; W[2h+e] = groups 4h+e, 4h+2+e
         * come from the same 32 bytes at shifts 2e and 2e + 4 */
        const uint8_t *qs = type == ZD_Q2_K ? ((const zd_block_q2_k *)block)->qs : ((const zd_block_q3_k *)block)->qs;
        const __m512i hm = type == ZD_Q3_K ? zd_broadcast_256_512(((const zd_block_q3_k *)block)->hmask) : _mm512_setzero_si512();
        ZD_UNROLL
        for (int h = 0; h < 2; h++) {
            const __m512i q = zd_broadcast_256_512(qs + 32 * h);
            ZD_UNROLL
            for (int e = 0; e < 2; e++) {
                __m512i v = _mm512_and_si512(_mm512_srlv_epi16(q, zd_halves_epi16_512(2 * e, 2 * e + 4)), _mm512_set1_epi8(3));
                if (type == ZD_Q3_K) {
                    const int g = 4 * h + e;
                    const __mmask64 high = _mm512_test_epi8_mask(hm, zd_halves_epi8_512(1 << g, 1 << (g + 2)));
                    v = _mm512_mask_add_epi8(v, high, v, _mm512_set1_epi8(4));
                }
                W[2 * h + e] = v;
            }
        }
        return;
    }
    case ZD_Q4_K:
    case ZD_Q5_K: {
        /* 64 bytes of qs (chunks 2h, 2h+1): low nibbles are sub-blocks (4h, 4h+2), high (4h+1, 4h+3) */
        const uint8_t *qs = type == ZD_Q4_K ? ((const zd_block_q4_k *)block)->qs : ((const zd_block_q5_k *)block)->qs;
        const __m512i qh = type == ZD_Q5_K ? zd_broadcast_256_512(((const zd_block_q5_k *)block)->qh) : _mm512_setzero_si512();
        ZD_UNROLL
        for (int h = 0; h < 2; h++) {
            const __m512i q = _mm512_loadu_si512(qs + 64 * h);
            W[2 * h] = _mm512_and_si512(q, nibble);
            W[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(q, 4), nibble);
            if (type == ZD_Q5_K)
                ZD_UNROLL
                for (int e = 0; e < 2; e++) {
                    const int j = 4 * h + e;   /* sub-blocks j, j + 2: bits j, j + 2 of qh[l] */
                    const __mmask64 high = _mm512_test_epi8_mask(qh, zd_halves_epi8_512(1 << j, 1 << (j + 2)));
                    W[2 * h + e] = _mm512_mask_add_epi8(W[2 * h + e], high, W[2 * h + e], _mm512_set1_epi8(16));
                }
        }
        return;
    }
    default: {   /* ZD_Q6_K: half h, group k = 32 values; W[2h+e] = groups (e, e + 2) */
        const zd_block_q6_k *b = (const zd_block_q6_k *)block;
        ZD_UNROLL
        for (int h = 0; h < 2; h++) {
            const __m512i qh = zd_broadcast_256_512(b->qh + 32 * h);
            ZD_UNROLL
            for (int e = 0; e < 2; e++) {
                /* low bits: ql[64h + 32e + l], low nibble for group e, high nibble for e + 2 */
                __m512i ql = zd_broadcast_256_512(b->ql + 64 * h + 32 * e);
                ql = _mm512_and_si512(_mm512_mask_srli_epi16(ql, 0xffff0000u, ql, 4), nibble);
                /* high bits: (qh[l] >> 2k) & 3 -> bits 4, 5, for k = e (lower half) and e + 2 */
                const __m512i high = e ? _mm512_srlv_epi16(_mm512_sllv_epi16(qh, zd_halves_epi16_512(2, 0)), zd_halves_epi16_512(0, 2))
                                       : _mm512_sllv_epi16(qh, zd_halves_epi16_512(4, 0));
                W[2 * h + e] = _mm512_ternarylogic_epi32(ql, high, _mm512_set1_epi8(0x30), 0xf8);   /* ql | (high & 0x30) */
            }
        }
        return;
    }
    }
}

/* R rows x T tokens. */
ZD_TARGET_AVX512 ZD_INLINE void zd_kq_tile_512(const int type, const int R, const int T, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t nsb = x->k / 256, bytes = zd_block_bytes(type);
    const int nc = zd_kq_corrections(type);
    const int64_t ncorr = nsb * nc, cstride = zd_cbuf_stride(x->k);
    const uint8_t *row[ZD_TILE_MAX_R];
    const int8_t *xq[ZD_TILE_MAX_T];
    const float *xd[ZD_TILE_MAX_T];
    zd_tile_operands(tile, R, T, row, xq, xd);
    __m512 F[ZD_TILE_MAX_R][ZD_TILE_MAX_T];
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[r][j] = _mm512_setzero_ps();
    /* The tiles ahead follow this one: fetch one as fast as this tile is consumed. */
    const uint8_t *next = zd_prefetch_base(tile, R);
    for (int64_t sb = 0; sb < nsb; sb++) {
        for (int64_t o = 0; o < R * bytes; o += 64)
            _mm_prefetch((const char *)(next + sb * R * bytes + o), ZD_PREFETCH_HINT);
        __m512i W[ZD_TILE_MAX_R][4], S[ZD_TILE_MAX_R][2];
        float d[ZD_TILE_MAX_R];
        ZD_UNROLL
        for (int r = 0; r < R; r++) {
            d[r] = zd_kq_prep_512(type, row[r] + sb * bytes, S[r], tile->cbuf + r * cstride + sb * nc);
            zd_kq_unpack4_512(type, row[r] + sb * bytes, W[r]);
        }
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            const int8_t *q = xq[j] + 256 * sb;
            ZD_UNROLL
            for (int r = 0; r < R; r++) {
                __m512i I[4];
                ZD_UNROLL
                for (int v = 0; v < 4; v++)
                    I[v] = _mm512_dpbusd_epi32(zd_zero_512(), W[r][v], _mm512_loadu_si512(q + 64 * v));
                const __m512i A = _mm512_dpwssd_epi32(_mm512_madd_epi16(_mm512_packs_epi32(I[0], I[1]), S[r][0]),
                                                      _mm512_packs_epi32(I[2], I[3]), S[r][1]);
                F[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A), _mm512_set1_ps(d[r] * xd[j][sb]), F[r][j]);
            }
        }
    }
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            if (r < tile->rows && j < tile->nt) {
                const float *s = (nc == 8 ? x->s32 : x->s16) + (tile->t0 + j) * x->s_stride;
                zd_tile_store(tile, r, j, _mm512_reduce_add_ps(F[r][j]) + zd_dot_f32_512(tile->cbuf + r * cstride, s, ncorr));
            }
}
#endif

#if ZD_X86
/* ---- AVX2 path: 32 values per step, maddubs + madd (x scale) ------------------------------------ */

ZD_TARGET_AVX2 ZD_INLINE __m256i zd_scale_pair_256(int a, int b) {
    return _mm256_set_m128i(_mm_set1_epi16((short)b), _mm_set1_epi16((short)a));
}

ZD_TARGET_AVX2 ZD_INLINE float zd_kq_prep_256(int type, const uint8_t *block, __m256i S[8], float *corr) {
    switch (type) {
    case ZD_Q4_K:
    case ZD_Q5_K: {
        const zd_block_q4_k *b = (const zd_block_q4_k *)block;
        uint64_t scales, mins;
        zd_k4_scales_mins(b->scales, &scales, &mins);
        ZD_UNROLL
        for (int s = 0; s < 8; s++)
            S[s] = _mm256_set1_epi16((short)((scales >> (8 * s)) & 0xff));
        const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mins)));
        _mm256_storeu_ps(corr, _mm256_mul_ps(m, _mm256_set1_ps(-_cvtsh_ss(b->dmin))));
        return _cvtsh_ss(b->d);
    }
    default: {
        int8_t scales[16];
        float d, factor;
        if (type == ZD_Q2_K) {
            const zd_block_q2_k *b = (const zd_block_q2_k *)block;
            ZD_UNROLL
            for (int i = 0; i < 16; i++)
                scales[i] = (int8_t)(b->scales[i] & 0x0f);
            const __m128i packed = _mm_loadu_si128((const __m128i *)b->scales);
            const __m128i mins = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f));
            const __m256 dmin = _mm256_set1_ps(-_cvtsh_ss(b->dmin));
            _mm256_storeu_ps(corr, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mins)), dmin));
            _mm256_storeu_ps(corr + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mins, 8))), dmin));
            d = _cvtsh_ss(b->d);
        } else {
            if (type == ZD_Q3_K) {
                _mm_storeu_si128((__m128i *)scales, zd_q3k_scales_128(((const zd_block_q3_k *)block)->scales));
                d = _cvtsh_ss(((const zd_block_q3_k *)block)->d);
                factor = -4.0f * d;
            } else {
                memcpy(scales, ((const zd_block_q6_k *)block)->scales, 16);
                d = _cvtsh_ss(((const zd_block_q6_k *)block)->d);
                factor = -32.0f * d;
            }
            const __m128i packed = _mm_loadu_si128((const __m128i *)scales);
            _mm256_storeu_ps(corr, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(packed)), _mm256_set1_ps(factor)));
            _mm256_storeu_ps(corr + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(packed, 8))),
                                                     _mm256_set1_ps(factor)));
        }
        ZD_UNROLL
        for (int s = 0; s < 8; s++)
            S[s] = zd_scale_pair_256(scales[2 * s], scales[2 * s + 1]);
        return d;
    }
    }
}

/* Bits move within bytes: a 16-bit shift by `by` (left if positive), then `mask`. */
ZD_TARGET_AVX2 ZD_INLINE __m256i zd_shift_mask_256(__m256i v, int by, int mask) {
    const __m256i shifted = by > 0 ? _mm256_slli_epi16(v, by) : by < 0 ? _mm256_srli_epi16(v, -by) : v;
    return _mm256_and_si256(shifted, _mm256_set1_epi8((char)mask));
}

/* Values 32s .. 32s + 31 of a super-block as unsigned bytes. */
ZD_TARGET_AVX2 ZD_INLINE __m256i zd_kq_unpack_256(int type, const uint8_t *block, int s) {
    switch (type) {
    case ZD_Q2_K:
    case ZD_Q3_K: {
        const uint8_t *qs = type == ZD_Q2_K ? ((const zd_block_q2_k *)block)->qs : ((const zd_block_q3_k *)block)->qs;
        __m256i v = zd_shift_mask_256(_mm256_loadu_si256((const __m256i *)(qs + 32 * (s / 4))), -2 * (s % 4), 3);
        if (type == ZD_Q3_K) {
            const __m256i hm = _mm256_loadu_si256((const __m256i *)((const zd_block_q3_k *)block)->hmask);
            v = _mm256_or_si256(v, zd_shift_mask_256(hm, 2 - s, 4));
        }
        return v;
    }
    case ZD_Q4_K:
    case ZD_Q5_K: {
        const uint8_t *qs = type == ZD_Q4_K ? ((const zd_block_q4_k *)block)->qs : ((const zd_block_q5_k *)block)->qs;
        __m256i v = zd_shift_mask_256(_mm256_loadu_si256((const __m256i *)(qs + 32 * (s / 2))), -4 * (s % 2), 0x0f);
        if (type == ZD_Q5_K) {
            const __m256i qh = _mm256_loadu_si256((const __m256i *)((const zd_block_q5_k *)block)->qh);
            v = _mm256_or_si256(v, zd_shift_mask_256(qh, 4 - s, 0x10));
        }
        return v;
    }
    default: {   /* ZD_Q6_K: half s/4, k = s%4 */
        const zd_block_q6_k *b = (const zd_block_q6_k *)block;
        const int h = s / 4, k = s % 4;
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32 * (k % 2)));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
        return _mm256_or_si256(zd_shift_mask_256(ql, -4 * (k / 2), 0x0f), zd_shift_mask_256(qh, 4 - 2 * k, 0x30));
    }
    }
}

/* R rows x T tokens. */
ZD_TARGET_AVX2 ZD_INLINE void zd_kq_tile_256(const int type, const int R, const int T, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t nsb = x->k / 256, bytes = zd_block_bytes(type);
    const int nc = zd_kq_corrections(type);
    const int64_t ncorr = nsb * nc, cstride = zd_cbuf_stride(x->k);
    const uint8_t *row[ZD_TILE_MAX_R];
    const int8_t *xq[ZD_TILE_MAX_T];
    const float *xd[ZD_TILE_MAX_T];
    zd_tile_operands(tile, R, T, row, xq, xd);
    __m256 F[ZD_TILE_MAX_R][ZD_TILE_MAX_T];
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[r][j] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m256i S[ZD_TILE_MAX_R][8];
        float d[ZD_TILE_MAX_R];
        ZD_UNROLL
        for (int r = 0; r < R; r++)
            d[r] = zd_kq_prep_256(type, row[r] + sb * bytes, S[r], tile->cbuf + r * cstride + sb * nc);
        __m256i A[ZD_TILE_MAX_R][ZD_TILE_MAX_T];
        ZD_UNROLL
        for (int r = 0; r < R; r++)
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                A[r][j] = _mm256_setzero_si256();
        ZD_UNROLL
        for (int s = 0; s < 8; s++) {
            __m256i W[ZD_TILE_MAX_R];
            ZD_UNROLL
            for (int r = 0; r < R; r++)
                W[r] = zd_kq_unpack_256(type, row[r] + sb * bytes, s);
            ZD_UNROLL
            for (int j = 0; j < T; j++) {
                const __m256i X = _mm256_loadu_si256((const __m256i *)(xq[j] + 256 * sb + 32 * s));
                ZD_UNROLL
                for (int r = 0; r < R; r++)
                    A[r][j] = _mm256_add_epi32(A[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(W[r], X), S[r][s]));
            }
        }
        ZD_UNROLL
        for (int r = 0; r < R; r++)
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                F[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(A[r][j]), _mm256_set1_ps(d[r] * xd[j][sb]), F[r][j]);
    }
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            if (r < tile->rows && j < tile->nt) {
                const float *s = (nc == 8 ? x->s32 : x->s16) + (tile->t0 + j) * x->s_stride;
                zd_tile_store(tile, r, j, zd_hsum_256(F[r][j]) + zd_dot_f32_256(tile->cbuf + r * cstride, s, ncorr));
            }
}
#endif

/* ---- kernel tables ------------------------------------------------------------------------------ */

ZD_INSTANTIATE(zd_q2k, ZD_Q2_K, zd_kq_tile_scalar, zd_kq_tile_512, zd_kq_tile_256)
ZD_INSTANTIATE(zd_q3k, ZD_Q3_K, zd_kq_tile_scalar, zd_kq_tile_512, zd_kq_tile_256)
ZD_INSTANTIATE(zd_q4k, ZD_Q4_K, zd_kq_tile_scalar, zd_kq_tile_512, zd_kq_tile_256)
ZD_INSTANTIATE(zd_q5k, ZD_Q5_K, zd_kq_tile_scalar, zd_kq_tile_512, zd_kq_tile_256)
ZD_INSTANTIATE(zd_q6k, ZD_Q6_K, zd_kq_tile_scalar, zd_kq_tile_512, zd_kq_tile_256)

/* The kernels for k-quant `type` on path `isa`; 0 if there are none. */
static int zd_kq_kernel(int type, int isa, int prefill, zd_kernel *kn) {
    switch (type) {
    ZD_KERNEL_CASE(zd_q2k, ZD_Q2_K)
    ZD_KERNEL_CASE(zd_q3k, ZD_Q3_K)
    ZD_KERNEL_CASE(zd_q4k, ZD_Q4_K)
    ZD_KERNEL_CASE(zd_q5k, ZD_Q5_K)
    ZD_KERNEL_CASE(zd_q6k, ZD_Q6_K)
    default:
        return 0;
    }
}



#endif
