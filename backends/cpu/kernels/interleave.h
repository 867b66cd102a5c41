/* Weights interleaved at load: 16 rows side by side, so a vector's lanes are rows.
 *
 * The row-major tile kernels (dot_legacy.h) spend most of their work per block on scaling and
 * reducing each row's dpbusd lanes; with Q4_0's scale per 32 values that makes decode
 * compute-bound on 2 cores. Interleaved, a dpbusd of one 64-byte load adds 4 products to each of
 * 16 rows, a block's scale is one vector for the 16 rows, and the result is a vector of 16 rows
 * stored as it is: decode streams the weights at the memory's pace, and prefill needs no panel.
 *
 * Layout (type code ZD_X16 | ZD_Q4_0): groups of 16 rows (the last padded with zero rows), each
 * the size of 16 GGUF rows; in a group, per block of 32 values, 288 bytes: the 16 rows' f16
 * scales, then 4 vectors of 64 bytes, vector i holding quant bytes 4i .. 4i + 3 of rows 0..15
 * (4 bytes per row). A quant byte's low nibble is value 4i + j of the block, its high nibble
 * value 16 + 4i + j, as in GGUF.
 */
#ifndef ZEPHYR_INTERLEAVE_H
#define ZEPHYR_INTERLEAVE_H

#include <string.h>
#include "common.h"
#include "dequant.h"
#include "quantize.h"
#include "tile.h"

#define ZD_X16_ROWS 16

/* Whether weights of `type` are interleaved at load for path `isa`. */
static inline int zd_x16_wanted(int type, int isa) {
    return isa == ZD_ISA_AVX512 && type == ZD_Q4_0;
}

/* Bytes of an interleaved matrix of m rows of k values (whole groups). */
static inline int64_t zd_x16_bytes(int type, int64_t m, int64_t k) {
    return (m + ZD_X16_ROWS - 1) / ZD_X16_ROWS * ZD_X16_ROWS * zd_row_bytes(zd_x16_base(type), k);
}

/* Interleave groups [g0, g1) of the m x k GGUF matrix `src` of type `type` into `dst`. Block by
 * block, so the writes are sequential; rows past m are zeros. */
static void zd_x16_pack(int type, const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int64_t g0, int64_t g1) {
    const int64_t row_bytes = zd_row_bytes(type, k), nb = k / 32;
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *rows[ZD_X16_ROWS];
        const int valid = (int)zd_min64(ZD_X16_ROWS, m - g * ZD_X16_ROWS);
        for (int r = 0; r < ZD_X16_ROWS; r++)
            rows[r] = src + (g * ZD_X16_ROWS + zd_min64(r, valid - 1)) * row_bytes;
        uint8_t *out = dst + g * ZD_X16_ROWS * row_bytes;
        for (int64_t b = 0; b < nb; b++, out += 288) {
            for (int r = 0; r < ZD_X16_ROWS; r++) {
                const uint8_t *block = rows[r] + b * 18;
                uint16_t d;
                uint32_t q[4];
                memcpy(&d, block, 2);
                memcpy(q, block + 2, 16);
                if (r >= valid)
                    d = 0, memset(q, 0, 16);
                memcpy(out + 2 * r, &d, 2);
                for (int i = 0; i < 4; i++)
                    memcpy(out + 32 + 64 * i + 4 * r, &q[i], 4);
            }
        }
    }
}

/* Row `row` of an interleaved matrix, decoded to floats (embedding lookups, tests). */
static void zd_x16_decode_row(int type, const uint8_t *w, int64_t row, int64_t k, float *out) {
    const int64_t row_bytes = zd_row_bytes(zd_x16_base(type), k);
    const uint8_t *group = w + row / ZD_X16_ROWS * ZD_X16_ROWS * row_bytes;
    const int r = (int)(row % ZD_X16_ROWS);
    for (int64_t b = 0; b < k / 32; b++) {
        const uint8_t *block = group + b * 288;
        uint16_t h;
        memcpy(&h, block + 2 * r, 2);
        const float d = zd_f16_to_f32(h);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) {
                const uint8_t byte = block[32 + 64 * i + 4 * r + j];
                out[32 * b + 4 * i + j] = d * (float)((byte & 0x0f) - 8);
                out[32 * b + 16 + 4 * i + j] = d * (float)((byte >> 4) - 8);
            }
    }
}

