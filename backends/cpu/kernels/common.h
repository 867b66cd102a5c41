/* Definitions every kernel header shares: restrict, instruction-set paths and their selection. */
#ifndef ZEPHYR_COMMON_H
#define ZEPHYR_COMMON_H

#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* `restrict` is C99 but not C++/MSVC; both gcc and MSVC accept __restrict. */
#define ZD_RESTRICT __restrict

/* Instruction-set paths of the matmul kernels. Every path computes the same integer dot
 * products; they differ only in float summation order. One build carries all of them, each
 * function compiled for its own ISA with a target attribute, so a portable build
 * (ZEPHYR_PORTABLE=1, no -march=native) still runs the fastest path the CPU has. */
enum { ZD_ISA_SCALAR = 0, ZD_ISA_AVX2 = 1, ZD_ISA_AVX512 = 2, ZD_ISA_COUNT = 3 };

#if defined(__GNUC__) && defined(__x86_64__)
#define ZD_X86 1
#include <immintrin.h>
/* AVX2 path: AVX2 + FMA + F16C (Haswell and later, Zen 1 and later). */
#define ZD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
/* AVX-512 path: F/BW/VL/DQ plus VNNI (Ice Lake, Zen 4 and later); 512-bit vectors. */
#define ZD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define ZD_INLINE static inline __attribute__((always_inline))
#else
#define ZD_X86 0
#define ZD_INLINE static inline
#endif

/* Unroll the loop that follows completely. The SIMD kernels keep arrays of vector registers
 * indexed by token and by vector; a loop gcc leaves rolled turns such an array into stack
 * memory (an interleaved Q6_K pass over 2 tokens ran at 14 GB/s from L2, unrolled at 34). */
#define ZD_UNROLL _Pragma("GCC unroll 16")

/* Whether this CPU (and OS: libgcc checks the saved vector state) can run path `isa`. */
static int zd_isa_supported(int isa) {
    if (isa == ZD_ISA_SCALAR)
        return 1;
#if ZD_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                     && __builtin_cpu_supports("f16c");
    if (isa == ZD_ISA_AVX2)
        return avx2;
    if (isa == ZD_ISA_AVX512)
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
               && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
               && __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

/* Whether this is an Intel CPU, whose cores run some row-major kernels slower than the memory
 * streams them where AMD's keep pace (interleave.h picks the weight layout by it). */
static int zd_cpu_is_intel(void) {
#if ZD_X86
    __builtin_cpu_init();
    return __builtin_cpu_is("intel");
#else
    return 0;
#endif
}

/* The fastest path this CPU supports. */
static int zd_best_isa(void) {
    for (int isa = ZD_ISA_COUNT - 1; isa > ZD_ISA_SCALAR; isa--)
        if (zd_isa_supported(isa))
            return isa;
    return ZD_ISA_SCALAR;
}

static inline int64_t zd_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t zd_max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* This thread's number and its team's size inside a parallel region (0 and 1 without OpenMP). */
#ifdef _OPENMP
static inline int zd_thread_num(void) { return omp_get_thread_num(); }
static inline int zd_team_size(void) { return omp_get_num_threads(); }
#else
static inline int zd_thread_num(void) { return 0; }
static inline int zd_team_size(void) { return 1; }
#endif

/* A barrier for the threads of one parallel region. It spins briefly (the usual wait is a few
 * microseconds), then yields the CPU while it waits: on a machine shared with other work, a
 * spinning waiter would otherwise burn the very timeslice the thread it waits for needs.
 * Sense-reversing: `count` and `sense` start at 0, each thread keeps its own `local` sense. */
typedef struct {
    int count, sense;
} zd_barrier;

#if defined(_WIN32)
#include <windows.h>
static inline void zd_yield(void) { SwitchToThread(); }
#else
#include <sched.h>
static inline void zd_yield(void) { sched_yield(); }
#endif

static inline void zd_pause(void) {
#if ZD_X86
    __builtin_ia32_pause();
#endif
}

static inline void zd_barrier_wait(zd_barrier *b, int *local, int nth) {
    if (nth <= 1)
        return;
    *local = !*local;
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == nth) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, *local, __ATOMIC_RELEASE);
        return;
    }
    for (int spin = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != *local; spin++) {
        if (spin < 4000)
            zd_pause();
        else
            zd_yield();
    }
}

/* Thread ith of nth's contiguous share of n rows x `units` units per row, walked as spans
 * (row t, units [u0, u1)): rows are shared out even when there are fewer rows than threads. */
typedef struct {
    int64_t i, end, units;
} zd_spans;

static inline zd_spans zd_spans_of(int64_t n, int64_t units, int ith, int nth) {
    zd_spans s = {n * units * ith / nth, n * units * (ith + 1) / nth, units};
    return s;
}

static inline int zd_spans_next(zd_spans *s, int64_t *t, int64_t *u0, int64_t *u1) {
    if (s->i >= s->end || s->units <= 0)
        return 0;
    *t = s->i / s->units;
    *u0 = s->i % s->units;
    *u1 = zd_min64(s->units, *u0 + s->end - s->i);
    s->i += *u1 - *u0;
    return 1;
}

#endif
