/* The fused 8-bit AdamW step on CPU: one pass per quantization block decodes both moments, updates
 * them and the parameter in fp32 and re-quantizes the moments with the block's fresh absmax.
 *
 * Bit for bit the twin (kernels/optim/reference.py) as torch's CPU kernels compute it, codes, absmax
 * and parameter alike; the roundings, in the twin's order (built with -ffp-contract=off, so the only
 * fused multiply-adds are the explicit fmaf calls, where torch's own kernels fuse):
 * - decode: code[q] * absmax, one fp32 product;
 * - m.lerp_(g, w): torch's vector lerp, fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g);
 * - v.mul_(beta2).addcmul_(g, g, value=c): v * beta2 rounded, then fma(c * g, g, that);
 * - p * decay, then p + (step_size * m) / (sqrt(v) / bias_correction2_sqrt + eps): IEEE divisions,
 *   each rounded (torch's addcdiv is self + value * t1 / t2, left to right), and torch's own square
 *   root (vector_sqrt below);
 * - re-quantize: absmax = max |x| (NaN if any x is NaN, as amax), x / (absmax if > 0 else 1) by true
 *   division, and the code index is torch.bucketize's: the count of midpoints strictly below it
 *   (NaN -> 255, past every midpoint).
 * Callers split the blocks into ranges, one per thread; nothing here allocates or keeps state.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_convert.h"

#define MAX_BLOCKSIZE 4096

/* torch's fp32 square root where it is not the IEEE one: torch built with MKL computes Tensor.sqrt
 * with MKL's vmsSqrt (high-accuracy mode, within 1 ulp, not correctly rounded: 16% of uniform
 * inputs land one ulp off). The caller passes that function from torch's own library, so the
 * parameter is torch's bits; NULL means torch's sqrt is the IEEE one (sqrtf). */
typedef void (*vector_sqrt)(int n, const float *in, float *out, int64_t mode);

typedef struct {
    float lerp_weight, beta2, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps;
    int lerp_from_end;
    vector_sqrt sqrt_fn;
    int64_t sqrt_mode;
} Hyper;

/* The nearest code's index by table instead of an 8-step binary search over the midpoints (which
 * cost 88% of the step: 16 dependent gathers per 16 elements). A float's bits, sign-folded, order
 * like the float; the top bits of that key name a bucket of [-1, 1] (2^shift keys each), and per
 * bucket `first` holds the count of midpoints below the bucket's smallest value and `threshold`
 * the next midpoint (midpoints[first]). Buckets are made fine enough (cpu.py, nearest_table) that at
 * most `1 + extra` midpoints fall inside one, so the count below x is first + [threshold < x] +
 * [midpoints[first + j] < x] for j = 1..extra: exactly torch.bucketize's answer, in two independent
 * gathers per 16 values for the dynamic maps (extra = 0). */
typedef struct {
    const uint8_t *first;    /* per bucket, padded with 3 bytes (read as 32-bit lanes) */
    const float *threshold;  /* per bucket */
    const float *midpoints;  /* 255 midpoints, then +inf up to index 256 + extra */
    int64_t buckets;
    int shift, extra;
} NearestTable;

#define KEY_OFFSET 0x3F800001 /* minus the key of -1.0f: keys of [-1, 1] become [0, 0x7F000001] */

static inline int nearest_code(float x, const NearestTable *t) {
    if (x != x) return 255; /* torch.bucketize sorts NaN past every midpoint */
    int32_t bits;
    memcpy(&bits, &x, 4);
    const int64_t key = (int64_t)(bits ^ ((bits >> 31) & 0x7FFFFFFF)) + KEY_OFFSET;
    int64_t bucket = key >> t->shift;
    bucket = bucket < 0 ? 0 : bucket >= t->buckets ? t->buckets - 1 : bucket; /* |x| <= 1: never clamps */
    const int first = t->first[bucket];
    int index = first + (t->threshold[bucket] < x);
    for (int j = 1; j <= t->extra; ++j) index += t->midpoints[first + j] < x;
    return index;
}

/* max |x| over n values; NaN if any is NaN. */
static inline float absmax_of(const float *x, int64_t n) {
    float best = 0.0f;
    int nan = 0;
    int64_t i = 0;
#ifdef QLORA_AVX512
    __m512 best16 = _mm512_setzero_ps();
    __mmask16 nan16 = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        nan16 |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        best16 = _mm512_max_ps(best16, a);
    }
    best = _mm512_reduce_max_ps(best16);
    nan = nan16 != 0;
#endif
    for (; i < n; ++i) {
        float a = fabsf(x[i]);
        nan |= a != a;
        best = a > best ? a : best;
    }
    return nan ? NAN : best;
}