/* ---- the tile kernels: a group of 16 rows, every token of the tile ---------------------------- */

/* Scalar, for the paths without AVX-512 (weights interleaved for AVX-512 and the path forced
 * down afterwards): the same integer sums, row by row. */
static void zd_x16_q4_0_scalar(const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32;
    for (int64_t j = 0; j < tile->nt; j++) {
        const int64_t t = tile->t0 + j;
        const int8_t *q = x->q + t * x->q_stride;
        const float *xd = x->d + t * x->d_stride, *xs = x->s32 + t * x->s_stride;
        for (int r = 0; r < tile->rows; r++) {
            float total = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *block = tile->w + b * 288;
                uint16_t h;
                memcpy(&h, block + 2 * r, 2);
                const float dw = zd_f16_to_f32(h);
                int sum = 0;
                for (int i = 0; i < 4; i++)
                    for (int l = 0; l < 4; l++) {
                        const uint8_t byte = block[32 + 64 * i + 4 * r + l];
                        sum += (byte & 0x0f) * q[32 * b + 4 * i + l] + (byte >> 4) * q[32 * b + 16 + 4 * i + l];
                    }
                total += dw * xd[b] * (float)sum - 8.0f * dw * xs[b];
            }
            zd_tile_store(tile, r, j, total);
        }
    }
}

#if ZD_X86
/* T tokens from j0: per block, 4 loads give 8 slices (low and high nibbles), 8 dpbusd per token. */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_q4_0_tokens_512(const int T, const zd_tile *tile, int64_t j0) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32;
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    for (int j = 0; j < T; j++) {
        const int64_t t = tile->t0 + j0 + j;
        q[j] = x->q + t * x->q_stride;
        xd[j] = x->d + t * x->d_stride;
        xs[j] = x->s32 + t * x->s_stride;
    }
    __m512 F[4], C[4];
    for (int j = 0; j < T; j++)
        F[j] = C[j] = _mm512_setzero_ps();
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block = tile->w + b * 288;
        for (int o = 0; o < 288; o += 64)
            _mm_prefetch((const char *)(block + ZD_PREFETCH_BYTES + o), ZD_PREFETCH_HINT);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)block));
        __m512i I[4];
        for (int j = 0; j < T; j++)
            I[j] = _mm512_setzero_si512();
        for (int i = 0; i < 4; i++) {
            const __m512i v = _mm512_loadu_si512(block + 32 + 64 * i);
            const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            for (int j = 0; j < T; j++) {
                I[j] = _mm512_dpbusd_epi32(I[j], lo, zd_x4_512(q[j] + 32 * b + 4 * i));
                I[j] = _mm512_dpbusd_epi32(I[j], hi, zd_x4_512(q[j] + 32 * b + 16 + 4 * i));
            }
        }
        for (int j = 0; j < T; j++) {
            F[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[j]), _mm512_mul_ps(dw, _mm512_set1_ps(xd[j][b])), F[j]);
            C[j] = _mm512_fmadd_ps(dw, _mm512_set1_ps(xs[j][b]), C[j]);
        }
    }
    for (int j = 0; j < T; j++)   /* Q4_0's offset: every value is dw * (nibble - 8) */
        zd_rows16_store(tile, j0 + j, _mm512_fmadd_ps(C[j], _mm512_set1_ps(-8.0f), F[j]));
}

ZD_TARGET_AVX512 static void zd_x16_q4_0_512(const zd_tile *tile) {
    int64_t j = 0;
    for (; j + 4 <= tile->nt; j += 4)
        zd_x16_q4_0_tokens_512(4, tile, j);
    for (; j < tile->nt; j++)
        zd_x16_q4_0_tokens_512(1, tile, j);
}
#endif

/* The kernel for interleaved weights of `type` on path `isa`, or NULL. */
static zd_tile_fn zd_x16_kernel(int type, int isa) {
    if (type != (ZD_X16 | ZD_Q4_0))
        return 0;
#if ZD_X86
    if (isa == ZD_ISA_AVX512)
        return zd_x16_q4_0_512;
#endif
    (void)isa;
    return zd_x16_q4_0_scalar;
}

#endif
