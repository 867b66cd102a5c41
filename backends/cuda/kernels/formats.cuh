// The quantised weight formats as the kernels see them, one struct per GGML type.
//
// Weights live on the device as planes (see backends/cuda/layout.py): each block field, e.g. the
// 4-bit quants or the f16 scale, gathered into its own row-major array, so that every row of every
// plane starts 16-byte aligned and a warp reads consecutive 16-byte pieces. The bits are the file's.
//
// Each format gives
//   UNIT                  values one thread takes per step of the matrix-vector product (32 or 64)
//   Regs load(w, row, nb, u)           the weight bits of unit u of a row (nb = blocks per row)
//   float dot(r, aq, ad, u)            that unit against 8-bit activations of one token:
//                                      aq: int8 [k] quants, ad: float2 [k / 32] (d, d * sum q)
//   float value(w, row, nb, i)         value i of a row, as the reference dequantiser gives it
//   int row_stride(k)                  the nb the functions above take for rows of k values
//
// 8-bit activations: value j of 32-value group g is aq[32g + j] * ad[g].x, so an integer dot
// product of quants scaled by both d's is the float dot product; ad[g].y serves the formats whose
// values carry an offset (a min), which multiplies the sum of the activations.
#pragma once
#include "common.cuh"

// Bit j (j < 4) of b moved to bit 4 of byte j: the fifth bits of Q5_0/Q5_1 for four values.
__device__ __forceinline__ int spread_fifth_bits(u32 b) {
    return (int)(((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25));
}

// The 32 activation quants of group g as ints, and that group's (d, d * sum).
__device__ __forceinline__ void act_group(const i8 *aq, const float2 *ad, int g, int (&v)[8], float2 &ds) {
    load32(aq + 32 * g, v);
    ds = ad[g];
}

// Q4_0: f16 d | u8 qs[16]; q[j] = qs[j] & 15, q[j + 16] = qs[j] >> 4; value = (q - 8) d.
// Planes: p0 qs (16 bytes a block), p1 d.
struct FormatQ4_0 {
    static constexpr int UNIT = 32;
    static __device__ __forceinline__ int row_stride(int k) { return k / 32; }
    struct Regs { uint4 q; float d; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 b = (i64)row * nb + u;
        return {load16(w.p0 + 16 * b), f16_to_f32(load_u16(w.p1 + 2 * b))};
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        int a[8]; float2 ds;
        act_group(aq, ad, u, a, ds);
        const int q[4] = {(int)r.q.x, (int)r.q.y, (int)r.q.z, (int)r.q.w};
        int s = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s = dot4(q[i] & 0x0F0F0F0F, a[i], s);
            s = dot4((q[i] >> 4) & 0x0F0F0F0F, a[4 + i], s);
        }
        return r.d * (ds.x * (float)s - 8.0f * ds.y);
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 b = (i64)row * nb + i / 32;
        const int j = i % 32;
        const int q = (w.p0[16 * b + (j & 15)] >> (j < 16 ? 0 : 4)) & 15;
        return (float)(q - 8) * f16_to_f32(load_u16(w.p1 + 2 * b));
    }
};

// Q4_1: f16 d | f16 m | u8 qs[16]; nibbles as Q4_0; value = q d + m. Planes: p0 qs, p1 (d, m).
struct FormatQ4_1 {
    static constexpr int UNIT = 32;
    static __device__ __forceinline__ int row_stride(int k) { return k / 32; }
    struct Regs { uint4 q; float d, m; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 b = (i64)row * nb + u;
        const u32 dm = load_u32(w.p1 + 4 * b);
        return {load16(w.p0 + 16 * b), f16_to_f32((u16)(dm & 0xFFFF)), f16_to_f32((u16)(dm >> 16))};
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        int a[8]; float2 ds;
        act_group(aq, ad, u, a, ds);
        const int q[4] = {(int)r.q.x, (int)r.q.y, (int)r.q.z, (int)r.q.w};
        int s = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s = dot4(q[i] & 0x0F0F0F0F, a[i], s);
            s = dot4((q[i] >> 4) & 0x0F0F0F0F, a[4 + i], s);
        }
        return r.d * ds.x * (float)s + r.m * ds.y;
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 b = (i64)row * nb + i / 32;
        const int j = i % 32;
        const int q = (w.p0[16 * b + (j & 15)] >> (j < 16 ? 0 : 4)) & 15;
        const u32 dm = load_u32(w.p1 + 4 * b);
        return (float)q * f16_to_f32((u16)(dm & 0xFFFF)) + f16_to_f32((u16)(dm >> 16));
    }
};

