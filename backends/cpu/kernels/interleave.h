/* Weights interleaved at load: 16 rows side by side, so a vector's lanes are rows.
 *
 * The row-major tile kernels (dot_legacy.h) spend much of their work per block on scaling and
 * reducing each row's dpbusd lanes, and per row on its final sums: with a scale per 32 values
 * (Q4_0, Q4_1) that makes decode compute-bound on 2 cores, and short rows (a small model's
 * k = 576) pay the per-row part often. Interleaved, a dpbusd of one 64-byte load adds 4 products
 * to each of 16 rows, a block's scale is one vector for the 16 rows, and the result is a vector
 * of 16 rows stored as it is: decode streams the weights at the memory's pace, and prefill needs
 * no panel.
 *
 * Layout (type code ZD_X16 | the GGML type): groups of 16 rows (the last padded with zero rows),
 * each the size of 16 GGUF rows; in a group, per block of 32 values, 16 blocks' bytes: the 16
 * rows' f16 scales d, for Q4_1 then their f16 mins, then the quants as vectors of 64 bytes,
 * vector i holding quant bytes 4i .. 4i + 3 of rows 0..15 (4 bytes per row). Q4_0/Q4_1 have 4
 * such vectors, whose bytes' low nibbles are values 4i + j of the block and high nibbles values
 * 16 + 4i + j, as in GGUF; Q8_0 has 8, values 4i + j, stored + 128 (unsigned, for dpbusd).
 */
#ifndef ZEPHYR_INTERLEAVE_H
#define ZEPHYR_INTERLEAVE_H

#include <string.h>
#include "common.h"
#include "dequant.h"
#include "dot_legacy.h"
#include "quantize.h"
#include "tile.h"

#define ZD_X16_ROWS 16

/* Rows shorter than this gain from interleaving in every type; longer ones only where the
 * row-major kernel is compute-bound (scale and min per 32 values). A 7B model's Q8_0 rows
 * stream at memory speed already, and copying 7 GB would only slow its load. */
#define ZD_X16_SHORT_ROW 2048

/* Whether an m x k matrix of `type` is interleaved at load for path `isa`. */
static inline int zd_x16_wanted(int type, int isa, int64_t k) {
    if (isa != ZD_ISA_AVX512)
        return 0;
    return type == ZD_Q4_0 || type == ZD_Q4_1 || (type == ZD_Q8_0 && k < ZD_X16_SHORT_ROW);
}

/* Where a block group's parts start, for interleaved `type`: the mins (Q4_1; else -1), the
 * quant vectors; and how many quant vectors (4 of nibbles, or 8 of bytes). */
static inline int zd_x16_mins(int type) { return zd_x16_base(type) == ZD_Q4_1 ? 32 : -1; }
static inline int zd_x16_quants(int type) { return zd_x16_base(type) == ZD_Q4_1 ? 64 : 32; }
static inline int zd_x16_vectors(int type) { return zd_x16_base(type) == ZD_Q8_0 ? 8 : 4; }

/* Bytes of an interleaved matrix of m rows of k values (whole groups). */
static inline int64_t zd_x16_bytes(int type, int64_t m, int64_t k) {
    return (m + ZD_X16_ROWS - 1) / ZD_X16_ROWS * ZD_X16_ROWS * zd_row_bytes(zd_x16_base(type), k);
}

/* Interleave groups [g0, g1) of the m x k GGUF matrix `src` of (GGML) type `type` into `dst`.
 * Block by block, so the writes are sequential; rows past m are zeros. */
