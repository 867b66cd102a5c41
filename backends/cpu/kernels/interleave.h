/* Weights interleaved at load: 16 rows side by side, so a vector's lanes are rows.
 *
 * The row-major tile kernels (dot_legacy.h, dot_kquant.h) spend much of their work per block on
 * scaling and reducing each row's dpbusd lanes, and per row on its final sums: with a scale per
 * 32 values that makes Q4_0 and Q4_1 decode compute-bound on 2 cores (Q4_K only just keeps pace:
 * ~32-43 GB/s from cache on 2 threads, ~63 interleaved), and short rows (a small model's k = 576)
 * pay the per-row part often. Interleaved, a dpbusd of one 64-byte load adds 4 products to each
 * of 16 rows, a block's scales are one vector for the 16 rows, and the result is a vector of 16
 * rows stored as it is: decode streams the weights at the memory's pace. A prompt's batch
 * fills the panel of panel.h from the group (no transpose needed) and runs its kernel.
 *
 * Layout (type code ZD_X16 | the GGML type): groups of 16 rows (the last padded with zero rows),
 * each the size of 16 GGUF rows; in a group, per block, the 16 rows' blocks with their bytes
 * reordered (zd_x16_at): first the block's f16 fields (d; for Q4_1, Q5_1, Q4_K and Q5_K then
 * the min or dmin; Q2_K's d and dmin and Q3_K's and Q6_K's d, last in their GGUF blocks, come
 * first here too), 16 rows side by side per field; then the rest of the block as vectors of 64
 * bytes, vector i holding bytes 4i .. 4i + 3 of rows 0..15 (4 bytes per row). Q4_0/Q4_1 have 4
 * such vectors of quants, whose bytes' low nibbles are values 4i + j of the block and high
 * nibbles values 16 + 4i + j, as in GGUF; Q5_0/Q5_1 have the same 4 after one of qh (the fifth
 * bits); Q8_0 has 8, values 4i + j, stored + 128 (unsigned, for dpbusd); Q4_K has 3 of packed
 * 6-bit scales and mins, then 32 of quants (GGUF's order); Q5_K the same with 8 of qh between
 * them; Q2_K, Q3_K and Q6_K their GGUF fields in GGUF's order (Q6_K: 32 of low nibbles, 16 of
 * top bits, 4 of int8 scales).
 */
#ifndef ZEPHYR_INTERLEAVE_H
#define ZEPHYR_INTERLEAVE_H

#include <string.h>
#include "common.h"
#include "dequant.h"
#include "dot_kquant.h"
#include "dot_legacy.h"
#include "panel.h"
#include "quantize.h"
#include "tile.h"

#define ZD_X16_ROWS 16

/* Rows shorter than this gain from interleaving in every type; longer ones only where the
 * row-major kernel cannot keep pace with the memory: Q4_0, Q4_1, Q5_0 and Q5_1 (a scale, and a
 * min, per 32 values; 7B Q4_0 decode +10-30 % here), Q2_K and Q3_K (13-14 GB/s per core from L2
 * row-major on the AMD host below, 27-35 interleaved; 7B Q3_K_M decode 7.8-7.9 -> 8.9-10.6 tok/s,
 * prefill 25-27 -> 30, load 0.15 -> 4.8 s), and Q4_K, Q5_K and Q8_0 on Intel cores. On
 * this project's AMD Zen 4 machine a 7B model's Q8_0 and Q4_K rows stream at memory speed
 * already (Q4_K A/B: decode 6.05 tok/s interleaved, 6.06-6.46 not), and copying 4-7 GB costs
 * 8-20 s of load in its VM; Q5_K, not measured there, follows Q4_K. On its Intel Xeon (Emerald
 * Rapids) the row-major kernels are compute-bound: interleaved, in alternating runs, 7B Q4_K_M
 * decode went from 3.5-3.7 to 4.4-5.0 tok/s and four sequences at once from 10.4-11.8 to
 * 13.4-13.8, load from 0.25 to 2.0 s; 7B Q8_0 decode from 2.3-3.3 to 3.4-3.6, four sequences
 * from 6.4-8.5 to 11.7-12.1, load from 0.2 to 3.4-4.2 s. There one token's matmul from L2 (the
 * memory reads 8-9 GB/s on one core, 15-20 on two), row-major against interleaved in the same
 * runs: Q5_0 and Q5_1 5-14 against 27-45 GB/s on one thread, 14-26 against 51-80 on two; Q5_K
 * 15-22 against 23-37, 30-43 against 42-62. */
#define ZD_X16_SHORT_ROW 2048

/* Whether an m x k matrix of `type` is interleaved at load for path `isa`. `repack`: 1 for
 * every type that has an interleaved kernel, 0 for none, -1 for this host's choice (above; on
 * AVX2 every such type: its row-major kernels are compute-bound wherever measured). */
static inline int zd_x16_wanted(int type, int isa, int64_t k, int repack) {
    const int legacy = type == ZD_Q4_0 || type == ZD_Q4_1 || type == ZD_Q5_0 || type == ZD_Q5_1;
    const int always = legacy || type == ZD_Q2_K || type == ZD_Q3_K;
    const int by_host = type == ZD_Q4_K || type == ZD_Q5_K || type == ZD_Q6_K || type == ZD_Q8_0;
    if (repack == 0 || isa == ZD_ISA_SCALAR || !(always || by_host))
        return 0;
    return always || repack == 1 || isa == ZD_ISA_AVX2 || k < ZD_X16_SHORT_ROW || zd_cpu_is_intel();
}

/* Bytes of f16 fields in a GGUF block of interleaved `type` (d, then any min). */
static inline int zd_x16_head(int type) {
    const int base = zd_x16_base(type);
    return base == ZD_Q4_1 || base == ZD_Q5_1 || base == ZD_Q4_K || base == ZD_Q5_K || base == ZD_Q2_K ? 4 : 2;
}

/* Where in the GGUF block the f16 fields sit: first, or last (Q2_K, Q3_K and Q6_K keep them
 * after their quants). */
static inline int zd_x16_head_at(int type) {
    const int base = zd_x16_base(type);
    const int last = base == ZD_Q2_K || base == ZD_Q3_K || base == ZD_Q6_K;
    return last ? (int)zd_block_bytes(type) - zd_x16_head(type) : 0;
}

/* Where the rest of the block (its words) starts in the GGUF block. */
static inline int zd_x16_body_at(int type) { return zd_x16_head_at(type) == 0 ? zd_x16_head(type) : 0; }

/* Where byte o of row r's block sits in its interleaved group of 16 blocks: the f16 fields
 * first, then the words. */
static inline int64_t zd_x16_at(int type, int r, int o) {
    const int head = zd_x16_head(type), h = o - zd_x16_head_at(type);
    if (h >= 0 && h < head)
        return ZD_X16_ROWS * (h & ~1) + 2 * r + (h & 1);
    o -= zd_x16_body_at(type);
    return ZD_X16_ROWS * head + 64 * (o / 4) + 4 * r + o % 4;
}

/* Q8_0's quant bytes are stored + 128 (a flip of the top bit), the others as they are. */
static inline uint32_t zd_x16_flip(int type) { return zd_x16_base(type) == ZD_Q8_0 ? 0x80808080u : 0; }

