/* Element-wise kernels over a contiguous span. */
#ifndef ZEPHYR_ELEMENTWISE_H
#define ZEPHYR_ELEMENTWISE_H

#include <math.h>
#include "common.h"

/* e^x for finite x <= 0 (0 below about -87) down to about -1e9, where n overflows an int, to
 * 3e-7 relative; plain arithmetic, so gcc vectorises the loops that call it. x = n ln2 + r,
 * e^r by its Taylor series to r^6. */
static inline float zd_exp_nonpos(float x) {
    const int32_t ni = (int32_t)(x * 1.44269504f - 0.5f);
    const float n = (float)ni;
    const float r = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, x));
    float p = 1.0f / 720;
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    union { int32_t i; float f; } scale;
    scale.i = (ni > -127 ? ni + 127 : 0) << 23;
    return p * scale.f;
}

/* 1 / (1 + e^-z) for any z, from e^-|z|, which cannot overflow; |z| is held at 104 or below
 * (e^-104 is 0 in float) by its bits, an integer min: a float compare there kept gcc from
 * vectorising the loops. */
static inline float zd_sigmoid(float z) {
    union { float f; uint32_t i; } a = {z};
    a.i &= 0x7fffffffu;                                 /* |z| */
    a.i = a.i < 0x42d00000u ? a.i : 0x42d00000u;        /* min(|z|, 104.0f); a NaN gives 104 */
    const float e = zd_exp_nonpos(-a.f);
    return (z >= 0.0f ? 1.0f : e) / (1.0f + e);
}

/* tanh(y) for any y, to 3e-7 relative: (1 - e) / (1 + e) with e = e^-2|y|, which cannot overflow,
 * and below |y| = 1/4, where 1 - e cancels, the Taylor series to y^9; the sign put back by its bit.
 * Plain arithmetic on bits (|y| held at 10, where tanh is 1 in float; a NaN gives +-1), so the
 * loops calling it vectorise: the two forms are picked by a mask, as a select let gcc move the
 * division into a branch. */
static inline float zd_tanh(float y) {
    union { float f; uint32_t i; } a = {y};
    const uint32_t sign = a.i & 0x80000000u;
    a.i &= 0x7fffffffu;                                 /* |y| */
    a.i = a.i < 0x41200000u ? a.i : 0x41200000u;        /* min(|y|, 10.0f); a NaN gives 10 */
    const float e = zd_exp_nonpos(-2.0f * a.f), y2 = a.f * a.f;
    union { float f; uint32_t i; } series = {a.f * (1.0f + y2 * (-1.0f / 3 + y2 * (2.0f / 15 + y2 * (-17.0f / 315 + y2 * (62.0f / 2835)))))};
    union { float f; uint32_t i; } ratio = {(1.0f - e) / (1.0f + e)};
    const uint32_t small = 0u - (uint32_t)(a.i < 0x3e800000u);   /* all ones where |y| < 0.25f */
    union { float f; uint32_t i; } t;
    t.i = ((series.i & small) | (ratio.i & ~small)) | sign;
    return t.f;
}

/* out = act(gate) * up, act SiLU (g sigmoid(g)) or GELU's tanh approximation,
 * 0.5 g (1 + tanh(y)) with y = sqrt(2/pi) (g + 0.044715 g^3), written g sigmoid(2y): the same
 * function, which stays accurate where tanh(y) nears -1. Loops of plain arithmetic (no libm
 * call), so gcc vectorises them on each path below. */
static inline void zd_glu_body(const float *ZD_RESTRICT gate, const float *ZD_RESTRICT up,
                               float *ZD_RESTRICT out, int64_t count, int gelu) {
    const float two_sqrt_2_over_pi = 1.5957691216057307f;
    if (gelu) {
        for (int64_t i = 0; i < count; i++) {
            const float g = gate[i];
            out[i] = g * zd_sigmoid(two_sqrt_2_over_pi * g * (1.0f + 0.044715f * g * g)) * up[i];
        }
    } else {
        for (int64_t i = 0; i < count; i++)
            out[i] = gate[i] * zd_sigmoid(gate[i]) * up[i];
    }
}

#define ZD_GLU(path, target)                                                                           \
    target __attribute__((noinline)) static void zd_glu_##path(const float *gate, const float *up,    \
                                                               float *out, int64_t count, int gelu) { \
        zd_glu_body(gate, up, out, count, gelu);                                                       \
    }
ZD_GLU(scalar, )
#if ZD_X86
ZD_GLU(avx2, ZD_TARGET_AVX2)
ZD_GLU(avx512, ZD_TARGET_AVX512)
#endif

/* out = silu(gate) * up, or gelu(gate) * up with `gelu`, on instruction-set path `isa`. */
static inline void zd_glu(const float *gate, const float *up, float *out, int64_t count, int gelu, int isa) {
#if ZD_X86
    if (isa == ZD_ISA_AVX512)
        return zd_glu_avx512(gate, up, out, count, gelu);
    if (isa == ZD_ISA_AVX2)
        return zd_glu_avx2(gate, up, out, count, gelu);
#endif
    zd_glu_scalar(gate, up, out, count, gelu);
}

static inline void zd_add(const float *ZD_RESTRICT a, const float *ZD_RESTRICT b,
                          float *ZD_RESTRICT out, int64_t count) {
    for (int64_t i = 0; i < count; i++)
        out[i] = a[i] + b[i];
}

#endif