// Q5_0: f16 d | u32 qh | u8 qs[16]; q = nibble | (bit j of qh) << 4; value = (q - 16) d.
// Planes: p0 qs, p1 qh, p2 d.
struct FormatQ5_0 {
    static constexpr int UNIT = 32;
    static __device__ __forceinline__ int row_stride(int k) { return k / 32; }
    struct Regs { uint4 q; u32 h; float d; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 b = (i64)row * nb + u;
        return {load16(w.p0 + 16 * b), load_u32(w.p1 + 4 * b), f16_to_f32(load_u16(w.p2 + 2 * b))};
    }
    static __device__ __forceinline__ int sum(const Regs &r, const int (&a)[8]) {
        const int q[4] = {(int)r.q.x, (int)r.q.y, (int)r.q.z, (int)r.q.w};
        int s = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s = dot4((q[i] & 0x0F0F0F0F) | spread_fifth_bits(r.h >> (4 * i)), a[i], s);
            s = dot4(((q[i] >> 4) & 0x0F0F0F0F) | spread_fifth_bits(r.h >> (16 + 4 * i)), a[4 + i], s);
        }
        return s;
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        int a[8]; float2 ds;
        act_group(aq, ad, u, a, ds);
        return r.d * (ds.x * (float)sum(r, a) - 16.0f * ds.y);
    }
    static __device__ __forceinline__ int quant(const Planes &w, i64 b, int j) {
        const int low = (w.p0[16 * b + (j & 15)] >> (j < 16 ? 0 : 4)) & 15;
        return low | (int)((load_u32(w.p1 + 4 * b) >> j) & 1u) << 4;
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 b = (i64)row * nb + i / 32;
        return (float)(quant(w, b, i % 32) - 16) * f16_to_f32(load_u16(w.p2 + 2 * b));
    }
};

// Q5_1: f16 d | f16 m | u32 qh | u8 qs[16]; q as Q5_0; value = q d + m. Planes: p0 qs, p1 qh, p2 (d, m).
struct FormatQ5_1 {
    static constexpr int UNIT = 32;
    static __device__ __forceinline__ int row_stride(int k) { return k / 32; }
    struct Regs { uint4 q; u32 h; float d, m; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 b = (i64)row * nb + u;
        const u32 dm = load_u32(w.p2 + 4 * b);
        return {load16(w.p0 + 16 * b), load_u32(w.p1 + 4 * b), f16_to_f32((u16)(dm & 0xFFFF)),
                f16_to_f32((u16)(dm >> 16))};
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        int a[8]; float2 ds;
        act_group(aq, ad, u, a, ds);
        const FormatQ5_0::Regs bits = {r.q, r.h, 0.0f};
        return r.d * ds.x * (float)FormatQ5_0::sum(bits, a) + r.m * ds.y;
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 b = (i64)row * nb + i / 32;
        const u32 dm = load_u32(w.p2 + 4 * b);
        return (float)FormatQ5_0::quant(w, b, i % 32) * f16_to_f32((u16)(dm & 0xFFFF)) + f16_to_f32((u16)(dm >> 16));
    }
};