/* Floats of scratch, past the panel's, a thread needs for 16 GGUF rows of k values of an
 * interleaved type (Q8_0 has the most bytes per value). */
static inline int64_t zd_x16_rows_floats(int64_t k) { return (ZD_X16_ROWS * (k / 32) * 34 + 3) / 4; }

/* Bytes of an interleaved matrix of m rows of k values (whole groups). */
static inline int64_t zd_x16_bytes(int type, int64_t m, int64_t k) {
    return (m + ZD_X16_ROWS - 1) / ZD_X16_ROWS * ZD_X16_ROWS * zd_row_bytes(zd_x16_base(type), k);
}

/* Interleave groups [g0, g1) of the m x k GGUF matrix `src` of (GGML) type `type` into `dst`,
 * word by word: the reference for zd_x16_pack_512. Rows past m are zeros. */
static void zd_x16_pack_scalar(int type, const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int64_t g0, int64_t g1) {
    const int64_t row_bytes = zd_row_bytes(type, k), bytes = zd_block_bytes(type), nb = row_bytes / bytes;
    const int head = zd_x16_head(type), h0 = zd_x16_head_at(type), w0 = zd_x16_body_at(type);
    const int words = (int)bytes - head;
    const uint32_t flip = zd_x16_flip(type);
    for (int64_t g = g0; g < g1; g++) {
        const int valid = (int)zd_min64(ZD_X16_ROWS, m - g * ZD_X16_ROWS);
        uint8_t *out = dst + g * ZD_X16_ROWS * row_bytes;
        for (int64_t b = 0; b < nb; b++, out += ZD_X16_ROWS * bytes) {
            if (valid < ZD_X16_ROWS)
                memset(out, 0, ZD_X16_ROWS * bytes);
            for (int r = 0; r < valid; r++) {
                const uint8_t *block = src + (g * ZD_X16_ROWS + r) * row_bytes + b * bytes;
                for (int o = h0; o < h0 + head; o += 2)
                    memcpy(out + zd_x16_at(type, r, o), block + o, 2);
                for (int o = w0; o < w0 + words; o += 4) {
                    const uint32_t word = zd_u32_at(block + o) ^ flip;
                    memcpy(out + zd_x16_at(type, r, o), &word, 4);
                }
            }
        }
    }
}

#if ZD_X86
/* The same with one gather of the 16 rows per 64 bytes written (the load-time copy of a 7B
 * model: ~3 GB/s word by word). A 2-byte field is read as 4 bytes that stay inside its block:
 * from the field on where the fields come first, up to its end where they come last. */
ZD_TARGET_AVX512 static void zd_x16_pack_512(int type, const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int64_t g0, int64_t g1) {
    const int64_t row_bytes = zd_row_bytes(type, k), bytes = zd_block_bytes(type), nb = row_bytes / bytes;
    const int head = zd_x16_head(type), h0 = zd_x16_head_at(type), w0 = zd_x16_body_at(type);
    const int words = (int)bytes - head, back = h0 > 0 ? 2 : 0;
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)row_bytes));
    const __m512i flip = _mm512_set1_epi32((int)zd_x16_flip(type));
    for (int64_t g = g0; g < g1; g++) {
        const int valid = (int)zd_min64(ZD_X16_ROWS, m - g * ZD_X16_ROWS);
        const __mmask16 live = (__mmask16)((1u << valid) - 1);
        const uint8_t *rows0 = src + g * ZD_X16_ROWS * row_bytes;
        uint8_t *out = dst + g * ZD_X16_ROWS * row_bytes;
        for (int64_t b = 0; b < nb; b++, out += ZD_X16_ROWS * bytes) {
            const uint8_t *at = rows0 + b * bytes;
            for (int o = h0; o < h0 + head; o += 2) {
                const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, at + o - back, 1);
                _mm256_storeu_si256((__m256i *)(out + zd_x16_at(type, 0, o)),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 8 * back)));
            }
            for (int o = w0; o < w0 + words; o += 4) {
                const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, at + o, 1);
                _mm512_storeu_si512(out + zd_x16_at(type, 0, o), _mm512_maskz_xor_epi32(live, v, flip));
            }
        }
    }
}
#endif

#if ZD_X86
/* The same on AVX2: two gathers of 8 rows per 64 bytes written; the 2-byte fields narrowed with
 * a saturating pack (exact: each is masked to 16 bits first), whose 128-bit lanes a permute
 * puts back in row order. */
ZD_TARGET_AVX2 static void zd_x16_pack_256(int type, const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int64_t g0, int64_t g1) {
    const int64_t row_bytes = zd_row_bytes(type, k), bytes = zd_block_bytes(type), nb = row_bytes / bytes;
    const int head = zd_x16_head(type), h0 = zd_x16_head_at(type), w0 = zd_x16_body_at(type);
    const int words = (int)bytes - head, back = h0 > 0 ? 2 : 0;
    const __m256i first = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm256_set1_epi32(8);
    const __m256i rows[2] = {_mm256_mullo_epi32(first, _mm256_set1_epi32((int)row_bytes)),
                             _mm256_mullo_epi32(_mm256_add_epi32(first, eight), _mm256_set1_epi32((int)row_bytes))};
    const __m256i flip = _mm256_set1_epi32((int)zd_x16_flip(type)), low16 = _mm256_set1_epi32(0xffff);
    for (int64_t g = g0; g < g1; g++) {
        const __m256i valid = _mm256_set1_epi32((int)zd_min64(ZD_X16_ROWS, m - g * ZD_X16_ROWS));
        const __m256i live[2] = {_mm256_cmpgt_epi32(valid, first), _mm256_cmpgt_epi32(valid, _mm256_add_epi32(first, eight))};
        const uint8_t *rows0 = src + g * ZD_X16_ROWS * row_bytes;
        uint8_t *out = dst + g * ZD_X16_ROWS * row_bytes;
        for (int64_t b = 0; b < nb; b++, out += ZD_X16_ROWS * bytes) {
            const uint8_t *at = rows0 + b * bytes;
            __m256i v[2];
            for (int o = h0; o < h0 + head; o += 2) {
                for (int h = 0; h < 2; h++)
                    v[h] = _mm256_and_si256(_mm256_srli_epi32(_mm256_mask_i32gather_epi32(
                        _mm256_setzero_si256(), (const int *)(at + o - back), rows[h], live[h], 1), 8 * back), low16);
                _mm256_storeu_si256((__m256i *)(out + zd_x16_at(type, 0, o)),
                                    _mm256_permute4x64_epi64(_mm256_packus_epi32(v[0], v[1]), 0xD8));
            }
            for (int o = w0; o < w0 + words; o += 4)
                for (int h = 0; h < 2; h++) {
                    v[h] = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)(at + o), rows[h], live[h], 1);
                    _mm256_storeu_si256((__m256i *)(out + zd_x16_at(type, 0, o) + 32 * h),
                                        _mm256_and_si256(_mm256_xor_si256(v[h], flip), live[h]));
                }
        }
    }
}
#endif

