/* Matrix-vector products against one decoded weight row. */
#ifndef ZEPHYR_MATMUL_H
#define ZEPHYR_MATMUL_H

#include "common.h"

/* The omp simd reduction lets gcc reorder the sum into vector lanes (no -ffast-math needed). */
static inline float zd_dot(const float *ZD_RESTRICT a, const float *ZD_RESTRICT b, int64_t k) {
    float sum = 0.0f;
#pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < k; i++)
        sum += a[i] * b[i];
    return sum;
}

/* out[j * m] = dot(row, x[j]) for the n activation rows x: [n, k]; `out` points at column
 * `row` of the [n, m] output. */
static inline void zd_dot_rows(const float *ZD_RESTRICT row, const float *ZD_RESTRICT x,
                               float *ZD_RESTRICT out, int64_t n, int64_t k, int64_t m) {
    for (int64_t j = 0; j < n; j++)
        out[j * m] = zd_dot(row, x + j * k, k);
}

#endif