// Q8_0: f16 d | i8 qs[32]; value = q d. Planes: p0 qs (32 bytes a block), p1 d.
struct FormatQ8_0 {
    static constexpr int UNIT = 32;
    static __device__ __forceinline__ int row_stride(int k) { return k / 32; }
    struct Regs { int q[8]; float d; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 b = (i64)row * nb + u;
        Regs r;
        load32(w.p0 + 32 * b, r.q);
        r.d = f16_to_f32(load_u16(w.p1 + 2 * b));
        return r;
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        int a[8]; float2 ds;
        act_group(aq, ad, u, a, ds);
        int s = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) s = dot4(r.q[i], a[i], s);
        return r.d * ds.x * (float)s;
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 b = (i64)row * nb + i / 32;
        return (float)(i8)w.p0[32 * b + i % 32] * f16_to_f32(load_u16(w.p1 + 2 * b));
    }
};

// The k-quants take 64 values a unit: unit u is chunk c = u % 4 of super-block sb = u / 4.

// Q2_K: u8 scales[16] | u8 qs[64] | f16 d | f16 dmin. Value v of a super-block: h = v / 128,
// shift 2 ((v % 128) / 32), q = (qs[32 h + v % 32] >> shift) & 3; 16-value sub-block i has
// scale scales[i] & 15 and min scales[i] >> 4; value = d scale q - dmin min.
// Planes: p0 qs (64 bytes a super-block), p1 scales (16), p2 (d, dmin).
// Unit c covers values 64c..64c+63: groups 2c, 2c+1, reading qs[32 (c / 2)..] at shifts 4 (c % 2), + 2.
struct FormatQ2_K {
    static constexpr int UNIT = 64;
    static __device__ __forceinline__ int row_stride(int k) { return k / 256; }
    struct Regs { int q[8]; u32 scales; float d, dmin; int c; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 sb = (i64)row * nb + u / 4;
        const int c = u % 4;
        Regs r;
        load32(w.p0 + 64 * sb + 32 * (c / 2), r.q);
        r.scales = load_u32(w.p1 + 16 * sb + 4 * c);   // sub-blocks 4c..4c+3
        const u32 dm = load_u32(w.p2 + 4 * sb);
        r.d = f16_to_f32((u16)(dm & 0xFFFF));
        r.dmin = f16_to_f32((u16)(dm >> 16));
        r.c = c;
        return r;
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        float out = 0.0f;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            int a[8]; float2 ds;
            act_group(aq, ad, 2 * u + j, a, ds);
            const int shift = 4 * (r.c % 2) + 2 * j;
            int sum_qa = 0, sum_a = 0;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int sc = (r.scales >> (8 * (2 * j + half))) & 0xFF;
                int qa = 0, aa = 0;
#pragma unroll
                for (int i = 4 * half; i < 4 * half + 4; i++) {
                    qa = dot4((r.q[i] >> shift) & 0x03030303, a[i], qa);
                    aa = dot4(0x01010101, a[i], aa);
                }
                sum_qa += (sc & 15) * qa;
                sum_a += (sc >> 4) * aa;
            }
            out += ds.x * (r.d * (float)sum_qa - r.dmin * (float)sum_a);
        }
        return out;
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 sb = (i64)row * nb + i / 256;
        const int v = i % 256;
        const int q = (w.p0[64 * sb + 32 * (v / 128) + v % 32] >> (2 * ((v % 128) / 32))) & 3;
        const int sc = w.p1[16 * sb + v / 16];
        const u32 dm = load_u32(w.p2 + 4 * sb);
        const float dl = f16_to_f32((u16)(dm & 0xFFFF)) * (float)(sc & 15);
        const float ml = f16_to_f32((u16)(dm >> 16)) * (float)(sc >> 4);
        return dl * (float)q - ml;
    }
};