/* zd_x16_pack_scalar's result, the fast way on path `isa` where there is one. */
static void zd_x16_pack(int type, int isa, const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int64_t g0, int64_t g1) {
#if ZD_X86
    if (isa == ZD_ISA_AVX512) {
        zd_x16_pack_512(type, src, m, k, dst, g0, g1);
        return;
    }
    if (isa == ZD_ISA_AVX2) {
        zd_x16_pack_256(type, src, m, k, dst, g0, g1);
        return;
    }
#endif
    (void)isa;
    zd_x16_pack_scalar(type, src, m, k, dst, g0, g1);
}

/* Row r's GGUF block back from its interleaved group (the inverse of zd_x16_pack). */
static void zd_x16_block(int type, const uint8_t *group, int r, uint8_t *block) {
    const int head = zd_x16_head(type), h0 = zd_x16_head_at(type), w0 = zd_x16_body_at(type);
    const int words = (int)zd_block_bytes(type) - head;
    const uint32_t flip = zd_x16_flip(type);
    for (int o = h0; o < h0 + head; o += 2)
        memcpy(block + o, group + zd_x16_at(type, r, o), 2);
    for (int o = w0; o < w0 + words; o += 4) {
        const uint32_t word = zd_u32_at(group + zd_x16_at(type, r, o)) ^ flip;
        memcpy(block + o, &word, 4);
    }
}

/* The largest block an interleaved type has (Q6_K). */
#define ZD_X16_MAX_BLOCK 210

/* Row `row` of an interleaved matrix, decoded to floats (embedding lookups, tests). */
static void zd_x16_decode_row(int type, const uint8_t *w, int64_t row, int64_t k, float *out) {
    const int base = zd_x16_base(type);
    const int64_t row_bytes = zd_row_bytes(base, k), bytes = zd_block_bytes(base), values = zd_block_size(base);
    const uint8_t *group = w + row / ZD_X16_ROWS * ZD_X16_ROWS * row_bytes;
    uint8_t block[ZD_X16_MAX_BLOCK];
    for (int64_t b = 0; b < k / values; b++, group += ZD_X16_ROWS * bytes) {
        zd_x16_block(type, group, (int)(row % ZD_X16_ROWS), block);
        zd_decoder(base)(block, out + b * values, values);
    }
}

/* ---- the tile kernels: a group of 16 rows, every token of the tile ---------------------------- */

/* One row's block b (with the activation's block or super-block b) for token t, as the
 * row-major scalar kernels compute it. */
static float zd_x16_block_dot_scalar(int base, const uint8_t *block, const zd_act *x, int64_t t, int64_t b) {
    const int8_t *q = x->q + t * x->q_stride;
    const float xd = x->d[t * x->d_stride + b], *xs = x->s32 + t * x->s_stride;
    if (zd_block_size(base) == ZD_QK_K) {
        uint8_t u[256];
        int sc[16];
        float corr[16];
        const float d = zd_kq_unpack_scalar(base, block, u, sc, corr);
        const int nc = zd_kq_corrections(base);
        const float *sums = (nc == 8 ? x->s32 : x->s16) + t * x->s_stride + nc * b;
        return d * xd * (float)zd_kq_int_dot_scalar(u, sc, q + 256 * b) + zd_dot_f32_scalar(corr, sums, nc);
    }
    uint8_t u[32];
    const float dw = zd_f16_to_f32(zd_u16_at(block));
    zd_legacy_unpack_scalar(base, block, u);
    return dw * xd * (float)zd_dot_u8_s8_scalar(u, q + 32 * b, 32) + zd_legacy_corr(base, block, dw) * xs[b];
}

/* Scalar, for the paths without AVX-512 (weights interleaved for AVX-512 and the path forced
 * down afterwards): each row's blocks taken back out of the group, computed as row-major. */
static void zd_x16_tile_scalar(int type, const zd_tile *tile) {
    const int base = zd_x16_base(type);
    const int64_t values = zd_block_size(base), nb = tile->x->k / values, bytes = ZD_X16_ROWS * zd_block_bytes(base);
    uint8_t block[ZD_X16_MAX_BLOCK];
    for (int64_t j = 0; j < tile->nt; j++)
        for (int r = 0; r < tile->rows; r++) {
            float total = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                zd_x16_block(type, tile->w + b * bytes, r, block);
                total += zd_x16_block_dot_scalar(base, block, tile->x, tile->t0 + j, b);
            }
            zd_tile_store(tile, r, j, total);
        }
}

#if ZD_X86
/* Tokens j0 .. j0 + T - 1 of the tile: their activation quants, block scales and d * sums per
 * 32 values, or per 16 (`per16`: the k-quants with a scale per 16 values). */
ZD_INLINE void zd_x16_token_operands(const zd_tile *tile, const int T, int64_t j0, const int per16, const int8_t **q,
                                     const float **xd, const float **xs) {
    const zd_act *x = tile->x;
    ZD_UNROLL
    for (int j = 0; j < T; j++) {
        const int64_t t = tile->t0 + j0 + j;
        q[j] = x->q + t * x->q_stride;
        xd[j] = x->d + t * x->d_stride;
        xs[j] = (per16 ? x->s16 : x->s32) + t * x->s_stride;
    }
}

/* Group i of the tile (`bytes` long), the bytes a few groups on prefetched; its first 16 halves
 * (every interleaved type's d) in *d. */
ZD_TARGET_AVX512 ZD_INLINE const uint8_t *zd_x16_group_512(const zd_tile *tile, int64_t i, int64_t bytes, __m512 *d) {
    const uint8_t *group = tile->w + i * bytes;
    for (int64_t o = 0; o < bytes; o += 64)
        _mm_prefetch((const char *)(group + ZD_PREFETCH_BYTES + o), ZD_PREFETCH_HINT);
    *d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)group));
    return group;
}

/* A k-quant super-block's sums into the row totals: F += acc d xd (the quants), C += cw m (the
 * offsets or mins, each kernel's weight side cw times the activations' side m). */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_fold_512(const int T, const __m512i *acc, const __m512 *m, __m512 d, __m512 cw,
                                                const float **xd, int64_t sb, __m512 *F, __m512 *C) {
    ZD_UNROLL
    for (int j = 0; j < T; j++) {
        F[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), _mm512_mul_ps(d, _mm512_set1_ps(xd[j][sb])), F[j]);
        C[j] = _mm512_fmadd_ps(cw, m[j], C[j]);
    }
}

/* In each row's 4 bytes, byte b of the row's word at all 4 places (for a byte shuffle, which
 * indexes within 128-bit lanes: 4 rows). */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_row_byte_index_512(int b) {
    return _mm512_add_epi32(_mm512_broadcast_i32x4(_mm_setr_epi32(0, 0x04040404, 0x08080808, 0x0c0c0c0c)),
                            _mm512_set1_epi32(b * 0x01010101));
}

