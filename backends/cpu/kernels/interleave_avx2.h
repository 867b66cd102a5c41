/* The interleaved layouts (interleave.h) on the AVX2 path: 8 rows per 256-bit vector.
 *
 * AVX2 has no dpbusd: a vector of byte products is one maddubs (unsigned weight x signed
 * activation bytes -> 16-bit sums of pairs) and a row's 4 products one madd more. The pair sums
 * of a block or 16-value group stay in 16 bits while they fit (4-bit values: 8 maddubs of at
 * most 2 x 15 x 127, 30,480 in all; 5-bit: 4; 6-bit: 2; 8-bit: 1), so a block takes few madds
 * per 8 rows (for Q2_K, Q3_K and Q6_K they also apply the group's scale), and a block's float
 * scale is one vector for the 8 rows, where the row-major kernels reduce and scale every row's
 * block on its own (dot_legacy.h, dot_kquant.h). Each 64-byte vector of a group holds 4 bytes of
 * rows 0..15: half h (32 bytes) is rows 8h .. 8h + 7. Each kernel reads the halves h0 .. h0 + nh - 1
 * of every group: both in one pass for one token, which streams the weights from memory without
 * pause; one half a pass for several tokens (their sums need the registers), the second pass
 * reading the tile from cache (zd_x16_tile_256).
 *
 * Every type with an AVX-512 interleaved kernel has one here.
 */
#ifndef ZEPHYR_INTERLEAVE_AVX2_H
#define ZEPHYR_INTERLEAVE_AVX2_H

#if ZD_X86
/* 4 activation quants broadcast to every 32-bit lane (8 rows). */
ZD_TARGET_AVX2 ZD_INLINE __m256i zd_x4_256(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm256_set1_epi32(v);
}

/* Store (or add) rows 8h .. 8h + 7 of token j's results, those of them the tile holds. */
ZD_TARGET_AVX2 ZD_INLINE void zd_rows8_store(const zd_tile *tile, int64_t j, int h, __m256 v) {
    const int valid = (int)zd_min64(8, tile->rows - 8 * h);
    float *dst = tile->out + j * tile->ldo + 8 * h;
    if (valid == 8) {
        if (tile->accumulate)
            v = _mm256_add_ps(v, _mm256_loadu_ps(dst));
        _mm256_storeu_ps(dst, v);
        return;
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    for (int r = 0; r < valid; r++)
        dst[r] = tile->accumulate ? dst[r] + lanes[r] : lanes[r];
}

/* Every token's results of the halves h0 .. h0 + nh - 1 a pass read (F[hh][j]: half h0 + hh,
 * token j0 + j). */
ZD_TARGET_AVX2 ZD_INLINE void zd_x16_store_256(const zd_tile *tile, int T, int64_t j0, int h0, int nh,
                                               const __m256 F[2][4]) {
    ZD_UNROLL
    for (int hh = 0; hh < nh; hh++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            zd_rows8_store(tile, j0 + j, h0 + hh, F[hh][j]);
}

/* The 8 f16 fields of half h at `at` in a group (d or the mins of 16 rows), as floats. */
ZD_TARGET_AVX2 ZD_INLINE __m256 zd_x16_halves_256(const uint8_t *group, int at, int h) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(group + at + 16 * h)));
}

/* Group i of the tile (`bytes` long) for a pass starting at half h0; the pass that reads half 0
 * (alone, or with half 1) prefetches the bytes a few groups on (a second pass, over half 1,
 * finds them in cache). */
ZD_TARGET_AVX2 ZD_INLINE const uint8_t *zd_x16_group_256(const zd_tile *tile, int64_t i, int64_t bytes, int h0) {
    const uint8_t *group = tile->w + i * bytes;
    if (h0 == 0)
        for (int64_t o = 0; o < bytes; o += 64)
            _mm_prefetch((const char *)(group + ZD_PREFETCH_BYTES + o), ZD_PREFETCH_HINT);
    return group;
}

