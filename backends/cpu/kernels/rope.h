/* Rotary position embedding. */
#ifndef ZEPHYR_ROPE_H
#define ZEPHYR_ROPE_H

#include <math.h>
#include "common.h"

/* cos/sin of pos * base^(-2j/n_rot) for j < n_rot/2, in double so large positions keep
 * their precision before rounding to float. */
static inline void zd_rope_angles(int64_t pos, int64_t n_rot, double base,
                                  float *ZD_RESTRICT cos_out, float *ZD_RESTRICT sin_out) {
    for (int64_t j = 0; j < n_rot / 2; j++) {
        const double theta = (double)pos * pow(base, -2.0 * (double)j / (double)n_rot);
        cos_out[j] = (float)cos(theta);
        sin_out[j] = (float)sin(theta);
    }
}

/* Rotate the first n_rot dims of one head, copy the rest. Pair j is (2j, 2j+1) normally,
 * (j, j + n_rot/2) in neox mode. */
static inline void zd_rope_head(const float *ZD_RESTRICT x, float *ZD_RESTRICT out,
                                const float *ZD_RESTRICT cos_t, const float *ZD_RESTRICT sin_t,
                                int64_t head_dim, int64_t n_rot, int neox) {
    const int64_t half = n_rot / 2;
    for (int64_t j = 0; j < half; j++) {
        const int64_t a = neox ? j : 2 * j;
        const int64_t b = neox ? j + half : 2 * j + 1;
        const float x0 = x[a], x1 = x[b];
        out[a] = x0 * cos_t[j] - x1 * sin_t[j];
        out[b] = x0 * sin_t[j] + x1 * cos_t[j];
    }
    for (int64_t i = n_rot; i < head_dim; i++)
        out[i] = x[i];
}

#endif