/* Legacy types, T tokens from j0: per block, each quant vector gives one slice of 16 rows
 * (Q8_0) or two (the low and high nibbles), one dpbusd per slice and token. Q5_0 and Q5_1 add
 * 16 to each nibble whose fifth bit is set: quant vector i's byte j holds values 4i + j and
 * 16 + 4i + j, whose bits in the row's qh word are bit 4 (i % 2) + j of its bytes i / 2 and
 * 2 + i / 2; a shuffle copies that byte to the row's 4 bytes, a test picks byte j's bit. */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_tokens_512(const int type, const int T, const zd_tile *tile, int64_t j0) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32, bytes = 16 * zd_block_bytes(type);
    const int five = type == ZD_Q5_0 || type == ZD_Q5_1;
    const int head = zd_x16_head(type), qh = zd_x16_at(type, 0, head), quants = qh + (five ? 64 : 0);
    const int mins = head == 4 ? zd_x16_at(type, 0, 2) : -1, nv = type == ZD_Q8_0 ? 8 : 4;
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    zd_x16_token_operands(tile, T, j0, 0, q, xd, xs);
    __m512 F[4], C[4];
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        F[j] = C[j] = _mm512_setzero_ps();
    const __m512i nibble = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(16);
    for (int64_t b = 0; b < nb; b++) {
        __m512 dw;
        const uint8_t *group = zd_x16_group_512(tile, b, bytes, &dw);
        /* the correction's weight side: the mins, or d (times -offset at the end) */
        const __m512 cw = mins >= 0 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + mins))) : dw;
        __m512i I[4];
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            I[j] = _mm512_setzero_si512();
        const __m512i h = five ? _mm512_loadu_si512(group + qh) : _mm512_setzero_si512();
        ZD_UNROLL
        for (int i = 0; i < nv; i++) {
            const __m512i v = _mm512_loadu_si512(group + quants + 64 * i);
            if (nv == 8) {
                ZD_UNROLL
                for (int j = 0; j < T; j++)
                    I[j] = _mm512_dpbusd_epi32(I[j], v, zd_x4_512(q[j] + 32 * b + 4 * i));
            } else {
                __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                if (five) {
                    const __m512i bits = _mm512_set1_epi32((int)(0x08040201u << 4 * (i % 2)));
                    const __m512i h_lo = _mm512_shuffle_epi8(h, zd_row_byte_index_512(i / 2));
                    const __m512i h_hi = _mm512_shuffle_epi8(h, zd_row_byte_index_512(2 + i / 2));
                    lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(h_lo, bits), lo, sixteen);
                    hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(h_hi, bits), hi, sixteen);
                }
                ZD_UNROLL
                for (int j = 0; j < T; j++) {
                    I[j] = _mm512_dpbusd_epi32(I[j], lo, zd_x4_512(q[j] + 32 * b + 4 * i));
                    I[j] = _mm512_dpbusd_epi32(I[j], hi, zd_x4_512(q[j] + 32 * b + 16 + 4 * i));
                }
            }
        }
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            F[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[j]), _mm512_mul_ps(dw, _mm512_set1_ps(xd[j][b])), F[j]);
            C[j] = _mm512_fmadd_ps(cw, _mm512_set1_ps(xs[j][b]), C[j]);
        }
    }
    const __m512 factor = _mm512_set1_ps(mins >= 0 ? 1.0f : -zd_legacy_offset(zd_x16_base(type)));
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        zd_rows16_store(tile, j0 + j, _mm512_fmadd_ps(C[j], factor, F[j]));
}

/* Byte s (0..3) of each 32-bit lane, as an int32 per lane: a byte shuffle (port 5 on Intel
 * cores) where a shift and a mask would take port 0 from the dpbusd. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_lane_byte_512(__m512i v, int s) {
    const __m512i lanes = _mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
    return _mm512_shuffle_epi8(v, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)(0x80808000u | (unsigned)s))));
}

/* A Q4_K group's 6-bit scales and mins (as zd_k4_scales_mins, 16 rows at once): lane r, byte s
 * holds sub-block s's scale (min) in sc[0] (mn[0]), sub-block s + 4's in sc[1] (mn[1]). */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_q4k_scales_512(const uint8_t *group, __m512i sc[2], __m512i mn[2]) {
    const __m512i low = _mm512_set1_epi8(0x0f), six = _mm512_set1_epi8(0x3f), top = _mm512_set1_epi8(0x30);
    const __m512i a = _mm512_loadu_si512(group + 64), b = _mm512_loadu_si512(group + 128);
    const __m512i c = _mm512_loadu_si512(group + 192);
    sc[0] = _mm512_and_si512(a, six);
    sc[1] = _mm512_or_si512(_mm512_and_si512(c, low), _mm512_and_si512(_mm512_srli_epi32(a, 2), top));
    mn[0] = _mm512_and_si512(b, six);
    mn[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(c, 4), low), _mm512_and_si512(_mm512_srli_epi32(b, 2), top));
}

/* Q5_K's two slices of quant vector 8 ch + i of the super-block at `group`, as bytes 0..31 (see
 * zd_x16_kq_tokens_512). After d, dmin and 3 vectors of scales, a group holds 8 vectors of qh
 * (from byte 256), then 32 of quants (from 768). */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_q5k_slices_512(const uint8_t *group, int ch, int i, __m512i *lo, __m512i *hi) {
    const __m512i low = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(16);
    const __m512i v = _mm512_loadu_si512(group + 768 + 64 * (8 * ch + i)), h = _mm512_loadu_si512(group + 256 + 64 * i);
    const __m512i l = _mm512_and_si512(v, low), u = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    *lo = _mm512_mask_add_epi8(l, _mm512_test_epi8_mask(h, _mm512_set1_epi8((char)(1 << 2 * ch))), l, sixteen);
    *hi = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(h, _mm512_set1_epi8((char)(2 << 2 * ch))), u, sixteen);
}

/* Q4_K and Q5_K, T tokens from j0. Per super-block the 16 rows' 6-bit scales and mins are
 * unpacked to bytes (as zd_k4_scales_mins, on 16 rows at once); each of the 32 quant vectors
 * gives two slices (sub-blocks 2c and 2c + 1 of chunk c = i / 8), one dpbusd each per token.
 * Q4_K's high nibbles are used in place (16 times their value) and their scale divided by 16,
 * which is exact; Q5_K's values (0..31) would not fit a byte that way, so its high nibbles are
 * shifted down, and 16 added where the fifth bit is set: quant vector 8c + i lines up byte for
 * byte with qh vector i (values 4i .. 4i + 3 of every sub-block), whose bits 2c and 2c + 1 are
 * those of the two slices. A sub-block's sum times its scale joins the super-block's total in
 * floats (each product exact, < 2^24; one multiply-add where an integer multiply, vpmulld, is
 * two uops and an add: 64-token prefill ~5 % faster, decode the same), then one multiply-add by
 * d * dx; the mins meet the activations' sums per 32 values (s32). Activations come in Q4_K order
 * (zd_act.kq_order): sub-block 2c's values start at 128 (c / 2) + 32 (c % 2), sub-block 2c + 1's
 * 64 later. Q5_K's slices can be kept in the tile's scratch for the passes after (`slices`:
 * ZD_X16_KEEP, ZD_X16_REUSE). */
