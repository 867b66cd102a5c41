/* Legacy-type weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) times Q8_0 activations, in integers.
 *
 * Each block of 32 values is dw * u + corr with u unsigned: Q4_0 u = nibble, corr = -8 dw;
 * Q4_1 corr = m; Q5_0 u = 5 bits, corr = -16 dw; Q5_1 corr = m; Q8_0 u = q + 128 (the sign bit
 * flipped), corr = -128 dw. Against a Q8_0 activation block dx * q a block contributes
 * dw * dx * sum(u * q) + corr * dx * sum(q): the first sum is one VNNI dpbusd (u8 x s8), the
 * second the correction dot product with the activation sums (tile.h).
 *
 * The AVX2 path has no dpbusd; it uses maddubs (u8 x s8 -> s16, saturating), which is exact for
 * u < 32 but not for Q8_0's u < 256, so there Q8_0 multiplies |w| by q carrying the sign of w
 * and needs no correction.
 */
#ifndef ZEPHYR_DOT_LEGACY_H
#define ZEPHYR_DOT_LEGACY_H

#include "common.h"
#include "dequant.h"
#include "tile.h"

/* Byte offsets within a block: scale d, min m (or -1), qh (or -1), quants. */
static inline int zd_legacy_m(int type) { return type == ZD_Q4_1 || type == ZD_Q5_1 ? 2 : -1; }
static inline int zd_legacy_qh(int type) { return type == ZD_Q5_0 ? 2 : type == ZD_Q5_1 ? 4 : -1; }
static inline int zd_legacy_qs(int type) {
    switch (type) {
    case ZD_Q4_1: return 4;
    case ZD_Q5_0: return 6;
    case ZD_Q5_1: return 8;
    default: return 2;   /* Q4_0, Q8_0 */
    }
}

static inline uint16_t zd_u16_at(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint32_t zd_u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The offset o of a type whose weights are dw * (u - o): 8 for Q4_0, 16 for Q5_0, 128 for
 * Q8_0 (u = q + 128); 0 for Q4_1 and Q5_1, which add a min instead. */
static inline float zd_legacy_offset(int type) {
    switch (type) {
    case ZD_Q4_0: return 8.0f;
    case ZD_Q5_0: return 16.0f;
    case ZD_Q8_0: return 128.0f;
    default: return 0.0f;
    }
}

/* The correction of one block given its scale (dw) and the block itself. */
static inline float zd_legacy_corr(int type, const uint8_t *block, float dw) {
    if (zd_legacy_m(type) >= 0)
        return zd_f16_to_f32(zd_u16_at(block + zd_legacy_m(type)));   /* Q4_1, Q5_1: the min */
    return -zd_legacy_offset(type) * dw;
}

/* ---- scalar path ------------------------------------------------------------------------------- */

static void zd_legacy_unpack_scalar(int type, const uint8_t *block, uint8_t u[32]) {
    const uint8_t *qs = block + zd_legacy_qs(type);
    if (type == ZD_Q8_0) {
        for (int j = 0; j < 32; j++)
            u[j] = (uint8_t)(qs[j] ^ 0x80);
        return;
    }
    const uint32_t qh = zd_legacy_qh(type) >= 0 ? zd_u32_at(block + zd_legacy_qh(type)) : 0;
    for (int j = 0; j < 16; j++) {
        u[j] = (uint8_t)((qs[j] & 0x0f) | ((qh >> j) & 1) << 4);
        u[j + 16] = (uint8_t)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
    }
}

/* R = 1 row, up to T = 4 tokens. */
static inline void zd_legacy_tile_scalar(int type, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32, bytes = zd_block_bytes(type);
    float total[ZD_TILE_MAX_T] = {0.0f};
    uint8_t u[32];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block = tile->w + b * bytes;
        const float dw = zd_f16_to_f32(zd_u16_at(block));
        tile->cbuf[b] = zd_legacy_corr(type, block, dw);
        zd_legacy_unpack_scalar(type, block, u);
        for (int64_t j = 0; j < tile->nt; j++) {
            const int8_t *q = x->q + (tile->t0 + j) * x->q_stride + 32 * b;
            total[j] += dw * x->d[(tile->t0 + j) * x->d_stride + b] * (float)zd_dot_u8_s8_scalar(u, q, 32);
        }
    }
    for (int64_t j = 0; j < tile->nt; j++)
        zd_tile_store(tile, 0, j, total[j] + zd_dot_f32_scalar(tile->cbuf, x->s32 + (tile->t0 + j) * x->s_stride, nb));
}

