/* fp32 -> 16-bit conversions as torch rounds them, and the loads back, shared by the CPU kernels (kernels/native.py
 * builds each .c with this folder on the include path). */
#ifndef QLORA_NATIVE_CONVERT_H
#define QLORA_NATIVE_CONVERT_H
#include <stdint.h>
#include <string.h>

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
#endif
