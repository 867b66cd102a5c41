/* Prefill kernels on panels: a tile of 16 weight rows unpacked once, then every token of the
 * batch passes over it (AVX-512 path, quantised types).
 *
 * The tile kernels (dot_legacy.h, dot_kquant.h) put a row's values in a vector's lanes, so each
 * dpbusd result must be scaled per block and reduced across lanes, per row and token. Here the
 * lanes are the rows: the panel holds, for every 4 consecutive values ("slice"), the 16 rows'
 * 4 unsigned quants as one 64-byte vector, so one dpbusd with the token's 4 quants broadcast
 * adds 4 products to each row's lane. A block of 32 values (a k-quant group of 16, or of 32 for
 * Q4_K and Q5_K) is then 8 (4, 8) dpbusd into one register and a single float scaling for all
 * 16 rows; the results are a vector of 16 rows, stored as they are. Unpacking and transposing
 * the tile costs a fixed amount per row, repaid over the batch: the path serves batches of
 * ZD_PANEL_MIN_N tokens or more.
 *
 * Per row, the panel stores per unit (legacy block of 32; k-quant group of 16) a float weight
 * scale (dw; d * sc for k-quants) and per correction unit (as tile.h: 32 values, 16 for Q2_K,
 * Q3_K, Q6_K) the correction that multiplies the activation sums. The quants sit in the
 * activation's value order (quantize.h: Q4_K order for Q8_K), as the tile kernels unpack them.
 * The integer dot products are the same as the tile kernels'; only the float summation order
 * differs.
 */
#ifndef ZEPHYR_PANEL_H
#define ZEPHYR_PANEL_H

#include "common.h"
#include "dot_kquant.h"
#include "dot_legacy.h"
#include "tile.h"

#define ZD_PANEL_ROWS 16

/* Batches of at least this many tokens use the panel kernels. */
#ifndef ZD_PANEL_MIN_N
#define ZD_PANEL_MIN_N 16
#endif

/* Tokens a panel kernel carries in registers at once. */
#define ZD_PANEL_T 4

/* Floats of scratch a thread needs for a panel of rows of k values (64-byte aligned inside). */
static inline int64_t zd_panel_floats(int64_t k) {
    return ZD_PANEL_ROWS * k / 4 + 2 * ZD_PANEL_ROWS * (k / 16) + 16;
}

/* A panel's parts in its scratch: quants [k / 4 slices][16 rows][4], then the unit scales
 * [units][16] and the corrections [correction units][16]. */
typedef struct {
    uint8_t *u;
    float *scale, *corr;
} zd_panel;

static inline zd_panel zd_panel_at(float *scratch, int64_t k) {
    zd_panel p;
    p.u = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    p.scale = (float *)(p.u + ZD_PANEL_ROWS * k);
    p.corr = p.scale + ZD_PANEL_ROWS * (k / 16);
    return p;
}

#if ZD_X86
/* Transpose 16 vectors of 16 int32 in place: r[i] lane j <-> r[j] lane i. */
ZD_TARGET_AVX512 ZD_INLINE void zd_transpose16_512(__m512i r[16]) {
    __m512i t[16], u[16];
    ZD_UNROLL
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4i + m], 128-bit lane L: column 4L + m of rows 4i .. 4i + 3 */
    ZD_UNROLL
    for (int i = 0; i < 4; i++) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    ZD_UNROLL
    for (int m = 0; m < 4; m++) {
        const __m512i a = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88), b = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88);
        const __m512i c = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xdd), d = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xdd);
        r[m] = _mm512_shuffle_i32x4(a, b, 0x88);        /* lanes L = 0 */
        r[4 + m] = _mm512_shuffle_i32x4(c, d, 0x88);    /* L = 1 */
        r[8 + m] = _mm512_shuffle_i32x4(a, b, 0xdd);    /* L = 2 */
        r[12 + m] = _mm512_shuffle_i32x4(c, d, 0xdd);   /* L = 3 */
    }
}

/* Transpose 16 rows' vectors (4-byte lane c of row r) and store vector c at dst + 64 c, for
 * c < n: quants become slices, per-row scales become per-unit vectors of 16 rows. */
