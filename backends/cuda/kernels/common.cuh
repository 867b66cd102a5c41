// Shared by every kernel file: integer types, half-precision conversion, warp reductions and the
// vector loads. NVRTC compiles these files without the CUDA headers, so nothing here includes any.
#pragma once

typedef signed char i8;
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define FULL_MASK 0xffffffffu

// IEEE half <-> float through PTX, so no cuda_fp16.h is needed. (The host emulator the tests build
// the kernels with, host_emulation.cuh, brings its own.)
#ifndef ZEPHYR_HOST_EMULATION
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// The float a half rounds to (as numpy's astype(float16).astype(float32)).
__device__ __forceinline__ float round_to_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float((u32)b << 16); }

// KV cache elements: float (an f32 cache) or half bits (an f16 cache), read and written as float.
__device__ __forceinline__ float load1(const float *p) { return *p; }
__device__ __forceinline__ float load1(const u16 *p) { return f16_to_f32(*p); }
__device__ __forceinline__ void store1(float *p, float v) { *p = v; }
__device__ __forceinline__ void store1(u16 *p, float v) { *p = f32_to_f16(v); }

// Four consecutive elements from a 4-element-aligned address.
__device__ __forceinline__ float4 load4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ float4 load4(const u16 *p) {
    const uint2 h = *reinterpret_cast<const uint2 *>(p);
    float4 f;
    f.x = f16_to_f32((u16)(h.x & 0xffff));
    f.y = f16_to_f32((u16)(h.x >> 16));
    f.z = f16_to_f32((u16)(h.y & 0xffff));
    f.w = f16_to_f32((u16)(h.y >> 16));
    return f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024); every thread gets it.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();   // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Read-only 16-byte loads through the non-coherent cache: the weights and activations the matrix
// kernels stream are never written while a kernel runs.
__device__ __forceinline__ uint4 load16(const void *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }

// 32 consecutive bytes (16-byte aligned) as eight ints.
__device__ __forceinline__ void load32(const void *p, int (&v)[8]) {
    const uint4 a = load16(p), b = load16(static_cast<const u8 *>(p) + 16);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ u32 load_u32(const void *p) { return __ldg(reinterpret_cast<const u32 *>(p)); }
__device__ __forceinline__ u16 load_u16(const void *p) { return __ldg(reinterpret_cast<const u16 *>(p)); }

// Four signed byte products summed into c (sm_61 and later).
__device__ __forceinline__ int dot4(int a, int b, int c) { return __dp4a(a, b, c); }

// Byte-wise a - b for bytes whose results lie in [-128, 127].
__device__ __forceinline__ int sub4(int a, int b) { return __vsubss4(a, b); }

// Up to four weight planes (see backends/cuda/layout.py): the bytes of each block field, row-major.
struct Planes {
    const u8 *p0, *p1, *p2, *p3;
};
