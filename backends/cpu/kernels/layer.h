/* One whole pre-norm block in one OpenMP parallel region: the fused form of
 * zephyr.backend.Backend.decoder_layer, built from the same kernels as the single ops (so it
 * computes the same values as the ops composed, bit for bit).
 *
 *   h = rms_norm(x) -> q, k, v = h @ Wq.T, Wk.T, Wv.T -> rope(q), rope(k) -> k, v into the cache
 *   -> attention -> x += attn @ Wo.T -> h = rms_norm(x) -> g, u = h @ Wgate.T, Wup.T
 *   -> x += (silu(g) * u) @ Wdown.T
 *
 * The block features of other families are flags and optional weights of the same steps: biases
 * after each matmul, an RMSNorm of every q and k head before RoPE, RoPE scaling (rope.h), a score
 * scale and soft-cap in attention, GELU for SiLU, and a post-norm of each sub-block's output
 * before its residual add (those outputs then go through s->y). Llama's block takes none of them
 * and runs the steps it always ran.
 *
 * Token t of the batch sits at position pos[t] of sequence seq[t] of the cache (zephyr.backend.Batch).
 * Each step is shared out over the team (rows, heads or weight tiles) and ends at a barrier
 * (zd_barrier: yields the CPU while it waits); the residual adds happen in the matmuls' stores.
 * Scratch memory comes from the caller, sized once for the largest batch (see zd_layer_scratch).
 */
#ifndef ZEPHYR_LAYER_H
#define ZEPHYR_LAYER_H

#include <math.h>
#include <string.h>
#include "common.h"
#include "attention.h"
#include "elementwise.h"
#include "matmul.h"
#include "norm.h"
#include "quantize.h"
#include "rope.h"

typedef struct {
    int type;
    const uint8_t *data;     /* rows x row_bytes */
    int64_t rows, cols;
} zd_matrix;

typedef struct {
    const float *attn_norm, *ffn_norm;   /* [d] */
    zd_matrix wq, wk, wv;                /* [h * hd, d], [h_kv * hd, d] x 2 */
    zd_matrix wo;                        /* [d, h * hd] */
    zd_matrix w_gate, w_up;              /* [f, d] */
    zd_matrix w_down;                    /* [d, f] */
    /* Optional (NULL: absent) */
    const float *q_bias, *k_bias, *v_bias;         /* [h * hd], [h_kv * hd] x 2 */
    const float *o_bias, *down_bias;               /* [d] */
    const float *gate_bias, *up_bias;              /* [f] */
    const float *q_norm, *k_norm;                  /* [hd]: each head's RMSNorm before RoPE */
    const float *post_attn_norm, *post_ffn_norm;   /* [d]: each sub-block output's RMSNorm */
} zd_layer_weights;

typedef struct {
    int64_t d, f, n_heads, n_kv_heads, head_dim, window;
    zd_rope rope;
    int rope_neox;
    float rms_eps;
    float attn_scale;     /* of the scores */
    float attn_softcap;   /* > 0: scores capped to (-c, c) */
    int gelu;             /* the FFN's gate is GELU (tanh) rather than SiLU */
} zd_layer_params;

/* Run state for up to n_max tokens; every pointer is caller-owned. */
typedef struct {
    int64_t n_max;
    float *h;                /* [n, max(d, f, h * hd)]: normed input, attention output, silu(g) * u */
    float *q, *q_rot;        /* [n, h * hd] */
    float *k, *v;            /* [n, h_kv * hd] */
    float *gate, *up;        /* [n, f] */
    float *y;                /* [n, d]: a sub-block's output, where it is biased or normed before its residual add */
    float *rope_cos, *rope_sin;   /* [n, rope_dims / 2] */
    int32_t *rope_pos;       /* [n]: the positions the rope tables hold */
    int64_t rope_n;          /* (0: nothing) */
    zd_rope rope;            /* the rotation they hold */
    float *att;              /* [threads, att_stride]: attention scratch (zd_att_scratch_floats) */
    int64_t att_stride;
    zd_att_item *att_items;  /* [zd_att_max_items(n_max, h_kv)] */
    int32_t *att_splits;     /* [n_max] */
    float *att_partial;      /* [n_max, h, ZD_ATT_MAX_SPLITS, hdp + 2] */
    float *cbuf;             /* [threads, zd_cbuf_floats(max(d, f, h * hd))] */
    int64_t cbuf_stride;
    void *act[3];            /* quantised activations, one per kind, each zd_act_bytes of [n, width] */
} zd_layer_scratch;

