/* Rotary position embedding, as llama.cpp's ggml_rope_ext: frequency factors, linear and YaRN
 * scaling (zephyr.backend.RopeScaling), normal and NeoX pairs. */
#ifndef ZEPHYR_ROPE_H
#define ZEPHYR_ROPE_H

#include <math.h>
#include "common.h"

/* How one layer rotates: the plain form is theta_j = pos * base^(-2j/n_rot). */
typedef struct {
    int64_t n_rot;
    double base;
    double freq_scale;        /* theta x this (1: unscaled) */
    double ext_factor;        /* YaRN's mix of scaled and unscaled angles over pairs [corr_lo, corr_hi] (0: off) */
    double attn_factor;       /* cos and sin x this */
    double corr_lo, corr_hi;
    const float *factors;     /* [n_rot / 2]: theta_j / factors[j]; NULL: none */
} zd_rope;

static inline int zd_rope_same(const zd_rope *a, const zd_rope *b) {
    return a->n_rot == b->n_rot && a->base == b->base && a->freq_scale == b->freq_scale
        && a->ext_factor == b->ext_factor && a->attn_factor == b->attn_factor && a->corr_lo == b->corr_lo
        && a->corr_hi == b->corr_hi && a->factors == b->factors;
}

/* cos/sin of pair j's angle at `pos` for j < n_rot/2, in double so large positions keep their
 * precision before rounding to float. The plain form's values are exact: every scaling step
 * multiplies by 1. */
static inline void zd_rope_angles(int64_t pos, const zd_rope *r, float *ZD_RESTRICT cos_out,
                                  float *ZD_RESTRICT sin_out) {
    const double magnitude = r->ext_factor != 0.0 ? r->attn_factor * (1.0 + 0.1 * log(1.0 / r->freq_scale))
                                                  : r->attn_factor;
    for (int64_t j = 0; j < r->n_rot / 2; j++) {
        double extrapolated = (double)pos * pow(r->base, -2.0 * (double)j / (double)r->n_rot);
        if (r->factors)
            extrapolated /= (double)r->factors[j];
        double theta = r->freq_scale * extrapolated;
        if (r->ext_factor != 0.0) {
            double y = ((double)j - r->corr_lo) / fmax(0.001, r->corr_hi - r->corr_lo);
            const double ramp = (1.0 - fmin(1.0, fmax(0.0, y))) * r->ext_factor;
            theta = theta * (1.0 - ramp) + extrapolated * ramp;
        }
        cos_out[j] = (float)(cos(theta) * magnitude);
        sin_out[j] = (float)(sin(theta) * magnitude);
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