/* Byte s (0..3) of each 32-bit lane, as an int32 per lane (an unsigned scale or min of 8 rows). */
ZD_TARGET_AVX2 ZD_INLINE __m256i zd_lane_byte_256(__m256i v, int s) {
    return _mm256_and_si256(_mm256_srli_epi32(v, 8 * s), _mm256_set1_epi32(0xff));
}

/* A small int32 per lane copied into both of the lane's 16-bit halves: the multiplier of a madd
 * that scales a row's two pair sums. */
ZD_TARGET_AVX2 ZD_INLINE __m256i zd_both_halves_256(__m256i v) {
    return _mm256_blend_epi16(v, _mm256_slli_epi32(v, 16), 0xAA);
}

/* A k-quant super-block's sums into one token's row totals (zd_x16_fold_512, per token):
 * F + sums d xd - cw m, the quants' sums and the offsets' or mins' (cw: their weight side). */
ZD_TARGET_AVX2 ZD_INLINE __m256 zd_x16_fold_256(__m256 F, __m256 sums, __m256 m, __m256 d, __m256 cw, float xd) {
    return _mm256_fnmadd_ps(cw, m, _mm256_fmadd_ps(sums, _mm256_mul_ps(d, _mm256_set1_ps(xd)), F));
}

/* Q4_0, Q4_1, Q5_0 and Q5_1, rows 8h .. 8h + 7, T tokens from j0: per block, quant vector i's
 * half gives the low nibbles (values 4i + j) and the high ones (16 + 4i + j) of 8 rows. Q5_0 and
 * Q5_1 add 16 where the fifth bit is set (interleave.h's zd_x16_tokens_512: a shuffle copies the
 * row's qh byte to its 4 bytes, a compare picks byte j's bit), and, their values reaching 31,
 * widen their pair sums every 2 vectors instead of once a block. */
ZD_TARGET_AVX2 ZD_INLINE void zd_x16_legacy_tokens_256(const int type, const int T, const zd_tile *tile, int64_t j0,
                                                        const int h0, const int nh) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32, bytes = 16 * zd_block_bytes(type);
    const int five = type == ZD_Q5_0 || type == ZD_Q5_1, run = five ? 2 : 4;
    const int head = zd_x16_head(type), qh = zd_x16_at(type, 0, head), quants = qh + (five ? 64 : 0);
    const int mins = head == 4 ? zd_x16_at(type, 0, 2) : -1;
    const float offset = -zd_legacy_offset(type);
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    zd_x16_token_operands(tile, T, j0, 0, q, xd, xs);
    const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi8(16);
    const __m256i lane_bytes = _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0c0c0c0c, 0, 0x04040404, 0x08080808,
                                                 0x0c0c0c0c);
    __m256 F[2][4];   /* half h0 + hh, token */
    ZD_UNROLL
    for (int hh = 0; hh < nh; hh++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[hh][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *group = zd_x16_group_256(tile, b, bytes, h0);
        ZD_UNROLL
        for (int hh = 0; hh < nh; hh++) {
            const int h = h0 + hh;
            const __m256i hv = five ? _mm256_loadu_si256((const __m256i *)(group + qh + 32 * h)) : _mm256_setzero_si256();
            __m256i S[4];   /* 32-bit row sums */
            ZD_UNROLL
            for (int i0 = 0; i0 < 4; i0 += run) {
                __m256i P[4];
                ZD_UNROLL
                for (int j = 0; j < T; j++)
                    P[j] = _mm256_setzero_si256();
                ZD_UNROLL
                for (int i = i0; i < i0 + run; i++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(group + quants + 64 * i + 32 * h));
                    __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                    if (five) {
                        const __m256i bits = _mm256_set1_epi32((int)(0x08040201u << 4 * (i % 2)));
                        const __m256i h_lo = _mm256_shuffle_epi8(hv, _mm256_add_epi32(lane_bytes, _mm256_set1_epi8((char)(i / 2))));
                        const __m256i h_hi = _mm256_shuffle_epi8(hv, _mm256_add_epi32(lane_bytes, _mm256_set1_epi8((char)(2 + i / 2))));
                        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h_lo, bits), bits), sixteen));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h_hi, bits), bits), sixteen));
                    }
                    ZD_UNROLL
                    for (int j = 0; j < T; j++) {
                        P[j] = _mm256_add_epi16(P[j], _mm256_maddubs_epi16(lo, zd_x4_256(q[j] + 32 * b + 4 * i)));
                        P[j] = _mm256_add_epi16(P[j], _mm256_maddubs_epi16(hi, zd_x4_256(q[j] + 32 * b + 16 + 4 * i)));
                    }
                }
                ZD_UNROLL
                for (int j = 0; j < T; j++)
                    S[j] = i0 ? _mm256_add_epi32(S[j], _mm256_madd_epi16(P[j], ones)) : _mm256_madd_epi16(P[j], ones);
            }
            const __m256 dw = zd_x16_halves_256(group, 0, h);
            const __m256 mw = mins >= 0 ? zd_x16_halves_256(group, mins, h) : dw;
            ZD_UNROLL
            for (int j = 0; j < T; j++) {
                const __m256 sums = _mm256_cvtepi32_ps(S[j]);
                /* Q4_0, Q5_0: d (xd sums - offset xs); Q4_1, Q5_1: d xd sums + min xs */
                if (mins >= 0)
                    F[hh][j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[j][b]),
                                           _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, _mm256_set1_ps(xd[j][b])), F[hh][j]));
                else
                    F[hh][j] = _mm256_fmadd_ps(dw, _mm256_fmadd_ps(sums, _mm256_set1_ps(xd[j][b]),
                                                               _mm256_set1_ps(offset * xs[j][b])), F[hh][j]);
            }
        }
    }
    zd_x16_store_256(tile, T, j0, h0, nh, F);
}

