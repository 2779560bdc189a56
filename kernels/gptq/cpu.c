/* GPTQ decode on CPU (2, 4 and 8 bits): packed int32 words -> W^T [K, N] in fp32/bf16/fp16.
 *
 * The twin's arithmetic (kernels/gptq/reference.py): W^T[k, n] = scale[g, n] * (q - (z + zero_offset))
 * with g = g_idx[k]; the integer difference is exact, the fp32 product is exact too (an fp16 scale
 * has 11 significant bits, q - z at most 9), so one rounding into the output dtype. W^T is the
 * layout the words are in (K packed along rows of N columns): row k reads one row of words and
 * writes one contiguous output row, which both forward (X @ W^T) and backward (dY @ (W^T)^T) take
 * as they are. Callers split the rows [first, last) over threads.
 */
#include <stdint.h>

#include "native_convert.h"

void qlora_dequantize_gptq_t(const int32_t *qweight, const int32_t *qzeros, const float *scales, const int32_t *g_idx,
                             int64_t bits, int64_t zero_offset, int64_t n_cols, int64_t first, int64_t last,
                             void *out, int kind) {
    const int64_t per_word = 32 / bits, mask = (1 << bits) - 1, zero_words = (n_cols * bits + 31) / 32;
    for (int64_t k = first; k < last; ++k) {
        const uint32_t *words = (const uint32_t *)qweight + (k / per_word) * n_cols;
        const int shift = (int)(bits * (k % per_word));
        const int64_t g = g_idx[k];
        const uint32_t *zeros = (const uint32_t *)qzeros + g * zero_words;
        const float *scale = scales + g * n_cols;
        for (int64_t n = 0; n < n_cols; ++n) {
            int32_t q = (int32_t)((words[n] >> shift) & mask);
            int32_t z = (int32_t)((zeros[n / per_word] >> (bits * (n % per_word))) & mask) + (int32_t)zero_offset;
            store_as(out, k * n_cols + n, scale[n] * (float)(q - z), kind);
        }
    }
}