enum { ZD_X16_EXTRACT = 0, ZD_X16_KEEP = 1, ZD_X16_REUSE = 2 };
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_kq_tokens_512(const int type, const int T, const int slices, const zd_tile *tile,
                                                     int64_t j0) {
    const zd_act *x = tile->x;
    const int five = type == ZD_Q5_K;
    const int64_t nsb = x->k / 256, bytes = 16 * zd_block_bytes(type);
    uint8_t *kept = (uint8_t *)tile->cbuf;   /* 128 bytes per quant vector: the panel's room */
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    zd_x16_token_operands(tile, T, j0, 0, q, xd, xs);
    __m512 F[4], C[4];
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        F[j] = C[j] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f), high = _mm512_set1_epi8((char)0xf0);
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512 d;
        const uint8_t *group = zd_x16_group_512(tile, sb, bytes, &d);
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + 32)));
        __m512i sc[2], mn[2];
        zd_x16_q4k_scales_512(group, sc, mn);
        __m512 acc[4];
        __m512 m[4];
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            acc[j] = _mm512_setzero_ps();
            m[j] = _mm512_setzero_ps();
        }
        ZD_UNROLL
        for (int s = 0; s < 8; s++) {
            const __m512 mins = _mm512_cvtepi32_ps(zd_lane_byte_512(mn[s / 4], s % 4));
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                m[j] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xs[j][8 * sb + s]), m[j]);
        }
        ZD_UNROLL
        for (int ch = 0; ch < 4; ch++) {
            __m512i I[4], H[4];
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                I[j] = H[j] = _mm512_setzero_si512();
            const int64_t at = 256 * sb + 128 * (ch / 2) + 32 * (ch % 2);
            ZD_UNROLL
            for (int i = 0; i < 8; i++) {
                __m512i lo, hi;
                uint8_t *slot = kept + 128 * (32 * sb + 8 * ch + i);
                if (slices == ZD_X16_REUSE) {
                    lo = _mm512_loadu_si512(slot);
                    hi = _mm512_loadu_si512(slot + 64);
                } else if (five) {
                    zd_x16_q5k_slices_512(group, ch, i, &lo, &hi);
                    if (slices == ZD_X16_KEEP) {
                        _mm512_storeu_si512(slot, lo);
                        _mm512_storeu_si512(slot + 64, hi);
                    }
                } else {
                    const __m512i v = _mm512_loadu_si512(group + 256 + 64 * (8 * ch + i));
                    lo = _mm512_and_si512(v, low);
                    hi = _mm512_and_si512(v, high);
                }
                ZD_UNROLL
                for (int j = 0; j < T; j++) {
                    I[j] = _mm512_dpbusd_epi32(I[j], lo, zd_x4_512(q[j] + at + 4 * i));
                    H[j] = _mm512_dpbusd_epi32(H[j], hi, zd_x4_512(q[j] + at + 64 + 4 * i));
                }
            }
            const __m512 s_lo = _mm512_cvtepi32_ps(zd_lane_byte_512(sc[ch / 2], 2 * (ch % 2)));
            const __m512 s_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(zd_lane_byte_512(sc[ch / 2], 2 * (ch % 2) + 1)),
                                              _mm512_set1_ps(five ? 1.0f : 1.0f / 16));
            ZD_UNROLL
            for (int j = 0; j < T; j++) {
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(H[j]), s_hi, acc[j]);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[j]), s_lo, acc[j]);
            }
        }
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            F[j] = _mm512_fmadd_ps(acc[j], _mm512_mul_ps(d, _mm512_set1_ps(xd[j][sb])), F[j]);
            C[j] = _mm512_fmadd_ps(dmin, m[j], C[j]);
        }
    }
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        zd_rows16_store(tile, j0 + j, _mm512_sub_ps(F[j], C[j]));
}

