/* The unit of work every matmul kernel computes: a tile of R weight rows x T tokens.
 *
 * A kernel unpacks each weight block once for the T tokens of its tile (prefill), or streams
 * R rows side by side for one token (decode). Rows past `rows` repeat the last valid row and
 * tokens past `nt` repeat the last valid token: the duplicates are computed and discarded,
 * so one kernel shape serves every remainder and a value does not depend on where its row or
 * token fell in a tile (results are identical for any thread count, and for any batch split
 * below ZD_PANEL_MIN_N tokens; larger batches take the panel kernels, panel.h, which sum the
 * same integer products in another float order).
 *
 * Kernels end with out = (sum of the block products) + dot(c, s): c holds each row's per-block
 * corrections (weight offsets and mins, written to `cbuf` while the row is unpacked) and s the
 * activation's d * (sum of quants) per block (see quantize.h).
 */
#ifndef ZEPHYR_TILE_H
#define ZEPHYR_TILE_H

#include <string.h>
#include "common.h"
#include "quantize.h"

/* Largest R and T of any kernel. */
#define ZD_TILE_MAX_R 4
#define ZD_TILE_MAX_T 8

/* Floats of `cbuf` per tile row: room for k / 16 corrections plus a vector of slack. */
static inline int64_t zd_cbuf_stride(int64_t k) { return k / 16 + 16; }

typedef struct {
    const uint8_t *w;        /* the tile's first weight row */
    int64_t row_bytes;
    int64_t rows;            /* valid rows: 1..R */
    const zd_act *x;
    int64_t t0, nt;          /* tokens t0 .. t0 + nt - 1, nt: 1..T */
    float *out;              /* the value of row r, token t0 + j goes to out[j * ldo + r] */
    int64_t ldo;
    int accumulate;          /* add to out instead of storing */
    float *cbuf;             /* scratch: ZD_TILE_MAX_R * zd_cbuf_stride(k) floats */
} zd_tile;

typedef void (*zd_tile_fn)(const zd_tile *tile);

/* The kernels of one (weight type, ISA, batch size): fn[nt] computes tiles of nt valid tokens
 * (1..T); it may be a kernel for more tokens, computing clamped duplicates. */
typedef struct {
    zd_tile_fn fn[ZD_TILE_MAX_T + 1];
    int R, T;
    zd_tile_fn whole;        /* if set, computes a tile of R rows for every token at once (panel.h) */
} zd_kernel;

/* Batches above this many tokens use the prefill kernels. */
#define ZD_DECODE_MAX_N 4

/* fns[i] handles tiles of i + 1 tokens. */
static inline int zd_kernel_set(zd_kernel *kn, int R, int T, const zd_tile_fn *fns) {
    kn->R = R;
    kn->T = T;
    kn->whole = NULL;
    kn->fn[0] = NULL;
    for (int i = 0; i < T; i++)
        kn->fn[i + 1] = fns[i];
    return 1;
}

/* Every family (legacy, k-quant, float) writes a tile function per path, taking the weight
 * type and the tile shape as constants: TILE_SCALAR(type, tile) with R = 1; TILE_512(type, R, T,
 * tile); TILE_256(type, R, T, tile). These instantiate them for one type. Decode tiles have
 * 2 rows: more rows share activation loads, but every row is a memory stream and DRAM serves
 * few concurrent streams per core best. Prefill tiles have 1 row and many tokens, which
 * amortises unpacking a row over the tokens. AVX2 (16 vector registers) keeps 2 rows. */
#define ZD_INSTANTIATE(NAME, TYPE, TILE_SCALAR, TILE_512, TILE_256)                                 \
    static void NAME##_scalar(const zd_tile *t) { TILE_SCALAR(TYPE, t); }                           \
    ZD_INSTANTIATE_SIMD(NAME, TYPE, TILE_512, TILE_256)

