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
#include <omp.h>
#include <stdlib.h>

#include "q4.h"

/* The OpenMP team size of the parallel loops here, for the calling thread: the decode loop drops to
 * one thread when other processes hold the cores (qat.kernels.threads). The decode step
 * (decode_step.c) runs on its own team instead (team.c), sized per call. */
void qat_set_threads(int n) { omp_set_num_threads(n > 0 ? n : 1); }
int qat_max_threads(void) { return omp_get_max_threads(); }

#ifndef THREADED_MIN
#define THREADED_MIN (1 << 30)
#endif

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
            q4_row(x + m * K, xsum + m * groups, K, w, a, b, scale, zp, group, y + m * N + a);
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
        for (int64_t n = 0; n < N; n++) y[m * N + n] = q8_row(xm, K, w + n * K, scale[n]);
    }
}