// Q3_K: u8 hmask[32] | u8 qs[64] | u8 scales[12] | f16 d. Group g = v / 32 (h = g / 4, shift
// 2 (g % 4)); q = ((qs[32 h + v % 32] >> shift) & 3) - (bit g of hmask[v % 32] ? 0 : 4);
// 16-value sub-block i has a signed 6-bit scale (see q3_scale); value = d scale q.
// Planes: p0 qs (64), p1 hmask (32), p2 scales (12), p3 d. Units as Q2_K.
__device__ __forceinline__ int q3_scale(u32 w0, u32 w1, u32 w2, int i) {
    const u32 low_byte = ((i % 8) < 4 ? w0 : w1) >> (8 * (i % 4));
    const int low = (int)((i < 8 ? low_byte : low_byte >> 4) & 15u);
    const int high = (int)((w2 >> (8 * (i % 4) + 2 * (i / 4))) & 3u);
    return (low | high << 4) - 32;
}

struct FormatQ3_K {
    static constexpr int UNIT = 64;
    static __device__ __forceinline__ int row_stride(int k) { return k / 256; }
    struct Regs { int q[8], h[8]; u32 s0, s1, s2; float d; int c; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 sb = (i64)row * nb + u / 4;
        const int c = u % 4;
        Regs r;
        load32(w.p0 + 64 * sb + 32 * (c / 2), r.q);
        load32(w.p1 + 32 * sb, r.h);
        const u8 *s = w.p2 + 12 * sb;
        r.s0 = load_u32(s);
        r.s1 = load_u32(s + 4);
        r.s2 = load_u32(s + 8);
        r.d = f16_to_f32(load_u16(w.p3 + 2 * sb));
        r.c = c;
        return r;
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        float out = 0.0f;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            int a[8]; float2 ds;
            act_group(aq, ad, 2 * u + j, a, ds);
            const int g = 2 * r.c + j, shift = 2 * (g % 4);
            int s = 0;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int qa = 0;
#pragma unroll
                for (int i = 4 * half; i < 4 * half + 4; i++) {
                    const int q = ((r.q[i] >> shift) & 0x03030303) | (((r.h[i] >> g) & 0x01010101) << 2);
                    qa = dot4(sub4(q, 0x04040404), a[i], qa);
                }
                s += q3_scale(r.s0, r.s1, r.s2, 2 * g + half) * qa;
            }
            out += ds.x * (float)s;
        }
        return r.d * out;
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 sb = (i64)row * nb + i / 256;
        const int v = i % 256, g = v / 32, l = v % 32;
        const int low = (w.p0[64 * sb + 32 * (g / 4) + l] >> (2 * (g % 4))) & 3;
        const int q = low - (((w.p1[32 * sb + l] >> g) & 1) ? 0 : 4);
        const u8 *s = w.p2 + 12 * sb;
        const int sc = q3_scale(load_u32(s), load_u32(s + 4), load_u32(s + 8), v / 16);
        const float dl = f16_to_f32(load_u16(w.p3 + 2 * sb)) * (float)sc;
        return dl * (float)q;
    }
};

// Q4_K and Q5_K: f16 d | f16 dmin | u8 scales[12] | ... ; eight 32-value sub-blocks with 6-bit
// (scale, min). The 16-byte header as words: x = (d, dmin), y = bytes a[0..3], z = b[0..3],
// w = c[0..3]; for j < 4: scale = a[j] & 63, min = b[j] & 63; for j >= 4 (jj = j - 4):
// scale = (c[jj] & 15) | (a[jj] >> 6) << 4, min = (c[jj] >> 4) | (b[jj] >> 6) << 4.
__device__ __forceinline__ void k_scale_min(const uint4 &h, int j, int &scale, int &min) {
    if (j < 4) {
        scale = (int)((h.y >> (8 * j)) & 63u);
        min = (int)((h.z >> (8 * j)) & 63u);
    } else {
        const int s = 8 * (j - 4);
        scale = (int)(((h.w >> s) & 15u) | ((h.y >> (s + 6)) & 3u) << 4);
        min = (int)(((h.w >> (s + 4)) & 15u) | ((h.z >> (s + 6)) & 3u) << 4);
    }
}