ZD_TARGET_AVX512 ZD_INLINE void zd_panel_put(void *dst, __m512i rows[16], int n) {
    zd_transpose16_512(rows);
    for (int c = 0; c < n; c++)
        _mm512_store_si512((uint8_t *)dst + 64 * c, rows[c]);
}

ZD_TARGET_AVX512 ZD_INLINE void zd_panel_put_floats(float *dst, const __m512 rows[16], int n) {
    __m512i v[16];
    ZD_UNROLL
    for (int r = 0; r < 16; r++)
        v[r] = _mm512_castps_si512(rows[r]);
    zd_panel_put(dst, v, n);
}

/* One k-quant super-block's weight scale per 16 values (d * sc) in the activation order, and its
 * corrections (zd_kq_corrections of them, the other lanes zero). */
ZD_TARGET_AVX512 ZD_INLINE void zd_kq_row_scales_512(int type, const uint8_t *block, __m512 *scale, __m512 *corr) {
    /* 16-value group c of the activation order is group g of the natural order: vector c / 4 =
     * 2h + e of a super-block holds sub-blocks 4h + e (bytes 0-31) and 4h + 2 + e (32-63), so
     * g = 2 (4h + 2 second + e) + c % 2 with h = c / 8, e = (c / 4) % 2, second = (c % 4) / 2 */
    const __m512i order = _mm512_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
    float d;
    __m512i sc = _mm512_cvtepi8_epi32(zd_kq_scale_bytes_512(type, block, corr, &d));
    if (type == ZD_Q4_K || type == ZD_Q5_K)   /* a scale per 32 values serves two groups of 16 */
        sc = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), sc);
    *scale = _mm512_mul_ps(_mm512_permutexvar_ps(order, _mm512_cvtepi32_ps(sc)), _mm512_set1_ps(d));
}

/* Unpack the tile's rows of a k-quant type into the panel. */
ZD_TARGET_AVX512 ZD_INLINE void zd_panel_fill_kq(int type, const zd_tile *tile, const zd_panel *p) {
    const int64_t nsb = tile->x->k / 256, bytes = zd_block_bytes(type);
    const int nc = zd_kq_corrections(type);
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512i W[4][16];
        __m512 scale[16], corr[16];
        ZD_UNROLL
        for (int r = 0; r < ZD_PANEL_ROWS; r++) {
            const uint8_t *block = zd_tile_row(tile, r) + sb * bytes;
            __m512i w[4];
            zd_kq_unpack4_512(type, block, w);
            ZD_UNROLL
            for (int v = 0; v < 4; v++)
                W[v][r] = w[v];
            zd_kq_row_scales_512(type, block, &scale[r], &corr[r]);
        }
        ZD_UNROLL
        for (int v = 0; v < 4; v++)
            zd_panel_put(p->u + (64 * sb + 16 * v) * 64, W[v], 16);
        zd_panel_put_floats(p->scale + 16 * sb * ZD_PANEL_ROWS, scale, 16);
        zd_panel_put_floats(p->corr + nc * sb * ZD_PANEL_ROWS, corr, nc);
    }
}

