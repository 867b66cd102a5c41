/* Element-wise kernels over a contiguous span. */
#ifndef ZEPHYR_ELEMENTWISE_H
#define ZEPHYR_ELEMENTWISE_H

#include <math.h>
#include "common.h"

/* out = silu(gate) * up = gate / (1 + exp(-gate)) * up */
static inline void zd_swiglu(const float *ZD_RESTRICT gate, const float *ZD_RESTRICT up,
                             float *ZD_RESTRICT out, int64_t count) {
    for (int64_t i = 0; i < count; i++)
        out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* out = gelu(gate) * up, GELU's tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) */
static inline void zd_geglu(const float *ZD_RESTRICT gate, const float *ZD_RESTRICT up,
                            float *ZD_RESTRICT out, int64_t count) {
    const float sqrt_2_over_pi = 0.79788456080286535588f;
    for (int64_t i = 0; i < count; i++) {
        const float g = gate[i];
        out[i] = 0.5f * g * (1.0f + tanhf(sqrt_2_over_pi * g * (1.0f + 0.044715f * g * g))) * up[i];
    }
}

static inline void zd_add(const float *ZD_RESTRICT a, const float *ZD_RESTRICT b,
                          float *ZD_RESTRICT out, int64_t count) {
    for (int64_t i = 0; i < count; i++)
        out[i] = a[i] + b[i];
}

#endif
