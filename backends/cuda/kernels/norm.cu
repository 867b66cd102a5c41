// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, one block (256 to 1024 threads) a row.
#include "formats.cuh"

// x: [n, d] -> any of y: f32 [n, d], and the 8-bit form the next matrix-vector product reads,
// q: int8 [n, d], ds: float2 [n, d / 32], rounded Q8_0 style (q_format 0, d % 32 == 0) or Q8_K
// style (q_format 1, d % 256 == 0). Null outputs are skipped.
extern "C" __global__ void __launch_bounds__(1024)
rms_norm(const float *__restrict__ x, const float *__restrict__ w, float eps, int d, float *__restrict__ y,
         i8 *__restrict__ q, float2 *__restrict__ ds, int q_format) {
    __shared__ float scratch[32];
    const i64 row = (i64)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += x[row + i] * x[row + i];
    ss = block_sum(ss, scratch);
    const float scale = rsqrtf(ss / (float)d + eps);
    if (y) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) y[row + i] = x[row + i] * scale * w[i];
    }
    if (!q) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (q_format == 0) {
        for (int g = warp; g < d / 32; g += warps) {
            const int i = 32 * g + lane;
            quantize_group(x[row + i] * scale * w[i], q + row + 32 * g, ds + (i64)blockIdx.x * (d / 32) + g);
        }
    } else {
        for (int b = warp; b < d / 256; b += warps) {
            float v[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int i = 256 * b + 32 * j + lane;
                v[j] = x[row + i] * scale * w[i];
            }
            quantize_block_k(v, q + row + 256 * b, ds + (i64)blockIdx.x * (d / 32) + 8 * b);
        }
    }
}