static inline void quantize_block(const float *x, int64_t n, const NearestTable *t, uint8_t *codes, float *absmax) {
    const float top = absmax_of(x, n);
    const float divisor = top > 0.0f ? top : 1.0f; /* false for 0 and NaN: an all-zero block keeps code 0's place */
    int64_t i = 0;
#ifdef QLORA_AVX512
    const __m512 divisor16 = _mm512_set1_ps(divisor);
    const __m512i one = _mm512_set1_epi32(1), fold = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i last_bucket = _mm512_set1_epi32((int)t->buckets - 1);
    for (; i + 16 <= n; i += 16) {
        const __m512 scaled = _mm512_div_ps(_mm512_loadu_ps(x + i), divisor16);
        const __m512i bits = _mm512_castps_si512(scaled);
        const __m512i key = _mm512_add_epi32(_mm512_xor_si512(bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), fold)),
                                             _mm512_set1_epi32(KEY_OFFSET));
        /* NaN keys wrap past int32: clamped here, replaced by 255 below. */
        const __m512i bucket = _mm512_min_epi32(_mm512_max_epi32(_mm512_srai_epi32(key, t->shift), _mm512_setzero_si512()),
                                                last_bucket);
        const __m512i first = _mm512_and_si512(_mm512_i32gather_epi32(bucket, t->first, 1), _mm512_set1_epi32(0xFF));
        const __m512 threshold = _mm512_i32gather_ps(bucket, t->threshold, 4);
        __m512i index = _mm512_mask_add_epi32(first, _mm512_cmp_ps_mask(threshold, scaled, _CMP_LT_OQ), first, one);
        for (int j = 1; j <= t->extra; ++j) {
            __m512 probe = _mm512_i32gather_ps(_mm512_add_epi32(first, _mm512_set1_epi32(j)), t->midpoints, 4);
            index = _mm512_mask_add_epi32(index, _mm512_cmp_ps_mask(probe, scaled, _CMP_LT_OQ), index, one);
        }
        index = _mm512_mask_mov_epi32(index, _mm512_cmp_ps_mask(scaled, scaled, _CMP_UNORD_Q), _mm512_set1_epi32(255));
        _mm_storeu_si128((__m128i *)(codes + i), _mm512_cvtepi32_epi8(index));
    }
#endif
    for (; i < n; ++i) codes[i] = (uint8_t)nearest_code(x[i] / divisor, t);
    *absmax = top;
}


/* One block of n elements from offset `start`. Inlined with constant dtype kinds, so each of the nine
 * (param, grad) combinations gets its own loop. */
static inline __attribute__((always_inline)) void step_block(
    void *param, const void *grad, uint8_t *exp_avg, float *exp_avg_absmax, uint8_t *exp_avg_sq,
    float *exp_avg_sq_absmax, const float *signed_code, const float *unsigned_code, const NearestTable *signed_table,
    const NearestTable *unsigned_table, int64_t block, int64_t start, int64_t n, const Hyper *h, const int param_kind,
    const int grad_kind) {
    float m[MAX_BLOCKSIZE], v[MAX_BLOCKSIZE], root[MAX_BLOCKSIZE];
    const float m_scale = exp_avg_absmax[block], v_scale = exp_avg_sq_absmax[block];
    const float lerp_weight = h->lerp_weight, lerp_coeff = h->lerp_weight - 1.0f, beta2 = h->beta2;
    const float one_minus_beta2 = h->one_minus_beta2, decay = h->decay, step_size = h->step_size;
    const float bias_correction2_sqrt = h->bias_correction2_sqrt, eps = h->eps;
    const uint8_t *m_codes = exp_avg + start, *v_codes = exp_avg_sq + start;
    /* The moments: decode, lerp, mul + addcmul. */
    int64_t i = 0;
#ifdef QLORA_AVX512
    for (; i + 16 <= n; i += 16) {
        const __m512 g = load16(grad, start + i, grad_kind);
        __m512 mi = _mm512_mul_ps(_mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(m_codes + i))),
                                                      signed_code, 4), _mm512_set1_ps(m_scale));
        __m512 vi = _mm512_mul_ps(_mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(v_codes + i))),
                                                      unsigned_code, 4), _mm512_set1_ps(v_scale));
        const __m512 diff = _mm512_sub_ps(g, mi);
        mi = h->lerp_from_end ? _mm512_fmadd_ps(_mm512_set1_ps(lerp_coeff), diff, g)
                              : _mm512_fmadd_ps(_mm512_set1_ps(lerp_weight), diff, mi);
        vi = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(one_minus_beta2), g), g,
                             _mm512_mul_ps(vi, _mm512_set1_ps(beta2)));
        _mm512_storeu_ps(m + i, mi);
        _mm512_storeu_ps(v + i, vi);
    }
