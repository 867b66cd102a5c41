/* Matrix products out[n, m] = x[n, k] @ W[m, k].T for every weight type, split over threads.
 *
 * The activation rows are quantised once (quantize.h), then the threads take chunks of the
 * weight's row tiles (tile.h) from a shared counter and compute each for every token: a weight
 * byte is read from memory once per matmul, by one thread. Within a chunk, tiles of R rows go
 * in order and, for each, tiles of up to T tokens, so the rows of a tile stay in cache while all
 * tokens pass over them (prefill) and a single token streams R rows at once (decode). Chunks
 * are handed out dynamically so a thread the OS pauses (a shared machine) delays little.
 * Batches of ZD_PANEL_MIN_N tokens or more instead unpack each tile of 16 rows once into a
 * panel and pass every token over it (panel.h).
 *
 * Several matmuls over the same activations (Q, K and V; gate and up) form one job list whose
 * chunks are handed out together, so no thread waits for another at the end of each.
 */
#ifndef ZEPHYR_MATMUL_H
#define ZEPHYR_MATMUL_H

#include "common.h"
#include "dequant.h"
#include "quantize.h"
#include "tile.h"
#include "dot_float.h"
#include "dot_kquant.h"
#include "dot_legacy.h"
#include "panel.h"
#include "interleave.h"

/* The omp simd reduction lets gcc reorder the sum into vector lanes (no -ffast-math needed). */
static inline float zd_dot(const float *ZD_RESTRICT a, const float *ZD_RESTRICT b, int64_t k) {
    float sum = 0.0f;
#pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < k; i++)
        sum += a[i] * b[i];
    return sum;
}

/* The kernels for weights of `type` on path `isa`, for batches of n tokens; 0 if none. */
static int zd_matmul_kernel(int type, int isa, int64_t n, zd_kernel *kn) {
    const zd_tile_fn interleaved = zd_x16_kernel(type, isa);
    const zd_tile_fn whole = interleaved ? interleaved : zd_panel_kernel(type, isa, n);
    if (whole) {
        kn->R = interleaved ? ZD_X16_ROWS : ZD_PANEL_ROWS;
        kn->T = 1;
        kn->whole = whole;
        return 1;
    }
    const int prefill = n > ZD_DECODE_MAX_N;
    return zd_legacy_kernel(type, isa, prefill, kn) || zd_kq_kernel(type, isa, prefill, kn)
           || zd_float_kernel(type, isa, prefill, kn);
}

/* One matmul of a job list. */
typedef struct {
    zd_kernel kn;
    const uint8_t *w;        /* [m rows of row_bytes] */
    int64_t row_bytes, m;
    const zd_act *x;         /* n tokens, prepared for this weight's type */
    float *out;              /* value (token t, row r) at out[t * ldo + r] */
    int64_t ldo;
    int accumulate;          /* add to out (a residual) instead of storing */
} zd_mm_job;

static void zd_mm_job_init(zd_mm_job *job, int type, int isa, const uint8_t *w, int64_t m, int64_t k,
                           const zd_act *x, float *out, int64_t ldo, int accumulate) {
    zd_matmul_kernel(type, isa, x->n, &job->kn);
    job->w = w;
    job->row_bytes = zd_row_bytes(type, k);
    job->m = m;
    job->x = x;
    job->out = out;
    job->ldo = ldo;
    job->accumulate = accumulate;
}

/* Tiles [lo, hi) of one job, every token. */
static void zd_mm_job_tiles(const zd_mm_job *job, int64_t lo, int64_t hi, float *cbuf) {
    const int R = job->kn.R, T = job->kn.T;
    const int64_t n = job->x->n;
    zd_tile tile;
    tile.row_bytes = job->row_bytes;
    tile.x = job->x;
    tile.ldo = job->ldo;
    tile.accumulate = job->accumulate;
    tile.cbuf = cbuf;
    for (int64_t i = lo; i < hi; i++) {
        const int64_t row = i * R;
        tile.w = job->w + row * job->row_bytes;
        tile.rows = zd_min64(R, job->m - row);
        if (job->kn.whole) {
            tile.t0 = 0;
            tile.nt = n;
            tile.out = job->out + row;
            job->kn.whole(&tile);
            continue;
        }
        for (int64_t t0 = 0; t0 < n; t0 += T) {
            tile.t0 = t0;
            tile.nt = zd_min64(T, n - t0);
            tile.out = job->out + t0 * job->ldo + row;
            job->kn.fn[tile.nt](&tile);
        }
    }
}