// Both: unit c (64 values) is sub-blocks 2c (low nibbles of qs[32c..32c+31]) and 2c + 1 (high).
__device__ __forceinline__ float k_offset_dot(const int (&q0)[8], const int (&q1)[8], const uint4 &h, int u,
                                              const i8 *aq, const float2 *ad) {
    int a0[8], a1[8]; float2 ds0, ds1;
    act_group(aq, ad, 2 * u, a0, ds0);
    act_group(aq, ad, 2 * u + 1, a1, ds1);
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        s0 = dot4(q0[i], a0[i], s0);
        s1 = dot4(q1[i], a1[i], s1);
    }
    int sc0, m0, sc1, m1;
    const int c = u % 4;
    k_scale_min(h, 2 * c, sc0, m0);
    k_scale_min(h, 2 * c + 1, sc1, m1);
    const float d = f16_to_f32((u16)(h.x & 0xFFFF)), dmin = f16_to_f32((u16)(h.x >> 16));
    return d * ((float)sc0 * ds0.x * (float)s0 + (float)sc1 * ds1.x * (float)s1)
         - dmin * ((float)m0 * ds0.y + (float)m1 * ds1.y);
}

__device__ __forceinline__ float k_offset_value(const uint4 &h, int sub, int q) {
    int sc, m;
    k_scale_min(h, sub, sc, m);
    const float dl = f16_to_f32((u16)(h.x & 0xFFFF)) * (float)sc;
    const float ml = f16_to_f32((u16)(h.x >> 16)) * (float)m;
    return dl * (float)q - ml;
}

// Q4_K: header | u8 qs[128]. Planes: p0 qs (128), p1 header (16).
struct FormatQ4_K {
    static constexpr int UNIT = 64;
    static __device__ __forceinline__ int row_stride(int k) { return k / 256; }
    struct Regs { int q[8]; uint4 h; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 sb = (i64)row * nb + u / 4;
        Regs r;
        load32(w.p0 + 128 * sb + 32 * (u % 4), r.q);
        r.h = load16(w.p1 + 16 * sb);
        return r;
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        int q0[8], q1[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            q0[i] = r.q[i] & 0x0F0F0F0F;
            q1[i] = (r.q[i] >> 4) & 0x0F0F0F0F;
        }
        return k_offset_dot(q0, q1, r.h, u, aq, ad);
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 sb = (i64)row * nb + i / 256;
        const int v = i % 256, sub = v / 32;
        const int q = (w.p0[128 * sb + 32 * (sub / 2) + v % 32] >> (4 * (sub % 2))) & 15;
        return k_offset_value(load16(w.p1 + 16 * sb), sub, q);
    }
};

// Q5_K: header | u8 qh[32] | u8 qs[128]; value l of sub-block i adds bit i of qh[l] as bit 4.
// Planes: p0 qs (128), p1 qh (32), p2 header (16).
struct FormatQ5_K {
    static constexpr int UNIT = 64;
    static __device__ __forceinline__ int row_stride(int k) { return k / 256; }
    struct Regs { int q[8], qh[8]; uint4 h; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 sb = (i64)row * nb + u / 4;
        Regs r;
        load32(w.p0 + 128 * sb + 32 * (u % 4), r.q);
        load32(w.p1 + 32 * sb, r.qh);
        r.h = load16(w.p2 + 16 * sb);
        return r;
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        const int c = u % 4;
        int q0[8], q1[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            q0[i] = (r.q[i] & 0x0F0F0F0F) | (((r.qh[i] >> (2 * c)) & 0x01010101) << 4);
            q1[i] = ((r.q[i] >> 4) & 0x0F0F0F0F) | (((r.qh[i] >> (2 * c + 1)) & 0x01010101) << 4);
        }
        return k_offset_dot(q0, q1, r.h, u, aq, ad);
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 sb = (i64)row * nb + i / 256;
        const int v = i % 256, sub = v / 32, l = v % 32;
        const int low = (w.p0[128 * sb + 32 * (sub / 2) + l] >> (4 * (sub % 2))) & 15;
        const int q = low | ((w.p1[32 * sb + l] >> sub) & 1) << 4;
        return k_offset_value(load16(w.p2 + 16 * sb), sub, q);
    }
};