static void zd_x16_pack(int type, const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int64_t g0, int64_t g1) {
    const int64_t row_bytes = zd_row_bytes(type, k), nb = k / 32, bytes = zd_block_bytes(type);
    const int mins = zd_x16_mins(type), quants = zd_x16_quants(type), nv = zd_x16_vectors(type);
    const int qs = type == ZD_Q4_1 ? 4 : 2;   /* where a GGUF block's quants start */
    for (int64_t g = g0; g < g1; g++) {
        const int valid = (int)zd_min64(ZD_X16_ROWS, m - g * ZD_X16_ROWS);
        uint8_t *out = dst + g * ZD_X16_ROWS * row_bytes;
        for (int64_t b = 0; b < nb; b++, out += ZD_X16_ROWS * bytes) {
            if (valid < ZD_X16_ROWS)
                memset(out, 0, ZD_X16_ROWS * bytes);
            for (int r = 0; r < valid; r++) {
                const uint8_t *block = src + (g * ZD_X16_ROWS + r) * row_bytes + b * bytes;
                memcpy(out + 2 * r, block, 2);
                if (mins >= 0)
                    memcpy(out + mins + 2 * r, block + 2, 2);
                for (int i = 0; i < nv; i++) {
                    uint32_t q;
                    memcpy(&q, block + qs + 4 * i, 4);
                    if (type == ZD_Q8_0)
                        q ^= 0x80808080u;
                    memcpy(out + quants + 64 * i + 4 * r, &q, 4);
                }
            }
        }
    }
}

/* The f16 field of row r in a group's 16 (scales or mins), as a float. */
static inline float zd_x16_half(const uint8_t *p, int r) {
    return zd_f16_to_f32(zd_u16_at(p + 2 * r));
}

/* Unsigned quant u of value v (0..31) of row r in a block group: the weight is
 * d * (u - zd_legacy_offset) + min. */
static inline int zd_x16_quant(int type, const uint8_t *group, int r, int v) {
    const uint8_t *q = group + zd_x16_quants(type) + 4 * r;
    if (zd_x16_base(type) == ZD_Q8_0)
        return q[64 * (v / 4) + v % 4];
    const int w = v % 16;
    const uint8_t byte = q[64 * (w / 4) + w % 4];
    return v < 16 ? byte & 0x0f : byte >> 4;
}

/* Row `row` of an interleaved matrix, decoded to floats (embedding lookups, tests). */
static void zd_x16_decode_row(int type, const uint8_t *w, int64_t row, int64_t k, float *out) {
    const int64_t row_bytes = zd_row_bytes(zd_x16_base(type), k), bytes = zd_block_bytes(type);
    const uint8_t *group = w + row / ZD_X16_ROWS * ZD_X16_ROWS * row_bytes;
    const int r = (int)(row % ZD_X16_ROWS), mins = zd_x16_mins(type);
    const float offset = zd_legacy_offset(zd_x16_base(type));
    for (int64_t b = 0; b < k / 32; b++, group += ZD_X16_ROWS * bytes) {
        const float d = zd_x16_half(group, r), m = mins >= 0 ? zd_x16_half(group + mins, r) : 0.0f;
        for (int v = 0; v < 32; v++)
            out[32 * b + v] = d * ((float)zd_x16_quant(type, group, r, v) - offset) + m;
    }
}

/* ---- the tile kernels: a group of 16 rows, every token of the tile ---------------------------- */

/* Scalar, for the paths without AVX-512 (weights interleaved for AVX-512 and the path forced
 * down afterwards): the same integer sums, row by row. */
static void zd_x16_tile_scalar(int type, const zd_tile *tile) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32, bytes = zd_block_bytes(type);
    const int mins = zd_x16_mins(type);
    const float offset = zd_legacy_offset(zd_x16_base(type));
    for (int64_t j = 0; j < tile->nt; j++) {
        const int64_t t = tile->t0 + j;
        const int8_t *q = x->q + t * x->q_stride;
        const float *xd = x->d + t * x->d_stride, *xs = x->s32 + t * x->s_stride;
        for (int r = 0; r < tile->rows; r++) {
            float total = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *group = tile->w + b * ZD_X16_ROWS * bytes;
                const float dw = zd_x16_half(group, r);
                int sum = 0;
                for (int v = 0; v < 32; v++)
                    sum += zd_x16_quant(type, group, r, v) * q[32 * b + v];
                const float corr = mins >= 0 ? zd_x16_half(group + mins, r) : -offset * dw;
                total += dw * xd[b] * (float)sum + corr * xs[b];
            }
            zd_tile_store(tile, r, j, total);
        }
    }
}

