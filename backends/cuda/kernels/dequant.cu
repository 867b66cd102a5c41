// Weights -> values: f16 tiles of a weight matrix for the cuBLAS prompt path, and embedding rows.
#include "formats.cuh"

// Rows row0..row0+rows-1 of a [m, k] weight -> out: f16 bits [rows, k]. Grid-stride over values.
template <class F>
__device__ __forceinline__ void dequant_f16(const Planes &w, int row0, int rows, int k, u16 *__restrict__ out) {
    const i64 total = (i64)rows * k;
    const int stride = F::row_stride(k);
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(i / k), c = (int)(i % k);
        out[i] = f32_to_f16(F::value(w, row0 + r, stride, c));
    }
}

// ids: int32 [n] (checked by the caller) -> out: f32 [n, k]. Grid (n, ceil(k / 256)), 256 threads.
template <class F>
__device__ __forceinline__ void embed(const Planes &w, int k, const int *__restrict__ ids, float *__restrict__ out) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c < k) out[(i64)blockIdx.x * k + c] = F::value(w, ids[blockIdx.x], F::row_stride(k), c);
}

#define DEQUANT(name, F)                                                                               \
    extern "C" __global__ void dequant_f16_##name(const u8 *p0, const u8 *p1, const u8 *p2, const u8 *p3, \
                                                  int row0, int rows, int k, u16 *out) {                \
        dequant_f16<F>(Planes{p0, p1, p2, p3}, row0, rows, k, out);                                     \
    }                                                                                                  \
    extern "C" __global__ void embed_##name(const u8 *p0, const u8 *p1, const u8 *p2, const u8 *p3, int k, \
                                            const int *ids, float *out) {                              \
        embed<F>(Planes{p0, p1, p2, p3}, k, ids, out);                                                  \
    }

FOR_EACH_QUANT_FORMAT(DEQUANT)
FOR_EACH_FLOAT_FORMAT(DEQUANT)
