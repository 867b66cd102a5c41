// Causal grouped-query attention over one layer's KV cache: cache_k, cache_v [n_seqs, h_kv, n_ctx, hd],
// of float (attention_f32) or of half bits (attention_f16, read into f32: every sum is f32).
//
// One warp takes one query token against one share ("split") of its visible keys, for the query
// heads that read one kv head (up to MAX_GROUP of them; larger groups are cut into several), so
// every key row is read once per group. Lane j scores key base + j of each 32-key step (its whole K row against the group's
// queries, kept in shared memory); an online softmax folds the step in; lane j then owns output
// dims j, j + 32, ... and accumulates the V rows of the step, reading them coalesced.
//
// With one split (long prompts) a warp writes its normalised output; with several (decode, where
// flash-decoding spreads a long context over many warps) it writes (max, sum, unnormalised acc)
// to `part`, and attention_combine merges the splits.
//
// Token t sits at position p = pos[t] of sequence seq[t] (device arrays, so a captured CUDA graph
// serves every batch of its size) and sees that sequence's keys lo..p, lo = max(0, p - window + 1)
// when window > 0, else 0.
#include "common.cuh"

#define MAX_GROUP 8
#define MAX_HD 256
#define WARPS 4
#define NEG_INF (-__int_as_float(0x7f800000))

