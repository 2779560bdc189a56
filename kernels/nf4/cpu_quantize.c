/* The 4-bit quantize on CPU: fp32/bf16/fp16 weight -> packed NF4/FP4 codes + fp32 absmax per block.
 *
 * Bit for bit the twin (qlora/quant/nf4/quantize.py, which mirrors bitsandbytes' CPU quantizer):
 * - absmax = max |w| over the block, NaN if any w is NaN (torch's amax);
 * - a full block is scaled by the fp32 reciprocal 1 / max(absmax, 1e-38f) (one IEEE division, then
 *   one product per element); the partial last block divides by max(absmax, 1e-38f) instead, and
 *   keeps that clamped value as its absmax (the twin's asymmetry, which one ulp at a midpoint shows);
 *   the clamp keeps NaN, as torch.clamp does;
 * - the scaled value is clamped to [-1, 1] (NaN stays NaN), and its sorted position is the count of
 *   the 15 code midpoints strictly below it (torch.bucketize; NaN counts past all 15: position 15);
 * - the code is order[position] (identity for NF4; FP4's sorted-position -> code map, which fixes
 *   which of its two zeros a 0 gets), two per byte, the first element in the high nibble; an odd
 *   element count pads the last byte with the code of 0.0.
 * Callers split the blocks into ranges, one per thread; nothing here allocates or keeps state.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_convert.h" /* and immintrin.h, QLORA_AVX512 where the CPU has AVX-512 F + BW */

#define MAX_BLOCKSIZE 4096

/* torch.clamp(x, min=low): NaN stays NaN. */
static inline float clamp_low(float x, float low) { return x != x ? x : (x < low ? low : x); }

static inline int sorted_position(float scaled, const float *midpoints) {
    int position = 0;
    for (int j = 0; j < 15; ++j) position += midpoints[j] < scaled;
    return scaled != scaled ? 15 : position;
}

static inline float clamp_unit(float x) { return x != x ? x : x < -1.0f ? -1.0f : x > 1.0f ? 1.0f : x; }

/* Blocks [first_block, last_block) of an n-element weight of kind `kind` (OUT_* of native_convert.h)
 * into `packed` ((n + 1) / 2 bytes for the whole weight) and `absmax` (one per block). min_absmax is
 * the fp32 value of the twin's clamp (1e-38, a subnormal), passed by the caller as torch rounds it. */
void qlora_quantize_4bit(const void *weight, int kind, int64_t numel, int64_t blocksize, int64_t first_block,
                         int64_t last_block, const float *midpoints, const uint8_t *order, float min_absmax,
                         uint8_t *packed, float *absmax) {
    float scaled[MAX_BLOCKSIZE + 1];
    uint8_t codes[MAX_BLOCKSIZE + 1];
    uint8_t zero_code = order[sorted_position(0.0f, midpoints)];
#ifdef QLORA_AVX512
    __m512 mids[15];
    for (int j = 0; j < 15; ++j) mids[j] = _mm512_set1_ps(midpoints[j]);
    uint32_t order32[16];
    for (int c = 0; c < 16; ++c) order32[c] = order[c];
    const __m512i order16 = _mm512_loadu_si512(order32);
#endif
    for (int64_t b = first_block; b < last_block; ++b) {
        const int64_t start = b * blocksize;
        const int full = start + blocksize <= numel;
        const int64_t n = full ? blocksize : numel - start;
        /* Load as fp32 and find absmax. */
        float top = 0.0f;
        int nan = 0;
        int64_t i = 0;
#ifdef QLORA_AVX512
        __m512 top16 = _mm512_setzero_ps();
        __mmask16 nan16 = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 x = load16(weight, start + i, kind);
            const __m512 a = _mm512_abs_ps(x);
            nan16 |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
            top16 = _mm512_max_ps(top16, a);
            _mm512_storeu_ps(scaled + i, x);
        }
        top = _mm512_reduce_max_ps(top16);
        nan = nan16 != 0;
#endif
        for (; i < n; ++i) {
            const float x = load_as(weight, start + i, kind);
            const float a = fabsf(x);
            nan |= a != a;
            top = a > top ? a : top;
            scaled[i] = x;
        }
        if (nan) top = NAN;
        const float clamped = clamp_low(top, min_absmax);
        const float reciprocal = 1.0f / clamped;
        absmax[b] = full ? top : clamped;
        /* Scale, clamp, find the code. */
        i = 0;
#ifdef QLORA_AVX512
        const __m512 factor = _mm512_set1_ps(full ? reciprocal : clamped);
        for (; i + 16 <= n; i += 16) {
            __m512 x = _mm512_loadu_ps(scaled + i);
            x = full ? _mm512_mul_ps(x, factor) : _mm512_div_ps(x, factor);
            const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            /* min/max return their second operand for a NaN first: keep NaN lanes NaN, as clamp does. */
            x = _mm512_mask_blend_ps(is_nan, _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f)), x);
            __m512i position = _mm512_setzero_si512();
            for (int j = 0; j < 15; ++j)
                position = _mm512_mask_add_epi32(position, _mm512_cmp_ps_mask(mids[j], x, _CMP_LT_OQ), position,
                                                 _mm512_set1_epi32(1));
            position = _mm512_mask_mov_epi32(position, is_nan, _mm512_set1_epi32(15));
            _mm_storeu_si128((__m128i *)(codes + i), _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(position, order16)));
        }
#endif
        for (; i < n; ++i) {
            const float x = full ? scaled[i] * reciprocal : scaled[i] / clamped;
            codes[i] = order[sorted_position(clamp_unit(x), midpoints)];
        }
        if (n % 2) codes[n] = zero_code; /* only the last block can be odd: blocksize is even */
        /* Two codes per byte, the first in the high nibble. */
        uint8_t *out = packed + start / 2;
        const int64_t bytes = (n + 1) / 2;
        int64_t k = 0;
#ifdef QLORA_AVX512
        for (; k + 16 <= bytes; k += 16) {
            const __m256i pairs = _mm256_loadu_si256((const __m256i *)(codes + 2 * k)); /* 16-bit lanes: first | second << 8 */
            const __m256i byte = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(pairs, _mm256_set1_epi16(0xF)), 4),
                                                 _mm256_srli_epi16(pairs, 8));
            _mm_storeu_si128((__m128i *)(out + k), _mm256_cvtepi16_epi8(byte));
        }
#endif
        for (; k < bytes; ++k) out[k] = (uint8_t)(codes[2 * k] << 4 | codes[2 * k + 1]);
    }
}
