// Activations -> 8-bit blocks for the integer matrix-vector products (see formats.cuh).
#include "formats.cuh"

// x: [n, k] f32 -> q: int8 [n, k], ds: float2 [n, k / 32].
// Q8_0 style (k % 32 == 0): grid (ceil(k / 256), n), 256 threads, a warp a 32-value group.
extern "C" __global__ void __launch_bounds__(256)
quantize_q8_0(const float *__restrict__ x, int k, i8 *__restrict__ q, float2 *__restrict__ ds) {
    const int t = blockIdx.y, g = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (g >= k / 32) return;   // a whole warp leaves
    const i64 i = (i64)t * k + 32 * g;
    quantize_group(x[i + (threadIdx.x & 31)], q + i, ds + (i64)t * (k / 32) + g);
}

// Q8_K style (k % 256 == 0): grid (ceil(k / 2048), n), 256 threads, a warp a 256-value block.
extern "C" __global__ void __launch_bounds__(256)
quantize_q8_k(const float *__restrict__ x, int k, i8 *__restrict__ q, float2 *__restrict__ ds) {
    const int t = blockIdx.y, b = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (b >= k / 256) return;
    const i64 i = (i64)t * k + 256 * b;
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; j++) v[j] = x[i + 32 * j + lane];
    quantize_block_k(v, q + i, ds + (i64)t * (k / 32) + 8 * b);
}