/* The widest row a layer quantises or keeps in h. */
static inline int64_t zd_layer_width(const zd_layer_params *p) {
    return zd_max64(zd_max64(p->d, p->f), p->n_heads * p->head_dim);
}


/* The units (quantisation blocks) a row of `width` floats is shared out in, for weights that
 * read it with activation kinds `kinds` (a bit set of 1 << ZD_ACT_*). */
static inline int64_t zd_layer_unit(int kinds, int64_t width) {
    if (kinds & (1 << ZD_ACT_Q8_K))
        return 256;
    if (kinds & (1 << ZD_ACT_Q8_0))
        return 32;
    return width;
}

/* Activations of n rows of `src` ([n, width]) for each kind in `kinds`, set up over the
 * scratch buffers (a[kind]). */
static void zd_layer_acts(zd_layer_scratch *s, int kinds, const float *src, int64_t n, int64_t width, int isa,
                          zd_act a[3]) {
    for (int kind = 0; kind < 3; kind++)
        if (kinds & (1 << kind)) {
            zd_act_init(&a[kind], kind, n, width, s->act[kind], isa);
            zd_act_use_floats(&a[kind], src, width);
        }
}

/* Quantise units [u0, u1) of row t of `src` for every kind in `kinds`. */
static void zd_layer_quantize(zd_act a[3], int kinds, const float *row, int isa, int64_t t, int64_t unit,
                              int64_t u0, int64_t u1) {
    for (int kind = ZD_ACT_Q8_0; kind <= ZD_ACT_Q8_K; kind++)
        if (kinds & (1 << kind)) {
            const int64_t per = unit / zd_act_block(kind);
            zd_quantize_blocks(row, &a[kind], isa, t, u0 * per, u1 * per);
        }
}

/* x = rms_norm(x) rows into `out`, quantised for `kinds`, this thread's share. */
static void zd_layer_norm(const float *x, const float *w, float *out, int64_t n, int64_t d, float eps,
                          zd_act a[3], int kinds, int isa, int ith, int nth) {
    const int64_t unit = zd_layer_unit(kinds, d);
    zd_spans spans = zd_spans_of(n, d / unit, ith, nth);
    int64_t t, u0, u1;
    while (zd_spans_next(&spans, &t, &u0, &u1)) {
        const float scale = zd_rms_scale(x + t * d, d, eps);
        zd_rms_apply(x + t * d, w, out + t * d, scale, u0 * unit, u1 * unit);
        zd_layer_quantize(a, kinds, out + t * d, isa, t, unit, u0, u1);
    }
}

static inline int zd_kind_bit(int type) { return 1 << zd_act_kind(type); }

/* The rope tables for positions pos[0..n) (s->rope_*), unless they hold them already: every
 * layer of a forward pass asks for the same ones. Run by one thread, before the parallel region. */
static int zd_layer_rope_ready(zd_layer_scratch *s, const zd_layer_params *p, const int32_t *pos, int64_t n) {
    if (s->rope_n >= n && zd_rope_same(&s->rope, &p->rope)
        && memcmp(s->rope_pos, pos, (size_t)n * sizeof(int32_t)) == 0)
        return 1;
    memcpy(s->rope_pos, pos, (size_t)n * sizeof(int32_t));
    s->rope_n = n;
    s->rope = p->rope;
    return 0;
}

