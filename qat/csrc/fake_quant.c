/* Fused fake quantization for QAT on CPU: one pass over the weight instead of torch's four to
 * six elementwise passes (each a full read and write of every weight).
 *
 * The weight is viewed as (groups, size) rows, each with one scale s and zero point z (z absent:
 * symmetric). The math is torch's, op for op and in the same order, so results are bit-identical:
 *   v = w / s + z;  q = clamp(round_half_even(v), qmin, qmax);  w_hat = (q - z) * s
 * and the straight-through gradient keeps dL/dw_hat where clamp(v) == v, else 0.
 * Compiled with -ffp-contract=off: no fused multiply-adds may change the rounding.
 */
#include <math.h>
#include <immintrin.h>
#include <stdint.h>

/* v = w / s + z for 8 weights (z absent: symmetric), as torch computes it. */
static inline __m256 position8(const float *w, __m256 s, __m256 z, int has_zp) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(w), s);
    return has_zp ? _mm256_add_ps(v, z) : v;
}

static inline float position1(float w, float s, const float *zp) {
    float v = w / s;
    return zp ? v + *zp : v;
}

void fq_forward(const float *w, float *out, const float *scale, const float *zp, int64_t groups,
                int64_t size, float qmin, float qmax) {
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const __m256 s = _mm256_set1_ps(scale[g]), z = _mm256_set1_ps(zp ? zp[g] : 0.f);
        const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
        const float *src = w + g * size;
        float *dst = out + g * size;
        int64_t k = 0;
        for (; k + 8 <= size; k += 8) {
            __m256 v = position8(src + k, s, z, zp != 0);
            __m256 q = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
            if (zp) q = _mm256_sub_ps(q, z);
            _mm256_storeu_ps(dst + k, _mm256_mul_ps(q, s));
        }
        for (; k < size; k++) {
            float v = position1(src[k], scale[g], zp ? zp + g : 0);
            __m128 r = _mm_round_ss(_mm_setzero_ps(), _mm_set_ss(v),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            float q = _mm_cvtss_f32(r);
            q = q < qmin ? qmin : (q > qmax ? qmax : q);
            if (zp) q -= zp[g];
            dst[k] = q * scale[g];
        }
    }
}

/* grad[i] = grad[i] where qmin <= w / s + z <= qmax, else 0 (in place). */
void fq_mask_grad(const float *w, float *grad, const float *scale, const float *zp,
                  int64_t groups, int64_t size, float qmin, float qmax) {
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const __m256 s = _mm256_set1_ps(scale[g]), z = _mm256_set1_ps(zp ? zp[g] : 0.f);
        const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
        const float *src = w + g * size;
        float *dst = grad + g * size;
        int64_t k = 0;
        for (; k + 8 <= size; k += 8) {
            __m256 v = position8(src + k, s, z, zp != 0);
            __m256 inside = _mm256_and_ps(_mm256_cmp_ps(v, lo, _CMP_GE_OQ),
                                          _mm256_cmp_ps(v, hi, _CMP_LE_OQ));
            _mm256_storeu_ps(dst + k, _mm256_and_ps(_mm256_loadu_ps(dst + k), inside));
        }
        for (; k < size; k++) {
            float v = position1(src[k], scale[g], zp ? zp + g : 0);
            if (!(v >= qmin && v <= qmax)) dst[k] = 0.f;
        }
    }
}

/* lo[g], hi[g] = min and max of each group, in one pass (torch's amin and amax are two). A group
 * holding a NaN gets NaN for both, as torch gives. */