/* The same for a legacy type: blocks in pairs (64 quants per row), scales 16 blocks at a time. */
ZD_TARGET_AVX512 ZD_INLINE void zd_panel_fill_legacy(int type, const zd_tile *tile, const zd_panel *p) {
    const int64_t nb = tile->x->k / 32, bytes = zd_block_bytes(type);
    const int m = zd_legacy_m(type);
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int n = (int)zd_min64(16, nb - b0);
        __m512 dw[16], corr[16];
        ZD_UNROLL
        for (int r = 0; r < ZD_PANEL_ROWS; r++) {
            const uint8_t *group = zd_tile_row(tile, r) + b0 * bytes;
            const int n0 = n < 8 ? n : 8, n1 = n - n0;
            dw[r] = _mm512_insertf32x8(_mm512_castps256_ps512(zd_legacy_halves_512(group, bytes, 0, n0)),
                                       n1 ? zd_legacy_halves_512(group + 8 * bytes, bytes, 0, n1) : _mm256_setzero_ps(), 1);
            if (m >= 0)
                corr[r] = _mm512_insertf32x8(_mm512_castps256_ps512(zd_legacy_halves_512(group, bytes, m, n0)),
                                             n1 ? zd_legacy_halves_512(group + 8 * bytes, bytes, m, n1) : _mm256_setzero_ps(), 1);
            else
                corr[r] = _mm512_mul_ps(dw[r], _mm512_set1_ps(-zd_legacy_offset(type)));
        }
        zd_panel_put_floats(p->scale + b0 * ZD_PANEL_ROWS, dw, n);
        zd_panel_put_floats(p->corr + b0 * ZD_PANEL_ROWS, corr, n);
        for (int64_t b = b0; b < b0 + n; b += 2) {
            const int two = b + 1 < nb;
            __m512i W[16];
            ZD_UNROLL
            for (int r = 0; r < ZD_PANEL_ROWS; r++)
                W[r] = zd_legacy_unpack_512(type, zd_tile_row(tile, r) + b * bytes, 0, two);
            zd_panel_put(p->u + 8 * b * 64, W, two ? 16 : 8);   /* a lone last block: 8 slices */
        }
    }
}

/* T tokens starting at j0 over a filled panel; `kq`: k-quant (units of 16 values, taken in
 * pairs for Q4_K and Q5_K, one activation scale per 256) or legacy (blocks of 32, one activation scale each). */
ZD_TARGET_AVX512 ZD_INLINE void zd_panel_tokens(const int kq, const int T, int type, const zd_tile *tile,
                                                const zd_panel *p, int64_t j0) {
    const zd_act *x = tile->x;
    const int64_t k = x->k;
    const int8_t *q[ZD_PANEL_T];
    const float *xd[ZD_PANEL_T], *xs[ZD_PANEL_T];
    const int s16 = kq && zd_kq_corrections(type) == 16;
    for (int j = 0; j < T; j++) {
        const int64_t t = tile->t0 + j0 + j;
        q[j] = x->q + t * x->q_stride;
        xd[j] = x->d + t * x->d_stride;
        xs[j] = (s16 ? x->s16 : x->s32) + t * x->s_stride;
    }
    __m512 F[ZD_PANEL_T];
    for (int j = 0; j < T; j++)
        F[j] = _mm512_setzero_ps();
    const __m512i *u = (const __m512i *)p->u;
    if (kq) {
        /* Q4_K and Q5_K scale 32 values alike (groups c and c + 1 share a scale): one float
         * step per 32 values, half the conversions and multiply-adds */
        const int groups = zd_kq_corrections(type) == 8 ? 2 : 1;
        for (int64_t sb = 0; sb < k / 256; sb++) {
            __m512 G[ZD_PANEL_T];
            for (int j = 0; j < T; j++)
                G[j] = _mm512_setzero_ps();
            for (int c = 0; c < 16; c += groups) {
                const int64_t s0 = 64 * sb + 4 * c;   /* first slice of group c */
                __m512i I[ZD_PANEL_T];
                for (int j = 0; j < T; j++)
                    I[j] = zd_zero_512();
                for (int i = 0; i < 4 * groups; i++) {
                    const __m512i w = _mm512_load_si512(u + s0 + i);
                    for (int j = 0; j < T; j++)
                        I[j] = _mm512_dpbusd_epi32(I[j], w, zd_x4_512(q[j] + 4 * (s0 + i)));
                }
                const __m512 scale = _mm512_load_ps(p->scale + (16 * sb + c) * ZD_PANEL_ROWS);
                for (int j = 0; j < T; j++)
                    G[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[j]), scale, G[j]);
            }
            for (int j = 0; j < T; j++)
                F[j] = _mm512_fmadd_ps(G[j], _mm512_set1_ps(xd[j][sb]), F[j]);
        }
    } else {
        for (int64_t b = 0; b < k / 32; b++) {
            __m512i I[ZD_PANEL_T];
            for (int j = 0; j < T; j++)
                I[j] = zd_zero_512();
            for (int i = 0; i < 8; i++) {
                const __m512i w = _mm512_load_si512(u + 8 * b + i);
                for (int j = 0; j < T; j++)
                    I[j] = _mm512_dpbusd_epi32(I[j], w, zd_x4_512(q[j] + 32 * b + 4 * i));
            }
            const __m512 scale = _mm512_load_ps(p->scale + b * ZD_PANEL_ROWS);
            for (int j = 0; j < T; j++)
                F[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[j]), _mm512_mul_ps(scale, _mm512_set1_ps(xd[j][b])), F[j]);
        }
    }
    const int64_t ncorr = kq ? k / 256 * zd_kq_corrections(type) : k / 32;
    for (int64_t c = 0; c < ncorr; c++) {
        const __m512 corr = _mm512_load_ps(p->corr + c * ZD_PANEL_ROWS);
        for (int j = 0; j < T; j++)
            F[j] = _mm512_fmadd_ps(corr, _mm512_set1_ps(xs[j][c]), F[j]);
    }
    for (int j = 0; j < T; j++)
        zd_rows16_store(tile, j0 + j, F[j]);
}