#if ZD_X86
/* T tokens from j0: per block, each quant vector gives one slice of 16 rows (Q8_0) or two (the
 * low and high nibbles), one dpbusd per slice and token. */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_tokens_512(const int type, const int T, const zd_tile *tile, int64_t j0) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32, bytes = 16 * zd_block_bytes(type);
    const int mins = zd_x16_mins(type), quants = zd_x16_quants(type), nv = zd_x16_vectors(type);
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
        const uint8_t *group = tile->w + b * bytes;
        for (int64_t o = 0; o < bytes; o += 64)
            _mm_prefetch((const char *)(group + ZD_PREFETCH_BYTES + o), ZD_PREFETCH_HINT);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)group));
        /* the correction's weight side: the mins, or d (times -offset at the end) */
        const __m512 cw = mins >= 0 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + mins))) : dw;
        __m512i I[4];
        for (int j = 0; j < T; j++)
            I[j] = _mm512_setzero_si512();
        for (int i = 0; i < nv; i++) {
            const __m512i v = _mm512_loadu_si512(group + quants + 64 * i);
            if (nv == 8) {
                for (int j = 0; j < T; j++)
                    I[j] = _mm512_dpbusd_epi32(I[j], v, zd_x4_512(q[j] + 32 * b + 4 * i));
            } else {
                const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                for (int j = 0; j < T; j++) {
                    I[j] = _mm512_dpbusd_epi32(I[j], lo, zd_x4_512(q[j] + 32 * b + 4 * i));
                    I[j] = _mm512_dpbusd_epi32(I[j], hi, zd_x4_512(q[j] + 32 * b + 16 + 4 * i));
                }
            }
        }
        for (int j = 0; j < T; j++) {
            F[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[j]), _mm512_mul_ps(dw, _mm512_set1_ps(xd[j][b])), F[j]);
            C[j] = _mm512_fmadd_ps(cw, _mm512_set1_ps(xs[j][b]), C[j]);
        }
    }
    const __m512 factor = _mm512_set1_ps(mins >= 0 ? 1.0f : -zd_legacy_offset(zd_x16_base(type)));
    for (int j = 0; j < T; j++)
        zd_rows16_store(tile, j0 + j, _mm512_fmadd_ps(C[j], factor, F[j]));
}

ZD_TARGET_AVX512 ZD_INLINE void zd_x16_tile_512(const int type, const zd_tile *tile) {
    int64_t j = 0;
    for (; j + 4 <= tile->nt; j += 4)
        zd_x16_tokens_512(type, 4, tile, j);
    for (; j < tile->nt; j++)
        zd_x16_tokens_512(type, 1, tile, j);
}
#endif

#define ZD_X16_KERNELS(NAME, TYPE)                                                              \
    static void NAME##_scalar(const zd_tile *t) { zd_x16_tile_scalar(TYPE, t); }               \
    ZD_X16_KERNEL_512(NAME, TYPE)
#if ZD_X86
#define ZD_X16_KERNEL_512(NAME, TYPE) \
    ZD_TARGET_AVX512 static void NAME##_512(const zd_tile *t) { zd_x16_tile_512(TYPE, t); }
#else
#define ZD_X16_KERNEL_512(NAME, TYPE)
#endif
ZD_X16_KERNELS(zd_x16_q4_0, ZD_Q4_0)
ZD_X16_KERNELS(zd_x16_q4_1, ZD_Q4_1)
ZD_X16_KERNELS(zd_x16_q8_0, ZD_Q8_0)

/* The kernel for an interleaved type code on path `isa`, or NULL for a code no kernel reads. */
#if ZD_X86
#define ZD_X16_PICK(NAME, isa) ((isa) == ZD_ISA_AVX512 ? NAME##_512 : NAME##_scalar)
#else
#define ZD_X16_PICK(NAME, isa) ((void)(isa), NAME##_scalar)
#endif
static zd_tile_fn zd_x16_kernel(int type, int isa) {
    switch (type) {
    case ZD_X16 | ZD_Q4_0: return ZD_X16_PICK(zd_x16_q4_0, isa);
    case ZD_X16 | ZD_Q4_1: return ZD_X16_PICK(zd_x16_q4_1, isa);
    case ZD_X16 | ZD_Q8_0: return ZD_X16_PICK(zd_x16_q8_0, isa);
    default: return 0;
    }
}

#endif