/* x [count] += bias, where there is one. */
static inline void zd_layer_bias(float *ZD_RESTRICT x, const float *ZD_RESTRICT bias, int64_t count) {
    if (bias)
        for (int64_t i = 0; i < count; i++)
            x[i] = x[i] + bias[i];
}

/* One q or k head as RoPE takes it: biased, then normed, in place (`tmp`: hd floats). */
static inline void zd_layer_head(float *head, const float *bias, const float *norm, int64_t hd, float eps,
                                 float *tmp) {
    zd_layer_bias(head, bias, hd);
    if (norm) {
        zd_rms_norm_row(head, norm, tmp, hd, eps);
        memcpy(head, tmp, (size_t)hd * sizeof(float));
    }
}

/* Rotate q into q_rot and k into the cache (with v), per (token, head), each biased and normed
 * first where the block says so: this thread's share. `row`: 2 * hd floats of scratch. */
static void zd_layer_rope_store(const zd_layer_weights *w, const zd_layer_params *p, zd_layer_scratch *s,
                                const zd_kv_layer *cache, const int32_t *pos, const int32_t *seq, int64_t n,
                                float *row, int ith, int nth) {
    const int64_t hd = p->head_dim, half = p->rope.n_rot / 2;
    const int64_t qd = p->n_heads * hd, kvd = p->n_kv_heads * hd;
    float *tmp = row + hd;
    zd_spans spans = zd_spans_of(n, p->n_heads + p->n_kv_heads, ith, nth);
    int64_t t, u0, u1;
    while (zd_spans_next(&spans, &t, &u0, &u1))
        for (int64_t u = u0; u < u1; u++) {
            const float *cos_t = s->rope_cos + t * half, *sin_t = s->rope_sin + t * half;
            if (u < p->n_heads) {
                float *q = s->q + t * qd + u * hd;
                zd_layer_head(q, w->q_bias ? w->q_bias + u * hd : NULL, w->q_norm, hd, p->rms_eps, tmp);
                zd_rope_head(q, s->q_rot + t * qd + u * hd, cos_t, sin_t, hd, p->rope.n_rot, p->rope_neox);
                continue;
            }
            const int64_t kv = u - p->n_heads, at = zd_kv_offset(cache, seq[t], pos[t], kv);
            float *k = s->k + t * kvd + kv * hd, *v = s->v + t * kvd + kv * hd;
            zd_layer_head(k, w->k_bias ? w->k_bias + kv * hd : NULL, w->k_norm, hd, p->rms_eps, tmp);
            zd_layer_bias(v, w->v_bias ? w->v_bias + kv * hd : NULL, hd);
            zd_rope_head(k, row, cos_t, sin_t, hd, p->rope.n_rot, p->rope_neox);
            zd_kv_encode(cache->type, row, hd, cache->k + at);
            zd_kv_encode(cache->type, v, hd, cache->v + at);
        }
}

/* x += y, y [n, d] being a sub-block's output: biased (in place) and normed first where the
 * block says so. This thread's share; the bias step ends at a barrier of the team. */
static void zd_layer_residual(float *y, const float *bias, const float *norm, float *x, int64_t n, int64_t d,
                              float eps, zd_barrier *barrier, int *sense, int ith, int nth) {
    zd_spans spans;
    int64_t t, u0, u1;
    if (bias) {
        spans = zd_spans_of(n, d, ith, nth);
        while (zd_spans_next(&spans, &t, &u0, &u1))
            zd_layer_bias(y + t * d + u0, bias + u0, u1 - u0);
        zd_barrier_wait(barrier, sense, nth);
    }
    spans = zd_spans_of(n, d, ith, nth);
    while (zd_spans_next(&spans, &t, &u0, &u1)) {
        float *ZD_RESTRICT xt = x + t * d;
        const float *ZD_RESTRICT yt = y + t * d;
        if (norm) {
            const float scale = zd_rms_scale(yt, d, eps);
            for (int64_t i = u0; i < u1; i++)
                xt[i] = xt[i] + yt[i] * scale * norm[i];
        } else {
            for (int64_t i = u0; i < u1; i++)
                xt[i] = xt[i] + yt[i];
        }
    }
}