/* Every token of the tile over its filled panel. */
ZD_TARGET_AVX512 ZD_INLINE void zd_panel_run(const int kq, int type, const zd_tile *tile, const zd_panel *p) {
    int64_t j = 0;
    for (; j + ZD_PANEL_T <= tile->nt; j += ZD_PANEL_T)
        zd_panel_tokens(kq, ZD_PANEL_T, type, tile, p, j);
    for (; j < tile->nt; j++)
        zd_panel_tokens(kq, 1, type, tile, p, j);
}

/* A tile of 16 rows, all tile->nt tokens. */
ZD_TARGET_AVX512 ZD_INLINE void zd_panel_tile(const int kq, int type, const zd_tile *tile) {
    const zd_panel p = zd_panel_at(tile->cbuf, tile->x->k);
    if (kq)
        zd_panel_fill_kq(type, tile, &p);
    else
        zd_panel_fill_legacy(type, tile, &p);
    zd_panel_run(kq, type, tile, &p);
}

#define ZD_PANEL_KERNEL(NAME, KQ, TYPE) \
    ZD_TARGET_AVX512 static void NAME(const zd_tile *t) { zd_panel_tile(KQ, TYPE, t); }
ZD_PANEL_KERNEL(zd_panel_q4_0, 0, ZD_Q4_0)
ZD_PANEL_KERNEL(zd_panel_q4_1, 0, ZD_Q4_1)
ZD_PANEL_KERNEL(zd_panel_q5_0, 0, ZD_Q5_0)
ZD_PANEL_KERNEL(zd_panel_q5_1, 0, ZD_Q5_1)
ZD_PANEL_KERNEL(zd_panel_q8_0, 0, ZD_Q8_0)
ZD_PANEL_KERNEL(zd_panel_q2_k, 1, ZD_Q2_K)
ZD_PANEL_KERNEL(zd_panel_q3_k, 1, ZD_Q3_K)
ZD_PANEL_KERNEL(zd_panel_q4_k, 1, ZD_Q4_K)
ZD_PANEL_KERNEL(zd_panel_q5_k, 1, ZD_Q5_K)
ZD_PANEL_KERNEL(zd_panel_q6_k, 1, ZD_Q6_K)
#endif

/* The panel kernel of `type` for a batch of n tokens on path `isa`, or NULL. */
static zd_tile_fn zd_panel_kernel(int type, int isa, int64_t n) {
#if ZD_X86
    if (isa != ZD_ISA_AVX512 || n < ZD_PANEL_MIN_N)
        return 0;
    switch (type) {
    case ZD_Q4_0: return zd_panel_q4_0;
    case ZD_Q4_1: return zd_panel_q4_1;
    case ZD_Q5_0: return zd_panel_q5_0;
    case ZD_Q5_1: return zd_panel_q5_1;
    case ZD_Q8_0: return zd_panel_q8_0;
    case ZD_Q2_K: return zd_panel_q2_k;
    case ZD_Q3_K: return zd_panel_q3_k;
    case ZD_Q4_K: return zd_panel_q4_k;
    case ZD_Q5_K: return zd_panel_q5_k;
    case ZD_Q6_K: return zd_panel_q6_k;
    }
#endif
    (void)type, (void)isa, (void)n;
    return 0;
}

#endif
