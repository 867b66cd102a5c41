/* Normalisation kernels. */
#ifndef ZEPHYR_NORM_H
#define ZEPHYR_NORM_H

#include <math.h>
#include "common.h"

/* 1 / sqrt(mean(x^2) + eps) over one row of d values. */
static inline float zd_rms_scale(const float *ZD_RESTRICT x, int64_t d, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < d; i++)
        sum += x[i] * x[i];
    return 1.0f / sqrtf(sum / (float)d + eps);
}

/* out[i] = x[i] * scale * w[i] for i in [lo, hi). */
static inline void zd_rms_apply(const float *ZD_RESTRICT x, const float *ZD_RESTRICT w, float *ZD_RESTRICT out,
                                float scale, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++)
        out[i] = x[i] * scale * w[i];
}

/* out = x / sqrt(mean(x^2) + eps) * w for one row of d values. */
static inline void zd_rms_norm_row(const float *ZD_RESTRICT x, const float *ZD_RESTRICT w,
                                   float *ZD_RESTRICT out, int64_t d, float eps) {
    zd_rms_apply(x, w, out, zd_rms_scale(x, d, eps), 0, d);
}

#endif
