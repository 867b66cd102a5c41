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

static inline void zd_add(const float *ZD_RESTRICT a, const float *ZD_RESTRICT b,
                          float *ZD_RESTRICT out, int64_t count) {
    for (int64_t i = 0; i < count; i++)
        out[i] = a[i] + b[i];
}

#endif
