/* Attention of one query head over a span of the key/value cache. */
#ifndef ZEPHYR_ATTENTION_H
#define ZEPHYR_ATTENTION_H

#include <math.h>
#include "common.h"
#include "matmul.h"

/* out[hd] = softmax(scale * q . k[p]) . v[p] over cache positions lo <= p <= hi.
 * k_cache/v_cache point at position 0 of this query's kv head; consecutive positions are
 * `stride` floats apart. `scores` is scratch for hi - lo + 1 floats. */
static inline void zd_attend_head(const float *ZD_RESTRICT q, const float *ZD_RESTRICT k_cache,
                                  const float *ZD_RESTRICT v_cache, int64_t stride,
                                  int64_t lo, int64_t hi, int64_t hd, float scale,
                                  float *ZD_RESTRICT scores, float *ZD_RESTRICT out) {
    const int64_t span = hi - lo + 1;
    float max_score = -INFINITY;
    for (int64_t t = 0; t < span; t++) {
        scores[t] = scale * zd_dot(q, k_cache + (lo + t) * stride, hd);
        if (scores[t] > max_score)
            max_score = scores[t];
    }
    /* Subtracting the max keeps every exp() <= 1: no overflow whatever the logits. */
    float total = 0.0f;
    for (int64_t t = 0; t < span; t++) {
        scores[t] = expf(scores[t] - max_score);
        total += scores[t];
    }
    for (int64_t i = 0; i < hd; i++)
        out[i] = 0.0f;
    for (int64_t t = 0; t < span; t++) {
        const float weight = scores[t] / total;
        const float *ZD_RESTRICT v = v_cache + (lo + t) * stride;
        for (int64_t i = 0; i < hd; i++)
            out[i] += weight * v[i];
    }
}

#endif