/* Q8_0, rows 8h .. 8h + 7, T tokens from j0: per block, 8 quant vectors of values 4i .. 4i + 3
 * stored + 128. Back to signed bytes, their magnitudes go to maddubs and their signs onto the
 * activations (pairs of at most 2 x 128 x 127, too large to add a second in 16 bits). */
ZD_TARGET_AVX2 ZD_INLINE void zd_x16_q8_0_tokens_256(const int T, const zd_tile *tile, int64_t j0, const int h0, const int nh) {
    const zd_act *x = tile->x;
    const int64_t nb = x->k / 32, bytes = 16 * zd_block_bytes(ZD_Q8_0);
    const int quants = zd_x16_at(ZD_Q8_0, 0, zd_x16_head(ZD_Q8_0));
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    zd_x16_token_operands(tile, T, j0, 0, q, xd, xs);
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 F[2][4];   /* half h0 + hh, token */
    ZD_UNROLL
    for (int hh = 0; hh < nh; hh++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[hh][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *group = zd_x16_group_256(tile, b, bytes, h0);
        ZD_UNROLL
        for (int hh = 0; hh < nh; hh++) {
            const int h = h0 + hh;
            __m256i S[4];
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                S[j] = _mm256_setzero_si256();
            ZD_UNROLL
            for (int i = 0; i < 8; i++) {
                const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(group + quants + 64 * i + 32 * h)), flip);
                const __m256i magnitude = _mm256_abs_epi8(w);
                ZD_UNROLL
                for (int j = 0; j < T; j++) {
                    const __m256i signed_x = _mm256_sign_epi8(zd_x4_256(q[j] + 32 * b + 4 * i), w);
                    S[j] = _mm256_add_epi32(S[j], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_x), ones));
                }
            }
            const __m256 dw = zd_x16_halves_256(group, 0, h);
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                F[hh][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S[j]), _mm256_mul_ps(dw, _mm256_set1_ps(xd[j][b])), F[hh][j]);
        }
    }
    zd_x16_store_256(tile, T, j0, h0, nh, F);
}