#if ZD_X86
/* f16 fields at `offset` of `n` (<= 8) consecutive blocks -> 8 floats (0 past n). The fields
 * are gathered in general-purpose registers, off the vector pipes the dot products use. */
ZD_TARGET_AVX2 ZD_INLINE __m256 zd_legacy_halves_256(const uint8_t *block, int64_t bytes, int offset, int n) {
    uint64_t lo = 0, hi = 0;
    for (int i = 0; i < n && i < 4; i++)
        lo |= (uint64_t)zd_u16_at(block + i * bytes + offset) << (16 * i);
    for (int i = 4; i < n; i++)
        hi |= (uint64_t)zd_u16_at(block + i * bytes + offset) << (16 * (i - 4));
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)hi, (long long)lo));
}

/* ---- AVX-512 path: groups of 8 blocks, 2 blocks (64 values) per step --------------------------- */

/* As zd_legacy_halves_256. For blocks of at most 20 bytes (Q4_0, Q4_1) a whole group's fields
 * lie in two 64-byte loads (blocks 0-3 and 4-7) and one word permute collects them. */
ZD_TARGET_AVX512 ZD_INLINE __m256 zd_legacy_halves_512(const uint8_t *block, int64_t bytes, int offset, int n) {
    if (n < 8 || bytes > 20)
        return zd_legacy_halves_256(block, bytes, offset, n);
    const __m512i first = _mm512_loadu_si512(block), second = _mm512_loadu_si512(block + 4 * bytes);
    const int b = (int)bytes / 2, o = offset / 2;
    const __m512i words = _mm512_castsi128_si512(_mm_setr_epi16((short)o, (short)(o + b), (short)(o + 2 * b), (short)(o + 3 * b),
                                                                (short)(32 + o), (short)(32 + o + b), (short)(32 + o + 2 * b),
                                                                (short)(32 + o + 3 * b)));
    return _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutex2var_epi16(first, words, second)));
}

/* Blocks 2s and (if `two`) 2s + 1 of a group as 64 unsigned bytes; zeros for a missing block. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_legacy_unpack_512(int type, const uint8_t *group, int s, int two) {
    const int64_t bytes = zd_block_bytes(type);
    const uint8_t *b0 = group + 2 * s * bytes, *b1 = b0 + bytes;
    const int qs = zd_legacy_qs(type);
    if (type == ZD_Q8_0) {
        const __m256i lo = _mm256_loadu_si256((const __m256i *)(b0 + qs));
        const __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(b1 + qs)) : _mm256_set1_epi8((char)0x80);
        return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8((char)0x80));
    }
    /* [qs0, qs0, qs1, qs1] -> [low nibbles 0, high nibbles 0, low 1, high 1] */
    __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(b0 + qs)));
    v = two ? _mm512_mask_broadcast_i32x4(v, 0xff00, _mm_loadu_si128((const __m128i *)(b1 + qs)))
            : _mm512_maskz_mov_epi32(0x00ff, v);
    v = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xff00ff00u, v, 4), _mm512_set1_epi8(0x0f));
    if (zd_legacy_qh(type) >= 0) {
        const uint64_t h0 = zd_u32_at(b0 + zd_legacy_qh(type));
        const uint64_t h1 = two ? zd_u32_at(b1 + zd_legacy_qh(type)) : 0;
        v = _mm512_mask_add_epi8(v, _cvtu64_mask64(h0 | h1 << 32), v, _mm512_set1_epi8(16));
    }
    return v;
}

/* One step (blocks 2s, 2s+1 of a group) of an R x T tile: P[r][j] holds the group's 8 block
 * scale products dw * dx, spread to the step's two blocks' lanes by one permute. */