/* Each 32-bit lane's byte s (0..3), sign-extended: Q6_K's int8 scales, 16 rows at once. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_lane_int8_512(__m512i v, int s) {
    return _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * s), 24);
}

/* Q2_K and Q3_K, T tokens from j0. Quant vector i of half n (bytes 4i .. 4i + 3 of the half's
 * 32) holds at bit 2j values 4i .. 4i + 3 of sub-block 4n + j; Q3_K's third bit of sub-block s,
 * value l, is bit s of hmask byte l (hmask vector i, the same lane byte). The first 4 and the
 * last 4 vectors of a sub-block are different 16-value groups, each with its own scale: Q2_K's
 * a nibble (and a min, value d sc u - dmin min), Q3_K's 6 bits biased by 32 (value
 * d sc (u - 4)). Their scaling is integer work, two groups per instruction: the group sums
 * (within 16 bits) of two sub-blocks meet their scales as int16 pairs in one dpwssd, and the
 * offsets or mins meet the activations' sums per 16 values (split16) in two dpbusd per four
 * groups; a float multiply per group had cost as much as the quants' own dpbusd. */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_q23k_tokens_512(const int type, const int T, const zd_tile *tile, int64_t j0) {
    const zd_act *x = tile->x;
    const int q3 = type == ZD_Q3_K;
    const int64_t nsb = x->k / 256, bytes = 16 * zd_block_bytes(type);
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    const uint8_t *split[4];
    zd_x16_token_operands(tile, T, j0, 1, q, xd, xs);
    __m512 F[4], C[4];
    ZD_UNROLL
    for (int j = 0; j < T; j++) {
        split[j] = zd_act_split16(x, tile->t0 + j0 + j);
        F[j] = C[j] = _mm512_setzero_ps();
    }
    const __m512i three = _mm512_set1_epi8(3), nibble = _mm512_set1_epi8(0x0f);
    const __m512i low16 = _mm512_set1_epi32(0xffff), ones = _mm512_set1_epi8(1);
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512 d;
        const uint8_t *group = zd_x16_group_512(tile, sb, bytes, &d);
        const uint8_t *body = group + 16 * zd_x16_head(type);
        const uint8_t *hmask = body, *qs = body + (q3 ? 8 : 4) * 64, *packed = q3 ? qs + 16 * 64 : body;
        /* lane r, byte b of S[v]: the scale of 16-value group 4v + b (Q3_K's less its bias); of
         * c[v]: what meets that group's activation sum (Q3_K's scale, Q2_K's min) */
        __m512i S[4], c[4];
        if (q3) {
            const __m512i a = _mm512_loadu_si512(packed), b = _mm512_loadu_si512(packed + 64);
            const __m512i h = _mm512_loadu_si512(packed + 128);
            ZD_UNROLL
            for (int v = 0; v < 4; v++) {
                const __m512i src = v % 2 ? b : a;
                const __m512i lowbits = _mm512_and_si512(v < 2 ? src : _mm512_srli_epi32(src, 4), nibble);
                const __m512i top = _mm512_and_si512(_mm512_srli_epi32(h, 2 * v), three);
                S[v] = c[v] = _mm512_sub_epi8(_mm512_or_si512(lowbits, _mm512_slli_epi32(top, 4)), _mm512_set1_epi8(32));
            }
        } else {
            ZD_UNROLL
            for (int v = 0; v < 4; v++) {
                const __m512i both = _mm512_loadu_si512(packed + 64 * v);
                S[v] = _mm512_and_si512(both, nibble);
                c[v] = _mm512_and_si512(_mm512_srli_epi32(both, 4), nibble);
            }
        }
        /* per token, sum over groups of c times the activations' sum, in integers: split16's
         * high bytes carry + 128, which takes 128 times each lane's sum of c back out */
        __m512i csum = _mm512_setzero_si512();
        ZD_UNROLL
        for (int v = 0; v < 4; v++)
            csum = _mm512_dpbusd_epi32(csum, ones, c[v]);
        __m512 m[4];
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            const uint8_t *hi = split[j] + 32 * sb, *lo = hi + 16;
            __m512i H = _mm512_setzero_si512(), L = _mm512_setzero_si512();
            ZD_UNROLL
            for (int v = 0; v < 4; v++) {
                H = _mm512_dpbusd_epi32(H, _mm512_set1_epi32((int)zd_u32_at(hi + 4 * v)), c[v]);
                L = _mm512_dpbusd_epi32(L, _mm512_set1_epi32((int)zd_u32_at(lo + 4 * v)), c[v]);
            }
            const __m512i sums = _mm512_add_epi32(_mm512_slli_epi32(_mm512_sub_epi32(H, _mm512_slli_epi32(csum, 7)), 4), L);
            m[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(xd[j][sb]));
        }
        /* int16 lanes of the scales: groups (4v, 4v + 2) in P[v][0], (4v + 1, 4v + 3) in P[v][1],
         * the pairs an even sub-block 2v and its odd neighbour make */
        __m512i P[4][2];
        ZD_UNROLL
        for (int v = 0; v < 4; v++) {
            P[v][0] = _mm512_srai_epi16(_mm512_slli_epi16(S[v], 8), 8);
            P[v][1] = _mm512_srai_epi16(S[v], 8);
        }
        __m512i acc[4], even[4][2];
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            acc[j] = _mm512_setzero_si512();
        ZD_UNROLL
        for (int n = 0; n < 2; n++)
            ZD_UNROLL
            for (int sh = 0; sh < 4; sh++) {
                const int s = 4 * n + sh;
                const int64_t at = 256 * sb + 64 * (2 * (s / 4) + s % 2) + 32 * ((s % 4) / 2);   /* Q4_K order */
                /* the 2 bits in place, 4^sh times their value (the sums are unscaled below), but
                 * Q3_K's top pair: its third bit, next above them, would not fit in the byte */
                const int top = q3 && sh == 3, scaled = top ? 0 : 2 * sh;
                __m512i I[4][2];
                ZD_UNROLL
                for (int j = 0; j < T; j++)
                    I[j][0] = I[j][1] = _mm512_setzero_si512();
                ZD_UNROLL
                for (int i = 0; i < 8; i++) {
                    const __m512i v = _mm512_loadu_si512(qs + 64 * (8 * n + i));
                    __m512i u = top ? _mm512_and_si512(_mm512_srli_epi32(v, 6), three)
                                    : _mm512_and_si512(v, _mm512_set1_epi8((char)(3 << scaled)));
                    if (q3) {
                        const __m512i hm = _mm512_loadu_si512(hmask + 64 * i);
                        const int up = scaled + 2 - s;   /* bit s of hmask to bit scaled + 2 */
                        const __m512i bit = up > 0 ? _mm512_slli_epi32(hm, up) : up < 0 ? _mm512_srli_epi32(hm, -up) : hm;
                        u = _mm512_ternarylogic_epi32(u, bit, _mm512_set1_epi8((char)(4 << scaled)), 0xF8);   /* u | (bit & 4 << scaled) */
                    }
                    ZD_UNROLL
                    for (int j = 0; j < T; j++)
                        I[j][i / 4] = _mm512_dpbusd_epi32(I[j][i / 4], u, zd_x4_512(q[j] + at + 4 * i));
                }
                /* each group's sum fits 16 bits (|sum| <= 16 * 7 * 127): an even sub-block's go to
                 * the low halves, the next one's to the high halves */
                ZD_UNROLL
                for (int j = 0; j < T; j++)
                    ZD_UNROLL
                    for (int e = 0; e < 2; e++) {
                        if (s % 2 == 0)
                            even[j][e] = scaled ? _mm512_srai_epi32(I[j][e], scaled) : I[j][e];
                        else
                            acc[j] = _mm512_dpwssd_epi32(acc[j], _mm512_ternarylogic_epi32(even[j][e],
                                _mm512_slli_epi32(I[j][e], 16 - scaled), low16, 0xEC), P[s / 2][e]);
                    }
            }
        /* the offsets: dmin per min (Q2_K), 4 d per scale (Q3_K) */
        const __m512 cw = q3 ? _mm512_mul_ps(d, _mm512_set1_ps(4.0f))
                             : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + 32)));
        zd_x16_fold_512(T, acc, m, d, cw, xd, sb, F, C);
    }
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        zd_rows16_store(tile, j0 + j, _mm512_sub_ps(F[j], C[j]));
}

/* Q6_K's quant vector i of chunk c of half h (its super-block's quants at ql, top bits at qh):
 * 16 rows x 4 six-bit values of the low nibbles' sub-block, and of the high nibbles'. */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_q6k_unpack_512(const uint8_t *ql, const uint8_t *qh, int h, int c, int i,
                                                      __m512i *lo, __m512i *hi) {
    const __m512i low = _mm512_set1_epi8(0x0f), two = _mm512_set1_epi8(0x30);
    const __m512i v = _mm512_loadu_si512(ql + 64 * (16 * h + 8 * c + i));
    const __m512i bits = _mm512_loadu_si512(qh + 64 * (8 * h + i));
    /* the top bits moved to bits 4-5 of each byte (a lane shift; the mask drops what crossed bytes) */
    const __m512i top_lo = _mm512_and_si512(c == 0 ? _mm512_slli_epi32(bits, 4) : _mm512_slli_epi32(bits, 2), two);
    const __m512i top_hi = _mm512_and_si512(c == 0 ? bits : _mm512_srli_epi32(bits, 2), two);
    *lo = _mm512_ternarylogic_epi32(v, top_lo, low, 0xEC);   /* (v & low) | top */
    *hi = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4), top_hi, low, 0xEC);
}