void fq_minmax(const float *w, float *lo, float *hi, int64_t groups, int64_t size) {
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const float *src = w + g * size;
        float mn = src[0], mx = src[0];
        int nan = 0;
        int64_t k = 0;
        if (size >= 8) {
            __m256 vmin = _mm256_loadu_ps(src), vmax = vmin;
            __m256 bad = _mm256_cmp_ps(vmin, vmin, _CMP_UNORD_Q);
            for (k = 8; k + 8 <= size; k += 8) {
                __m256 v = _mm256_loadu_ps(src + k);
                vmin = _mm256_min_ps(vmin, v);
                vmax = _mm256_max_ps(vmax, v);
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            }
            float a[8], b[8];
            _mm256_storeu_ps(a, vmin);
            _mm256_storeu_ps(b, vmax);
            mn = a[0], mx = b[0];
            for (int i = 1; i < 8; i++) {
                mn = a[i] < mn ? a[i] : mn;
                mx = b[i] > mx ? b[i] : mx;
            }
            nan = _mm256_movemask_ps(bad) != 0;
        }
        for (; k < size; k++) {
            float v = src[k];
            nan |= v != v;
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        lo[g] = nan ? NAN : mn;
        hi[g] = nan ? NAN : mx;
    }
}

/* Frozen integer codes (optim.trainable=scales) in one pass, per group of `size` codes with one
 * scale s and zero point z (z absent: symmetric), q the code's value:
 *   mode 0: out = (q - z) * s        the dequantized weight
 *   mode 1: out = out * (q - z)      in place: dL/dw_hat times the code, before dL/ds's group sum
 * codes: int8 values (packed = 0), or two per byte (packed = 1), low nibble first, each stored as
 * q - code_min. Torch's ops in torch's order (q as float, then - z, then * s), so bit-identical
 * to ste._dequantize_codes; packed groups have an even size. */
static inline void codes16(const uint8_t *src, __m256 offset, __m256 *a, __m256 *b) {
    const __m128i nib = _mm_set1_epi8(0x0f);
    __m128i bytes = _mm_loadl_epi64((const __m128i *)src);
    __m128i lo = _mm_and_si128(bytes, nib), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
    __m128i both = _mm_unpacklo_epi8(lo, hi);  /* code 2i, code 2i+1, ... */
    *a = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(both)), offset);
    *b = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(both, 8))), offset);
}

static inline __m256 apply8(__m256 q, __m256 s, __m256 z, int has_zp, int mode, float *dst) {
    if (has_zp) q = _mm256_sub_ps(q, z);
    return mode == 0 ? _mm256_mul_ps(q, s) : _mm256_mul_ps(_mm256_loadu_ps(dst), q);
}

void fq_codes(const uint8_t *codes, int packed, float *out, const float *scale, const float *zp,
              int64_t groups, int64_t size, float code_min, int mode) {
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const __m256 s = _mm256_set1_ps(scale ? scale[g] : 1.f), z = _mm256_set1_ps(zp ? zp[g] : 0.f);
        const __m256 offset = _mm256_set1_ps(code_min);
        float *dst = out + g * size;
        int64_t k = 0;
        if (packed) {
            const uint8_t *src = codes + g * (size / 2);
            for (; k + 16 <= size; k += 16) {
                __m256 a, b;
                codes16(src + k / 2, offset, &a, &b);
                _mm256_storeu_ps(dst + k, apply8(a, s, z, zp != 0, mode, dst + k));
                _mm256_storeu_ps(dst + k + 8, apply8(b, s, z, zp != 0, mode, dst + k + 8));
            }
        } else {
            const int8_t *src = (const int8_t *)codes + g * size;
            for (; k + 8 <= size; k += 8) {
                __m128i c = _mm_loadl_epi64((const __m128i *)(src + k));
                __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
                _mm256_storeu_ps(dst + k, apply8(q, s, z, zp != 0, mode, dst + k));
            }
        }
        for (; k < size; k++) {
            float q = packed ? (float)((codes[g * (size / 2) + k / 2] >> (4 * (k & 1))) & 15) + code_min
                             : (float)((const int8_t *)codes)[g * size + k];
            if (zp) q -= zp[g];
            dst[k] = mode == 0 ? q * scale[g] : dst[k] * q;
        }
    }
}
