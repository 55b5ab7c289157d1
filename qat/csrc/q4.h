/* The 4-bit and int8 row kernels shared by the GEMV (gemv.c) and the fused decode step (decode_step.c).
 * Layout and requirements: see gemv.c. */
#ifndef QAT_Q4_H
#define QAT_Q4_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* A 32-bit word broadcast to 8 lanes -> its 8 nibbles as floats 0..15, nibble i in lane i. */
static inline __m256 nibbles(__m256i word) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), mask));
}

/* Per-group sums of one row of x: the zero-point term of every output uses them. */
static inline void group_sums(const float *x, int64_t K, int64_t group, float *xsum) {
    for (int64_t g = 0; g < K / group; g++) {
        const float *xg = x + g * group;
        __m256 s = _mm256_setzero_ps();
        for (int64_t k = 0; k < group; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xg + k));
        xsum[g] = hsum(s);
    }
}

/* One row of x: y[n - n0] = sum_k x[k] * w[n, k] for rows [n0, n1). Four independent accumulators per
 * group keep the FMA chain latency-free; one horizontal sum per output. */
static inline void q4_row(const float *x, const float *xsum, int64_t K, const uint8_t *w, int64_t n0,
                   int64_t n1, const uint16_t *scale, const int8_t *zp, int64_t group, float *y) {
    int64_t groups = K / group;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * (K / 2);
        const uint16_t *srow = scale + n * groups;
        __m256 acc = _mm256_setzero_ps();
        float offset = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            __m256 d2 = _mm256_setzero_ps(), d3 = _mm256_setzero_ps();
            for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
                /* one 32-bit word = 8 codes in order: broadcast it (a load, no shuffle) and shift
                 * lane i right by 4i */
                const uint32_t *words = (const uint32_t *)(row + k / 2);
                __m256i w0 = _mm256_set1_epi32((int)words[0]), w1 = _mm256_set1_epi32((int)words[1]);
                __m256i w2 = _mm256_set1_epi32((int)words[2]), w3 = _mm256_set1_epi32((int)words[3]);
                d0 = _mm256_fmadd_ps(nibbles(w0), _mm256_loadu_ps(x + k), d0);
                d1 = _mm256_fmadd_ps(nibbles(w1), _mm256_loadu_ps(x + k + 8), d1);
                d2 = _mm256_fmadd_ps(nibbles(w2), _mm256_loadu_ps(x + k + 16), d2);
                d3 = _mm256_fmadd_ps(nibbles(w3), _mm256_loadu_ps(x + k + 24), d3);
            }
            float s = bf16_to_float(srow[g]);
            float shift = 8.f + (zp ? (float)zp[n * groups + g] : 0.f);
            __m256 dot = _mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s), dot, acc);
            offset += s * shift * xsum[g];
        }
        y[n - n0] = hsum(acc) - offset;
    }
}

/* y = (x . row) * scale for one row of int8 codes (the int8 embedding used as head). */
static inline float q8_row(const float *x, int64_t K, const int8_t *row, float scale) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i b = _mm256_loadu_si256((const __m256i *)(row + k));
        __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
                             _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(x + k + 24), a3);
    }
    float tail = 0.f;
    for (; k < K; k++) tail += x[k] * (float)row[k];
    __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    return scale * (hsum(a) + tail);
}

#endif