#endif
    for (; i < n; ++i) {
        const float g = load_as(grad, start + i, grad_kind);
        float mi = signed_code[m_codes[i]] * m_scale;
        float vi = unsigned_code[v_codes[i]] * v_scale;
        m[i] = h->lerp_from_end ? fmaf(lerp_coeff, g - mi, g) : fmaf(lerp_weight, g - mi, mi);
        v[i] = fmaf(one_minus_beta2 * g, g, vi * beta2);
    }
    if (h->sqrt_fn) {
        h->sqrt_fn((int)n, v, root, h->sqrt_mode);
    } else {
        for (i = 0; i < n; ++i) root[i] = sqrtf(v[i]);
    }
    /* The parameter: p * decay + (step_size * m) / (root / bias_correction2_sqrt + eps). */
    i = 0;
#ifdef QLORA_AVX512
    for (; i + 16 <= n; i += 16) {
        const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_loadu_ps(root + i), _mm512_set1_ps(bias_correction2_sqrt)),
                                           _mm512_set1_ps(eps));
        const __m512 p = _mm512_mul_ps(load16(param, start + i, param_kind), _mm512_set1_ps(decay));
        const __m512 update = _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(step_size), _mm512_loadu_ps(m + i)), denom);
        store16(param, start + i, _mm512_add_ps(p, update), param_kind);
    }
#endif
    for (; i < n; ++i) {
        const float denom = root[i] / bias_correction2_sqrt + eps;
        const float p = load_as(param, start + i, param_kind) * decay;
        store_as(param, start + i, p + step_size * m[i] / denom, param_kind);
    }
    quantize_block(m, n, signed_table, exp_avg + start, exp_avg_absmax + block);
    quantize_block(v, n, unsigned_table, exp_avg_sq + start, exp_avg_sq_absmax + block);
}

/* Blocks [first_block, last_block) of an n-element parameter. param_kind / grad_kind: OUT_* of
 * native_convert.h. lerp_from_end: torch.lerp's switch for a weight >= 0.5 (computed by the caller
 * on the fp32 weight, as torch does). blocksize <= MAX_BLOCKSIZE (checked by the caller). sqrt_fn, sqrt_mode:
 * torch's square root (vector_sqrt above), or NULL for sqrtf. */
void qlora_adamw8bit_step(void *param, int param_kind, const void *grad, int grad_kind, uint8_t *exp_avg,
                          float *exp_avg_absmax, uint8_t *exp_avg_sq, float *exp_avg_sq_absmax,
                          const float *signed_code, const float *unsigned_code, const uint8_t *signed_first,
                          const float *signed_threshold, const float *signed_midpoints, int64_t signed_buckets,
                          int signed_shift, int signed_extra, const uint8_t *unsigned_first,
                          const float *unsigned_threshold, const float *unsigned_midpoints, int64_t unsigned_buckets,
                          int unsigned_shift, int unsigned_extra, int64_t numel, int64_t blocksize, int64_t first_block,
                          int64_t last_block, float lerp_weight, int lerp_from_end, float beta2,
                          float one_minus_beta2, float decay, float step_size, float bias_correction2_sqrt,
                          float eps, vector_sqrt sqrt_fn, int64_t sqrt_mode) {
    const Hyper h = {lerp_weight, beta2, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps, lerp_from_end,
                     sqrt_fn, sqrt_mode};
    const NearestTable signed_table = {signed_first, signed_threshold, signed_midpoints, signed_buckets, signed_shift,
                                       signed_extra};
    const NearestTable unsigned_table = {unsigned_first, unsigned_threshold, unsigned_midpoints, unsigned_buckets,
                                         unsigned_shift, unsigned_extra};
    for (int64_t b = first_block; b < last_block; ++b) {
        const int64_t start = b * blocksize;
        const int64_t n = start + blocksize < numel ? blocksize : numel - start;
#define STEP(P, G)                                                                                          \
    step_block(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_code, unsigned_code, \
               &signed_table, &unsigned_table, b, start, n, &h, P, G)
        switch (param_kind * 3 + grad_kind) {
        case OUT_FP32 * 3 + OUT_FP32: STEP(OUT_FP32, OUT_FP32); break;
        case OUT_FP32 * 3 + OUT_BF16: STEP(OUT_FP32, OUT_BF16); break;
        case OUT_FP32 * 3 + OUT_FP16: STEP(OUT_FP32, OUT_FP16); break;
        case OUT_BF16 * 3 + OUT_FP32: STEP(OUT_BF16, OUT_FP32); break;
        case OUT_BF16 * 3 + OUT_BF16: STEP(OUT_BF16, OUT_BF16); break;
        case OUT_BF16 * 3 + OUT_FP16: STEP(OUT_BF16, OUT_FP16); break;
        case OUT_FP16 * 3 + OUT_FP32: STEP(OUT_FP16, OUT_FP32); break;
        case OUT_FP16 * 3 + OUT_BF16: STEP(OUT_FP16, OUT_BF16); break;
        default: STEP(OUT_FP16, OUT_FP16); break;
        }
#undef STEP
    }
}