/* Q4_K and Q5_K, rows 8h .. 8h + 7, T tokens from j0. Per super-block (the layout of
 * interleave.h's zd_x16_kq_tokens_512): 3 vectors of packed 6-bit scales and mins, for Q5_K 8
 * vectors of qh, then 32 quant vectors, vector 8c + i holding values 4i .. 4i + 3 of sub-blocks
 * 2c (low nibbles) and 2c + 1 (high); Q5_K's fifth bit of sub-block s is bit s of the qh byte
 * in the same place of qh vector i. A sub-block's maddubs add up in 16 bits (Q4_K: 8 of at most
 * 2 x 15 x 127; Q5_K's values reach 31, so 4 at a time); its scale multiplies the 32-bit row
 * sums in floats, as the AVX-512 kernel does; the mins meet the activations' sums per 32 values.
 * The activations keep their natural order here (zd_act.kq_order is for the AVX-512 path). */
ZD_TARGET_AVX2 ZD_INLINE void zd_x16_kq_tokens_256(const int type, const int T, const zd_tile *tile, int64_t j0,
                                                    const int h0, const int nh) {
    const zd_act *x = tile->x;
    const int five = type == ZD_Q5_K, quants = five ? 768 : 256, run = five ? 4 : 8;
    const int64_t nsb = x->k / 256, bytes = 16 * zd_block_bytes(type);
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    zd_x16_token_operands(tile, T, j0, 0, q, xd, xs);
    const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256i six = _mm256_set1_epi8(0x3f), top = _mm256_set1_epi8(0x30);
    __m256 F[2][4];   /* half h0 + hh, token */
    ZD_UNROLL
    for (int hh = 0; hh < nh; hh++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[hh][j] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *group = zd_x16_group_256(tile, sb, bytes, h0);
        ZD_UNROLL
        for (int hh = 0; hh < nh; hh++) {
            const int h = h0 + hh;
            /* lane r, byte s of sc[0] (mn[0]): sub-block s's scale (min); sc[1] (mn[1]): s + 4's */
            const __m256i a = _mm256_loadu_si256((const __m256i *)(group + 64 + 32 * h));
            const __m256i bm = _mm256_loadu_si256((const __m256i *)(group + 128 + 32 * h));
            const __m256i c = _mm256_loadu_si256((const __m256i *)(group + 192 + 32 * h));
            const __m256i sc[2] = {_mm256_and_si256(a, six),
                                   _mm256_or_si256(_mm256_and_si256(c, nibble),
                                                   _mm256_and_si256(_mm256_srli_epi32(a, 2), top))};
            const __m256i mn[2] = {_mm256_and_si256(bm, six),
                                   _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(c, 4), nibble),
                                                   _mm256_and_si256(_mm256_srli_epi32(bm, 2), top))};
            const __m256 d = zd_x16_halves_256(group, 0, h), dmin = zd_x16_halves_256(group, 32, h);
            __m256 acc[4], m[4];
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                acc[j] = m[j] = _mm256_setzero_ps();
            ZD_UNROLL
            for (int s = 0; s < 8; s++) {
                const __m256 scale = _mm256_cvtepi32_ps(zd_lane_byte_256(sc[s / 4], s % 4));   /* sub-block s's */
                const __m256 min = _mm256_cvtepi32_ps(zd_lane_byte_256(mn[s / 4], s % 4));
                const int ch = s / 2, high = s % 2;
                const __m256i bit = _mm256_set1_epi8((char)(1 << s));
                __m256i S[4];   /* 32-bit row sums */
                ZD_UNROLL
                for (int i0 = 0; i0 < 8; i0 += run) {
                    __m256i P[4];
                    ZD_UNROLL
                    for (int j = 0; j < T; j++)
                        P[j] = _mm256_setzero_si256();
                    ZD_UNROLL
                    for (int i = i0; i < i0 + run; i++) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(group + quants + 64 * (8 * ch + i) + 32 * h));
                        __m256i u = high ? _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble) : _mm256_and_si256(v, nibble);
                        if (five) {   /* bit s of each qh byte moved to bit 4 (16), within its byte */
                            const __m256i hb = _mm256_and_si256(
                                _mm256_loadu_si256((const __m256i *)(group + 256 + 64 * i + 32 * h)), bit);
                            u = _mm256_or_si256(u, s < 4 ? _mm256_slli_epi16(hb, 4 - s) : _mm256_srli_epi16(hb, s - 4));
                        }
                        ZD_UNROLL
                        for (int j = 0; j < T; j++)
                            P[j] = _mm256_add_epi16(P[j], _mm256_maddubs_epi16(u, zd_x4_256(q[j] + 256 * sb + 32 * s + 4 * i)));
                    }
                    ZD_UNROLL
                    for (int j = 0; j < T; j++)
                        S[j] = i0 ? _mm256_add_epi32(S[j], _mm256_madd_epi16(P[j], ones)) : _mm256_madd_epi16(P[j], ones);
                }
                ZD_UNROLL
                for (int j = 0; j < T; j++) {
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S[j]), scale, acc[j]);
                    m[j] = _mm256_fmadd_ps(min, _mm256_set1_ps(xs[j][8 * sb + s]), m[j]);
                }
            }
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                F[hh][j] = zd_x16_fold_256(F[hh][j], acc[j], m[j], d, dmin, xd[j][sb]);
        }
    }
    zd_x16_store_256(tile, T, j0, h0, nh, F);
}