// Q6_K: u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d. Half h reads ql[64h..], qh[32h..]; its
// value 32k + l takes ql[l + 32 (k % 2)] (low nibble if k < 2, else high) and (qh[l] >> 2k) & 3
// as bits 4-5; q = that - 32; value = d scales[v / 16] q.
// Planes: p0 ql (128), p1 qh (64), p2 scales (16), p3 d.
// Unit c: h = c / 2, j = c % 2, the 32 bytes ql[64h + 32j..] give groups 4h + j (low nibbles)
// and 4h + j + 2 (high nibbles), which are not adjacent.
struct FormatQ6_K {
    static constexpr int UNIT = 64;
    static __device__ __forceinline__ int row_stride(int k) { return k / 256; }
    struct Regs { int ql[8], qh[8]; u32 sa, sb; float d; int c; };
    static __device__ __forceinline__ Regs load(const Planes &w, int row, int nb, int u) {
        const i64 sb = (i64)row * nb + u / 4;
        const int c = u % 4, h = c / 2, j = c % 2;
        const int g = 4 * h + j;
        Regs r;
        load32(w.p0 + 128 * sb + 64 * h + 32 * j, r.ql);
        load32(w.p1 + 64 * sb + 32 * h, r.qh);
        r.sa = load_u16(w.p2 + 16 * sb + 2 * g);
        r.sb = load_u16(w.p2 + 16 * sb + 2 * (g + 2));
        r.d = f16_to_f32(load_u16(w.p3 + 2 * sb));
        r.c = c;
        return r;
    }
    static __device__ __forceinline__ int group_sum(const int (&q)[8], const int (&a)[8], u32 scales) {
        int lo = 0, hi = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            lo = dot4(q[i], a[i], lo);
            hi = dot4(q[4 + i], a[4 + i], hi);
        }
        return (int)(i8)(scales & 0xFF) * lo + (int)(i8)(scales >> 8) * hi;
    }
    static __device__ __forceinline__ float dot(const Regs &r, const i8 *aq, const float2 *ad, int u) {
        const int h = r.c / 2, j = r.c % 2;
        const int ga = 8 * (u / 4) + 4 * h + j;
        int qa[8], qb[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            qa[i] = sub4((r.ql[i] & 0x0F0F0F0F) | (((r.qh[i] >> (2 * j)) & 0x03030303) << 4), 0x20202020);
            qb[i] = sub4(((r.ql[i] >> 4) & 0x0F0F0F0F) | (((r.qh[i] >> (2 * j + 4)) & 0x03030303) << 4),
                         0x20202020);
        }
        int a[8]; float2 dsa, dsb;
        act_group(aq, ad, ga, a, dsa);
        const int sa = group_sum(qa, a, r.sa);
        act_group(aq, ad, ga + 2, a, dsb);
        const int sb = group_sum(qb, a, r.sb);
        return r.d * (dsa.x * (float)sa + dsb.x * (float)sb);
    }
    static __device__ __forceinline__ float value(const Planes &w, int row, int nb, int i) {
        const i64 sb = (i64)row * nb + i / 256;
        const int v = i % 256, h = v / 128, k = (v % 128) / 32, l = v % 32;
        const int low = (w.p0[128 * sb + 64 * h + l + 32 * (k % 2)] >> (k < 2 ? 0 : 4)) & 15;
        const int high = (w.p1[64 * sb + 32 * h + l] >> (2 * k)) & 3;
        const float dl = f16_to_f32(load_u16(w.p3 + 2 * sb)) * (float)(i8)w.p2[16 * sb + v / 16];
        return dl * (float)((low | high << 4) - 32);
    }
};

