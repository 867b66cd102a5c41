// Matrix-vector products for decode (n <= 8 tokens): y[t, r] = sum_i x[t, i] w[r, i].
//
// One warp per weight row; its lanes take consecutive units (32 or 64 values), so a warp reads a
// contiguous run of every weight plane. Quantised weights meet activations quantised to 8 bits
// (quantize.cu) in integer dot products (__dp4a); each weight unit is loaded once and used for
// every token. Float weights meet the float activations directly.
//
// Variants: mv_<type>_<N> (optionally adding a residual: y = resid + x w^T); mvglu_<type>_<N>,
// which takes the gate and up matrices of a SwiGLU feed-forward block and writes
// silu(x gate^T) * (x up^T); and mv3_<type>, three matrices of one type against one token (the
// q, k and v projections in one launch). N, the largest token count the kernel takes, is 1 or 8.
#include "formats.cuh"

#define ROWS_PER_BLOCK 4   // warps per block of 128 threads

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// sum over this lane's units of row `row`, for tokens 0..n-1 (n <= N).
template <class F, int N>
__device__ __forceinline__ void row_dots(const Planes &w, int row, int k, int n, const i8 *__restrict__ xq,
                                         const float2 *__restrict__ xd, float (&acc)[N]) {
    const int lane = threadIdx.x & 31, nb = F::row_stride(k), units = k / F::UNIT;
#pragma unroll
    for (int t = 0; t < N; t++) acc[t] = 0.0f;
#pragma unroll 2
    for (int u = lane; u < units; u += 32) {
        const typename F::Regs r = F::load(w, row, nb, u);
#pragma unroll
        for (int t = 0; t < N; t++) {
            if (t < n) acc[t] += F::dot(r, xq + (i64)t * k, xd + (i64)t * (k / 32), u);
        }
    }
#pragma unroll
    for (int t = 0; t < N; t++) acc[t] = warp_sum(acc[t]);
}

template <class F, int N>
__device__ __forceinline__ void matvec_q(const Planes &w, int m, int k, int n, const i8 *__restrict__ xq,
                                         const float2 *__restrict__ xd, float *__restrict__ y,
                                         const float *__restrict__ resid) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= m) return;   // a whole warp leaves; no block-wide barrier follows
    float acc[N];
    row_dots<F, N>(w, row, k, n, xq, xd, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int t = 0; t < N; t++) {
            if (t < n) y[(i64)t * m + row] = acc[t] + (resid ? resid[(i64)t * m + row] : 0.0f);
        }
    }
}

// Gate and up rows in one pass, so both rows' loads are in flight together.
template <class F, int N>
__device__ __forceinline__ void matvec_glu_q(const Planes &gate, const Planes &up, int m, int k, int n,
                                             const i8 *__restrict__ xq, const float2 *__restrict__ xd,
                                             float *__restrict__ y) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= m) return;
    const int lane = threadIdx.x & 31, nb = F::row_stride(k), units = k / F::UNIT;
    float g[N], u[N];
#pragma unroll
    for (int t = 0; t < N; t++) g[t] = u[t] = 0.0f;
    for (int i = lane; i < units; i += 32) {
        const typename F::Regs rg = F::load(gate, row, nb, i);
        const typename F::Regs ru = F::load(up, row, nb, i);
#pragma unroll
        for (int t = 0; t < N; t++) {
            if (t < n) {
                g[t] += F::dot(rg, xq + (i64)t * k, xd + (i64)t * (k / 32), i);
                u[t] += F::dot(ru, xq + (i64)t * k, xd + (i64)t * (k / 32), i);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < N; t++) {
        g[t] = warp_sum(g[t]);
        u[t] = warp_sum(u[t]);
    }
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int t = 0; t < N; t++) {
            if (t < n) y[(i64)t * m + row] = silu(g[t]) * u[t];
        }
    }
}

// Rows 0..ma-1 of the grid are a's, the next mb rows b's, the next mc rows c's; n = 1.
template <class F>
__device__ __forceinline__ void matvec3_q(const Planes &a, const Planes &b, const Planes &c, int ma, int mb, int mc,
                                          int k, const i8 *__restrict__ xq, const float2 *__restrict__ xd,
                                          float *__restrict__ ya, float *__restrict__ yb, float *__restrict__ yc) {
    int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= ma + mb + mc) return;
    const int which = row < ma ? 0 : row < ma + mb ? 1 : 2;
    row -= which == 0 ? 0 : which == 1 ? ma : ma + mb;
    const Planes w = which == 0 ? a : which == 1 ? b : c;
    float *y = which == 0 ? ya : which == 1 ? yb : yc;
    float acc[1];
    row_dots<F, 1>(w, row, k, 1, xq, xd, acc);
    if ((threadIdx.x & 31) == 0) y[row] = acc[0];
}

// Float weights: 8 values a lane a step when rows are 16-byte aligned (k % 8 == 0), else one.
template <class F>
__device__ __forceinline__ void load8(const Planes &w, int row, int k, int i, float (&v)[8]);

template <>
__device__ __forceinline__ void load8<FormatF32>(const Planes &w, int row, int k, int i, float (&v)[8]) {
    const float *p = reinterpret_cast<const float *>(w.p0) + (i64)row * k + i;
    const uint4 a = load16(p), b = load16(p + 4);
    v[0] = __uint_as_float(a.x); v[1] = __uint_as_float(a.y); v[2] = __uint_as_float(a.z); v[3] = __uint_as_float(a.w);
    v[4] = __uint_as_float(b.x); v[5] = __uint_as_float(b.y); v[6] = __uint_as_float(b.z); v[7] = __uint_as_float(b.w);
}