/* Q6_K, rows 8h .. 8h + 7, T tokens from j0 (at most 2: AVX2 has 16 vector registers). The
 * layout and unpacking are zd_x16_q6k_tokens_512's: per half hf of a super-block and chunk c,
 * quant vector i gives values 128 hf + 32 c + 4i + j (low nibbles) and 64 later (high), 6 bits
 * with their top 2 from qh. Pair sums of 6-bit values reach 2 x 63 x 127 = 16,002, so two
 * maddubs add in 16 bits, and the madd that widens them multiplies by the 16-value group's int8
 * scale (in both 16-bit halves of each row's lane) on the way. The offset -32 meets the
 * activations' sums per 16 values (s16). */
ZD_TARGET_AVX2 ZD_INLINE void zd_x16_q6k_tokens_256(const int T, const zd_tile *tile, int64_t j0, const int h0, const int nh) {
    const zd_act *x = tile->x;
    const int64_t nsb = x->k / 256, bytes = 16 * zd_block_bytes(ZD_Q6_K);
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    zd_x16_token_operands(tile, T, j0, 1, q, xd, xs);
    const __m256i low = _mm256_set1_epi8(0x0f), two = _mm256_set1_epi8(0x30);
    __m256 F[2][4];   /* half h0 + hh, token */
    ZD_UNROLL
    for (int hh = 0; hh < nh; hh++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[hh][j] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *group = zd_x16_group_256(tile, sb, bytes, h0);
        ZD_UNROLL
        for (int hh = 0; hh < nh; hh++) {
            const int h = h0 + hh;
            const uint8_t *ql = group + 32, *qh = ql + 64 * 32, *scales = qh + 64 * 16;
            __m256i acc[2];
            __m256 m[2];
            ZD_UNROLL
            for (int j = 0; j < T; j++) {
                acc[j] = _mm256_setzero_si256();
                m[j] = _mm256_setzero_ps();
            }
            ZD_UNROLL
            for (int hf = 0; hf < 2; hf++)
                ZD_UNROLL
                for (int c = 0; c < 2; c++)
                    ZD_UNROLL
                    for (int e = 0; e < 2; e++) {   /* vectors 4e .. 4e + 3: one group of the low and one of the high values */
                        const int g_lo = 8 * hf + 2 * c + e, g_hi = g_lo + 4;
                        __m256i sc16[2];
                        ZD_UNROLL
                        for (int k = 0; k < 2; k++) {
                            const int g = k ? g_hi : g_lo;
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(scales + 64 * (g / 4) + 32 * h));
                            const __m256i sc = _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * (g % 4)), 24);
                            sc16[k] = zd_both_halves_256(sc);
                            const __m256 f = _mm256_cvtepi32_ps(sc);
                            ZD_UNROLL
                            for (int j = 0; j < T; j++)
                                m[j] = _mm256_fmadd_ps(f, _mm256_set1_ps(xs[j][16 * sb + g]), m[j]);
                        }
                        ZD_UNROLL
                        for (int pair = 0; pair < 2; pair++) {
                            __m256i P[2][2];   /* token, low or high values */
                            ZD_UNROLL
                            for (int t = 0; t < 2; t++) {
                                const int i = 4 * e + 2 * pair + t;
                                const __m256i v = _mm256_loadu_si256((const __m256i *)(ql + 64 * (16 * hf + 8 * c + i) + 32 * h));
                                const __m256i bits = _mm256_loadu_si256((const __m256i *)(qh + 64 * (8 * hf + i) + 32 * h));
                                const __m256i top_lo = _mm256_and_si256(c == 0 ? _mm256_slli_epi32(bits, 4) : _mm256_slli_epi32(bits, 2), two);
                                const __m256i top_hi = _mm256_and_si256(c == 0 ? bits : _mm256_srli_epi32(bits, 2), two);
                                const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, low), top_lo);
                                const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v, 4), low), top_hi);
                                const int64_t at = 256 * sb + 128 * hf + 32 * c + 4 * i;
                                ZD_UNROLL
                                for (int j = 0; j < T; j++) {
                                    const __m256i a = _mm256_maddubs_epi16(lo, zd_x4_256(q[j] + at));
                                    const __m256i b = _mm256_maddubs_epi16(hi, zd_x4_256(q[j] + at + 64));
                                    P[j][0] = t ? _mm256_add_epi16(P[j][0], a) : a;
                                    P[j][1] = t ? _mm256_add_epi16(P[j][1], b) : b;
                                }
                            }
                            ZD_UNROLL
                            for (int j = 0; j < T; j++)
                                acc[j] = _mm256_add_epi32(acc[j], _mm256_add_epi32(_mm256_madd_epi16(P[j][0], sc16[0]),
                                                                                   _mm256_madd_epi16(P[j][1], sc16[1])));
                        }
                    }
            const __m256 d = zd_x16_halves_256(group, 0, h), cw = _mm256_mul_ps(d, _mm256_set1_ps(32.0f));
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                F[hh][j] = zd_x16_fold_256(F[hh][j], _mm256_cvtepi32_ps(acc[j]), m[j], d, cw, xd[j][sb]);
        }
    }
    zd_x16_store_256(tile, T, j0, h0, nh, F);
}