/* Q6_K, T tokens from j0. Per half h of a super-block (128 values), chunk c (0, 1) of 32 ql
 * bytes holds sub-blocks 4h + c (low nibbles) and 4h + 2 + c (high nibbles), whose top 2 bits
 * are bits 2c and 4 + 2c of the qh byte with the same l (qh vector i pairs with ql vector i of
 * each chunk). Quant vectors i < 4 and i >= 4 fall in different 16-value groups (each with its
 * own int8 scale), so a chunk keeps 4 integer sums per token; they also break the dpbusd
 * chains into short ones, which a single token's decode would otherwise wait on. The offset
 * -32 meets the activations' sums per 16 values (s16). In Q4_K order the low sub-block's values
 * start at 128 h + 64 c, the high one's 32 later. */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_q6k_tokens_512(const int T, const zd_tile *tile, int64_t j0) {
    const zd_act *x = tile->x;
    const int64_t nsb = x->k / 256, bytes = 16 * sizeof(zd_block_q6_k);
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    zd_x16_token_operands(tile, T, j0, 1, q, xd, xs);
    __m512 F[4], C[4];
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        F[j] = C[j] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512 d;
        const uint8_t *group = zd_x16_group_512(tile, sb, bytes, &d);
        const uint8_t *ql = group + 32, *qh = ql + 64 * 32, *scales = qh + 64 * 16;
        __m512i acc[4];
        __m512 m[4];
        ZD_UNROLL
        for (int j = 0; j < T; j++) {
            acc[j] = _mm512_setzero_si512();
            m[j] = _mm512_setzero_ps();
        }
        ZD_UNROLL
        for (int h = 0; h < 2; h++)
            ZD_UNROLL
            for (int c = 0; c < 2; c++) {
                __m512i I[4][4];   /* token, then (low, high) x (values 0-15, 16-31) */
                ZD_UNROLL
                for (int j = 0; j < T; j++)
                    I[j][0] = I[j][1] = I[j][2] = I[j][3] = _mm512_setzero_si512();
                const int64_t at = 256 * sb + 128 * h + 64 * c;
                ZD_UNROLL
                for (int i = 0; i < 8; i++) {
                    __m512i lo, hi;
                    zd_x16_q6k_unpack_512(ql, qh, h, c, i, &lo, &hi);
                    ZD_UNROLL
                    for (int j = 0; j < T; j++) {
                        I[j][i / 4] = _mm512_dpbusd_epi32(I[j][i / 4], lo, zd_x4_512(q[j] + at + 4 * i));
                        I[j][2 + i / 4] = _mm512_dpbusd_epi32(I[j][2 + i / 4], hi, zd_x4_512(q[j] + at + 32 + 4 * i));
                    }
                }
                /* the chunk's 4 groups: 2 of the low sub-block, 2 of the high one */
                ZD_UNROLL
                for (int e = 0; e < 4; e++) {
                    const int g = 2 * (4 * h + c + 2 * (e / 2)) + e % 2;
                    const __m512i sc = zd_lane_int8_512(_mm512_loadu_si512(scales + 64 * (g / 4)), g % 4);
                    const __m512 f = _mm512_cvtepi32_ps(sc);
                    ZD_UNROLL
                    for (int j = 0; j < T; j++) {
                        acc[j] = _mm512_add_epi32(acc[j], _mm512_mullo_epi32(I[j][e], sc));
                        m[j] = _mm512_fmadd_ps(f, _mm512_set1_ps(xs[j][16 * sb + g]), m[j]);
                    }
                }
            }
        zd_x16_fold_512(T, acc, m, d, d, xd, sb, F, C);
    }
    ZD_UNROLL
    for (int j = 0; j < T; j++)
        zd_rows16_store(tile, j0 + j, _mm512_fmadd_ps(C[j], _mm512_set1_ps(-32.0f), F[j]));
}

/* One pass over the tile's weights for T tokens from j0. */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_pass_512(const int type, const int T, const int slices, const zd_tile *tile,
                                                int64_t j0) {
    if (type == ZD_Q4_K || type == ZD_Q5_K)
        zd_x16_kq_tokens_512(type, T, slices, tile, j0);
    else if (type == ZD_Q6_K)
        zd_x16_q6k_tokens_512(T, tile, j0);
    else if (type == ZD_Q2_K || type == ZD_Q3_K)
        zd_x16_q23k_tokens_512(type, T, tile, j0);
    else
        zd_x16_tokens_512(type, T, tile, j0);
}

/* Q6_K's tile into the panel (panel.h) straight from the interleaved group: its quant vectors
 * are already slices of 16 rows once unpacked. */
ZD_TARGET_AVX512 static void zd_x16_q6k_panel_fill(const zd_tile *tile, const zd_panel *p) {
    const int64_t nsb = tile->x->k / 256, bytes = 16 * sizeof(zd_block_q6_k);
    __m512i *u = (__m512i *)p->u;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *group = tile->w + sb * bytes, *ql = group + 32, *qh = ql + 64 * 32, *scales = qh + 64 * 16;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)group));
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < 2; c++)
                for (int i = 0; i < 8; i++) {
                    __m512i lo, hi;
                    zd_x16_q6k_unpack_512(ql, qh, h, c, i, &lo, &hi);
                    const int64_t slice = 64 * sb + 32 * h + 16 * c + i;   /* value 128 h + 64 c + 4 i, Q4_K order */
                    _mm512_store_si512(u + slice, lo);
                    _mm512_store_si512(u + slice + 8, hi);
                }
        for (int g = 0; g < 16; g++) {   /* natural group g; in the activation order, group a */
            const int s = g / 2, a = 8 * (s / 4) + 4 * (s % 2) + 2 * ((s % 4) / 2) + g % 2;
            const __m512 f = _mm512_mul_ps(d, _mm512_cvtepi32_ps(zd_lane_int8_512(_mm512_loadu_si512(scales + 64 * (g / 4)), g % 4)));
            _mm512_store_ps(p->scale + (16 * sb + a) * ZD_PANEL_ROWS, f);
            _mm512_store_ps(p->corr + (16 * sb + g) * ZD_PANEL_ROWS, _mm512_mul_ps(f, _mm512_set1_ps(-32.0f)));
        }
    }
}

/* The same for Q4_K: chunk ch's quant vector i gives sub-blocks 2 ch and 2 ch + 1, values 4i ..
 * 4i + 3 (their Q4_K-order slices as in zd_x16_q4k_tokens_512); a scale per 32 values serves
 * two panel groups of 16, and the mins make the corrections (per 32 values). */
ZD_TARGET_AVX512 static void zd_x16_q4k_panel_fill(const zd_tile *tile, const zd_panel *p) {
    const int64_t nsb = tile->x->k / 256, bytes = 16 * sizeof(zd_block_q4_k);
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512i *u = (__m512i *)p->u;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *group = tile->w + sb * bytes;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)group));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + 32)));
        for (int ch = 0; ch < 4; ch++)
            for (int i = 0; i < 8; i++) {
                const __m512i v = _mm512_loadu_si512(group + 256 + 64 * (8 * ch + i));
                const int64_t slice = 64 * sb + 32 * (ch / 2) + 8 * (ch % 2) + i;
                _mm512_store_si512(u + slice, _mm512_and_si512(v, low));
                _mm512_store_si512(u + slice + 16, _mm512_and_si512(_mm512_srli_epi32(v, 4), low));
            }
        __m512i sc[2], mn[2];
        zd_x16_q4k_scales_512(group, sc, mn);
        for (int s = 0; s < 8; s++) {   /* natural sub-block s: activation groups a, a + 1 */
            const int a = 8 * (s / 4) + 4 * (s % 2) + 2 * ((s % 4) / 2);
            const __m512 f = _mm512_mul_ps(d, _mm512_cvtepi32_ps(zd_lane_byte_512(sc[s / 4], s % 4)));
            _mm512_store_ps(p->scale + (16 * sb + a) * ZD_PANEL_ROWS, f);
            _mm512_store_ps(p->scale + (16 * sb + a + 1) * ZD_PANEL_ROWS, f);
            _mm512_store_ps(p->corr + (8 * sb + s) * ZD_PANEL_ROWS,
                            _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_setzero_si512(), zd_lane_byte_512(mn[s / 4], s % 4)))));
        }
    }
}

/* Row r's blocks [0, nb) back in GGUF order at `row` (zd_x16_block for a whole row): the
 * words scattered 16 rows at a time, the f16 fields copied. */
