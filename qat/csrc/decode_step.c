/* One greedy-decode step of a Llama-style decoder (llama, mistral, qwen2) for a single new token,
 * every decoder layer in one call: RMSNorm, q/k/v, rotary, the KV cache, attention, o, RMSNorm,
 * gate/up, SiLU, down, residuals, all in float32 over 4-bit Linears (q4.h).
 *
 * Why: at batch 1 the torch version of this loop costs ~11 ms per token of SmolLM2-135M in
 * ~1,200 small ops (norms, rotary, attention glue) plus ~40 us of Python per Linear call, about
 * as much as the 4-bit matmuls themselves; here the step is memory-bound on the packed weights.
 * With an int8 head (qat.kernels.embedding) the final norm, the logits and their argmax run here
 * too, so a token is one call. The step is a team job (team.h): per layer, seven phases whose
 * chunks are 64 output rows of the Linears that share an input (q/k/v), the same 64 rows of gate
 * and up with SiLU(gate) * up of them, one kv head of attention, or a whole RMSNorm. Run alone
 * (one thread), chunks are 1024 rows: claims, group sums and commit copies per chunk made the
 * layers ~8% slower at 64 rows (measured on 2 cores, SmolLM2-135M).
 *
 * Layouts: the caches are the torch tensors of qat.serve.decode, (kv_heads, max_len, head_dim) float32;
 * cos/sin are the model's rotary tables for this position, (head_dim,) each; Linear weights are
 * the compressed-tensors words (see gemv.c).
 */
#include <math.h>
#include <stdlib.h>

#include "q4.h"
#include "team.h"

typedef struct {
    const uint8_t *w;      /* (N, K / 2) packed codes */
    const uint16_t *scale; /* (N, K / group) bf16 */
    const int8_t *zp;      /* (N, K / group) or NULL: symmetric */
    const float *bias;     /* (N,) or NULL */
    int64_t K, N, group;
} Q4Linear;

typedef struct {
    Q4Linear q, k, v, o, gate, up, down;
    const float *input_norm, *post_norm; /* RMSNorm weights, (hidden,) */
    float *k_cache, *v_cache;            /* (kv_heads, max_len, head_dim) */
} Q4Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, max_len;
    float eps, attn_scale;
} Q4Config;

typedef struct {
    const int8_t *codes;  /* (vocab, hidden) */
    const float *scale;   /* (vocab,) */
    const float *norm;    /* the final RMSNorm's weight, (hidden,) */
    int64_t vocab;
    float eps;
} Q8Head;

typedef struct {
    float *r, *q, *k, *v, *att, *delta, *g, *best;
} Buffers;

typedef struct {
    const Q4Layer *layers;
    const Q4Config *c;
    const Q8Head *head; /* NULL: the step ends with the decoder's output in h */
    float *h, *buf;
    const float *cos, *sin;
    int64_t *token;
    int64_t n_layers, pos, rows; /* rows: output rows per matvec and head chunk */
} Step;

enum { PRE_ATTN, QKV, ATTN, O, PRE_MLP, GATE_UP, DOWN, FINAL, HEAD, ARGMAX };
#define LAYER_PHASES 7
#define ROWS 64         /* output rows per matvec and head chunk with a team */
#define SOLO_ROWS 1024  /* ... and alone: fewer, longer chunks */

static int64_t blocks(int64_t n, int64_t size) { return (n + size - 1) / size; }

/* Rows [*a, *z) of chunk c when n rows are cut into chunks of `rows`. */
static void span(int64_t c, int64_t rows, int64_t n, int64_t *a, int64_t *z) {
    *a = c * rows;
    *z = *a + rows < n ? *a + rows : n;
}