/* Q2_K and Q3_K, rows 8h .. 8h + 7, T tokens from j0 (at most 2). The layout is
 * zd_x16_q23k_tokens_512's: quant vector i of half n holds at bits 2 sh the values 4i .. 4i + 3
 * of sub-block s = 4n + sh, whose 16-value groups 2s and 2s + 1 take vectors 0-3 and 4-7; Q3_K's
 * third bit of sub-block s is bit s of hmask vector i. The 2- or 3-bit values are taken down to
 * bits 0-2 (pairs of products at most 2 x 7 x 127), a group's 4 maddubs add in 16 bits, and the
 * madd that widens them multiplies by the group's scale (Q2_K's nibble, Q3_K's 6 bits - 32). The
 * mins (Q2_K) or the offset 4 (Q3_K) meet the activations' sums per 16 values (s16). */
ZD_TARGET_AVX2 ZD_INLINE void zd_x16_q23k_tokens_256(const int type, const int T, const zd_tile *tile, int64_t j0,
                                                      const int h0, const int nh) {
    const zd_act *x = tile->x;
    const int q3 = type == ZD_Q3_K;
    const int64_t nsb = x->k / 256, bytes = 16 * zd_block_bytes(type);
    const int8_t *q[4];
    const float *xd[4], *xs[4];
    zd_x16_token_operands(tile, T, j0, 1, q, xd, xs);
    const __m256i three = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), nibble = _mm256_set1_epi8(0x0f);
    __m256 F[2][4];   /* half h0 + hh, token */
    ZD_UNROLL
    for (int hh = 0; hh < nh; hh++)
        ZD_UNROLL
        for (int j = 0; j < T; j++)
            F[hh][j] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *group = zd_x16_group_256(tile, sb, bytes, h0);
        ZD_UNROLL
        for (int hh = 0; hh < nh; hh++) {
            const int h = h0 + hh;
            const uint8_t *body = group + 16 * zd_x16_head(type);
            const uint8_t *hmask = body, *qs = body + (q3 ? 8 : 4) * 64, *packed = q3 ? qs + 16 * 64 : body;
            /* lane r, byte b of S[v] (M[v]): the scale (min) of 16-value group 4v + b */
            __m256i S[4], M[4];
            if (q3) {
                const __m256i a = _mm256_loadu_si256((const __m256i *)(packed + 32 * h));
                const __m256i b = _mm256_loadu_si256((const __m256i *)(packed + 64 + 32 * h));
                const __m256i hi = _mm256_loadu_si256((const __m256i *)(packed + 128 + 32 * h));
                ZD_UNROLL
                for (int v = 0; v < 4; v++) {
                    const __m256i src = v % 2 ? b : a;
                    const __m256i lowbits = _mm256_and_si256(v < 2 ? src : _mm256_srli_epi32(src, 4), nibble);
                    const __m256i top = _mm256_and_si256(_mm256_srli_epi32(hi, 2 * v), three);
                    S[v] = _mm256_or_si256(lowbits, _mm256_slli_epi32(top, 4));
                }
            } else {
                ZD_UNROLL
                for (int v = 0; v < 4; v++) {
                    const __m256i both = _mm256_loadu_si256((const __m256i *)(packed + 64 * v + 32 * h));
                    S[v] = _mm256_and_si256(both, nibble);
                    M[v] = _mm256_and_si256(_mm256_srli_epi32(both, 4), nibble);
                }
            }
            __m256i acc[2];
            __m256 m[2];
            ZD_UNROLL
            for (int j = 0; j < T; j++) {
                acc[j] = _mm256_setzero_si256();
                m[j] = _mm256_setzero_ps();
            }
            ZD_UNROLL
            for (int n = 0; n < 2; n++)
                ZD_UNROLL
                for (int sh = 0; sh < 4; sh++) {
                    const int s = 4 * n + sh;
                    ZD_UNROLL
                    for (int e = 0; e < 2; e++) {
                        const int g = 2 * s + e;
                        /* the group's scale as an int32 per row, and as the madd's multiplier */
                        __m256i sc = zd_lane_byte_256(S[g / 4], g % 4);
                        if (q3)
                            sc = _mm256_sub_epi32(sc, _mm256_set1_epi32(32));
                        const __m256i sc16 = zd_both_halves_256(sc);
                        const __m256 c = _mm256_cvtepi32_ps(q3 ? sc : zd_lane_byte_256(M[g / 4], g % 4));
                        __m256i P[2];
                        ZD_UNROLL
                        for (int j = 0; j < T; j++)
                            P[j] = _mm256_setzero_si256();
                        ZD_UNROLL
                        for (int i = 4 * e; i < 4 * e + 4; i++) {
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 64 * (8 * n + i) + 32 * h));
                            __m256i u = _mm256_and_si256(sh ? _mm256_srli_epi16(v, 2 * sh) : v, three);
                            if (q3) {   /* bit s of the hmask byte moved to bit 2, within its byte */
                                const __m256i hm = _mm256_loadu_si256((const __m256i *)(hmask + 64 * i + 32 * h));
                                const __m256i bit = s < 2 ? _mm256_slli_epi16(hm, 2 - s) : s > 2 ? _mm256_srli_epi16(hm, s - 2) : hm;
                                u = _mm256_or_si256(u, _mm256_and_si256(bit, four));
                            }
                            ZD_UNROLL
                            for (int j = 0; j < T; j++)
                                P[j] = _mm256_add_epi16(P[j], _mm256_maddubs_epi16(u, zd_x4_256(q[j] + 256 * sb + 32 * s + 4 * i)));
                        }
                        ZD_UNROLL
                        for (int j = 0; j < T; j++) {
                            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(P[j], sc16));
                            m[j] = _mm256_fmadd_ps(c, _mm256_set1_ps(xs[j][16 * sb + g]), m[j]);
                        }
                    }
                }
            /* the offsets: dmin per min (Q2_K), 4 d per scale (Q3_K) */
            const __m256 d = zd_x16_halves_256(group, 0, h);
            const __m256 cw = q3 ? _mm256_mul_ps(d, _mm256_set1_ps(4.0f)) : zd_x16_halves_256(group, 32, h);
            ZD_UNROLL
            for (int j = 0; j < T; j++)
                F[hh][j] = zd_x16_fold_256(F[hh][j], _mm256_cvtepi32_ps(acc[j]), m[j], d, cw, xd[j][sb]);
        }
    }
    zd_x16_store_256(tile, T, j0, h0, nh, F);
}

