// Rotary position embeddings. The first n_rot dims of every head rotate by theta = pos * base^(-2j / n_rot);
// pairs are (2j, 2j + 1) in llama's normal mode and (j, j + n_rot / 2) in NeoX mode. Angles and
// rotations are computed in double: positions reach tens of thousands, where a float angle is off
// by about 1e-3 radians.
//
// Token t sits at position start + *pos + t: `pos` is a one-element device array (null reads as 0),
// so a captured CUDA graph serves every decode position.
#include "common.cuh"

__device__ __forceinline__ int position(const int *pos, int start, int t) { return start + (pos ? *pos : 0) + t; }

// Rotates one head of hd values from `src` into `dst` (which may be `src`); 64 threads a head.
__device__ __forceinline__ void rotate_head(const float *src, float *dst, int p, int hd, int n_rot, float base,
                                            int neox) {
    const int half = n_rot / 2;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
        const double theta = (double)p * pow((double)base, -2.0 * j / n_rot);
        double s, c;
        sincos(theta, &s, &c);
        const double x0 = src[a], x1 = src[b];
        dst[a] = (float)(x0 * c - x1 * s);
        dst[b] = (float)(x0 * s + x1 * c);
    }
    if (src != dst) {
        for (int i = n_rot + threadIdx.x; i < hd; i += blockDim.x) dst[i] = src[i];
    }
}

// x, y: [n, heads * hd]. Grid (n, heads), 64 threads.
extern "C" __global__ void __launch_bounds__(64)
rope(const float *x, float *y, int heads, int hd, int n_rot, float base, int neox, const int *pos, int start) {
    const i64 off = ((i64)blockIdx.x * heads + blockIdx.y) * hd;
    rotate_head(x + off, y + off, position(pos, start, blockIdx.x), hd, n_rot, base, neox);
}

// The attention inputs of one layer: rotates q [n, h * hd] in place, and writes rotated k and
// unchanged v ([n, h_kv * hd] each) into the cache rows of their positions
// (cache_k, cache_v: [n_ctx, h_kv, hd] of this layer). Grid (n, h + h_kv), 64 threads.
extern "C" __global__ void __launch_bounds__(64)
rope_store(float *q, const float *k, const float *v, float *cache_k, float *cache_v, int n_heads, int n_kv, int hd,
           int n_rot, float base, int neox, const int *pos, int start) {
    const int t = blockIdx.x, head = blockIdx.y, p = position(pos, start, t);
    if (head < n_heads) {
        float *row = q + ((i64)t * n_heads + head) * hd;
        rotate_head(row, row, p, hd, n_rot, base, neox);
        return;
    }
    const int kv = head - n_heads;
    const i64 src = ((i64)t * n_kv + kv) * hd, dst = ((i64)p * n_kv + kv) * hd;
    rotate_head(k + src, cache_k + dst, p, hd, n_rot, base, neox);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) cache_v[dst + i] = v[src + i];
}
