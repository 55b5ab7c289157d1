/* Weight-only GEMV for decode on x86-64 CPUs with AVX2 + FMA: float32 activations, float32
 * accumulation, weights read in their packed form (4-bit codes: 4x fewer bytes than bf16).
 *
 * Why not only torch's _weight_int4pack_mm_for_cpu: it is blocked for GEMM and computes in bf16,
 * which this kind of CPU emulates; this row-by-row GEMV reads the stored words as they are,
 * computes in float32 and measured as fast or faster at batch 1 (BENCHMARKS.md, decode).
 *
 * Layouts are the compressed-tensors ones, so no conversion is needed:
 *   q4: row n is K/2 bytes; byte j holds code 2j (low nibble) and 2j+1 (high nibble), each stored
 *       as u = q + 8 in 0..15.  w[n, k] = (u - 8 - zp[n, g]) * scale[n, g], g = k / group.
 *   q8: row n is K int8 codes, w[n, k] = q * scale[n]  (used for the tied embedding / lm_head).
 * Scales are bfloat16 bit patterns (q4) or float32 (q8). zp may be NULL (symmetric).
 * Requirements (checked by the caller): K % 32 == 0, group % 32 == 0, K % group == 0.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef THREADED_MIN
#define THREADED_MIN (1 << 30)
#endif

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
static void group_sums(const float *x, int64_t K, int64_t group, float *xsum) {
    for (int64_t g = 0; g < K / group; g++) {
        const float *xg = x + g * group;
        __m256 s = _mm256_setzero_ps();
        for (int64_t k = 0; k < group; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xg + k));
        xsum[g] = hsum(s);
    }
}

/* One row of x: y[n] = sum_k x[k] * w[n, k] for rows [n0, n1). Four independent accumulators per
 * group keep the FMA chain latency-free; one horizontal sum per output. */
static void q4_row(const float *x, const float *xsum, int64_t K, const uint8_t *w, int64_t n0,
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
        y[n] = hsum(acc) - offset;
    }
}

/* y (M, N) = x (M, K) @ w.T over the packed 4-bit codes (bias is the caller's). Returns 0, or -1
 * when out of memory. */
int q4_gemv(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *scale,
            const int8_t *zp, int64_t group, float *y, int64_t N) {
    int64_t groups = K / group, chunks = (N + 63) / 64;
    float *xsum = malloc(sizeof(float) * M * groups);  /* once per call, shared by all threads */
    if (!xsum) return -1;
    for (int64_t m = 0; m < M; m++) group_sums(x + m * K, K, group, xsum + m * groups);
    #pragma omp parallel for schedule(static) if (N * K >= THREADED_MIN)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t a = c * 64, b = a + 64 < N ? a + 64 : N;
        for (int64_t m = 0; m < M; m++)
            q4_row(x + m * K, xsum + m * groups, K, w, a, b, scale, zp, group, y + m * N);
    }
    free(xsum);
    return 0;
}

/* y (M, N) = (x @ w.T) * scale per output for int8 codes. */
void q8_gemv(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale, float *y,
             int64_t N) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        #pragma omp parallel for schedule(static) if (N * K >= THREADED_MIN)
        for (int64_t n = 0; n < N; n++) {
            const int8_t *row = w + n * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(row + k));
                __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
                                     _mm256_loadu_ps(xm + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                                     _mm256_loadu_ps(xm + k + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
                                     _mm256_loadu_ps(xm + k + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                                     _mm256_loadu_ps(xm + k + 24), a3);
            }
            float tail = 0.f;
            for (; k < K; k++) tail += xm[k] * (float)row[k];
            __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            y[m * N + n] = scale[n] * (hsum(a) + tail);
        }
    }
}
