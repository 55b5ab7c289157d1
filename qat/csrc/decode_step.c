/* One greedy-decode step of a Llama-style decoder (llama, mistral, qwen2) for a single new token,
 * every decoder layer in one call: RMSNorm, q/k/v, rotary, the KV cache, attention, o, RMSNorm,
 * gate/up, SiLU, down, residuals, all in float32 over 4-bit Linears (q4.h).
 *
 * Why: at batch 1 the torch version of this loop costs ~11 ms per token of SmolLM2-135M in
 * ~1,200 small ops (norms, rotary, attention glue) plus ~40 us of Python per Linear call, about
 * as much as the 4-bit matmuls themselves; here the step is memory-bound on the packed weights.
 * Linears that share an input (q/k/v, gate/up) run as one parallel loop over their rows.
 *
 * Layouts: the caches are the torch tensors of qat.serve.decode, (kv_heads, max_len, head_dim) float32;
 * cos/sin are the model's rotary tables for this position, (head_dim,) each; Linear weights are
 * the compressed-tensors words (see gemv.c).
 */
#include <math.h>
#include <stdlib.h>

#include "q4.h"

#ifndef THREADED_MIN
#define THREADED_MIN (1 << 30)
#endif

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

#define MAX_SHARED 3 /* Linears fed the same input in one parallel loop (q/k/v) */

/* y_i = W_i x (+ b_i) for up to MAX_SHARED Linears with the same input, one loop over all rows. */
static void matvecs(const Q4Linear *const *lin, float *const *y, int count, const float *x,
                    float *xsum) {
    int64_t first[MAX_SHARED + 1], work = 0;
    float *sums[MAX_SHARED];
    first[0] = 0;
    for (int i = 0; i < count; i++) {
        first[i + 1] = first[i] + (lin[i]->N + 63) / 64;
        sums[i] = xsum + i * (lin[i]->K / 32);
        group_sums(x, lin[i]->K, lin[i]->group, sums[i]);
        work += lin[i]->N * lin[i]->K;
    }
    #pragma omp parallel for schedule(static) if (work >= THREADED_MIN)
    for (int64_t c = 0; c < first[count]; c++) {
        int i = 0;
        while (c >= first[i + 1]) i++;
        const Q4Linear *l = lin[i];
        int64_t a = (c - first[i]) * 64, b = a + 64 < l->N ? a + 64 : l->N;
        q4_row(x, sums[i], l->K, l->w, a, b, l->scale, l->zp, l->group, y[i]);
    }
    for (int i = 0; i < count; i++)
        if (lin[i]->bias)
            for (int64_t n = 0; n < lin[i]->N; n++) y[i][n] += lin[i]->bias[n];
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

/* Softmax attention of one query per head over positions 0..len-1 of the cache (grouped-query:
 * heads / kv_heads query heads read each cached head). */
static void attention(const float *q, const float *k_cache, const float *v_cache, float *out,
                      float *scores, const Q4Config *c, int64_t len) {
    int64_t group = c->heads / c->kv_heads, d = c->head_dim;
    for (int64_t h = 0; h < c->heads; h++) {
        const float *qh = q + h * d;
        const float *kc = k_cache + (h / group) * c->max_len * d;
        const float *vc = v_cache + (h / group) * c->max_len * d;
        float top = -INFINITY, total = 0.f;
        for (int64_t t = 0; t < len; t++) {
            float s = 0.f;
            for (int64_t i = 0; i < d; i++) s += qh[i] * kc[t * d + i];
            scores[t] = s * c->attn_scale;
            top = scores[t] > top ? scores[t] : top;
        }
        for (int64_t t = 0; t < len; t++) total += (scores[t] = expf(scores[t] - top));
        float *oh = out + h * d;
        for (int64_t i = 0; i < d; i++) oh[i] = 0.f;
        for (int64_t t = 0; t < len; t++) {
            float p = scores[t] / total;
            for (int64_t i = 0; i < d; i++) oh[i] += p * vc[t * d + i];
        }
    }
}

/* h (hidden,) <- the decoder's output for the token at position `pos`, whose k and v are written
 * to every layer's cache at `pos`. Returns 0, or -1 when out of memory. */
int q4_decode_step(const Q4Layer *layers, int64_t n_layers, const Q4Config *c, float *h,
                   int64_t pos, const float *cos, const float *sin) {
    int64_t d = c->head_dim, kv = c->kv_heads * d, widest = c->hidden > c->intermediate
        ? c->hidden : c->intermediate;
    int64_t size = c->hidden * 2 + c->heads * d * 2 + kv * 2 + c->intermediate * 2 + c->max_len
        + MAX_SHARED * (widest / 32);
    float *buf = malloc(sizeof(float) * size);
    if (!buf) return -1;
    float *r = buf, *delta = r + c->hidden, *q = delta + c->hidden, *att = q + c->heads * d;
    float *k = att + c->heads * d, *v = k + kv, *gate = v + kv, *up = gate + c->intermediate;
    float *scores = up + c->intermediate, *xsum = scores + c->max_len;
    for (int64_t l = 0; l < n_layers; l++) {
        const Q4Layer *L = layers + l;
        rms_norm(h, L->input_norm, r, c->hidden, c->eps);
        const Q4Linear *qkv[3] = {&L->q, &L->k, &L->v};
        float *qkv_out[3] = {q, k, v};
        matvecs(qkv, qkv_out, 3, r, xsum);
        rotary(q, c->heads, d, cos, sin);
        rotary(k, c->kv_heads, d, cos, sin);
        for (int64_t g = 0; g < c->kv_heads; g++) {
            memcpy(L->k_cache + (g * c->max_len + pos) * d, k + g * d, sizeof(float) * d);
            memcpy(L->v_cache + (g * c->max_len + pos) * d, v + g * d, sizeof(float) * d);
        }
        attention(q, L->k_cache, L->v_cache, att, scores, c, pos + 1);
        const Q4Linear *o[1] = {&L->o};
        float *o_out[1] = {delta};
        matvecs(o, o_out, 1, att, xsum);
        for (int64_t i = 0; i < c->hidden; i++) h[i] += delta[i];
        rms_norm(h, L->post_norm, r, c->hidden, c->eps);
        const Q4Linear *gu[2] = {&L->gate, &L->up};
        float *gu_out[2] = {gate, up};
        matvecs(gu, gu_out, 2, r, xsum);
        for (int64_t i = 0; i < c->intermediate; i++)
            gate[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
        const Q4Linear *down[1] = {&L->down};
        float *down_out[1] = {delta};
        matvecs(down, down_out, 1, gate, xsum);
        for (int64_t i = 0; i < c->hidden; i++) h[i] += delta[i];
    }
    free(buf);
    return 0;
}