ZD_TARGET_AVX512 static void zd_x16_unpack_rows_512(int type, const uint8_t *group, int64_t k, uint8_t *rows) {
    const int64_t row_bytes = zd_row_bytes(type, k), bytes = zd_block_bytes(type), nb = row_bytes / bytes;
    const int head = zd_x16_head(type), h0 = zd_x16_head_at(type), w0 = zd_x16_body_at(type);
    const int words = (int)bytes - head;
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)row_bytes));
    const __m512i flip = _mm512_set1_epi32((int)zd_x16_flip(type));
    for (int64_t b = 0; b < nb; b++, group += ZD_X16_ROWS * bytes) {
        uint8_t *blocks = rows + b * bytes;
        for (int o = w0; o < w0 + words; o += 4)
            _mm512_i32scatter_epi32(blocks + o, at, _mm512_xor_si512(_mm512_loadu_si512(group + zd_x16_at(type, 0, o)), flip), 1);
        for (int o = h0; o < h0 + head; o += 2)
            for (int r = 0; r < ZD_X16_ROWS; r++)
                memcpy(blocks + r * row_bytes + o, group + zd_x16_at(type, r, o), 2);
    }
}

/* Tokens 4 at a time from j, then the 1-3 left in one pass (each pass unpacks the weights once). */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_passes_512(const int type, const int slices, const zd_tile *tile, int64_t j) {
    for (; j < tile->nt; j += 4) {
        switch (zd_min64(4, tile->nt - j)) {   /* constant token counts, so each pass is unrolled */
        case 4: zd_x16_pass_512(type, 4, slices, tile, j); break;
        case 3: zd_x16_pass_512(type, 3, slices, tile, j); break;
        case 2: zd_x16_pass_512(type, 2, slices, tile, j); break;
        default: zd_x16_pass_512(type, 1, slices, tile, j);
        }
    }
}

/* A tile of 16 rows, every token. A prompt's batch (the panel kernels' sizes, panel.h) fills
 * the panel once for all its tokens, where a pass re-reads the group per 4 tokens (a 64-token
 * Q6_K matmul: 2-2.7x the time): Q4_K and Q6_K straight from the group, the others from their
 * rows taken back to GGUF order. Q5_K tiles of more than 4 tokens instead keep the first pass's
 * slices for the others, which would each take the fifth bits apart again (64 tokens: 0.7x the
 * panel kernel's speed that way, 0.91-1.06x kept). */
ZD_TARGET_AVX512 ZD_INLINE void zd_x16_tile_512(const int type, const zd_tile *tile) {
    const zd_tile_fn panel = type == ZD_Q5_K ? 0 : zd_panel_kernel(type, ZD_ISA_AVX512, tile->nt);
    if (panel && (type == ZD_Q4_K || type == ZD_Q6_K)) {
        const zd_panel p = zd_panel_at(tile->cbuf, tile->x->k);
        if (type == ZD_Q4_K)
            zd_x16_q4k_panel_fill(tile, &p);
        else
            zd_x16_q6k_panel_fill(tile, &p);
        zd_panel_run(1, type, tile, &p);
    } else if (panel) {
        const int64_t k = tile->x->k;
        zd_tile rows = *tile;
        rows.w = (const uint8_t *)(tile->cbuf + zd_panel_floats(k));
        zd_x16_unpack_rows_512(type, tile->w, k, (uint8_t *)rows.w);
        panel(&rows);
    } else if (type == ZD_Q5_K && tile->nt > 4) {
        zd_x16_pass_512(type, 4, ZD_X16_KEEP, tile, 0);
        zd_x16_passes_512(type, ZD_X16_REUSE, tile, 4);
    } else {
        zd_x16_passes_512(type, ZD_X16_EXTRACT, tile, 0);
    }
}
#endif

#include "interleave_avx2.h"

#define ZD_X16_KERNELS(NAME, TYPE)                                                              \
    static void NAME##_scalar(const zd_tile *t) { zd_x16_tile_scalar(TYPE, t); }               \
    ZD_X16_KERNELS_SIMD(NAME, TYPE)
#if ZD_X86
#define ZD_X16_KERNELS_SIMD(NAME, TYPE)                                                         \
    ZD_TARGET_AVX512 static void NAME##_512(const zd_tile *t) { zd_x16_tile_512(TYPE, t); }    \
    ZD_TARGET_AVX2 static void NAME##_256(const zd_tile *t) { zd_x16_tile_256(TYPE, t); }
#else
#define ZD_X16_KERNELS_SIMD(NAME, TYPE)
#endif
ZD_X16_KERNELS(zd_x16_q4_0, ZD_Q4_0)
ZD_X16_KERNELS(zd_x16_q4_1, ZD_Q4_1)
ZD_X16_KERNELS(zd_x16_q5_0, ZD_Q5_0)
ZD_X16_KERNELS(zd_x16_q5_1, ZD_Q5_1)
ZD_X16_KERNELS(zd_x16_q8_0, ZD_Q8_0)
ZD_X16_KERNELS(zd_x16_q4_k, ZD_Q4_K)
ZD_X16_KERNELS(zd_x16_q5_k, ZD_Q5_K)
ZD_X16_KERNELS(zd_x16_q6_k, ZD_Q6_K)
ZD_X16_KERNELS(zd_x16_q2_k, ZD_Q2_K)
ZD_X16_KERNELS(zd_x16_q3_k, ZD_Q3_K)

/* The kernel for an interleaved type code on path `isa`, or NULL for a code no kernel reads. */
#if ZD_X86
#define ZD_X16_PICK(NAME, isa) \
    ((isa) == ZD_ISA_AVX512 ? NAME##_512 : (isa) == ZD_ISA_AVX2 ? NAME##_256 : NAME##_scalar)
#else
#define ZD_X16_PICK(NAME, isa) ((void)(isa), NAME##_scalar)
#endif
static zd_tile_fn zd_x16_kernel(int type, int isa) {
    switch (type) {
    case ZD_X16 | ZD_Q4_0: return ZD_X16_PICK(zd_x16_q4_0, isa);
    case ZD_X16 | ZD_Q4_1: return ZD_X16_PICK(zd_x16_q4_1, isa);
    case ZD_X16 | ZD_Q5_0: return ZD_X16_PICK(zd_x16_q5_0, isa);
    case ZD_X16 | ZD_Q5_1: return ZD_X16_PICK(zd_x16_q5_1, isa);
    case ZD_X16 | ZD_Q8_0: return ZD_X16_PICK(zd_x16_q8_0, isa);
    case ZD_X16 | ZD_Q4_K: return ZD_X16_PICK(zd_x16_q4_k, isa);
    case ZD_X16 | ZD_Q5_K: return ZD_X16_PICK(zd_x16_q5_k, isa);
    case ZD_X16 | ZD_Q6_K: return ZD_X16_PICK(zd_x16_q6_k, isa);
    case ZD_X16 | ZD_Q2_K: return ZD_X16_PICK(zd_x16_q2_k, isa);
    case ZD_X16 | ZD_Q3_K: return ZD_X16_PICK(zd_x16_q3_k, isa);
    default: return 0;
    }
}

#endif
