/* lowbit_fn native CPU kernel: one Adam step over block-quantized moments (8-bit / 4-bit codebooks, FP8).
 *
 * The same arithmetic as the reference path (lowbit_fn/kernels/adam.py and lowbit_fn/formats/), operation for
 * operation, so codes, scales and directions are identical: float32 math without contraction into FMAs
 * (built with -ffp-contract=off), sqrt through double, the same nearest-code search, the same stochastic
 * rounding hash. Built on the user's machine with -O3 -march=native; called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { FMT_CODEBOOK8 = 0, FMT_CODEBOOK4 = 1, FMT_FP8 = 2 };

static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

static inline float noise_at(int64_t index, uint32_t key) {
    uint32_t h = hash32((uint32_t)((uint64_t)index ^ (uint64_t)key));
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> float8_e4m3fn bits, round to nearest even, saturating to NaN like c10::Float8_e4m3fn. */
static inline uint8_t e4m3_from_f32(float f) {
    const uint32_t fp8_max = UINT32_C(1087) << 20;
    const uint32_t denorm_mask = UINT32_C(141) << 23;
    uint32_t bits = f2u(f);
    const uint32_t sign = bits & UINT32_C(0x80000000);
    uint8_t result;
    bits ^= sign;
    if (bits >= fp8_max) {
        result = 0x7F;
    } else if (bits < (UINT32_C(121) << 23)) {
        bits = f2u(u2f(bits) + u2f(denorm_mask));
        result = (uint8_t)(bits - denorm_mask);
    } else {
        uint32_t mant_odd = (bits >> 20) & 1;
        bits += ((uint32_t)(7 - 127) << 23) + 0x7FFFF;
        bits += mant_odd;
        result = (uint8_t)(bits >> 20);
    }
    return result | (uint8_t)(sign >> 24);
}

/* The reference's search result, idx = min(#entries < y, n - 1), from a table over the top 16 bits of y:
 * lut[prefix] = min(#entries below the prefix's interval, n - 1), and no interval holds two entries (checked
 * when the table is built), so one comparison finishes the count. NaN gives 0, as in the reference. */
static inline int count_below(float y, const float *map, int n, const uint8_t *lut) {
    int c = lut[f2u(y) >> 16];
    int idx = c + (map[c] < y);
    idx -= idx > n - 1;
    return idx * (y == y); /* NaN: 0 */
}

static inline int nearest_code(float y, const float *map, int n, const uint8_t *lut) {
    int idx = count_below(y, map, n, lut);
    int lower = idx - (idx > 0);
    return lower + (idx - lower) * (fabsf(map[idx] - y) < fabsf(y - map[lower])); /* arithmetic, not a branch */
}

static inline int stochastic_code(float y, const float *map, int n, const uint8_t *lut, float u) {
    int idx = count_below(y, map, n, lut);
    int lower = idx - (idx > 0);
    float lo = map[lower], hi = map[idx];
    /* arithmetic instead of a branch: the random outcome would mispredict half of the time */
    return lower + (idx - lower) * ((u * (hi - lo) < (y - lo)) | (y >= hi));
}

static inline float stochastic_e4m3(float y, float u) {
    int32_t exponent = (int32_t)((f2u(y) >> 23) & 0xFF) - 127;
    if (exponent < -6) exponent = -6;
    float spacing = u2f((uint32_t)(exponent - 3 + 127) << 23);
    float rounded = floorf(fabsf(y) / spacing + u) * spacing;
    if (rounded > 448.0f) rounded = 448.0f;
    return copysignf(rounded, y);
}

/* Decode one block of moment `i` into out[bs]. */
static void decode_block(int fmt, const uint8_t *codes, float scale, const float *map, const float *fp8_lut,
                         int64_t bs, int square, float *out) {
    if (fmt == FMT_CODEBOOK4) {
        for (int64_t j = 0; j < bs; j += 2) {
            uint8_t b = codes[j / 2];
            out[j] = map[b >> 4] * scale;
            out[j + 1] = map[b & 15] * scale;
        }
    } else {
        const float *table = fmt == FMT_FP8 ? fp8_lut : map;
        for (int64_t j = 0; j < bs; ++j) out[j] = table[codes[j]] * scale;
    }
    if (square)
        for (int64_t j = 0; j < bs; ++j) out[j] = out[j] * out[j];
}

/* Codebook codes for one block. Kept scalar: GCC's gather-based vectorization of these loops ran 2x slower. */
__attribute__((optimize("no-tree-vectorize")))
static void encode_codebook(int packed, const float *x, float div, int64_t bs, const float *map, int map_len,
                            const uint8_t *lut, int stochastic, uint32_t key, int64_t first, uint8_t *codes) {
    for (int64_t j = 0; j < bs; ++j) {
        float y = x[j] / div;
        int c = stochastic ? stochastic_code(y, map, map_len, lut, noise_at(first + j, key)) : nearest_code(y, map, map_len, lut);
        if (packed) {
            if (j & 1) codes[j / 2] |= (uint8_t)c;
            else codes[j / 2] = (uint8_t)(c << 4);
        } else {
            codes[j] = (uint8_t)c;
        }
    }
}