// The float formats: one plane of k values a row, any k; `value` takes k itself as nb.
struct FormatF32 {
    static __device__ __forceinline__ int row_stride(int k) { return k; }
    static __device__ __forceinline__ float value(const Planes &w, int row, int k, int i) {
        return reinterpret_cast<const float *>(w.p0)[(i64)row * k + i];
    }
};

struct FormatF16 {
    static __device__ __forceinline__ int row_stride(int k) { return k; }
    static __device__ __forceinline__ float value(const Planes &w, int row, int k, int i) {
        return f16_to_f32(reinterpret_cast<const u16 *>(w.p0)[(i64)row * k + i]);
    }
};

struct FormatBF16 {
    static __device__ __forceinline__ int row_stride(int k) { return k; }
    static __device__ __forceinline__ float value(const Planes &w, int row, int k, int i) {
        return bf16_to_f32(reinterpret_cast<const u16 *>(w.p0)[(i64)row * k + i]);
    }
};

// X-macro over the formats with 8-bit-activation matrix kernels: NAME, struct.
#define FOR_EACH_QUANT_FORMAT(X) \
    X(q4_0, FormatQ4_0) X(q4_1, FormatQ4_1) X(q5_0, FormatQ5_0) X(q5_1, FormatQ5_1) X(q8_0, FormatQ8_0) \
    X(q2_k, FormatQ2_K) X(q3_k, FormatQ3_K) X(q4_k, FormatQ4_K) X(q5_k, FormatQ5_K) X(q6_k, FormatQ6_K)

#define FOR_EACH_FLOAT_FORMAT(X) X(f32, FormatF32) X(f16, FormatF16) X(bf16, FormatBF16)

// 8-bit activations, rounded exactly as the reference backend rounds them before its matmul
// (zephyr.quants): Q8_0 style for the legacy formats, Q8_K style for the k-quants. Both are kept
// as (d, d * sum q) per 32-value group, so the dot products above serve either.

// Q8_0 style, a warp per 32-value group, lane j holding value j: d = max |v| / 127,
// q = roundf(v * (1 / d)) (half away from zero), and d rounded to f16 is the group's scale.
__device__ __forceinline__ void quantize_group(float v, i8 *q, float2 *ds) {
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    const int qi = (int)roundf(v * inverse);
    const int sum = warp_sum_int(qi);
    q[threadIdx.x & 31] = (i8)qi;
    if ((threadIdx.x & 31) == 0) {
        const float d16 = round_to_f16(d);
        *ds = make_float2(d16, d16 * (float)sum);
    }
}

// Q8_K style, a warp per 256-value block, lane l holding v[j] = value 32 j + l: `peak` is the first
// value of largest magnitude (sign kept), iscale = -127 / peak, q = min(127, rint(iscale v))
// (half to even) and d = 1 / iscale (negative when peak > 0), shared by the block's 8 groups.
__device__ __forceinline__ void quantize_block_k(const float (&v)[8], i8 *q, float2 *ds) {
    const int lane = threadIdx.x & 31;
    float best = -1.0f, peak = 0.0f;
    int where = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {   // a lane's values in increasing index order: keep the first
        if (fabsf(v[j]) > best) {
            best = fabsf(v[j]);
            peak = v[j];
            where = 32 * j + lane;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float other_best = __shfl_xor_sync(FULL_MASK, best, o);
        const float other_peak = __shfl_xor_sync(FULL_MASK, peak, o);
        const int other_where = __shfl_xor_sync(FULL_MASK, where, o);
        if (other_best > best || (other_best == best && other_where < where)) {
            best = other_best;
            peak = other_peak;
            where = other_where;
        }
    }
    const float iscale = peak != 0.0f ? -127.0f / peak : 0.0f;
    const float d = peak != 0.0f ? 1.0f / iscale : 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int qi = (int)fminf(rintf(iscale * v[j]), 127.0f);
        q[32 * j + lane] = (i8)qi;
        const int sum = warp_sum_int(qi);
        if (lane == 0) ds[j] = make_float2(d, d * (float)sum);
    }
}