/* The work buffers in buf (which holds q4_step_buffer_floats floats); returns their size. */
static int64_t layout(const Q4Config *c, int64_t vocab, float *buf, Buffers *b) {
    int64_t d = c->head_dim, sizes[8] = {c->hidden, c->heads * d, c->kv_heads * d,
        c->kv_heads * d, c->heads * d, c->hidden, c->intermediate, 2 * blocks(vocab, ROWS)};
    float **slots[8] = {&b->r, &b->q, &b->k, &b->v, &b->att, &b->delta, &b->g, &b->best};
    int64_t total = 0;
    for (int i = 0; i < 8; i++) {
        if (buf) *slots[i] = buf + total;
        total += sizes[i];
    }
    return total;
}

int64_t q4_step_buffer_floats(const Q4Config *c, int64_t vocab) { return layout(c, vocab, NULL, NULL); }

static int64_t scratch_floats(const Q4Config *c, int64_t rows) {
    int64_t widest = c->hidden > c->intermediate ? c->hidden : c->intermediate;
    int64_t group = c->heads / c->kv_heads;
    return 2 * c->hidden + 2 * rows + widest / 32 + (group + 3) * c->head_dim + c->max_len;
}

/* out = weight * (x / sqrt(mean(x^2) + eps)), in the order of transformers' LlamaRMSNorm. */
static void rms_norm(const float *x, const float *weight, float *out, int64_t n, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

/* x * cos + rotate_half(x) * sin for each head in place; rotate_half(x) = (-x2, x1). */
static void rotary(float *x, int64_t heads, int64_t dim, const float *cos, const float *sin) {
    int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * dim;
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}


/* Softmax attention of one rotated query over the cached positions 0..pos-1 and this token's
 * (key, value) at pos, which are not in the cache yet. */
static void attend(const float *qh, const float *kc, const float *vc, const float *key,
                   const float *value, float *out, float *scores, const Q4Config *c, int64_t pos) {
    int64_t d = c->head_dim;
    float top = -INFINITY, total = 0.f;
    for (int64_t t = 0; t <= pos; t++) {
        const float *kt = t < pos ? kc + t * d : key;
        float s = 0.f;
        for (int64_t i = 0; i < d; i++) s += qh[i] * kt[i];
        scores[t] = s * c->attn_scale;
        top = scores[t] > top ? scores[t] : top;
    }
    for (int64_t t = 0; t <= pos; t++) total += (scores[t] = expf(scores[t] - top));
    for (int64_t i = 0; i < d; i++) out[i] = 0.f;
    for (int64_t t = 0; t <= pos; t++) {
        const float *vt = t < pos ? vc + t * d : value;
        float p = scores[t] / total;
        for (int64_t i = 0; i < d; i++) out[i] += p * vt[i];
    }
}

typedef struct {
    const Q4Linear *lin[3];
    float *y[3];
    int count;
    const float *x;
    int64_t rows;
} Matvecs;

/* The Linears of a matvec phase, which share the input x. */
static Matvecs matvecs_of(const Step *s, const Buffers *b, int64_t layer, int kind) {
    const Q4Layer *L = s->layers + layer;
    switch (kind) {
    case QKV: return (Matvecs){{&L->q, &L->k, &L->v}, {b->q, b->k, b->v}, 3, b->r, s->rows};
    case O: return (Matvecs){{&L->o}, {b->delta}, 1, b->att, s->rows};
    default: return (Matvecs){{&L->down}, {b->delta}, 1, b->g, s->rows};
    }
}

static int64_t matvec_chunks(const Matvecs *m) {
    int64_t n = 0;
    for (int i = 0; i < m->count; i++) n += blocks(m->lin[i]->N, m->rows);
    return n;
}

/* y[n - a] = (x W^T + bias)[n] for rows [a, z) of l; sums: room for x's group sums. */
static void linear_rows(const Q4Linear *l, const float *x, float *sums, int64_t a, int64_t z,
                        float *y) {
    group_sums(x, l->K, l->group, sums);
    q4_row(x, sums, l->K, l->w, a, z, l->scale, l->zp, l->group, y);
    if (l->bias)
        for (int64_t n = a; n < z; n++) y[n - a] += l->bias[n];
}

/* Rows [rows * c', rows * (c' + 1)) of the Linear that chunk c falls in. */
static void matvec_chunk(const Matvecs *m, int64_t c, float *scratch, TeamCommit *out) {
    int i = 0;
    while (c >= blocks(m->lin[i]->N, m->rows)) c -= blocks(m->lin[i++]->N, m->rows);
    const Q4Linear *l = m->lin[i];
    int64_t a, z;
    span(c, m->rows, l->N, &a, &z);
    float *y = scratch;
    linear_rows(l, m->x, scratch + m->rows, a, z, y);
    *out = (TeamCommit){1, {{m->y[i] + a, y, sizeof(float) * (z - a)}}};
}

static void phase_of(const Step *s, int64_t p, int64_t *layer, int *kind) {
    *layer = p / LAYER_PHASES < s->n_layers ? p / LAYER_PHASES : s->n_layers;
    *kind = p < LAYER_PHASES * s->n_layers ? (int)(p % LAYER_PHASES)
        : FINAL + (int)(p - LAYER_PHASES * s->n_layers);
}

static int step_kind(const void *ctx, int64_t p) {
    int64_t layer;
    int kind;
    phase_of(ctx, p, &layer, &kind);
    return kind;
}

static int64_t step_chunks(const void *ctx, int64_t p) {
    const Step *s = ctx;
    const Q4Config *c = s->c;
    Buffers b;
    int64_t layer;
    int kind;
    phase_of(s, p, &layer, &kind);
    layout(c, s->head ? s->head->vocab : 0, s->buf, &b);
    switch (kind) {
    case QKV: case O: case DOWN: {
        Matvecs m = matvecs_of(s, &b, layer, kind);
        return matvec_chunks(&m);
    }
    case GATE_UP: return blocks(c->intermediate, s->rows);
    case ATTN: return c->kv_heads;
    case HEAD: return blocks(s->head->vocab, s->rows);
    default: return 1;
    }
}

/* a better than b for argmax: larger, NaN above everything (torch.argmax); ties keep b. */
static int better(float a, float b) { return isnan(a) ? !isnan(b) : a > b; }

static void step_run(const void *ctx, int64_t p, int64_t chunk, float *scratch, TeamCommit *out) {
    const Step *s = ctx;
    const Q4Config *c = s->c;
    Buffers b;
    int64_t layer, d = c->head_dim, hidden = c->hidden;
    int kind;
    phase_of(s, p, &layer, &kind);
    layout(c, s->head ? s->head->vocab : 0, s->buf, &b);
    const Q4Layer *L = s->layers + layer;
    switch (kind) {
    case PRE_ATTN: case PRE_MLP: case FINAL: { /* h += delta (the last sublayer's), RMSNorm */
        float *h = scratch, *r = scratch + hidden;
        int add = kind != PRE_ATTN || layer > 0;
        for (int64_t i = 0; i < hidden; i++) h[i] = add ? s->h[i] + b.delta[i] : s->h[i];
        int n = 0;
        if (add) out->seg[n++] = (typeof(out->seg[0])){s->h, h, sizeof(float) * hidden};
        if (kind != FINAL || s->head) {
            const float *weight = kind == PRE_ATTN ? L->input_norm : kind == PRE_MLP
                ? L->post_norm : s->head->norm;
            rms_norm(h, weight, r, hidden, kind == FINAL ? s->head->eps : c->eps);
            out->seg[n++] = (typeof(out->seg[0])){b.r, r, sizeof(float) * hidden};
        }
        out->n = n;
        return;
    }
    case QKV: case O: case DOWN: {
        Matvecs m = matvecs_of(s, &b, layer, kind);
        matvec_chunk(&m, chunk, scratch, out);
        return;
    }
    case GATE_UP: { /* rows [a, z) of gate and up, and SiLU(gate) * up of them */
        int64_t a, z;
        span(chunk, s->rows, c->intermediate, &a, &z);
        float *gate = scratch, *up = scratch + s->rows, *sums = up + s->rows;
        linear_rows(&L->gate, b.r, sums, a, z, gate);
        linear_rows(&L->up, b.r, sums, a, z, up);
        for (int64_t i = 0; i < z - a; i++) gate[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
        *out = (TeamCommit){1, {{b.g + a, gate, sizeof(float) * (z - a)}}};
        return;
    }
    case ATTN: { /* kv head `chunk`: rotary, attention of its query heads, its cache entries */
        int64_t group = c->heads / c->kv_heads, g = chunk;
        float *key = scratch, *value = key + d, *qh = value + d, *att = qh + d;
        float *scores = att + group * d;
        memcpy(key, b.k + g * d, sizeof(float) * d);
        rotary(key, 1, d, s->cos, s->sin);
        memcpy(value, b.v + g * d, sizeof(float) * d);
        const float *kc = L->k_cache + g * c->max_len * d, *vc = L->v_cache + g * c->max_len * d;
        for (int64_t j = 0; j < group; j++) {
            memcpy(qh, b.q + (g * group + j) * d, sizeof(float) * d);
            rotary(qh, 1, d, s->cos, s->sin);
            attend(qh, kc, vc, key, value, att + j * d, scores, c, s->pos);
        }
        *out = (TeamCommit){3, {{L->k_cache + (g * c->max_len + s->pos) * d, key, sizeof(float) * d},
                                {L->v_cache + (g * c->max_len + s->pos) * d, value, sizeof(float) * d},
                                {b.att + g * group * d, att, sizeof(float) * group * d}}};
        return;
    }
    case HEAD: { /* the largest logit of `rows` tokens, and which */
        const Q8Head *head = s->head;
        int64_t a, z;
        span(chunk, s->rows, head->vocab, &a, &z);
        int64_t top = a;
        float best = q8_row(b.r, hidden, head->codes + a * hidden, head->scale[a]);
        for (int64_t n = a + 1; n < z; n++) {
            float v = q8_row(b.r, hidden, head->codes + n * hidden, head->scale[n]);
            if (better(v, best)) best = v, top = n;
        }
        scratch[0] = best;
        scratch[1] = (float)top;
        *out = (TeamCommit){1, {{b.best + 2 * chunk, scratch, sizeof(float) * 2}}};
        return;
    }
    default: { /* ARGMAX over the chunks' winners, in order: the first largest logit */
        int64_t n = blocks(s->head->vocab, s->rows), top = 0;
        for (int64_t i = 1; i < n; i++)
            if (better(b.best[2 * i], b.best[2 * top])) top = i;
        int64_t token = (int64_t)b.best[2 * top + 1];
        memcpy(scratch, &token, sizeof token);
        *out = (TeamCommit){1, {{s->token, scratch, sizeof token}}};
        return;
    }
    }
}

/* h (hidden,) <- the decoder's output for the token at position `pos`, whose k and v are written
 * to every layer's cache at `pos`; with a head, *token <- the argmax of its logits (h then holds
 * the decoder's output before the final norm). buf: q4_step_buffer_floats floats. Returns 0, -1
 * when out of memory, -2 when a phase has more chunks than a team job holds. */
int q4_decode_step(const Q4Layer *layers, int64_t n_layers, const Q4Config *c, float *h,
                   int64_t pos, const float *cos, const float *sin, const Q8Head *head,
                   float *buf, int64_t *token, int threads) {
    int64_t rows = threads > 1 ? ROWS : SOLO_ROWS;
    TeamJob job = {step_chunks, step_kind, step_run, LAYER_PHASES * n_layers + (head ? 3 : 1),
                   scratch_floats(c, rows), {0}};
    Step s = {layers, c, head, h, buf, cos, sin, token, n_layers, pos, rows};
    _Static_assert(sizeof(Step) <= TEAM_CONTEXT, "Step must fit a team job's context");
    memcpy(job.ctx, &s, sizeof s);
    for (int64_t p = 0; p < job.phases; p++)
        if (step_chunks(&s, p) > TEAM_MAX_CHUNKS) return -2;
    return team_run(&job, threads);
}