/* Encode one block (values x[bs]) with its scale; `noise_key` >= 0 selects stochastic rounding. */
static void encode_block(int fmt, const float *x, int64_t bs, const float *map, int map_len, const uint8_t *lut,
                         int stochastic, uint32_t key, int64_t first, uint8_t *codes, float *scale_out) {
    float absmax = 0.0f;
    int nonfinite = 0;
    for (int64_t j = 0; j < bs; ++j) {
        float a = fabsf(x[j]);
        nonfinite |= !(a <= 3.4028234663852886e38f); /* NaN or Inf */
        absmax = a > absmax ? a : absmax; /* NaN is caught by nonfinite */
    }
    int finite = !nonfinite;
    float scale = finite ? absmax : NAN;
    if (fmt == FMT_FP8) scale = scale / 448.0f;
    *scale_out = scale;
    float div = scale > 0.0f ? scale : 1.0f;
    if (fmt == FMT_FP8) {
        if (stochastic) {
            for (int64_t j = 0; j < bs; ++j) {
                float y = x[j] / div;
                y = y < -448.0f ? -448.0f : (y > 448.0f ? 448.0f : y); /* NaN passes through */
                codes[j] = e4m3_from_f32(stochastic_e4m3(y, noise_at(first + j, key)));
            }
        } else {
            for (int64_t j = 0; j < bs; ++j) {
                float y = x[j] / div;
                y = y < -448.0f ? -448.0f : (y > 448.0f ? 448.0f : y);
                codes[j] = e4m3_from_f32(y);
            }
        }
        return;
    }
    encode_codebook(fmt == FMT_CODEBOOK4, x, div, bs, map, map_len, lut, stochastic, key, first, codes);
}

/* One Adam step over `nb` blocks of `bs` elements.
 *   g: float32 gradients, nb * bs (padded); direction: float32 output, same size.
 *   codes[i], scales[i]: moment i (0: m, 1: v, 2: vmax when nmom == 3), updated in place.
 *   one_minus_b1, b2f, one_minus_b2, bc1, bc2_sqrt, eps: the step's float32 scalars, computed by the caller
 *   exactly as the reference computes them.
 *   keys[i]: the stochastic-rounding stream key of moment i (used when stochastic).
 */
void lowbit_adam_quant_step(const float *g, float *direction, int64_t nb, int64_t bs, int nmom, uint8_t **codes,
                            float **scales, int fmt, const float *signed_map, const float *unsigned_map, int map_len,
                            const float *fp8_lut, const uint8_t *signed_lut, const uint8_t *unsigned_lut, float one_minus_b1, float b2f, float one_minus_b2, float bc1,
                            float bc2_sqrt, float eps, int stochastic, const uint32_t *keys, int nthreads) {
    const int64_t code_bytes = fmt == FMT_CODEBOOK4 ? bs / 2 : bs;
#pragma omp parallel num_threads(nthreads)
    {
        float *m = malloc(sizeof(float) * bs * 3);
        float *v = m + bs, *vmax = m + 2 * bs;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const float *gb = g + b * bs;
            float *db = direction + b * bs;
            decode_block(fmt, codes[0] + b * code_bytes, scales[0][b], signed_map, fp8_lut, bs, 0, m);
            decode_block(fmt, codes[1] + b * code_bytes, scales[1][b], unsigned_map, fp8_lut, bs, stochastic, v);
            if (nmom == 3)
                decode_block(fmt, codes[2] + b * code_bytes, scales[2][b], unsigned_map, fp8_lut, bs, stochastic, vmax);
            for (int64_t j = 0; j < bs; ++j) {
                float gj = gb[j];
                float mj = m[j] + one_minus_b1 * (gj - m[j]);
                float vj = v[j] * b2f + (gj * gj) * one_minus_b2;
                float d = vj;
                if (nmom == 3) {
                    float x = vmax[j] > vj ? vmax[j] : vj;
                    if (vmax[j] != vmax[j] || vj != vj) x = NAN; /* torch.maximum propagates NaN */
                    vmax[j] = x;
                    d = x;
                }
                float denom = (float)sqrt((double)d) / bc2_sqrt + eps;
                db[j] = (mj / bc1) / denom;
                m[j] = mj;
                v[j] = vj;
            }
            if (stochastic) { /* second moments are stored as sqrt(v) */
                for (int64_t j = 0; j < bs; ++j) v[j] = (float)sqrt((double)v[j]);
                if (nmom == 3)
                    for (int64_t j = 0; j < bs; ++j) vmax[j] = (float)sqrt((double)vmax[j]);
            }
            const float *values[3] = {m, v, vmax};
            for (int i = 0; i < nmom; ++i)
                encode_block(fmt, values[i], bs, i == 0 ? signed_map : unsigned_map, map_len,
                             i == 0 ? signed_lut : unsigned_lut, stochastic,
                             stochastic ? keys[i] : 0, b * bs, codes[i] + b * code_bytes, scales[i] + b);
        }
        free(m);
    }
}
