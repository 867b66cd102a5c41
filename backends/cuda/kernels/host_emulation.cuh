// A CPU stand-in for the CUDA execution model, so the tests can run these kernels where no GPU is:
// emulation.py compiles a kernel file with g++ and this header included first.
//
// Blocks run one after another; the threads of a block run as cooperative fibers on one OS thread
// (x86-64 only: a dozen instructions switch stacks), switching only at barriers (__syncthreads,
// __syncwarp, shuffles). __shared__ variables
// become function statics, which is right because only one block runs at a time. The emulator
// checks what the hardware lets slide: a barrier some threads of the block (or warp) never reach
// is reported as a deadlock instead of hanging.
#pragma once
#define ZEPHYR_HOST_EMULATION 1

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA host emulator switches fiber stacks with x86-64 instructions"
#endif

using std::max;
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }

// Saves the callee-saved registers on the current stack, stores its pointer in *save, and resumes
// the fiber whose stack pointer is `load` (the System V x86-64 calling convention).
extern "C" void emu_switch(void **save, void *load);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

namespace emu {

struct Thread {
    void *stack_pointer;
    dim3 index;
    int lane, warp;
    bool done;
};

struct Barrier {
    int arrived = 0;
    long generation = 0;
};

struct Block {
    std::vector<Thread> threads;
    std::vector<Barrier> warp_barriers;
    std::vector<unsigned> shuffle_slots;   // 32 per warp
    Barrier block_barrier;
    int current = 0;
    void *scheduler;
    std::function<void()> body;
    const char *error = nullptr;
};

inline Block *block_state = nullptr;
inline dim3 grid_dim, block_dim, block_index;
inline std::vector<char> stacks;
constexpr size_t STACK_BYTES = 64 * 1024;

inline Thread &self() { return block_state->threads[block_state->current]; }

inline void yield() { emu_switch(&self().stack_pointer, block_state->scheduler); }

inline int alive_in_warp(int warp) {
    int count = 0;
    for (auto &t : block_state->threads) count += (t.warp == warp && !t.done);
    return count;
}

inline int alive_in_block() {
    int count = 0;
    for (auto &t : block_state->threads) count += !t.done;
    return count;
}

inline void wait(Barrier &b, int members) {
    const long generation = b.generation;
    if (++b.arrived >= members) {
        b.arrived = 0;
        b.generation++;
        return;
    }
    while (b.generation == generation) yield();
}

inline void warp_sync() {
    const int warp = self().warp;
    wait(block_state->warp_barriers[warp], alive_in_warp(warp));
}

inline void block_sync() { wait(block_state->block_barrier, alive_in_block()); }

template <class T>
T shuffle(T value, int source) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    Thread &t = self();
    unsigned bits;
    std::memcpy(&bits, &value, 4);
    block_state->shuffle_slots[32 * t.warp + t.lane] = bits;
    warp_sync();
    const int warp = self().warp;
    bits = block_state->shuffle_slots[32 * warp + (source & 31)];
    warp_sync();
    T out;
    std::memcpy(&out, &bits, 4);
    return out;
}

inline void thread_main() {
    block_state->body();
    self().done = true;
    // a barrier some threads are waiting at may now be complete without this one
    for (size_t w = 0; w < block_state->warp_barriers.size(); w++) {
        Barrier &b = block_state->warp_barriers[w];
        if (b.arrived && b.arrived >= alive_in_warp((int)w)) {
            b.arrived = 0;
            b.generation++;
        }
    }
    Barrier &b = block_state->block_barrier;
    if (b.arrived && b.arrived >= alive_in_block()) {
        b.arrived = 0;
        b.generation++;
    }
    emu_switch(&self().stack_pointer, block_state->scheduler);   // never resumed
}

// A fresh fiber's stack, as emu_switch expects to find it: six saved registers, then thread_main
// as the return address, then a zero return address for thread_main (which never returns), so that
// thread_main starts with the stack alignment of a called function.
inline void *new_stack(char *base, size_t bytes) {
    auto top = reinterpret_cast<uintptr_t>(base + bytes) & ~uintptr_t(15);
    auto *slot = reinterpret_cast<void **>(top);
    *--slot = nullptr;
    *--slot = reinterpret_cast<void *>(&thread_main);
    for (int i = 0; i < 6; i++) *--slot = nullptr;
    return slot;
}

// Runs body() as every thread of every block; returns an error message or null.
inline const char *launch(dim3 grid, dim3 block, const std::function<void()> &body) {
    const int n = (int)(block.x * block.y * block.z);
    if (n <= 0 || n > 1024 || n % 32) return "block size must be a positive multiple of 32, at most 1024";
    if (stacks.size() < n * STACK_BYTES) stacks.resize(n * STACK_BYTES);
    grid_dim = grid;
    block_dim = block;
    Block state;
    state.body = body;
    block_state = &state;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                block_index = {bx, by, bz};
                state.threads.assign(n, Thread{});
                state.warp_barriers.assign(n / 32, Barrier{});
                state.shuffle_slots.assign(n, 0u);
                state.block_barrier = Barrier{};
                for (int i = 0; i < n; i++) {
                    Thread &t = state.threads[i];
                    t.index = {(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                               (unsigned)(i / (block.x * block.y))};
                    t.lane = i % 32;
                    t.warp = i / 32;
                    t.stack_pointer = new_stack(stacks.data() + i * STACK_BYTES, STACK_BYTES);
                }
                for (;;) {
                    bool progressed = false, all_done = true;
                    for (int i = 0; i < n; i++) {
                        if (state.threads[i].done) continue;
                        all_done = false;
                        const long before = state.block_barrier.generation;
                        long warp_before = state.warp_barriers[state.threads[i].warp].generation;
                        state.current = i;
                        const int arrived_block = state.block_barrier.arrived;
                        const int arrived_warp = state.warp_barriers[state.threads[i].warp].arrived;
                        emu_switch(&state.scheduler, state.threads[i].stack_pointer);
                        if (state.threads[i].done || state.block_barrier.generation != before ||
                            state.warp_barriers[state.threads[i].warp].generation != warp_before ||
                            state.block_barrier.arrived != arrived_block ||
                            state.warp_barriers[state.threads[i].warp].arrived != arrived_warp)
                            progressed = true;
                    }
                    if (all_done) break;
                    if (!progressed) {
                        block_state = nullptr;
                        return "deadlock: threads wait at a barrier others never reach";
                    }
                }
            }
    block_state = nullptr;
    return nullptr;
}

}  // namespace emu

#define threadIdx (emu::self().index)
#define blockIdx (emu::block_index)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_sync(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shuffle(v, (emu::self().lane ^ mask)); }
template <class T> T __shfl_sync(unsigned, T v, int source) { return emu::shuffle(v, source); }

template <class T> T __ldg(const T *p) { return *p; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void sincos(double x, double *s, double *c) { *s = std::sin(x); *c = std::cos(x); }

inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
}

inline int __vsubss4(int a, int b) {
    unsigned out = 0;
    for (int i = 0; i < 4; i++) {
        int v = (int)(int8_t)(a >> (8 * i)) - (int)(int8_t)(b >> (8 * i));
        v = std::max(-128, std::min(127, v));
        out |= (unsigned)(uint8_t)v << (8 * i);
    }
    return (int)out;
}

inline float f16_to_f32(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