// q: [n, h, hd]; out: [n, h, hd]; part: [n, h, splits, hd + 2].
// Grid (ceil(n * splits / WARPS), h_kv * ceil(group / MAX_GROUP)).
template <class T>
__device__ __forceinline__ void attend(const float *__restrict__ q, const T *__restrict__ cache_k,
                                       const T *__restrict__ cache_v, float *__restrict__ out,
                                       float *__restrict__ part, int n, int n_heads, int n_kv, int hd, float scale,
                                       int window, const int *__restrict__ pos, const int *__restrict__ seq,
                                       int n_ctx, int splits) {
    __shared__ __align__(16) float q_shared[WARPS][MAX_GROUP][MAX_HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int w = blockIdx.x * WARPS + warp;
    const int t = w / splits, split = w % splits;
    if (t >= n) return;   // whole warps leave; only warp-level synchronisation follows
    const int heads_per_kv = n_heads / n_kv, pieces = (heads_per_kv + MAX_GROUP - 1) / MAX_GROUP;
    const int kv = blockIdx.y / pieces, first = kv * heads_per_kv + (blockIdx.y % pieces) * MAX_GROUP;
    const int group = min(MAX_GROUP, kv * heads_per_kv + heads_per_kv - first);   // heads first..first+group-1
    const int p = pos[t];
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int chunk = (p + 1 - lo + splits - 1) / splits;
    const int k0 = lo + split * chunk, k1 = min(p + 1, k0 + chunk);
    const i64 rows = ((i64)seq[t] * n_kv + kv) * n_ctx;   // the first row of this sequence's kv head

    float(*qs)[MAX_HD] = q_shared[warp];
    for (int g = 0; g < group; g++) {
        const float *src = q + ((i64)t * n_heads + first + g) * hd;
        for (int d = lane; d < hd; d += 32) qs[g][d] = src[d] * scale;
    }
    __syncwarp();

    float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][MAX_HD / 32];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_HD / 32; i++) acc[g][i] = 0.0f;
    }

    for (int base = k0; base < k1; base += 32) {
        const int key = base + lane;
        const bool valid = key < k1;
        float s[MAX_GROUP];
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) s[g] = 0.0f;
        if (valid) {
            const T *krow = cache_k + (rows + key) * hd;
            for (int d = 0; d < hd; d += 4) {
                const float4 kk = load4(krow + d);
#pragma unroll
                for (int g = 0; g < MAX_GROUP; g++) {
                    if (g < group) {
                        const float4 qq = *reinterpret_cast<const float4 *>(&qs[g][d]);
                        s[g] += qq.x * kk.x + qq.y * kk.y + qq.z * kk.z + qq.w * kk.w;
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            if (g < group) {
                const float step_max = warp_max(valid ? s[g] : NEG_INF);   // finite: lane 0 is valid
                const float new_m = fmaxf(m[g], step_max);
                const float correction = expf(m[g] - new_m);               // 0 on the first step
                const float e = valid ? expf(s[g] - new_m) : 0.0f;
                l[g] = l[g] * correction + warp_sum(e);
                m[g] = new_m;
                s[g] = e;
#pragma unroll
                for (int i = 0; i < MAX_HD / 32; i++) acc[g][i] *= correction;
            }
        }
        const int count = min(32, k1 - base);
        for (int j = 0; j < count; j++) {
            const T *vrow = cache_v + (rows + base + j) * hd;
            float v[MAX_HD / 32];
#pragma unroll
            for (int i = 0; i < MAX_HD / 32; i++) v[i] = lane + 32 * i < hd ? load1(vrow + lane + 32 * i) : 0.0f;
#pragma unroll
            for (int g = 0; g < MAX_GROUP; g++) {
                if (g < group) {
                    const float weight = __shfl_sync(FULL_MASK, s[g], j);
#pragma unroll
                    for (int i = 0; i < MAX_HD / 32; i++) acc[g][i] += weight * v[i];
                }
            }
        }
    }

#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (g < group) {
            const int head = first + g;
            if (splits == 1) {
                float *dst = out + ((i64)t * n_heads + head) * hd;
#pragma unroll
                for (int i = 0; i < MAX_HD / 32; i++) {
                    if (lane + 32 * i < hd) dst[lane + 32 * i] = acc[g][i] / l[g];
                }
            } else {
                float *dst = part + (((i64)t * n_heads + head) * splits + split) * (hd + 2);
                if (lane == 0) {
                    dst[0] = m[g];
                    dst[1] = l[g];
                }
#pragma unroll
                for (int i = 0; i < MAX_HD / 32; i++) {
                    if (lane + 32 * i < hd) dst[2 + lane + 32 * i] = acc[g][i];
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
attention_f32(const float *q, const float *cache_k, const float *cache_v, float *out, float *part, int n,
              int n_heads, int n_kv, int hd, float scale, int window, const int *pos, const int *seq, int n_ctx,
              int splits) {
    attend(q, cache_k, cache_v, out, part, n, n_heads, n_kv, hd, scale, window, pos, seq, n_ctx, splits);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
attention_f16(const float *q, const u16 *cache_k, const u16 *cache_v, float *out, float *part, int n,
              int n_heads, int n_kv, int hd, float scale, int window, const int *pos, const int *seq, int n_ctx,
              int splits) {
    attend(q, cache_k, cache_v, out, part, n, n_heads, n_kv, hd, scale, window, pos, seq, n_ctx, splits);
}

// part: [n, h, splits, hd + 2] -> out: [n, h, hd]. Grid n * h, 128 threads. Empty splits carry
// max = -inf and sum 0, and weigh nothing.
extern "C" __global__ void __launch_bounds__(128)
attention_combine(const float *__restrict__ part, float *__restrict__ out, int hd, int splits) {
    const float *rows = part + (i64)blockIdx.x * splits * (hd + 2);
    float top = NEG_INF;
    for (int s = 0; s < splits; s++) top = fmaxf(top, rows[s * (hd + 2)]);
    float total = 0.0f;
    for (int s = 0; s < splits; s++) {
        const float m = rows[s * (hd + 2)];
        if (m != NEG_INF) total += rows[s * (hd + 2) + 1] * expf(m - top);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float m = rows[s * (hd + 2)];
            if (m != NEG_INF) v += rows[s * (hd + 2) + 2 + d] * expf(m - top);
        }
        out[(i64)blockIdx.x * hd + d] = v / total;
    }
}