#if ZD_X86
#define ZD_INSTANTIATE_SIMD(NAME, TYPE, TILE_512, TILE_256)                                         \
    ZD_TARGET_AVX512 static void NAME##_512_2x1(const zd_tile *t) { TILE_512(TYPE, 2, 1, t); }      \
    ZD_TARGET_AVX512 static void NAME##_512_2x2(const zd_tile *t) { TILE_512(TYPE, 2, 2, t); }      \
    ZD_TARGET_AVX512 static void NAME##_512_2x3(const zd_tile *t) { TILE_512(TYPE, 2, 3, t); }      \
    ZD_TARGET_AVX512 static void NAME##_512_2x4(const zd_tile *t) { TILE_512(TYPE, 2, 4, t); }      \
    ZD_TARGET_AVX512 static void NAME##_512_1x4(const zd_tile *t) { TILE_512(TYPE, 1, 4, t); }      \
    ZD_TARGET_AVX512 static void NAME##_512_1x8(const zd_tile *t) { TILE_512(TYPE, 1, 8, t); }      \
    ZD_TARGET_AVX2 static void NAME##_256_2x1(const zd_tile *t) { TILE_256(TYPE, 2, 1, t); }        \
    ZD_TARGET_AVX2 static void NAME##_256_2x2(const zd_tile *t) { TILE_256(TYPE, 2, 2, t); }        \
    ZD_TARGET_AVX2 static void NAME##_256_2x3(const zd_tile *t) { TILE_256(TYPE, 2, 3, t); }        \
    ZD_TARGET_AVX2 static void NAME##_256_2x4(const zd_tile *t) { TILE_256(TYPE, 2, 4, t); }
#else
#define ZD_INSTANTIATE_SIMD(NAME, TYPE, TILE_512, TILE_256)
#endif

