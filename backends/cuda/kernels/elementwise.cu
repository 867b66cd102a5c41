// Element-wise ops over [n, width] float32 arrays, grid-stride loops.
#include "common.cuh"

extern "C" __global__ void add(const float *__restrict__ a, const float *__restrict__ b, float *__restrict__ y,
                               i64 count) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < count; i += (i64)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

// silu(gate) * up; silu(g) = g / (1 + e^-g) is finite for every finite g (e^-g may overflow to inf,
// giving -0). Writes y (f32) and/or y16 (f16 bits) where not null.
extern "C" __global__ void swiglu(const float *__restrict__ gate, const float *__restrict__ up,
                                  float *__restrict__ y, u16 *__restrict__ y16, i64 count) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < count; i += (i64)gridDim.x * blockDim.x) {
        const float g = gate[i];
        const float v = g / (1.0f + expf(-g)) * up[i];
        if (y) y[i] = v;
        if (y16) y16[i] = f32_to_f16(v);
    }
}

// f32 -> f16 bits, the activations the cuBLAS prompt path multiplies.
extern "C" __global__ void to_f16(const float *__restrict__ x, u16 *__restrict__ y, i64 count) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < count; i += (i64)gridDim.x * blockDim.x)
        y[i] = f32_to_f16(x[i]);
}
