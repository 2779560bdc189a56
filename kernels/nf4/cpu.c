/* The 4-bit decode on CPU: packed NF4/FP4 bytes (+ double-quantized absmax) -> fp32/bf16/fp16.
 *
 * Bit for bit the twin's arithmetic (kernels/nf4/reference.py): the scale of a block is
 * nested_code[q] * nested_absmax[j] + offset (two fp32 roundings, no FMA: built with
 * -ffp-contract=off), an element is code[nibble] * scale in fp32, then one round to nearest even
 * into the output dtype. Per block the 16 products are made once and converted once (a 16-entry
 * table), so each byte costs two table loads and one 4-byte store (bf16/fp16) instead of two
 * decodes, two multiplies and two conversions. Callers split the work into block ranges, one per
 * thread; nothing here allocates or keeps state.
 */
#include <stdint.h>
#include <string.h>

#include "native_convert.h" /* and immintrin.h, QLORA_AVX512 where the CPU has AVX-512 F + BW */

/* fp32 scales of blocks [first, last): nested_code[q] * nested_absmax[b / nested_blocksize] + offset. */
void qlora_decode_absmax(const uint8_t *codes, const float *nested_code, const float *nested_absmax, float offset,
                         int64_t nested_blocksize, int64_t first, int64_t last, float *out) {
    for (int64_t b = first; b < last; ++b) {
        float scaled = nested_code[codes[b]] * nested_absmax[b / nested_blocksize];
        out[b] = scaled + offset;
    }
}

/* Elements of blocks [first_block, last_block) of an n-element weight into `out` (kind OUT_*). */
void qlora_dequantize_4bit(const uint8_t *packed, const float *scales, const float *code, int64_t numel,
                           int64_t blocksize, int64_t first_block, int64_t last_block, void *out, int kind) {
    for (int64_t b = first_block; b < last_block; ++b) {
        const int64_t start = b * blocksize;
        const int64_t stop = start + blocksize < numel ? start + blocksize : numel;
        const float scale = scales[b];
        float table32[16];
        for (int c = 0; c < 16; ++c) table32[c] = code[c] * scale;
        const uint8_t *bytes = packed + start / 2;
        const int64_t pairs = (stop - start) / 2; /* blocksize is even: a block starts on a byte */
        int64_t i = 0;
        if (kind == OUT_FP32) {
            float *dst = (float *)out + start;
#ifdef QLORA_AVX512
            /* 16 bytes -> 32 values: the nibbles as interleaved (high, low) indices, two 16-lane
               table permutes (vpermps) instead of 32 scalar loads. */
            const __m512 table = _mm512_loadu_ps(table32);
            for (; i + 16 <= pairs; i += 16) {
                __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(bytes + i)));
                __m256i idx = _mm256_or_si256(_mm256_srli_epi16(v, 4),
                                              _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(15)), 8));
                __m512i first = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(idx));
                __m512i second = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(idx, 1));
                _mm512_storeu_ps(dst + 2 * i, _mm512_permutexvar_ps(first, table));
                _mm512_storeu_ps(dst + 2 * i + 16, _mm512_permutexvar_ps(second, table));
            }
#endif
            for (; i < pairs; ++i) {
                dst[2 * i] = table32[bytes[i] >> 4];
                dst[2 * i + 1] = table32[bytes[i] & 15];
            }
            if (stop - start > 2 * pairs) dst[2 * pairs] = table32[bytes[pairs] >> 4];
        } else {
            uint16_t table16[16];
            for (int c = 0; c < 16; ++c)
                table16[c] = kind == OUT_BF16 ? bf16_from_float(table32[c]) : fp16_from_float(table32[c]);
            /* A 256-entry byte -> pair table would cost more to build than a 32-byte block uses. */
            uint16_t *dst = (uint16_t *)out + start;
#ifdef QLORA_AVX512
            /* 16 bytes -> 32 values: each byte widened to a 32-bit lane holds the (high, low) pair of
               16-bit indices in element order; one vpermw looks up all 32. */
            uint16_t padded[32] = {0};
            memcpy(padded, table16, sizeof(table16));
            const __m512i table = _mm512_loadu_si512(padded);
            for (; i + 16 <= pairs; i += 16) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + i)));
                __m512i idx = _mm512_or_si512(_mm512_srli_epi32(v, 4),
                                              _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), 16));
                _mm512_storeu_si512(dst + 2 * i, _mm512_permutexvar_epi16(idx, table));
            }
#endif
            for (; i < pairs; ++i) {
                dst[2 * i] = table16[bytes[i] >> 4]; /* the first element is the high nibble */
                dst[2 * i + 1] = table16[bytes[i] & 15];
            }
            if (stop - start > 2 * pairs) dst[2 * pairs] = table16[bytes[pairs] >> 4];
        }
    }
}