#define ZD_LEGACY_STEP_512(S, TWO)                                                              \
    do {                                                                                        \
        const __m512i lanes = zd_halves_epi32_512(2 * (S), 2 * (S) + 1);                        \
        __m512i W[ZD_TILE_MAX_R];                                                               \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                     \
            W[r] = zd_legacy_unpack_512(type, row[r] + g * gbytes, (S), (TWO));                 \
        _Pragma("GCC unroll 8") for (int j = 0; j < T; j++) {                                   \
            const __m512i X = _mm512_loadu_si512(xq[j] + 256 * g + 64 * (S));                  \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                               \
                const __m512i I = _mm512_dpbusd_epi32(_mm512_setzero_si512(), W[r], X);          \
                const __m512 scale = _mm512_permutexvar_ps(lanes, _mm512_castps256_ps512(P[r][j])); \
                F[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I), scale, F[r][j]);               \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* 32-bit lanes [a x 8, b x 8]. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_halves_epi32_512(int a, int b) {
    return _mm512_inserti64x4(_mm512_set1_epi32(a), _mm256_set1_epi32(b), 1);
}

/* R rows x T tokens. */
ZD_TARGET_AVX512 ZD_INLINE void zd_legacy_tile_512(const int type, const int R, const int T, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32, bytes = zd_block_bytes(type), gbytes = 8 * bytes;
    const int64_t cstride = zd_cbuf_stride(x->k);
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
    for (int64_t g = 0; g * 8 < nb; g++) {
        const int n = (int)zd_min64(8, nb - 8 * g);
        for (int64_t o = 0; o < R * gbytes; o += 64)
            _mm_prefetch((const char *)(next + g * R * gbytes + o), ZD_PREFETCH_HINT);
        __m256 dw[ZD_TILE_MAX_R], dx[ZD_TILE_MAX_T];
        ZD_UNROLL
        for (int r = 0; r < R; r++) {
            const uint8_t *group = row[r] + g * gbytes;
            dw[r] = zd_legacy_halves_512(group, bytes, 0, n);
            float *corr = tile->cbuf + r * cstride + 8 * g;
            const __mmask8 valid = (__mmask8)((1u << n) - 1);
            if (zd_legacy_m(type) >= 0)
                _mm256_mask_storeu_ps(corr, valid, zd_legacy_halves_512(group, bytes, zd_legacy_m(type), n));
            else
                _mm256_mask_storeu_ps(corr, valid, _mm256_mul_ps(dw[r], _mm256_set1_ps(-zd_legacy_offset(type))));
        }
        __m256 P[ZD_TILE_MAX_R][ZD_TILE_MAX_T];
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            dx[j] = _mm256_loadu_ps(xd[j] + 8 * g);   /* zero past the row's blocks (zd_quantize_blocks) */
            ZD_UNROLL
            for (int r = 0; r < R; r++)
                P[r][j] = _mm256_mul_ps(dw[r], dx[j]);
        }
        if (n == 8) {
            ZD_LEGACY_STEP_512(0, 1);
            ZD_LEGACY_STEP_512(1, 1);
            ZD_LEGACY_STEP_512(2, 1);
            ZD_LEGACY_STEP_512(3, 1);
        } else {
            for (int s = 0; 2 * s < n; s++)
                ZD_LEGACY_STEP_512(s, 2 * s + 1 < n);
        }
    }
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            if (r < tile->rows && j < tile->nt) {
                const float *s = x->s32 + (tile->t0 + j) * x->s_stride;
                zd_tile_store(tile, r, j, _mm512_reduce_add_ps(F[r][j]) + zd_dot_f32_512(tile->cbuf + r * cstride, s, nb));
            }
}

/* ---- AVX2 path: one block (32 values) per step ------------------------------------------------- */

/* Bit j of `bits` -> byte j is 0x10 if set, else 0. */
ZD_TARGET_AVX2 ZD_INLINE __m256i zd_bits_to_bytes_256(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
        _mm256_setr_epi64x(0x0000000000000000ll, 0x0101010101010101ll, 0x0202020202020202ll, 0x0303030303030303ll));
    const __m256i select = _mm256_set1_epi64x(0x8040201008040201ll);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select), _mm256_set1_epi8(0x10));
}

