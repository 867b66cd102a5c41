/* Normalisation kernels. */
#ifndef ZEPHYR_NORM_H
#define ZEPHYR_NORM_H

#include <math.h>
#include "common.h"

/* out = x / sqrt(mean(x^2) + eps) * w for one row of d values. */
static inline void zd_rms_norm_row(const float *ZD_RESTRICT x, const float *ZD_RESTRICT w,
                                   float *ZD_RESTRICT out, int64_t d, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < d; i++)
        sum += x[i] * x[i];
    const float scale = 1.0f / sqrtf(sum / (float)d + eps);
    for (int64_t i = 0; i < d; i++)
        out[i] = x[i] * scale * w[i];
}

#endif