/* A `case TYPE:` of a kernel-table switch over (type, isa, prefill). */
#define ZD_KERNEL_CASE(NAME, TYPE)                                                                  \
    case TYPE:                                                                                      \
        if (isa == ZD_ISA_SCALAR) {                                                                 \
            const zd_tile_fn fns[] = {NAME##_scalar, NAME##_scalar, NAME##_scalar, NAME##_scalar};  \
            return zd_kernel_set(kn, 1, 4, fns);                                                    \
        }                                                                                           \
        ZD_KERNEL_CASE_SIMD(NAME)                                                                   \
        return 0;

#if ZD_X86
#define ZD_KERNEL_CASE_SIMD(NAME)                                                                   \
    if (isa == ZD_ISA_AVX512 && !prefill) {                                                         \
        const zd_tile_fn fns[] = {NAME##_512_2x1, NAME##_512_2x2, NAME##_512_2x3, NAME##_512_2x4};  \
        return zd_kernel_set(kn, 2, 4, fns);                                                        \
    }                                                                                               \
    if (isa == ZD_ISA_AVX512) {                                                                     \
        const zd_tile_fn fns[] = {NAME##_512_1x4, NAME##_512_1x4, NAME##_512_1x4, NAME##_512_1x4,   \
                                  NAME##_512_1x8, NAME##_512_1x8, NAME##_512_1x8, NAME##_512_1x8};  \
        return zd_kernel_set(kn, 1, 8, fns);                                                        \
    }                                                                                               \
    if (isa == ZD_ISA_AVX2) {                                                                       \
        const zd_tile_fn fns[] = {NAME##_256_2x1, NAME##_256_2x2, NAME##_256_2x3, NAME##_256_2x4};  \
        return zd_kernel_set(kn, 2, 4, fns);                                                        \
    }
#else
#define ZD_KERNEL_CASE_SIMD(NAME)
#endif

/* How far ahead of its reads a kernel prefetches weights: the tile that starts at least this
 * many bytes after its own (streams of short rows need several tiles of lead to cover DRAM
 * latency; the hardware prefetcher alone keeps up with none of them). The lines go to L2
 * (ZD_PREFETCH_HINT): a tile of long rows (2 x 8 KB for k = 14336) prefetched into L1 next to
 * the tile being read and the activations overflows L1's 32-48 KB, and the lines are evicted
 * before use (measured: 17 GB/s into L1, 29 GB/s into L2, 2 threads, Zen 4). */
#ifndef ZD_PREFETCH_BYTES
#define ZD_PREFETCH_BYTES 8192
#endif
#define ZD_PREFETCH_HINT _MM_HINT_T1

static inline const uint8_t *zd_prefetch_base(const zd_tile *tile, int R) {
    const int64_t tile_bytes = R * tile->row_bytes;
    return tile->w + (ZD_PREFETCH_BYTES + tile_bytes - 1) / tile_bytes * tile_bytes;
}

/* Row r of the tile and the index of its token j: past `rows` (`nt`) the last valid row (token)
 * stands in, computed and discarded (see the top of this file). */
static inline const uint8_t *zd_tile_row(const zd_tile *tile, int r) {
    return tile->w + zd_min64(r, tile->rows - 1) * tile->row_bytes;
}

static inline int64_t zd_tile_token(const zd_tile *tile, int j) {
    return tile->t0 + zd_min64(j, tile->nt - 1);
}

/* What a quantised tile kernel of R rows x T tokens reads: each row's weights, and each token's
 * activation quants and block scales (stand-ins past the tile's end, as above). */
ZD_INLINE void zd_tile_operands(const zd_tile *tile, const int R, const int T, const uint8_t **row, const int8_t **xq,
                                const float **xd) {
    ZD_UNROLL
    for (int r = 0; r < R; r++)
        row[r] = zd_tile_row(tile, r);
    ZD_UNROLL
    for (int j = 0; j < T; j++) {
        const int64_t t = zd_tile_token(tile, j);
        xq[j] = tile->x->q + t * tile->x->q_stride;
        xd[j] = tile->x->d + t * tile->x->d_stride;
    }
}

static inline void zd_tile_store(const zd_tile *tile, int64_t r, int64_t j, float value) {
    float *dst = tile->out + j * tile->ldo + r;
    *dst = tile->accumulate ? *dst + value : value;
}

#if ZD_X86
/* ---- kernels whose vector lanes are 16 rows (panel.h, interleave.h) ------------------------- */

/* 4 activation quants broadcast to every lane: one dpbusd then adds 4 products to each row. */
ZD_TARGET_AVX512 ZD_INLINE __m512i zd_x4_512(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm512_set1_epi32(v);
}

/* Store (or add) the 16 rows of token j's results: one vector, the tile's valid rows. */
ZD_TARGET_AVX512 ZD_INLINE void zd_rows16_store(const zd_tile *tile, int64_t j, __m512 v) {
    const __mmask16 valid = (__mmask16)((1u << tile->rows) - 1);
    float *dst = tile->out + j * tile->ldo;
    if (tile->accumulate)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(valid, dst));
    _mm512_mask_storeu_ps(dst, valid, v);
}
#endif

/* The integer dot product of n unsigned weight quants and signed activation quants (the
 * scalar paths' inner loop). */
static inline int zd_dot_u8_s8_scalar(const uint8_t *u, const int8_t *q, int n) {
    int sum = 0;
    for (int i = 0; i < n; i++)
        sum += u[i] * q[i];
    return sum;
}

/* ---- the correction dot product dot(c, s) of n floats, one per ISA ------------------------- */

static inline float zd_dot_f32_scalar(const float *ZD_RESTRICT a, const float *ZD_RESTRICT b, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

#if ZD_X86
ZD_TARGET_AVX512 ZD_INLINE float zd_dot_f32_512(const float *ZD_RESTRICT a, const float *ZD_RESTRICT b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + i), _mm512_maskz_loadu_ps(tail, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

ZD_TARGET_AVX2 ZD_INLINE float zd_hsum_256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ZD_TARGET_AVX2 ZD_INLINE float zd_dot_f32_256(const float *ZD_RESTRICT a, const float *ZD_RESTRICT b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = zd_hsum_256(acc);
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}
#endif

#endif