__device__ __forceinline__ void unpack_halves(const uint4 &a, float (&v)[8], bool bf16) {
    const u32 words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u16 lo = (u16)(words[i] & 0xFFFF), hi = (u16)(words[i] >> 16);
        v[2 * i] = bf16 ? bf16_to_f32(lo) : f16_to_f32(lo);
        v[2 * i + 1] = bf16 ? bf16_to_f32(hi) : f16_to_f32(hi);
    }
}

template <>
__device__ __forceinline__ void load8<FormatF16>(const Planes &w, int row, int k, int i, float (&v)[8]) {
    unpack_halves(load16(reinterpret_cast<const u16 *>(w.p0) + (i64)row * k + i), v, false);
}

template <>
__device__ __forceinline__ void load8<FormatBF16>(const Planes &w, int row, int k, int i, float (&v)[8]) {
    unpack_halves(load16(reinterpret_cast<const u16 *>(w.p0) + (i64)row * k + i), v, true);
}

template <class F, int N>
__device__ __forceinline__ void row_dots_float(const Planes &w, int row, int k, int n, const float *__restrict__ x,
                                               float (&acc)[N]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < N; t++) acc[t] = 0.0f;
    if (k % 8 == 0) {
        for (int i = 8 * lane; i < k; i += 8 * 32) {
            float v[8];
            load8<F>(w, row, k, i, v);
#pragma unroll
            for (int t = 0; t < N; t++) {
                if (t < n) {
                    const float4 a = *reinterpret_cast<const float4 *>(x + (i64)t * k + i);
                    const float4 b = *reinterpret_cast<const float4 *>(x + (i64)t * k + i + 4);
                    acc[t] += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w
                            + v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
                }
            }
        }
    } else {
        for (int i = lane; i < k; i += 32) {
            const float v = F::value(w, row, k, i);
#pragma unroll
            for (int t = 0; t < N; t++) {
                if (t < n) acc[t] += v * x[(i64)t * k + i];
            }
        }
    }
#pragma unroll
    for (int t = 0; t < N; t++) acc[t] = warp_sum(acc[t]);
}

template <class F, int N>
__device__ __forceinline__ void matvec_f(const Planes &w, int m, int k, int n, const float *__restrict__ x,
                                         float *__restrict__ y, const float *__restrict__ resid) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= m) return;
    float acc[N];
    row_dots_float<F, N>(w, row, k, n, x, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int t = 0; t < N; t++) {
            if (t < n) y[(i64)t * m + row] = acc[t] + (resid ? resid[(i64)t * m + row] : 0.0f);
        }
    }
}

template <class F, int N>
__device__ __forceinline__ void matvec_glu_f(const Planes &gate, const Planes &up, int m, int k, int n,
                                             const float *__restrict__ x, float *__restrict__ y) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= m) return;
    float g[N], u[N];
    row_dots_float<F, N>(gate, row, k, n, x, g);
    row_dots_float<F, N>(up, row, k, n, x, u);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int t = 0; t < N; t++) {
            if (t < n) y[(i64)t * m + row] = silu(g[t]) * u[t];
        }
    }
}

#define MATVEC_Q(name, F, N)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                     \
    mv_##name##_##N(const u8 *p0, const u8 *p1, const u8 *p2, const u8 *p3, int m, int k, int n,          \
                    const i8 *xq, const float2 *xd, float *y, const float *resid) {                       \
        matvec_q<F, N>(Planes{p0, p1, p2, p3}, m, k, n, xq, xd, y, resid);                                 \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128)                                                     \
    mvglu_##name##_##N(const u8 *g0, const u8 *g1, const u8 *g2, const u8 *g3, const u8 *u0, const u8 *u1, \
                       const u8 *u2, const u8 *u3, int m, int k, int n, const i8 *xq, const float2 *xd,     \
                       float *y) {                                                                        \
        matvec_glu_q<F, N>(Planes{g0, g1, g2, g3}, Planes{u0, u1, u2, u3}, m, k, n, xq, xd, y);             \
    }

#define MATVEC_Q3(name, F)                                                                                \
    extern "C" __global__ void __launch_bounds__(128)                                                     \
    mv3_##name(const u8 *a0, const u8 *a1, const u8 *a2, const u8 *a3, const u8 *b0, const u8 *b1,         \
               const u8 *b2, const u8 *b3, const u8 *c0, const u8 *c1, const u8 *c2, const u8 *c3, int ma, \
               int mb, int mc, int k, const i8 *xq, const float2 *xd, float *ya, float *yb, float *yc) {  \
        matvec3_q<F>(Planes{a0, a1, a2, a3}, Planes{b0, b1, b2, b3}, Planes{c0, c1, c2, c3}, ma, mb, mc, k,   \
                     xq, xd, ya, yb, yc);                                                                 \
    }

#define MATVEC_F(name, F, N)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                     \
    mv_##name##_##N(const u8 *p0, int m, int k, int n, const float *x, float *y, const float *resid) {    \
        matvec_f<F, N>(Planes{p0, p0, p0, p0}, m, k, n, x, y, resid);                                      \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128)                                                     \
    mvglu_##name##_##N(const u8 *g0, const u8 *u0, int m, int k, int n, const float *x, float *y) {       \
        matvec_glu_f<F, N>(Planes{g0, g0, g0, g0}, Planes{u0, u0, u0, u0}, m, k, n, x, y);                 \
    }

#define MATVEC_Q_ALL(name, F) MATVEC_Q(name, F, 1) MATVEC_Q(name, F, 8) MATVEC_Q3(name, F)
#define MATVEC_F_ALL(name, F) MATVEC_F(name, F, 1) MATVEC_F(name, F, 8)

FOR_EACH_QUANT_FORMAT(MATVEC_Q_ALL)
FOR_EACH_FLOAT_FORMAT(MATVEC_F_ALL)
