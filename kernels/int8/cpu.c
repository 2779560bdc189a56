/* LLM.int8 decode on CPU: int8 codes [out, in] and per-row SCB -> fp32/bf16/fp16.
 *
 * The twin's arithmetic (kernels/int8/reference.py): (CB * SCB[row]) * fp32(1/127), two fp32
 * roundings in that order (no FMA: -ffp-contract=off), then one rounding into the output dtype,
 * in one pass over the codes instead of the twin's three. Callers split rows [first, last) over threads.
 */
#include <stdint.h>

#include "native_convert.h"

void qlora_int8_dequantize(const int8_t *codes, const float *scb, int64_t cols, int64_t first, int64_t last,
                           void *out, int kind) {
    const float inv_127 = (float)(1.0 / 127.0);
    for (int64_t r = first; r < last; ++r) {
        const float scale = scb[r];
        const int8_t *row = codes + r * cols;
        if (kind == OUT_FP32) {
            float *dst = (float *)out + r * cols;
            for (int64_t c = 0; c < cols; ++c) dst[c] = ((float)row[c] * scale) * inv_127;
        } else {
            for (int64_t c = 0; c < cols; ++c) store_as(out, r * cols + c, ((float)row[c] * scale) * inv_127, kind);
        }
    }
}