/* Weight bytes per chunk of work: small enough that a thread the OS pauses holds up little
 * work, large enough that each thread streams long runs of consecutive bytes. Every chunk
 * starts a new stream the prefetchers must pick up; with 2 threads on this project's Zen 4
 * machine, 48 KB chunks read at ~23 GB/s and 256 KB chunks at ~29 GB/s. */
#ifndef ZD_CHUNK_BYTES
#define ZD_CHUNK_BYTES (256 * 1024)
#endif

static inline int64_t zd_job_tiles(const zd_mm_job *job) { return (job->m + job->kn.R - 1) / job->kn.R; }

/* Tiles per chunk of a job: at least 8 chunks per thread when the job is small. */
static inline int64_t zd_job_chunk(const zd_mm_job *job, int nth) {
    const int64_t tiles = zd_job_tiles(job), tile_bytes = job->kn.R * job->row_bytes;
    const int64_t by_bytes = zd_max64(1, ZD_CHUNK_BYTES / zd_max64(1, tile_bytes));
    const int64_t by_count = zd_max64(1, tiles / (8 * (int64_t)nth));
    return zd_min64(by_bytes, by_count);
}

/* Run the jobs' tiles on the calling thread, chunk by chunk, taking chunks from `next` (shared
 * by the team, zeroed before the team starts) until none is left. Which thread computes a tile
 * changes nothing in its values. `cbuf` is this thread's scratch of zd_cbuf_floats(k) floats
 * for the largest k (corrections, or a prefill panel). */
static void zd_mm_jobs_run(const zd_mm_job *jobs, int njobs, int64_t *next, float *cbuf, int nth) {
    int64_t chunk[8], chunks[8], total = 0;
    for (int i = 0; i < njobs; i++) {
        chunk[i] = zd_job_chunk(&jobs[i], nth);
        chunks[i] = jobs[i].x->n > 0 ? (zd_job_tiles(&jobs[i]) + chunk[i] - 1) / chunk[i] : 0;
        total += chunks[i];
    }
    for (;;) {
        int64_t c = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
        if (c >= total)
            return;
        int i = 0;
        for (; i < njobs - 1 && c >= chunks[i]; i++)
            c -= chunks[i];
        zd_mm_job_tiles(&jobs[i], c * chunk[i], zd_min64(zd_job_tiles(&jobs[i]), (c + 1) * chunk[i]), cbuf);
    }
}

/* Floats of correction scratch one thread needs for rows of up to k values. */
static inline int64_t zd_cbuf_floats(int64_t k) {
    return zd_max64(ZD_TILE_MAX_R * zd_cbuf_stride(k), zd_panel_floats(k) + zd_x16_rows_floats(k));
}

/* out[n, m] = x[n, k] @ W.T in its own parallel region. `act` holds zd_act_bytes(kind, n, k)
 * bytes; `cbuf` nth * zd_cbuf_floats(k) floats. */
static void zd_matmul(int type, int isa, const uint8_t *w, int64_t m, int64_t k, const float *x, int64_t n,
                      float *out, void *act, float *cbuf, int nth) {
    zd_act a;
    const int kind = zd_act_kind(type);
    zd_act_init(&a, kind, n, k, act, isa);
    zd_act_use_floats(&a, x, k);
    zd_mm_job job;
    zd_mm_job_init(&job, type, isa, w, m, k, &a, out, m, 0);
    int64_t next = 0;
    zd_barrier barrier = {0, 0};
#pragma omp parallel num_threads(nth)
    {
        const int ith = zd_thread_num(), team = zd_team_size();
        int sense = 0;
        zd_spans spans = zd_spans_of(n, k / zd_act_block(kind), ith, team);
        int64_t t, b0, b1;
        while (zd_spans_next(&spans, &t, &b0, &b1))
            zd_quantize_blocks(x + t * k, &a, isa, t, b0, b1);
        zd_barrier_wait(&barrier, &sense, team);
        zd_mm_jobs_run(&job, 1, &next, cbuf + ith * zd_cbuf_floats(k), team);
    }
}

#endif