/* One pass over halves h0 .. h0 + nh - 1 of the tile's weights for T tokens from j0. */
ZD_TARGET_AVX2 ZD_INLINE void zd_x16_pass_256(const int type, const int T, const zd_tile *tile, int64_t j0,
                                              const int h0, const int nh) {
    if (type == ZD_Q6_K)
        zd_x16_q6k_tokens_256(T < 2 ? T : 2, tile, j0, h0, nh);
    else if (type == ZD_Q2_K || type == ZD_Q3_K)
        zd_x16_q23k_tokens_256(type, T < 2 ? T : 2, tile, j0, h0, nh);
    else if (type == ZD_Q8_0)
        zd_x16_q8_0_tokens_256(T, tile, j0, h0, nh);
    else if (type == ZD_Q4_K || type == ZD_Q5_K)
        zd_x16_kq_tokens_256(type, T, tile, j0, h0, nh);
    else
        zd_x16_legacy_tokens_256(type, T, tile, j0, h0, nh);
}

/* A tile of 16 rows, every token: per 4 tokens (2 for the types whose passes keep more sums
 * than 16 registers hold for 4), one pass per half of the rows; one token, both halves in one
 * pass. Prompts too: the row-major AVX2 kernels also unpack a row once per 4 tokens, and there is
 * no AVX2 panel (panel.h). A pass per half reads the tile from memory in the first and from cache
 * in the second, the memory standing idle meanwhile; one token leaves registers enough for both
 * halves at once, so a decode step streams the weights without pauses (Zen 4, AVX2 path, 2
 * threads, a 130 MB matrix, alternating with a plain read of 28-34 GB/s: Q4_K rows of 4096
 * 24-28 -> 30-32 GB/s, of 14336 24-25 -> 27-30, Q6_K 22-24 -> 24-25). */
ZD_TARGET_AVX2 ZD_INLINE void zd_x16_tile_256(const int type, const zd_tile *tile) {
    const int step = type == ZD_Q6_K || type == ZD_Q2_K || type == ZD_Q3_K ? 2 : 4;   /* 16 registers */
    for (int64_t j = 0; j < tile->nt; j += step) {
        const int64_t tokens = zd_min64(step, tile->nt - j);
        if (tokens == 1 && tile->rows > 8) {
            zd_x16_pass_256(type, 1, tile, j, 0, 2);
            continue;
        }
        for (int h = 0; h < 2 && 8 * h < tile->rows; h++)
            switch (tokens) {   /* constant token counts, so each pass is unrolled */
            case 4: zd_x16_pass_256(type, 4, tile, j, h, 1); break;
            case 3: zd_x16_pass_256(type, 3, tile, j, h, 1); break;
            case 2: zd_x16_pass_256(type, 2, tile, j, h, 1); break;
            default: zd_x16_pass_256(type, 1, tile, j, h, 1);
            }
    }
}
#endif

#endif