/* x: [n, d] IN/OUT. n <= s->n_max; token t at position pos[t] < n_ctx of sequence seq[t] < n_seqs. */
static void zd_decoder_layer(const zd_layer_weights *w, const zd_layer_params *p, zd_layer_scratch *s,
                             const zd_kv_layer *cache, float *x, const int32_t *pos, const int32_t *seq, int64_t n,
                             int isa, int nth) {
    const int64_t d = p->d, f = p->f, hd = p->head_dim;
    const int64_t qd = p->n_heads * hd, kvd = p->n_kv_heads * hd, half = p->rope.n_rot / 2;
    /* Sub-blocks whose output is biased or normed before the residual add go through s->y; the
     * others' matmuls add into x as they store. */
    const int o_through_y = w->o_bias || w->post_attn_norm, down_through_y = w->down_bias || w->post_ffn_norm;
    const int qkv_kinds = zd_kind_bit(w->wq.type) | zd_kind_bit(w->wk.type) | zd_kind_bit(w->wv.type);
    const int ffn_kinds = zd_kind_bit(w->w_gate.type) | zd_kind_bit(w->w_up.type);
    const int o_kind = zd_kind_bit(w->wo.type), down_kind = zd_kind_bit(w->w_down.type);
    const int rope_ready = zd_layer_rope_ready(s, p, pos, n);
    zd_act a_qkv[3], a_o[3], a_ffn[3], a_down[3];
    zd_mm_job qkv[3], o, gate_up[2], down;

    /* The steps take turns with the same activation buffers (and h). */
    zd_layer_acts(s, qkv_kinds, s->h, n, d, isa, a_qkv);
    zd_layer_acts(s, o_kind, s->h, n, qd, isa, a_o);
    zd_layer_acts(s, ffn_kinds, s->h, n, d, isa, a_ffn);
    zd_layer_acts(s, down_kind, s->h, n, f, isa, a_down);
    zd_mm_job_init(&qkv[0], w->wq.type, isa, w->wq.data, qd, d, &a_qkv[zd_act_kind(w->wq.type)], s->q, qd, 0);
    zd_mm_job_init(&qkv[1], w->wk.type, isa, w->wk.data, kvd, d, &a_qkv[zd_act_kind(w->wk.type)], s->k, kvd, 0);
    zd_mm_job_init(&qkv[2], w->wv.type, isa, w->wv.data, kvd, d, &a_qkv[zd_act_kind(w->wv.type)], s->v, kvd, 0);
    zd_mm_job_init(&o, w->wo.type, isa, w->wo.data, d, qd, &a_o[zd_act_kind(w->wo.type)], o_through_y ? s->y : x, d,
                   !o_through_y);
    zd_mm_job_init(&gate_up[0], w->w_gate.type, isa, w->w_gate.data, f, d, &a_ffn[zd_act_kind(w->w_gate.type)], s->gate, f, 0);
    zd_mm_job_init(&gate_up[1], w->w_up.type, isa, w->w_up.data, f, d, &a_ffn[zd_act_kind(w->w_up.type)], s->up, f, 0);
    zd_mm_job_init(&down, w->w_down.type, isa, w->w_down.data, d, f, &a_down[zd_act_kind(w->w_down.type)],
                   down_through_y ? s->y : x, d, !down_through_y);
    zd_att_job att = {s->q_rot, s->h, pos, seq, n, p->n_heads, p->n_kv_heads, hd, p->window, p->attn_scale,
                      p->attn_softcap, cache, s->att_items, 0, s->att_splits, s->att_partial};
    zd_att_plan(&att);
    int64_t next[5] = {0, 0, 0, 0, 0};   /* work counters: the four matmul steps, attention */

    zd_barrier barrier = {0, 0};

#pragma omp parallel num_threads(nth)
    {
        const int ith = zd_thread_num(), team = zd_team_size();
        float *cbuf = s->cbuf + ith * s->cbuf_stride;
        float *att_scratch = s->att + ith * s->att_stride;
        int sense = 0;
        int64_t t, u0, u1;

        /* 1. attention norm (quantised for Q, K, V); rope angles once per batch position */
        zd_layer_norm(x, w->attn_norm, s->h, n, d, p->rms_eps, a_qkv, qkv_kinds, isa, ith, team);
        if (!rope_ready && half > 0)
            for (int64_t i = n * ith / team; i < n * (ith + 1) / team; i++)
                zd_rope_angles(pos[i], &p->rope, s->rope_cos + i * half, s->rope_sin + i * half);
        zd_barrier_wait(&barrier, &sense, team);
        /* 2. q, k, v */
        zd_mm_jobs_run(qkv, 3, &next[0], cbuf, team);
        zd_barrier_wait(&barrier, &sense, team);
        /* 3. rope q; rope k into the cache and store v there */
        zd_layer_rope_store(w, p, s, cache, pos, seq, n, att_scratch, ith, team);
        zd_barrier_wait(&barrier, &sense, team);
        /* attention into h (split tokens' shares merged after all items are done) */
        zd_att_work(&att, &next[4], att_scratch, isa);
        zd_barrier_wait(&barrier, &sense, team);
        zd_att_merge(&att, ith, team);
        zd_barrier_wait(&barrier, &sense, team);
        {   /* the attention output, quantised for Wo */
            const int64_t o_unit = zd_layer_unit(o_kind, qd);
            zd_spans spans = zd_spans_of(n, qd / o_unit, ith, team);
            while (zd_spans_next(&spans, &t, &u0, &u1))
                zd_layer_quantize(a_o, o_kind, s->h + t * qd, isa, t, o_unit, u0, u1);
        }
        zd_barrier_wait(&barrier, &sense, team);
        /* 4. x += attn @ Wo.T */
        zd_mm_jobs_run(&o, 1, &next[1], cbuf, team);
        zd_barrier_wait(&barrier, &sense, team);
        if (o_through_y) {
            zd_layer_residual(s->y, w->o_bias, w->post_attn_norm, x, n, d, p->rms_eps, &barrier, &sense, ith, team);
            zd_barrier_wait(&barrier, &sense, team);
        }
        /* 5. FFN norm (quantised for gate and up) */
        zd_layer_norm(x, w->ffn_norm, s->h, n, d, p->rms_eps, a_ffn, ffn_kinds, isa, ith, team);
        zd_barrier_wait(&barrier, &sense, team);
        /* 6. gate, up */
        zd_mm_jobs_run(gate_up, 2, &next[2], cbuf, team);
        zd_barrier_wait(&barrier, &sense, team);
        /* 7. silu(gate) * up (or gelu), quantised for Wdown */
        {
            const int64_t unit = zd_layer_unit(down_kind, f);
            zd_spans spans = zd_spans_of(n, f / unit, ith, team);
            while (zd_spans_next(&spans, &t, &u0, &u1)) {
                const int64_t at = t * f + u0 * unit, count = (u1 - u0) * unit;
                zd_layer_bias(s->gate + at, w->gate_bias ? w->gate_bias + u0 * unit : NULL, count);
                zd_layer_bias(s->up + at, w->up_bias ? w->up_bias + u0 * unit : NULL, count);
                zd_glu(s->gate + at, s->up + at, s->h + at, count, p->gelu, isa);
                zd_layer_quantize(a_down, down_kind, s->h + t * f, isa, t, unit, u0, u1);
            }
        }
        zd_barrier_wait(&barrier, &sense, team);
        /* 8. x += ffn @ Wdown.T */
        zd_mm_jobs_run(&down, 1, &next[3], cbuf, team);
        if (down_through_y) {
            zd_barrier_wait(&barrier, &sense, team);
            zd_layer_residual(s->y, w->down_bias, w->post_ffn_norm, x, n, d, p->rms_eps, &barrier, &sense, ith,
                              team);
        }
    }
}

#endif
