// Rotary position embeddings. The first n_rot dims of every head rotate by theta = pos * base^(-2j / n_rot);
// pairs are (2j, 2j + 1) in llama's normal mode and (j, j + n_rot / 2) in NeoX mode. Angles and
// rotations are computed in double: positions reach tens of thousands, where a float angle is off
// by about 1e-3 radians.
//
// Token t sits at position pos[t] (of sequence seq[t], where the cache is written): device arrays,
// so a captured CUDA graph serves every batch of its size.
#include "common.cuh"

// Rotates one head of hd values from `src` into `dst` (which may be `src`, or a cache row of T);
// 64 threads a head. A rotated value is rounded to float first, then to T, as a float rope output
// stored into the cache would be.
template <class T>
__device__ __forceinline__ void rotate_head(const float *src, T *dst, int p, int hd, int n_rot, float base, int neox) {
    const int half = n_rot / 2;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
        const double theta = (double)p * pow((double)base, -2.0 * j / n_rot);
        double s, c;
        sincos(theta, &s, &c);
        const double x0 = src[a], x1 = src[b];
        store1(dst + a, (float)(x0 * c - x1 * s));
        store1(dst + b, (float)(x0 * s + x1 * c));
    }
    if ((const void *)src != (const void *)dst) {
        for (int i = n_rot + threadIdx.x; i < hd; i += blockDim.x) store1(dst + i, src[i]);
    }
}

// x, y: [n, heads * hd]. Grid (n, heads), 64 threads.
extern "C" __global__ void __launch_bounds__(64)
rope(const float *x, float *y, int heads, int hd, int n_rot, float base, int neox, const int *pos) {
    const i64 off = ((i64)blockIdx.x * heads + blockIdx.y) * hd;
    rotate_head(x + off, y + off, pos[blockIdx.x], hd, n_rot, base, neox);
}

// The attention inputs of one layer: rotates q [n, h * hd] in place, and writes rotated k and
// unchanged v ([n, h_kv * hd] each) into row pos[t] of sequence seq[t] of the cache
// (cache_k, cache_v: [n_seqs, h_kv, n_ctx, hd] of this layer). Grid (n, h + h_kv), 64 threads.
// With h = 0 and n_rot = 0 it only stores k and v (the attention op's store).
template <class T>
__device__ __forceinline__ void rope_and_store(float *q, const float *k, const float *v, T *cache_k, T *cache_v,
                                               int n_heads, int n_kv, int hd, int n_rot, float base, int neox,
                                               const int *pos, const int *seq, int n_ctx) {
    const int t = blockIdx.x, head = blockIdx.y, p = pos[t];
    if (head < n_heads) {
        float *row = q + ((i64)t * n_heads + head) * hd;
        rotate_head(row, row, p, hd, n_rot, base, neox);
        return;
    }
    const int kv = head - n_heads;
    const i64 src = ((i64)t * n_kv + kv) * hd, dst = (((i64)seq[t] * n_kv + kv) * n_ctx + p) * hd;
    rotate_head(k + src, cache_k + dst, p, hd, n_rot, base, neox);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) store1(cache_v + dst + i, v[src + i]);
}

extern "C" __global__ void __launch_bounds__(64)
rope_store_f32(float *q, const float *k, const float *v, float *cache_k, float *cache_v, int n_heads, int n_kv,
               int hd, int n_rot, float base, int neox, const int *pos, const int *seq, int n_ctx) {
    rope_and_store(q, k, v, cache_k, cache_v, n_heads, n_kv, hd, n_rot, base, neox, pos, seq, n_ctx);
}

extern "C" __global__ void __launch_bounds__(64)
rope_store_f16(float *q, const float *k, const float *v, u16 *cache_k, u16 *cache_v, int n_heads, int n_kv,
               int hd, int n_rot, float base, int neox, const int *pos, const int *seq, int n_ctx) {
    rope_and_store(q, k, v, cache_k, cache_v, n_heads, n_kv, hd, n_rot, base, neox, pos, seq, n_ctx);
}
