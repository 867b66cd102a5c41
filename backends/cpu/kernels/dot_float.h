/* Float weights (F32, F16, BF16) times float activations: weights widened to f32 as they are
 * loaded (F16C / a 16-bit shift for BF16) and multiplied with FMA. Activations are not rounded. */
#ifndef ZEPHYR_DOT_FLOAT_H
#define ZEPHYR_DOT_FLOAT_H

#include "common.h"
#include "dequant.h"
#include "tile.h"

static inline float zd_float_at(int type, const uint8_t *row, int64_t i) {
    uint16_t h;
    float f;
    switch (type) {
    case ZD_F32:
        memcpy(&f, row + 4 * i, 4);
        return f;
    case ZD_F16:
        memcpy(&h, row + 2 * i, 2);
        return zd_f16_to_f32(h);
    default:
        memcpy(&h, row + 2 * i, 2);
        return zd_bf16_to_f32(h);
    }
}

/* R = 1 row, up to T = 4 tokens. */
static inline void zd_float_tile_scalar(int type, const zd_tile *tile) {
    const zd_act *x = tile->x;
    float total[ZD_TILE_MAX_T] = {0.0f};
    for (int64_t i = 0; i < x->k; i++) {
        const float w = zd_float_at(type, tile->w, i);
        for (int64_t j = 0; j < tile->nt; j++)
            total[j] += w * x->f[(tile->t0 + j) * x->f_stride + i];
    }
    for (int64_t j = 0; j < tile->nt; j++)
        zd_tile_store(tile, 0, j, total[j]);
}

#if ZD_X86
/* 16 values of a row from value i; `valid` masks a tail. */
ZD_TARGET_AVX512 ZD_INLINE __m512 zd_float_load_512(int type, const uint8_t *row, int64_t i, __mmask16 valid) {
    switch (type) {
    case ZD_F32:
        return _mm512_maskz_loadu_ps(valid, row + 4 * i);
    case ZD_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, row + 2 * i));
    default:
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, row + 2 * i)), 16));
    }
}

/* R rows x T tokens. */
ZD_TARGET_AVX512 ZD_INLINE void zd_float_tile_512(const int type, const int R, const int T, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t k = x->k;
    const uint8_t *row[ZD_TILE_MAX_R];
    const float *xf[ZD_TILE_MAX_T];
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        row[r] = zd_tile_row(tile, r);
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        xf[j] = x->f + zd_tile_token(tile, j) * x->f_stride;
    __m512 F[ZD_TILE_MAX_R][ZD_TILE_MAX_T];
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[r][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 valid = k - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1);
        __m512 W[ZD_TILE_MAX_R];
        ZD_UNROLL
        for (int r = 0; r < R; r++)
            W[r] = zd_float_load_512(type, row[r], i, valid);
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            const __m512 X = _mm512_maskz_loadu_ps(valid, xf[j] + i);
            ZD_UNROLL
            for (int r = 0; r < R; r++)
                F[r][j] = _mm512_fmadd_ps(W[r], X, F[r][j]);
        }
    }
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            if (r < tile->rows && j < tile->nt)
                zd_tile_store(tile, r, j, _mm512_reduce_add_ps(F[r][j]));
}

/* 8 values of a row from value i (i + 8 <= k). */
ZD_TARGET_AVX2 ZD_INLINE __m256 zd_float_load_256(int type, const uint8_t *row, int64_t i) {
    switch (type) {
    case ZD_F32:
        return _mm256_loadu_ps((const float *)(row + 4 * i));
    case ZD_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
    default:
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * i))), 16));
    }
}

/* R rows x T tokens; the last k % 8 values in scalar code. */
ZD_TARGET_AVX2 ZD_INLINE void zd_float_tile_256(const int type, const int R, const int T, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t k = x->k, whole = k / 8 * 8;
    const uint8_t *row[ZD_TILE_MAX_R];
    const float *xf[ZD_TILE_MAX_T];
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        row[r] = zd_tile_row(tile, r);
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        xf[j] = x->f + zd_tile_token(tile, j) * x->f_stride;
    __m256 F[ZD_TILE_MAX_R][ZD_TILE_MAX_T];
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[r][j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < whole; i += 8) {
        __m256 W[ZD_TILE_MAX_R];
        ZD_UNROLL
        for (int r = 0; r < R; r++)
            W[r] = zd_float_load_256(type, row[r], i);
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            const __m256 X = _mm256_loadu_ps(xf[j] + i);
            ZD_UNROLL
            for (int r = 0; r < R; r++)
                F[r][j] = _mm256_fmadd_ps(W[r], X, F[r][j]);
        }
    }
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            if (r < tile->rows && j < tile->nt) {
                float value = zd_hsum_256(F[r][j]);
                for (int64_t i = whole; i < k; i++)
                    value += zd_float_at(type, row[r], i) * xf[j][i];
                zd_tile_store(tile, r, j, value);
            }
}
#endif

ZD_INSTANTIATE(zd_f32, ZD_F32, zd_float_tile_scalar, zd_float_tile_512, zd_float_tile_256)
ZD_INSTANTIATE(zd_f16, ZD_F16, zd_float_tile_scalar, zd_float_tile_512, zd_float_tile_256)
ZD_INSTANTIATE(zd_bf16, ZD_BF16, zd_float_tile_scalar, zd_float_tile_512, zd_float_tile_256)

/* The kernels for float `type` on path `isa`; 0 if there are none. */
static int zd_float_kernel(int type, int isa, int prefill, zd_kernel *kn) {
    switch (type) {
    ZD_KERNEL_CASE(zd_f32, ZD_F32)
    ZD_KERNEL_CASE(zd_f16, ZD_F16)
    ZD_KERNEL_CASE(zd_bf16, ZD_BF16)
    default:
        return 0;
    }
}

#endif
