/* fp32 -> 16-bit conversions as torch rounds them, and the loads back, shared by the CPU kernels (kernels/native.py
 * builds each .c with this folder on the include path). */
#ifndef QLORA_NATIVE_CONVERT_H
#define QLORA_NATIVE_CONVERT_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QLORA_AVX512 1
#endif

enum { OUT_FP32 = 0, OUT_BF16 = 1, OUT_FP16 = 2 };

/* torch's float -> bfloat16 (c10 round_to_nearest_even): NaN -> 0x7FC0, else round half to even. */
static inline uint16_t bf16_from_float(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if (value != value) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static inline uint16_t fp16_from_float(float value) {
    _Float16 half = (_Float16)value; /* IEEE round to nearest even, as torch's conversion */
    uint16_t bits;
    memcpy(&bits, &half, 2);
    return bits;
}

/* element i of `in`, an array of OUT_* kind, as fp32 (exact: every bf16/fp16 value is an fp32 value). */
static inline float load_as(const void *in, int64_t i, int kind) {
    if (kind == OUT_FP32) return ((const float *)in)[i];
    if (kind == OUT_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)in)[i] << 16;
        float value;
        memcpy(&value, &bits, 4);
        return value;
    }
    _Float16 half;
    memcpy(&half, (const uint16_t *)in + i, 2);
    return (float)half;
}

/* value into element i of `out`, an array of OUT_* kind. */
static inline void store_as(void *out, int64_t i, float value, int kind) {
    if (kind == OUT_FP32) ((float *)out)[i] = value;
    else if (kind == OUT_BF16) ((uint16_t *)out)[i] = bf16_from_float(value);
    else ((uint16_t *)out)[i] = fp16_from_float(value);
}

#ifdef QLORA_AVX512
/* 16 elements of an OUT_* array from element i, as fp32. */
static inline __m512 load16(const void *in, int64_t i, int kind) {
    if (kind == OUT_FP32) return _mm512_loadu_ps((const float *)in + i);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)in + i));
    if (kind == OUT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    return _mm512_cvtph_ps(half);
}

/* 16 fp32 values into an OUT_* array, rounded as bf16_from_float / fp16_from_float do. */
static inline void store16(void *out, int64_t i, __m512 value, int kind) {
    if (kind == OUT_FP32) {
        _mm512_storeu_ps((float *)out + i, value);
        return;
    }
    __m256i half;
    if (kind == OUT_BF16) {
        __m512i bits = _mm512_castps_si512(value);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        half = _mm512_cvtepi32_epi16(rounded);
    } else {
        half = _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), half);
}
#endif
#endif