/* One block as 32 bytes: unsigned quants, or for Q8_0 the signed quants themselves. */
ZD_TARGET_AVX2 ZD_INLINE __m256i zd_legacy_unpack_256(int type, const uint8_t *block) {
    const uint8_t *qs = block + zd_legacy_qs(type);
    if (type == ZD_Q8_0)
        return _mm256_loadu_si256((const __m256i *)qs);
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0f));
    if (zd_legacy_qh(type) >= 0)
        v = _mm256_or_si256(v, zd_bits_to_bytes_256(zd_u32_at(block + zd_legacy_qh(type))));
    return v;
}

/* R rows x T tokens. */
ZD_TARGET_AVX2 ZD_INLINE void zd_legacy_tile_256(const int type, const int R, const int T, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32, bytes = zd_block_bytes(type);
    const int64_t cstride = zd_cbuf_stride(x->k);
    const __m256i ones = _mm256_set1_epi16(1);
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
    for (int64_t b = 0; b < nb; b++) {
        __m256i W[ZD_TILE_MAX_R];
        float dw[ZD_TILE_MAX_R];
        ZD_UNROLL
        for (int r = 0; r < R; r++) {
            const uint8_t *block = row[r] + b * bytes;
            dw[r] = _cvtsh_ss(zd_u16_at(block));
            tile->cbuf[r * cstride + b] = type == ZD_Q8_0 ? 0.0f : zd_legacy_corr(type, block, dw[r]);
            W[r] = zd_legacy_unpack_256(type, block);
        }
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            const __m256i X = _mm256_loadu_si256((const __m256i *)(xq[j] + 32 * b));
            const float dx = xd[j][b];
            ZD_UNROLL
            for (int r = 0; r < R; r++) {
                const __m256i P = type == ZD_Q8_0 ? _mm256_maddubs_epi16(_mm256_abs_epi8(W[r]), _mm256_sign_epi8(X, W[r]))
                                                  : _mm256_maddubs_epi16(W[r], X);
                const __m256 I = _mm256_cvtepi32_ps(_mm256_madd_epi16(P, ones));
                F[r][j] = _mm256_fmadd_ps(I, _mm256_set1_ps(dw[r] * dx), F[r][j]);
            }
        }
    }
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            if (r < tile->rows && j < tile->nt) {
                float value = zd_hsum_256(F[r][j]);
                if (type != ZD_Q8_0)
                    value += zd_dot_f32_256(tile->cbuf + r * cstride, x->s32 + (tile->t0 + j) * x->s_stride, nb);
                zd_tile_store(tile, r, j, value);
            }
}
#endif

/* ---- kernel tables ------------------------------------------------------------------------------ */

ZD_INSTANTIATE(zd_q4_0, ZD_Q4_0, zd_legacy_tile_scalar, zd_legacy_tile_512, zd_legacy_tile_256)
ZD_INSTANTIATE(zd_q4_1, ZD_Q4_1, zd_legacy_tile_scalar, zd_legacy_tile_512, zd_legacy_tile_256)
ZD_INSTANTIATE(zd_q5_0, ZD_Q5_0, zd_legacy_tile_scalar, zd_legacy_tile_512, zd_legacy_tile_256)
ZD_INSTANTIATE(zd_q5_1, ZD_Q5_1, zd_legacy_tile_scalar, zd_legacy_tile_512, zd_legacy_tile_256)
ZD_INSTANTIATE(zd_q8_0, ZD_Q8_0, zd_legacy_tile_scalar, zd_legacy_tile_512, zd_legacy_tile_256)

/* The kernels for legacy `type` on path `isa`; 0 if there are none. */
static int zd_legacy_kernel(int type, int isa, int prefill, zd_kernel *kn) {
    switch (type) {
    ZD_KERNEL_CASE(zd_q4_0, ZD_Q4_0)
    ZD_KERNEL_CASE(zd_q4_1, ZD_Q4_1)
    ZD_KERNEL_CASE(zd_q5_0, ZD_Q5_0)
    ZD_KERNEL_CASE(zd_q5_1, ZD_Q5_1)
    ZD_KERNEL_CASE(zd_q8_0, ZD_Q8_0)
    default:
        return 0;
    }
}

#endif
