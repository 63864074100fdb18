/* lowbit_fn native CPU kernel: one optimizer step over block-quantized moments (8-bit / 4-bit codebooks, FP8) or
 * plain float32 ones, for every elementwise rule of lowbit_fn/kernels/rules.py (Adam, Lion, SGD's momentum,
 * RMSprop, AdEMAMix, Muon's momentum).
 *
 * The same arithmetic as the reference path (lowbit_fn/kernels/reference.py: the rule's math from rules.py, the
 * codecs of lowbit_fn/formats/ and the epilogue of weight decay, learning rate and the parameter's update),
 * operation for operation, so codes, scales, directions and parameters are identical: float32 math without
 * contraction into FMAs (built with -ffp-contract=off), correctly rounded square roots, the same nearest-code
 * search, the same stochastic rounding hash. Built on the user's machine with -O3 -march=native; called through
 * ctypes.
 *
 * Two code paths compute the same bits: AVX-512 (F/BW/VL) intrinsics for blocks whose size is a multiple of 16,
 * and portable C for everything else (other CPUs, odd block sizes, and blocks holding NaN or Inf). Build with
 * -DLOWBIT_PORTABLE to use only the portable one. Adam's math has its own AVX-512 loop (it tracks each new
 * moment's absmax as it makes it); the other rules' math is plain C that the compiler vectorizes, followed by one
 * pass per moment that takes the square roots of sqrt-domain moments and tracks the absmax.
 *
 * Work comes as *segments*: one per tensor, each with its own gradient, output, parameter and moment buffers,
 * its row length R (blocks never cross a row: each row has ceil(R / bs) blocks, the last one shorter), the index
 * of its first element in the whole tensor and its random stream keys (stochastic rounding). Gradients, parameters
 * and outputs may be float32, bfloat16 or float16: they are converted block by block in the thread's scratch and
 * written back rounded (to nearest, or stochastically for bfloat16 parameters). A short block is zero-padded in
 * scratch, as in the reference.
 *
 * Moments: up to three per rule, each signed (the signed codebook) or unsigned (a second moment, the unsigned
 * codebook). Under stochastic rounding an unsigned moment is stored as its square root: decoding squares it,
 * encoding takes the root.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(LOWBIT_PORTABLE)
#define LOWBIT_AVX512 1
#include <immintrin.h>
#else
#define LOWBIT_AVX512 0
#endif

enum { FMT_CODEBOOK8 = 0, FMT_CODEBOOK4 = 1, FMT_FP8 = 2, FMT_FP32 = 3 /* plain float32 moments */ };
/* epilogue bits: what is done with the direction d (mode 0: write d) */
enum { EPI_L2 = 1, EPI_DECOUPLED = 2, EPI_SCALE = 4, EPI_APPLY = 8 };
/* rules (Rule.native_id in rules.py) and their switches (Rule.flags) */
enum { RULE_ADAM = 0, RULE_LION = 1, RULE_TRACE = 2, RULE_RMS = 3, RULE_ADEMAMIX = 4, RULE_MUON = 5 };
enum { FLAG_NESTEROV = 1, FLAG_CENTERED = 2, FLAG_MOMENTUM = 4 };
/* segment fields (int64 each); dtypes: DT_F32, DT_BF16, DT_F16; keys: moments 0, 1, 2, parameter */
enum { SEG_G, SEG_OUT, SEG_P, SEG_NUMEL, SEG_ROW, SEG_INDEX, SEG_GDT, SEG_PDT, SEG_ODT, SEG_KEYS,
       SEG_CODES = SEG_KEYS + 4, SEG_SCALES = SEG_CODES + 3, SEG_FIELDS = SEG_SCALES + 3 };
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

typedef struct {
    int fmt, nmom, rule, flags, stochastic, mode, map_len, param_sr;
    int64_t bs, code_bytes;
    int squared[3];           /* moment i is stored as its square root (unsigned, stochastic rounding) */
    int floored[3];           /* moment i is unsigned: FP8 floors its normalized values at FP8_FLOOR */
    int plane[3];             /* moment i's byte planes: its map planes[plane[i]], its next[] planes[plane[i] + 2] */
    const float *map[3];      /* codebook of moment i (signed or unsigned) */
    const uint8_t *lut[3];    /* prefix table (65536 entries + 4 bytes of padding): over the thresholds when
                                 rounding to nearest, over the map when rounding stochastically */
    const float *next[3];     /* nearest-rounding thresholds from the first on: next[a] = t[a + 1], where code k
                                 is picked from t[k] up to t[k + 1] (t[0] = -inf, t[n] = +inf) */
    const float *fp8_lut;     /* float8_e4m3fn code -> float32 (portable path) */
    float s[8];               /* the rule's scalars, in the order of its Rule.scalars */
    float wd, lr;             /* weight decay and the learning-rate factor of the epilogue */
    /* 8-bit: the four bytes of every entry of the signed map, unsigned map, signed and unsigned next[], as
     * byte planes (planes[t][k][e] = byte k of entry e of table t) for 64-lane byte look-ups */
    uint8_t planes[4][4][256] __attribute__((aligned(64)));
} ctx_t;

static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* 32 random bits of element `index` (any int64 >= 0: no wrap at 2**32) of stream `key` */
static inline uint32_t mix(int64_t index, uint32_t key) {
    return hash32((uint32_t)index ^ hash32((uint32_t)((uint64_t)index >> 32) ^ key));
}

static inline float noise_at(int64_t index, uint32_t key) { return (float)(mix(index, key) >> 8) * (1.0f / 16777216.0f); }

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* bfloat16 and float16 <-> float32, rounding to nearest even like torch (NaN becomes a quiet NaN) */
static inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
/* stochastic: 16 random bits added below the mantissa, then truncated (the reference's round_to) */
static inline uint16_t f32_to_bf16_sr(float f, uint32_t bits) {
    if (f != f) return 0x7FC0;
    return (uint16_t)((f2u(f) + (bits & 0xFFFFu)) >> 16);
}

/* x[0..n) of dtype dt as float32 into out[0..bs), zero beyond n */
static void load_f32(const void *x, int dt, int64_t n, int64_t bs, float *out) {
    if (dt == DT_F32) memcpy(out, x, sizeof(float) * n);
    else if (dt == DT_BF16) for (int64_t j = 0; j < n; ++j) out[j] = bf16_to_f32(((const uint16_t *)x)[j]);
    else for (int64_t j = 0; j < n; ++j) out[j] = (float)((const _Float16 *)x)[j];
    if (n < bs) memset(out + n, 0, sizeof(float) * (bs - n));
}

/* float32 x[0..n) into dst of dtype dt, rounded to nearest, or stochastically (bfloat16, key != 0 with sr) with
 * the bits of elements first .. first + n - 1 */
static void store_from_f32(const float *x, int dt, int64_t n, void *dst, int sr, uint32_t key, int64_t first) {
    if (dt == DT_F32) memcpy(dst, x, sizeof(float) * n);
    else if (dt == DT_BF16 && sr) for (int64_t j = 0; j < n; ++j) ((uint16_t *)dst)[j] = f32_to_bf16_sr(x[j], mix(first + j, key));
    else if (dt == DT_BF16) for (int64_t j = 0; j < n; ++j) ((uint16_t *)dst)[j] = f32_to_bf16(x[j]);
    else for (int64_t j = 0; j < n; ++j) ((_Float16 *)dst)[j] = (_Float16)x[j];
}

static inline int64_t dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* The least normalized FP8 value of an unsigned moment in a block with a positive scale: e4m3's smallest
 * subnormal, 2**-9 (formats/fp8.py UNSIGNED_FLOOR), so a second moment never decodes to 0 there. */
#define FP8_FLOOR 0.001953125f

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

/* x, or 0 for NaN and +-Inf (|x| <= FLT_MAX is false for both), as formats/_base.py's finite_or_zero */
static inline float finite_or_zero(float x) { return fabsf(x) <= 3.4028234663852886e38f ? x : 0.0f; }

/* A second moment that overflowed from a finite gradient, held at FLT_MAX, as rules.py's _saturate */
static inline float saturate(float v, float g) {
    return (v > 3.4028234663852886e38f && fabsf(g) <= 3.4028234663852886e38f) ? 3.4028234663852886e38f : v;
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

/* The nearest code is the number of thresholds t[1..n-1] at or below y; lut[prefix] counts those below the
 * prefix's interval and no interval holds two of them (checked when the table is built), so one comparison
 * with the next threshold finishes the count. NaN gives 0, as in the reference. */
static inline int nearest_code(float y, const float *next, const uint8_t *lut) {
    int a = lut[f2u(y) >> 16];
    return a + (next[a] <= y);
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

/* ------------------------------------------------------------------------------------------------------------
 * Portable path
 * ------------------------------------------------------------------------------------------------------------ */

/* Decode one block of moment i into out[bs]. */
static void decode_block(const ctx_t *c, int i, const uint8_t *codes, float scale, float *out) {
    const int64_t bs = c->bs;
    if (c->fmt == FMT_CODEBOOK4) {
        const float *map = c->map[i];
        for (int64_t j = 0; j < bs; j += 2) {
            uint8_t b = codes[j / 2];
            out[j] = map[b >> 4] * scale;
            out[j + 1] = map[b & 15] * scale;
        }
    } else {
        const float *table = c->fmt == FMT_FP8 ? c->fp8_lut : c->map[i];
        for (int64_t j = 0; j < bs; ++j) out[j] = table[codes[j]] * scale;
    }
    if (c->squared[i]) /* unsigned moments are stored as their square roots under stochastic rounding */
        for (int64_t j = 0; j < bs; ++j) out[j] = out[j] * out[j];
}

/* Codebook codes for one block. Kept scalar: GCC's gather-based vectorization of these loops ran 2x slower. */
__attribute__((optimize("no-tree-vectorize")))
static void encode_codebook(const ctx_t *c, int i, const float *x, float div, int64_t first, uint32_t key, uint8_t *codes) {
    const float *map = c->map[i];
    const uint8_t *lut = c->lut[i];
    const int packed = c->fmt == FMT_CODEBOOK4, n = c->map_len;
    for (int64_t j = 0; j < c->bs; ++j) {
        float y = finite_or_zero(x[j]) / div;
        int code = c->stochastic ? stochastic_code(y, map, n, lut, noise_at(first + j, key)) : nearest_code(y, c->next[i], lut);
        if (packed) {
            if (j & 1) codes[j / 2] |= (uint8_t)code;
            else codes[j / 2] = (uint8_t)(code << 4);
        } else {
            codes[j] = (uint8_t)code;
        }
    }
}

/* The block's scale (the absmax of its finite values; FP8 divides by 448) and the divisor of its values. */
static float block_scale(int fmt, float absmax, float *div) {
    float scale = fmt == FMT_FP8 ? absmax / 448.0f : absmax;
    *div = scale > 0.0f ? scale : 1.0f;
    return scale;
}

/* The portable encoder, for every block the vector one declines (NaN or Inf among its values, odd sizes): a
 * non-finite value is stored as the code nearest to 0 (for an unsigned FP8 moment the floor's) and takes no part
 * in the scale, as in the reference (formats/_base.py). */
static void encode_block(const ctx_t *c, int i, const float *x, int64_t first, uint32_t key, uint8_t *codes, float *scale_out) {
    const int64_t bs = c->bs;
    float absmax = 0.0f, div;
    for (int64_t j = 0; j < bs; ++j) {
        float a = fabsf(finite_or_zero(x[j]));
        absmax = a > absmax ? a : absmax;
    }
    *scale_out = block_scale(c->fmt, absmax, &div);
    if (c->fmt != FMT_FP8) {
        encode_codebook(c, i, x, div, first, key, codes);
        return;
    }
    const float low = c->floored[i] && *scale_out > 0.0f ? FP8_FLOOR : -448.0f;
    for (int64_t j = 0; j < bs; ++j) {
        float y = finite_or_zero(x[j]) / div;
        y = y < low ? low : (y > 448.0f ? 448.0f : y);
        codes[j] = e4m3_from_f32(c->stochastic ? stochastic_e4m3(y, noise_at(first + j, key)) : y);
    }
}

/* The rules' math over n elements: the direction into d, the moments updated in place (as values: the square
 * roots of sqrt-domain moments are taken afterwards). Each mirrors its Rule.math in rules.py, operation for
 * operation and operand for operand; `lerp(a, b, w)` there is a + w * (b - a). Plain loops the compiler
 * vectorizes (`restrict`: the moments, the gradient and d are distinct buffers). */

static void math_adam(const ctx_t *c, int64_t n, const float *restrict g, float *restrict m, float *restrict v,
                      float *restrict vmax, float *restrict d) {
    const float omb1 = c->s[0], b2 = c->s[1], w = c->s[2], inv_bc1 = c->s[3], inv_bc2s = c->s[4], eps = c->s[5];
    if (c->nmom == 3) {
        for (int64_t j = 0; j < n; ++j) {
            float mj = m[j] + omb1 * (g[j] - m[j]);
            float gw = g[j] * w;
            float vj = saturate(v[j] * b2 + gw * gw, g[j]);
            float x = vmax[j] > vj ? vmax[j] : vj;
            x = (vmax[j] != vmax[j] || vj != vj) ? NAN : x; /* torch.maximum propagates NaN */
            d[j] = (mj * inv_bc1) / (sqrtf(x) * inv_bc2s + eps);
            m[j] = mj;
            v[j] = vj;
            vmax[j] = x;
        }
        return;
    }
    for (int64_t j = 0; j < n; ++j) {
        float mj = m[j] + omb1 * (g[j] - m[j]);
        float gw = g[j] * w;
        float vj = saturate(v[j] * b2 + gw * gw, g[j]);
        d[j] = (mj * inv_bc1) / (sqrtf(vj) * inv_bc2s + eps);
        m[j] = mj;
        v[j] = vj;
    }
}

/* direction = sign(lerp(m, g, 1 - b1)), NaN kept (torch.sign gives +0 for both zeros); m = lerp(m, g, 1 - b2) */
static void math_lion(const ctx_t *c, int64_t n, const float *restrict g, float *restrict m, float *restrict d) {
    const float omb1 = c->s[0], omb2 = c->s[1];
    for (int64_t j = 0; j < n; ++j) {
        float x = m[j] + omb1 * (g[j] - m[j]);
        float sign = (float)(x > 0.0f) - (float)(x < 0.0f);
        d[j] = x != x ? x : sign;
        m[j] = m[j] + omb2 * (g[j] - m[j]);
    }
}

/* buf = buf * a + g * c (a, c: the first step's (0, 1) already folded in); nesterov: g + buf * momentum */
static void math_trace(const ctx_t *c, int64_t n, const float *restrict g, float *restrict buf, float *restrict d) {
    const float a = c->s[0], k = c->s[1], momentum = c->s[2];
    if (c->flags & FLAG_NESTEROV) {
        for (int64_t j = 0; j < n; ++j) {
            float b = buf[j] * a + g[j] * k;
            d[j] = g[j] + b * momentum;
            buf[j] = b;
        }
        return;
    }
    for (int64_t j = 0; j < n; ++j) {
        float b = buf[j] * a + g[j] * k;
        d[j] = b;
        buf[j] = b;
    }
}

/* square_avg (unsigned), or centered the variance (unsigned, Welford's update with the old grad_avg) and grad_avg;
 * buf (momentum). */
static void math_rms(const ctx_t *c, int64_t n, const float *restrict g, float *restrict sq, float *restrict avg_g,
                     float *restrict buf, float *restrict d) {
    const float alpha = c->s[0], oma = c->s[1], eps = c->s[2], momentum = c->s[3], w = c->s[4];
    const int centered = c->flags & FLAG_CENTERED, with_momentum = c->flags & FLAG_MOMENTUM;
    if (centered) {
        for (int64_t j = 0; j < n; ++j) {
            float dw = (g[j] - avg_g[j]) * w;
            float var = saturate(sq[j] * alpha + dw * dw, g[j]);
            float a = avg_g[j] + oma * (g[j] - avg_g[j]);
            d[j] = g[j] / (sqrtf(var) + eps);
            sq[j] = var;
            avg_g[j] = a;
        }
    } else {
        for (int64_t j = 0; j < n; ++j) {
            float gw = g[j] * w;
            float s = saturate(sq[j] * alpha + gw * gw, g[j]);
            d[j] = g[j] / (sqrtf(s) + eps);
            sq[j] = s;
        }
    }
    if (with_momentum)
        for (int64_t j = 0; j < n; ++j) {
            float b = buf[j] * momentum + d[j];
            d[j] = b;
            buf[j] = b;
        }
}

/* m1 = lerp(m1, g, 1 - b1), m2 = lerp(m2, g, 1 - b3), nu = nu * b2 + (g * sqrt(1 - b2))**2;
 * direction = (m1 / (1 - b1**t) + alpha * m2) / (sqrt(nu) / sqrt(1 - b2**t) + eps) */
static void math_ademamix(const ctx_t *c, int64_t n, const float *restrict g, float *restrict m1, float *restrict m2,
                          float *restrict nu, float *restrict d) {
    const float omb1 = c->s[0], b2 = c->s[1], w = c->s[2], inv_bc1 = c->s[3], inv_bc2s = c->s[4], eps = c->s[5];
    const float omb3 = c->s[6], alpha = c->s[7];
    for (int64_t j = 0; j < n; ++j) {
        float a = m1[j] + omb1 * (g[j] - m1[j]);
        float b = m2[j] + omb3 * (g[j] - m2[j]);
        float gw = g[j] * w;
        float v = saturate(nu[j] * b2 + gw * gw, g[j]);
        d[j] = (a * inv_bc1 + b * alpha) / (sqrtf(v) * inv_bc2s + eps);
        m1[j] = a;
        m2[j] = b;
        nu[j] = v;
    }
}

/* buf = lerp(buf, g, 1 - momentum); nesterov: lerp(g, buf, momentum) */
static void math_muon(const ctx_t *c, int64_t n, const float *restrict g, float *restrict buf, float *restrict d) {
    const float omm = c->s[0], momentum = c->s[1];
    if (c->flags & FLAG_NESTEROV) {
        for (int64_t j = 0; j < n; ++j) {
            float b = buf[j] + omm * (g[j] - buf[j]);
            d[j] = g[j] + momentum * (b - g[j]);
            buf[j] = b;
        }
        return;
    }
    for (int64_t j = 0; j < n; ++j) {
        float b = buf[j] + omm * (g[j] - buf[j]);
        d[j] = b;
        buf[j] = b;
    }
}

/* The rule's math, the moments' square roots and the epilogue over n elements: g the gradient (with L2, g + p * wd
 * into lbuf first), p the parameter (read as float32), mom[] the decoded moments (updated in place: new values, or
 * their square roots for sqrt-domain moments), dst the direction or, with EPI_APPLY, the new parameter (dst may
 * be p or g: each element is read before it is written). dbuf holds the direction. */
static void math_generic(const ctx_t *c, int64_t n, const float *g, const float *p, float *const mom[3], float *dst,
                         float *dbuf, float *lbuf) {
    const int mode = c->mode;
    const float wd = c->wd, lr = c->lr;
    if (mode & EPI_L2) {
        for (int64_t j = 0; j < n; ++j) lbuf[j] = g[j] + p[j] * wd;
        g = lbuf;
    }
    const float *d = dbuf;
    switch (c->rule) {
    case RULE_ADAM: math_adam(c, n, g, mom[0], mom[1], mom[2], dbuf); break;
    case RULE_LION: math_lion(c, n, g, mom[0], dbuf); break;
    case RULE_TRACE:
        if (c->nmom == 0) d = g; /* no momentum: the direction is the gradient */
        else math_trace(c, n, g, mom[0], dbuf);
        break;
    case RULE_RMS: {
        const int centered = (c->flags & FLAG_CENTERED) != 0;
        math_rms(c, n, g, mom[0], centered ? mom[1] : NULL, (c->flags & FLAG_MOMENTUM) ? mom[1 + centered] : NULL, dbuf);
        break;
    }
    case RULE_ADEMAMIX: math_ademamix(c, n, g, mom[0], mom[1], mom[2], dbuf); break;
    default: math_muon(c, n, g, mom[0], dbuf); break;
    }
    for (int i = 0; i < c->nmom; ++i)
        if (c->squared[i])
            for (int64_t j = 0; j < n; ++j) mom[i][j] = sqrtf(mom[i][j]);
    if (!(mode & (EPI_DECOUPLED | EPI_SCALE | EPI_APPLY))) {
        if (dst != d) memcpy(dst, d, sizeof(float) * n);
        return;
    }
    for (int64_t j = 0; j < n; ++j) {
        float u = d[j];
        if (mode & EPI_DECOUPLED) u = u + p[j] * wd;
        if (mode & EPI_SCALE) u = u * lr;
        dst[j] = (mode & EPI_APPLY) ? p[j] + u : u;
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * AVX-512 path: the same operations, 16 lanes at a time
 * ------------------------------------------------------------------------------------------------------------ */
#if LOWBIT_AVX512

static inline __m512 v_abs(__m512 x) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF))); }

/* noise_at(first + lane, key) for 16 lanes that share the high 32 bits of their index; `high` is
 * hash32(high 32 bits ^ key) */
static inline __m512 v_noise(int64_t first, uint32_t high) {
    const uint32_t key = high;
    __m512i x = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)(uint64_t)first),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    x = _mm512_xor_si512(x, _mm512_set1_epi32((int32_t)key));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int32_t)0x846CA68Bu));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 8)), _mm512_set1_ps(1.0f / 16777216.0f));
}

/* map[idx] of a 256-entry map by permutes: 8 two-register permutes (32 entries each), then a blend tree on
 * index bits 5, 6, 7. Faster than a gather where gathers are microcoded (AMD Zen 4). */
static inline __m512 v_lookup256(__m512i idx, const float *map) {
    __m512 r[8];
    for (int k = 0; k < 8; ++k)
        r[k] = _mm512_permutex2var_ps(_mm512_loadu_ps(map + 32 * k), idx, _mm512_loadu_ps(map + 32 * k + 16));
    __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    __m512 a = _mm512_mask_blend_ps(b6, _mm512_mask_blend_ps(b5, r[0], r[1]), _mm512_mask_blend_ps(b5, r[2], r[3]));
    __m512 b = _mm512_mask_blend_ps(b6, _mm512_mask_blend_ps(b5, r[4], r[5]), _mm512_mask_blend_ps(b5, r[6], r[7]));
    return _mm512_mask_blend_ps(b7, a, b);
}

/* map[idx] for a 16-entry map held in a register, or a 256-entry one in memory */
static inline __m512 v_lookup(__m512i idx, __m512 map16, const float *map, int n) {
    return n == 16 ? _mm512_permutexvar_ps(idx, map16) : v_lookup256(idx, map);
}

/* lut[top 16 bits of y] for 16 lanes (a 32-bit gather from the padded byte table, low byte kept) */
static inline __m512i v_prefix_count(__m512 y, const uint8_t *lut) {
    __m512i prefix = _mm512_srli_epi32(_mm512_castps_si512(y), 16);
    return _mm512_and_si512(_mm512_i32gather_epi32(prefix, (const void *)lut, 1), _mm512_set1_epi32(0xFF));
}

/* #{k < 15 : table[k] < y} (le: <= y) for a sorted 16-entry table held in a register, by binary search */
static inline __m512i v_count16(__m512 table, __m512 y, int le) {
    __m512i idx = _mm512_setzero_si512();
    for (int step = 8; step >= 1; step /= 2) {
        __m512i cand = _mm512_add_epi32(idx, _mm512_set1_epi32(step));
        __m512 entry = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, _mm512_set1_epi32(1)), table);
        idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(entry, y, le ? _CMP_LE_OQ : _CMP_LT_OQ), cand);
    }
    return idx;
}

/* 16 codes (as int32 lanes) of elements j..j+15 */
static inline __m512i v_load_codes(int fmt, const uint8_t *codes, int64_t j) {
    if (fmt == FMT_CODEBOOK4) {
        __m128i b = _mm_loadl_epi64((const __m128i *)(codes + j / 2));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
        __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
        return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)); /* even elements are the high nibbles */
    }
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + j)));
}

static inline void v_store_codes(int fmt, uint8_t *codes, int64_t j, __m512i code) {
    __m128i b = _mm512_cvtepi32_epi8(code);
    if (fmt == FMT_CODEBOOK4) {
        __m128i even = _mm_and_si128(b, _mm_set1_epi16(0xFF)), odd = _mm_srli_epi16(b, 8);
        __m128i packed = _mm_packus_epi16(_mm_or_si128(_mm_slli_epi16(even, 4), odd), _mm_setzero_si128());
        _mm_storel_epi64((__m128i *)(codes + j / 2), packed);
    } else {
        _mm_storeu_si128((__m128i *)(codes + j), b);
    }
}

/* float8_e4m3fn bits (int32 lanes) -> float32, by arithmetic: 2**(e-7) * (1 + m/8), subnormals m * 2**-9,
 * 0x7F/0xFF NaN; the same values as the decode table, without a gather (slow on some CPUs) */
static inline __m512 v_from_e4m3(__m512i code) {
    __m512i x = _mm512_and_si512(code, _mm512_set1_epi32(0x7F));
    __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(x, 20), _mm512_set1_epi32(120 << 23)));
    __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(1.0f / 512.0f));
    __m512 r = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(x, _mm512_set1_epi32(8)), normal, sub);
    r = _mm512_mask_mov_ps(r, _mm512_cmpeq_epi32_mask(x, _mm512_set1_epi32(0x7F)), _mm512_set1_ps(NAN));
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(code, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
}

#if defined(__AVX512VBMI__)
#define LOWBIT_VBMI 1
/* table[c] for 64 byte indices at once, from the table's byte planes: per plane two 128-entry byte permutes and
 * a blend on bit 7, then the four planes are interleaved into floats. The indices are first permuted so that
 * the interleave (which works within 128-bit lanes) leaves out[k] = entries 16k .. 16k + 15, in order. */
static inline void v_lookup64(const uint8_t planes[4][256], __m512i c, __m512 out[4]) {
    static const uint8_t order[64] __attribute__((aligned(64))) = {
        0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
        8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
    c = _mm512_permutexvar_epi8(_mm512_load_si512((const void *)order), c);
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i p[4];
    for (int k = 0; k < 4; ++k) {
        const uint8_t *t = planes[k];
        __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512((const void *)t), c, _mm512_load_si512((const void *)(t + 64)));
        __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512((const void *)(t + 128)), c, _mm512_load_si512((const void *)(t + 192)));
        p[k] = _mm512_mask_blend_epi8(high, lo, hi);
    }
    __m512i w_lo = _mm512_unpacklo_epi8(p[0], p[1]), w_hi = _mm512_unpackhi_epi8(p[0], p[1]);
    __m512i x_lo = _mm512_unpacklo_epi8(p[2], p[3]), x_hi = _mm512_unpackhi_epi8(p[2], p[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w_lo, x_lo));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w_lo, x_lo));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w_hi, x_hi));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w_hi, x_hi));
}

/* four vectors of 16 int32 indices (each < 256) as one vector of 64 bytes, in order */
static inline __m512i v_bytes64(const __m512i idx[4]) {
    __m512i r = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(idx[0]));
    r = _mm512_inserti32x4(r, _mm512_cvtepi32_epi8(idx[1]), 1);
    r = _mm512_inserti32x4(r, _mm512_cvtepi32_epi8(idx[2]), 2);
    return _mm512_inserti32x4(r, _mm512_cvtepi32_epi8(idx[3]), 3);
}
#else
#define LOWBIT_VBMI 0
#endif

static void decode_block_avx512(const ctx_t *c, int i, const uint8_t *codes, float scale, float *out) {
    const float *table = c->map[i];
#if LOWBIT_VBMI
    if (c->fmt == FMT_CODEBOOK8 && c->bs % 64 == 0) {
        const __m512 s = _mm512_set1_ps(scale);
        for (int64_t j = 0; j < c->bs; j += 64) {
            __m512 x[4];
            v_lookup64(c->planes[c->plane[i]], _mm512_loadu_si512((const void *)(codes + j)), x);
            for (int k = 0; k < 4; ++k) {
                x[k] = _mm512_mul_ps(x[k], s);
                if (c->squared[i]) x[k] = _mm512_mul_ps(x[k], x[k]);
                _mm512_storeu_ps(out + j + 16 * k, x[k]);
            }
        }
        return;
    }
#endif
    const __m512 map16 = c->fmt == FMT_CODEBOOK4 ? _mm512_loadu_ps(table) : _mm512_setzero_ps();
    const __m512 s = _mm512_set1_ps(scale);
    const int n = c->fmt == FMT_CODEBOOK4 ? 16 : 256;
    for (int64_t j = 0; j < c->bs; j += 16) {
        __m512i code = v_load_codes(c->fmt, codes, j);
        __m512 x = _mm512_mul_ps(c->fmt == FMT_FP8 ? v_from_e4m3(code) : v_lookup(code, map16, table, n), s);
        if (c->squared[i]) x = _mm512_mul_ps(x, x);
        _mm512_storeu_ps(out + j, x);
    }
}

static inline __m512i v_e4m3(__m512 y) {
    const __m512i denorm_mask = _mm512_set1_epi32(141 << 23);
    __m512i bits = _mm512_castps_si512(y);
    __m512i sign = _mm512_and_si512(bits, _mm512_set1_epi32((int32_t)0x80000000u));
    bits = _mm512_xor_si512(bits, sign); /* |y| <= 448 here: no saturation */
    __mmask16 small = _mm512_cmplt_epu32_mask(bits, _mm512_set1_epi32(121 << 23));
    __m512i sub = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(bits), _mm512_castsi512_ps(denorm_mask))), denorm_mask);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(1));
    __m512i normal = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32((int32_t)(((uint32_t)(7 - 127) << 23) + 0x7FFFF))), odd), 20);
    __m512i r = _mm512_and_si512(_mm512_mask_blend_epi32(small, normal, sub), _mm512_set1_epi32(0xFF));
    return _mm512_or_si512(r, _mm512_srli_epi32(sign, 24));
}

/* Running max |x| of a block's values and whether one is NaN or Inf (computed where the values are made). */
typedef struct {
    __m512 amax;
    __mmask16 bad;
} absmax_t;

static inline void v_track(absmax_t *t, __m512 x) {
    __m512 a = v_abs(x);
    t->bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.4028234663852886e38f), _CMP_NLE_UQ);
    t->amax = _mm512_max_ps(t->amax, a);
}

/* The tracking of n values (a multiple of 16) made by plain C, where math_avx512 tracks its own as it goes. */
static void track_avx512(const float *x, int64_t n, absmax_t *t) {
    for (int64_t j = 0; j < n; j += 16) v_track(t, _mm512_loadu_ps(x + j));
}

/* Encode a block whose values are all finite, given their absmax; returns 0 (nothing written) otherwise. */
static int encode_block_avx512(const ctx_t *c, int i, const float *x, const absmax_t *t, int64_t first, uint32_t key,
                               uint8_t *codes, float *scale_out) {
    const int64_t bs = c->bs;
    if (t->bad) return 0;
    if (c->stochastic && ((uint64_t)first & 0xFFFFFFFFu) + (uint64_t)bs > UINT64_C(0x100000000)) return 0; /* crosses 2**32 */
    const uint32_t high = hash32((uint32_t)((uint64_t)first >> 32) ^ key);
    float div;
    *scale_out = block_scale(c->fmt, _mm512_reduce_max_ps(t->amax), &div);
    const __m512 vdiv = _mm512_set1_ps(div);
    if (c->fmt == FMT_FP8) {
        const __m512 low = _mm512_set1_ps(c->floored[i] && *scale_out > 0.0f ? FP8_FLOOR : -448.0f);
        for (int64_t j = 0; j < bs; j += 16) {
            __m512 y = _mm512_div_ps(_mm512_loadu_ps(x + j), vdiv);
            y = _mm512_min_ps(_mm512_max_ps(y, low), _mm512_set1_ps(448.0f));
            if (c->stochastic) {
                __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(y), 23), _mm512_set1_epi32(0xFF)),
                                             _mm512_set1_epi32(127));
                e = _mm512_max_epi32(e, _mm512_set1_epi32(-6));
                __m512 spacing = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(124)), 23));
                __m512 r = _mm512_add_ps(_mm512_div_ps(v_abs(y), spacing), v_noise(first + j, high));
                r = _mm512_mul_ps(_mm512_roundscale_ps(r, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), spacing);
                r = _mm512_min_ps(r, _mm512_set1_ps(448.0f));
                __m512i ysign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32((int32_t)0x80000000u));
                y = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), ysign));
            }
            _mm_storeu_si128((__m128i *)(codes + j), _mm512_cvtepi32_epi8(v_e4m3(y)));
        }
        return 1;
    }
    const float *map = c->map[i];
    const int n = c->map_len;
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512(), last = _mm512_set1_epi32(n - 1);
#if LOWBIT_VBMI
    if (n == 256 && !c->stochastic && bs % 64 == 0) { /* nearest 8-bit codes, 64 at a time with byte look-ups */
        for (int64_t j = 0; j < bs; j += 64) {
            __m512 y[4], next[4];
            __m512i below[4];
            for (int k = 0; k < 4; ++k) {
                y[k] = _mm512_div_ps(_mm512_loadu_ps(x + j + 16 * k), vdiv);
                below[k] = v_prefix_count(y[k], c->lut[i]);
            }
            const __m512i count = v_bytes64(below);
            v_lookup64(c->planes[c->plane[i] + 2], count, next);
            __mmask64 up = 0;
            for (int k = 0; k < 4; ++k) up |= (__mmask64)_mm512_cmp_ps_mask(next[k], y[k], _CMP_LE_OQ) << (16 * k);
            _mm512_storeu_si512((void *)(codes + j), _mm512_mask_add_epi8(count, up, count, _mm512_set1_epi8(1)));
        }
        return 1;
    }
#endif
    const __m512 map16 = n == 16 ? _mm512_loadu_ps(map) : _mm512_setzero_ps();
    const __m512 next16 = n == 16 ? _mm512_loadu_ps(c->next[i]) : _mm512_setzero_ps();
    for (int64_t j = 0; j < bs; j += 16) {
        __m512 y = _mm512_div_ps(_mm512_loadu_ps(x + j), vdiv);
        __m512i code;
        if (!c->stochastic) { /* the number of thresholds at or below y */
            if (n == 16) {
                code = v_count16(next16, y, 1);
            } else {
                __m512i a = v_prefix_count(y, c->lut[i]);
                code = _mm512_mask_add_epi32(a, _mm512_cmp_ps_mask(v_lookup256(a, c->next[i]), y, _CMP_LE_OQ), a, one);
            }
        } else { /* between the entries around y: the upper one with probability (y - lo) / (hi - lo) */
            __m512i idx;
            if (n == 16) {
                idx = v_count16(map16, y, 0);
            } else {
                idx = v_prefix_count(y, c->lut[i]);
                idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(v_lookup256(idx, map), y, _CMP_LT_OQ), idx, one);
            }
            idx = _mm512_min_epi32(idx, last);
            __m512i lower = _mm512_max_epi32(_mm512_sub_epi32(idx, one), zero);
            __m512 hi = v_lookup(idx, map16, map, n), lo = v_lookup(lower, map16, map, n);
            __m512 u = v_noise(first + j, high);
            __mmask16 up = _mm512_cmp_ps_mask(_mm512_mul_ps(u, _mm512_sub_ps(hi, lo)), _mm512_sub_ps(y, lo), _CMP_LT_OQ) |
                           _mm512_cmp_ps_mask(y, hi, _CMP_GE_OQ);
            code = _mm512_mask_blend_epi32(up, lower, idx);
        }
        v_store_codes(c->fmt, codes, j, code);
    }
    return 1;
}

/* saturate() for 16 lanes */
static inline __m512 v_saturate(__m512 v, __m512 g) {
    const __m512 max = _mm512_set1_ps(3.4028234663852886e38f);
    __mmask16 over = _mm512_cmp_ps_mask(v, max, _CMP_GT_OQ) & _mm512_cmp_ps_mask(v_abs(g), max, _CMP_LE_OQ);
    return _mm512_mask_mov_ps(v, over, max);
}

static void math_avx512(const ctx_t *c, int64_t n, const float *g, const float *p, float *m, float *v, float *vmax,
                        float *dst, absmax_t track[3]) {
    const __m512 omb1 = _mm512_set1_ps(c->s[0]), b2 = _mm512_set1_ps(c->s[1]), w = _mm512_set1_ps(c->s[2]);
    const __m512 inv_bc1 = _mm512_set1_ps(c->s[3]), inv_bc2s = _mm512_set1_ps(c->s[4]), eps = _mm512_set1_ps(c->s[5]);
    const __m512 wd = _mm512_set1_ps(c->wd), neg_lr = _mm512_set1_ps(c->lr);
    const int mode = c->mode;
    for (int64_t j = 0; j < n; j += 16) {
        __m512 gj = _mm512_loadu_ps(g + j), mj = _mm512_loadu_ps(m + j), vj = _mm512_loadu_ps(v + j);
        __m512 pj = mode & (EPI_L2 | EPI_DECOUPLED | EPI_APPLY) ? _mm512_loadu_ps(p + j) : _mm512_setzero_ps();
        if (mode & EPI_L2) gj = _mm512_add_ps(gj, _mm512_mul_ps(pj, wd));
        mj = _mm512_add_ps(mj, _mm512_mul_ps(omb1, _mm512_sub_ps(gj, mj)));
        __m512 gw = _mm512_mul_ps(gj, w);
        vj = v_saturate(_mm512_add_ps(_mm512_mul_ps(vj, b2), _mm512_mul_ps(gw, gw)), gj);
        __m512 d = vj, root;
        if (c->nmom == 3) {
            __m512 old = _mm512_loadu_ps(vmax + j);
            d = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(old, vj, _CMP_GT_OQ), vj, old);
            d = _mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(old, vj, _CMP_UNORD_Q), _mm512_set1_ps(NAN));
        }
        root = _mm512_sqrt_ps(d);
        if (c->nmom == 3) {
            __m512 stored = c->stochastic ? root : d;
            _mm512_storeu_ps(vmax + j, stored);
            v_track(&track[2], stored);
        }
        __m512 u = _mm512_div_ps(_mm512_mul_ps(mj, inv_bc1), _mm512_add_ps(_mm512_mul_ps(root, inv_bc2s), eps));
        if (mode & EPI_DECOUPLED) u = _mm512_add_ps(u, _mm512_mul_ps(pj, wd));
        if (mode & EPI_SCALE) u = _mm512_mul_ps(u, neg_lr);
        _mm512_storeu_ps(dst + j, mode & EPI_APPLY ? _mm512_add_ps(pj, u) : u);
        __m512 vs = c->stochastic ? (c->nmom == 3 ? _mm512_sqrt_ps(vj) : root) : vj;
        _mm512_storeu_ps(m + j, mj);
        _mm512_storeu_ps(v + j, vs);
        v_track(&track[0], mj);
        v_track(&track[1], vs);
    }
}

/* AdEMAMix's math_ademamix and math_generic's epilogue in one pass, 16 lanes at a time, with the same operations
 * in the same order (so the same bits), tracking the three moments' absmax as it goes (the generic path's separate
 * passes over the block cost AdEMAMix8bit 3-7% of its step on one 4096x4096 tensor). */
static void math_ademamix_avx512(const ctx_t *c, int64_t n, const float *g, const float *p, float *const mom[3],
                                 float *dst, absmax_t track[3]) {
    const __m512 omb1 = _mm512_set1_ps(c->s[0]), b2 = _mm512_set1_ps(c->s[1]), w = _mm512_set1_ps(c->s[2]);
    const __m512 inv_bc1 = _mm512_set1_ps(c->s[3]), inv_bc2s = _mm512_set1_ps(c->s[4]), eps = _mm512_set1_ps(c->s[5]);
    const __m512 omb3 = _mm512_set1_ps(c->s[6]), alpha = _mm512_set1_ps(c->s[7]);
    const __m512 wd = _mm512_set1_ps(c->wd), lr = _mm512_set1_ps(c->lr);
    const int mode = c->mode, nu_root = c->squared[2];
    float *m1 = mom[0], *m2 = mom[1], *nu = mom[2];
    for (int64_t j = 0; j < n; j += 16) {
        __m512 gj = _mm512_loadu_ps(g + j);
        __m512 pj = mode & (EPI_L2 | EPI_DECOUPLED | EPI_APPLY) ? _mm512_loadu_ps(p + j) : _mm512_setzero_ps();
        if (mode & EPI_L2) gj = _mm512_add_ps(gj, _mm512_mul_ps(pj, wd));
        __m512 m1j = _mm512_loadu_ps(m1 + j), m2j = _mm512_loadu_ps(m2 + j), nuj = _mm512_loadu_ps(nu + j);
        __m512 a = _mm512_add_ps(m1j, _mm512_mul_ps(omb1, _mm512_sub_ps(gj, m1j)));
        __m512 b = _mm512_add_ps(m2j, _mm512_mul_ps(omb3, _mm512_sub_ps(gj, m2j)));
        __m512 gw = _mm512_mul_ps(gj, w);
        __m512 v = v_saturate(_mm512_add_ps(_mm512_mul_ps(nuj, b2), _mm512_mul_ps(gw, gw)), gj);
        __m512 root = _mm512_sqrt_ps(v);
        __m512 u = _mm512_div_ps(_mm512_add_ps(_mm512_mul_ps(a, inv_bc1), _mm512_mul_ps(b, alpha)),
                                 _mm512_add_ps(_mm512_mul_ps(root, inv_bc2s), eps));
        if (mode & EPI_DECOUPLED) u = _mm512_add_ps(u, _mm512_mul_ps(pj, wd));
        if (mode & EPI_SCALE) u = _mm512_mul_ps(u, lr);
        _mm512_storeu_ps(dst + j, mode & EPI_APPLY ? _mm512_add_ps(pj, u) : u);
        __m512 vs = nu_root ? root : v;
        _mm512_storeu_ps(m1 + j, a);
        _mm512_storeu_ps(m2 + j, b);
        _mm512_storeu_ps(nu + j, vs);
        v_track(&track[0], a);
        v_track(&track[1], b);
        v_track(&track[2], vs);
    }
}
#endif

/* ------------------------------------------------------------------------------------------------------------
 * Driver
 * ------------------------------------------------------------------------------------------------------------ */

/* Scratch of one thread: eight float buffers of bs (three moments, g, p, out, the direction, the L2 gradient) and
 * three code buffers of bs bytes. */
static size_t scratch_bytes(int64_t bs) { return ((sizeof(float) * 8 * bs + 3 * bs + 63) / 64) * 64; }

/* Blocks of a segment: ceil(R / bs) per row. */
static int64_t seg_blocks(const int64_t *seg, int64_t bs) {
    const int64_t numel = seg[SEG_NUMEL], row = seg[SEG_ROW];
    return numel == 0 ? 0 : (numel / row) * ((row + bs - 1) / bs);
}

/* One block: b-th block of segment seg. */
static void step_block(const ctx_t *c, const int64_t *seg, int64_t b, float *work) {
    const int64_t bs = c->bs, row = seg[SEG_ROW], per_row = (row + bs - 1) / bs;
    const int64_t r = b / per_row, k = b % per_row, start = r * row + k * bs;
    const int64_t count = row - k * bs < bs ? row - k * bs : bs;
    const int gdt = (int)seg[SEG_GDT], pdt = (int)seg[SEG_PDT], odt = (int)seg[SEG_ODT];
    const int apply = c->mode & EPI_APPLY, short_block = count < bs;
    float *gbuf = work + 3 * bs, *pbuf = work + 4 * bs, *obuf = work + 5 * bs, *dbuf = work + 6 * bs, *lbuf = work + 7 * bs;
    uint8_t *cbuf = (uint8_t *)(work + 8 * bs); /* 3 * bs bytes */
    float *moment[3] = {work, work + bs, work + 2 * bs};
    const int64_t first = seg[SEG_INDEX] + start; /* this block's first element in the whole tensor */
    const uint32_t key[4] = {(uint32_t)seg[SEG_KEYS], (uint32_t)seg[SEG_KEYS + 1], (uint32_t)seg[SEG_KEYS + 2],
                             (uint32_t)seg[SEG_KEYS + 3]};

    const char *graw = (const char *)seg[SEG_G] + start * dt_size(gdt);
    const float *g = (const float *)graw;
    if (short_block || gdt != DT_F32) { load_f32(graw, gdt, count, bs, gbuf); g = gbuf; }
    char *praw = seg[SEG_P] ? (char *)seg[SEG_P] + start * dt_size(pdt) : NULL;
    const float *pin = (const float *)praw;
    if (praw && (short_block || pdt != DT_F32)) { load_f32(praw, pdt, count, bs, pbuf); pin = pbuf; }
    char *draw = apply ? praw : (char *)seg[SEG_OUT] + start * dt_size(odt);
    const int ddt = apply ? pdt : odt;
    float *out = (!short_block && ddt == DT_F32) ? (float *)draw : obuf;

    const int vector = LOWBIT_AVX512 && bs % 16 == 0;
    (void)vector; /* portable build */
    for (int i = 0; i < c->nmom && c->fmt == FMT_FP32; ++i) { /* plain moments: in place, or staged when short */
        float *state = (float *)seg[SEG_CODES + i] + start;
        if (short_block) load_f32(state, DT_F32, count, bs, moment[i]);
        else moment[i] = state;
    }
    const int64_t code_at = c->fmt == FMT_CODEBOOK4 ? r * ((row + 1) / 2) + k * bs / 2 : start;
    const int64_t code_len = c->fmt == FMT_CODEBOOK4 ? (count + 1) / 2 : count;
    for (int i = 0; i < c->nmom && c->fmt != FMT_FP32; ++i) {
        const uint8_t *codes = (const uint8_t *)seg[SEG_CODES + i] + code_at;
        float scale = ((const float *)seg[SEG_SCALES + i])[b];
        if (short_block) { /* the block's codes, zero-padded to bs */
            uint8_t *staged = cbuf + i * bs;
            memcpy(staged, codes, code_len);
            memset(staged + code_len, 0, c->code_bytes - code_len);
            codes = staged;
        }
#if LOWBIT_AVX512
        if (vector) decode_block_avx512(c, i, codes, scale, moment[i]);
        else
#endif
            decode_block(c, i, codes, scale, moment[i]);
        if (short_block) memset(moment[i] + count, 0, sizeof(float) * (bs - count)); /* padding is zero */
    }
#if LOWBIT_AVX512
    absmax_t track[3] = {{_mm512_setzero_ps(), 0}, {_mm512_setzero_ps(), 0}, {_mm512_setzero_ps(), 0}};
    if (vector && c->rule == RULE_ADAM) math_avx512(c, bs, g, pin, moment[0], moment[1], moment[2], out, track);
    else if (vector && c->rule == RULE_ADEMAMIX) math_ademamix_avx512(c, bs, g, pin, moment, out, track);
    else
#endif
    {
        math_generic(c, bs, g, pin, moment, out, dbuf, lbuf);
        for (int i = 0; i < c->nmom && short_block && c->fmt != FMT_FP32; ++i) /* the reference pads with zeros */
            memset(moment[i] + count, 0, sizeof(float) * (bs - count));
#if LOWBIT_AVX512
        for (int i = 0; i < c->nmom && vector && c->fmt != FMT_FP32; ++i) track_avx512(moment[i], bs, &track[i]);
#endif
    }
    if (out == obuf) store_from_f32(obuf, ddt, count, draw, apply && c->param_sr, key[3], first);
    if (c->fmt == FMT_FP32) {
        for (int i = 0; i < c->nmom && short_block; ++i) memcpy((float *)seg[SEG_CODES + i] + start, moment[i], sizeof(float) * count);
        return;
    }
    for (int i = 0; i < c->nmom; ++i) {
        uint8_t *dest = (uint8_t *)seg[SEG_CODES + i] + code_at;
        uint8_t *codes = short_block ? cbuf + i * bs : dest;
        float *scale = (float *)seg[SEG_SCALES + i] + b;
#if LOWBIT_AVX512
        if (!(vector && encode_block_avx512(c, i, moment[i], &track[i], first, key[i], codes, scale)))
#endif
            encode_block(c, i, moment[i], first, key[i], codes, scale);
        if (short_block) memcpy(dest, codes, code_len);
    }
}

static const float *after(const float *t) { return t ? t + 1 : NULL; }

/* The number of moments of `rule` with `flags` (Adam: 2, or 3 with amsgrad: nmom decides) and their signedness
 * (bit i set: moment i is signed), as rules.py defines them; -1 for an unknown rule. */
static int rule_moments(int rule, int flags, int nmom, int *signed_mask) {
    const int centered = (flags & FLAG_CENTERED) != 0, momentum = (flags & FLAG_MOMENTUM) != 0;
    switch (rule) {
    case RULE_ADAM: *signed_mask = 1; return nmom == 3 ? 3 : 2;
    case RULE_LION: case RULE_MUON: *signed_mask = 1; return 1;
    case RULE_TRACE: *signed_mask = momentum; return momentum;
    case RULE_RMS: *signed_mask = ((1 << (centered + momentum)) - 1) << 1; return 1 + centered + momentum;
    case RULE_ADEMAMIX: *signed_mask = 3; return 3;
    default: return -1;
    }
}

/* The layout the caller must use: the int64 fields of a segment row. native.py checks it after loading, so that a
 * cached file that is some other build of this library (or not this library at all) is refused before any call. */
int lowbit_abi(void) { return SEG_FIELDS; }

/* One step of rule `rule` (RULE_*, switches `flags`: FLAG_*) over `nseg` segments (`segs`: nseg * SEG_FIELDS int64),
 * each with `nmom` moments, moment i signed where bit i of `signed_mask` is set.
 *   scalars: 10 floats: the rule's scalars in the order of its Rule.scalars (unused slots 0), then the weight decay
 *   and the learning-rate factor (float32, computed by the caller exactly as the reference computes them).
 *   param_sr: bfloat16 parameters written back stochastically. mode: EPI_* bits.
 *   Codebook formats: *_lut are the prefix tables over the thresholds (nearest rounding) or over the maps
 *   (stochastic rounding); *_thr hold n + 1 floats: -inf, the n - 1 nearest-rounding thresholds, +inf.
 * Returns 0, 1 when scratch could not be allocated, 2 when the rule, its moments or their signedness are not
 * those of rules.py (nothing is written then). */
int lowbit_step(const int64_t *segs, int64_t nseg, int64_t bs, int nmom, int rule, int flags, int signed_mask, int fmt,
                const float *signed_map, const float *unsigned_map, int map_len, const float *fp8_lut,
                const uint8_t *signed_lut, const uint8_t *unsigned_lut, const float *signed_thr,
                const float *unsigned_thr, const float *scalars, int stochastic, int param_sr, int mode, int nthreads) {
    int expected_mask = 0;
    if (nmom < 0 || nmom > 3 || rule_moments(rule, flags, nmom, &expected_mask) != nmom || expected_mask != signed_mask)
        return 2;
    ctx_t c;
    memset(&c, 0, sizeof c);
    c.fmt = fmt, c.nmom = nmom, c.rule = rule, c.flags = flags, c.stochastic = stochastic, c.mode = mode;
    c.map_len = map_len, c.param_sr = param_sr, c.bs = bs, c.code_bytes = fmt == FMT_CODEBOOK4 ? bs / 2 : bs;
    c.fp8_lut = fp8_lut;
    for (int i = 0; i < 3; ++i) {
        const int is_signed = (signed_mask >> i) & 1;
        c.squared[i] = stochastic && !is_signed;
        c.floored[i] = !is_signed;
        c.plane[i] = is_signed ? 0 : 1;
        c.map[i] = is_signed ? signed_map : unsigned_map;
        c.lut[i] = is_signed ? signed_lut : unsigned_lut;
        c.next[i] = after(is_signed ? signed_thr : unsigned_thr);
    }
    for (int k = 0; k < 8; ++k) c.s[k] = scalars[k];
    c.wd = scalars[8], c.lr = scalars[9];
    if (fmt == FMT_CODEBOOK8) {
        const float *tables[4] = {signed_map, unsigned_map, after(signed_thr), after(unsigned_thr)};
        for (int t = 0; t < 4; ++t)
            for (int e = 0; e < 256; ++e) {
                uint32_t bits = f2u(tables[t][e]);
                for (int k = 0; k < 4; ++k) c.planes[t][k][e] = (uint8_t)(bits >> (8 * k));
            }
    }
    int64_t *starts = malloc(sizeof(int64_t) * (nseg + 1)); /* first global block of each segment */
    if (!starts) return 1;
    starts[0] = 0;
    for (int64_t s = 0; s < nseg; ++s) starts[s + 1] = starts[s] + seg_blocks(segs + s * SEG_FIELDS, bs);
    const int64_t total = starts[nseg];
    int failed = 0;
#pragma omp parallel num_threads(total >= 64 ? nthreads : 1) reduction(| : failed)
    {
        float *work = aligned_alloc(64, scratch_bytes(bs));
        int64_t s = -1;
        if (!work) failed = 1;
#pragma omp for schedule(static)
        for (int64_t gb = 0; gb < total; ++gb) {
            if (!work) continue;
            if (s < 0 || gb >= starts[s + 1] || gb < starts[s]) { /* find the segment: binary search */
                int64_t lo = 0, hi = nseg - 1;
                while (lo < hi) {
                    int64_t mid = (lo + hi + 1) / 2;
                    if (starts[mid] <= gb) lo = mid; else hi = mid - 1;
                }
                s = lo;
            }
            step_block(&c, segs + s * SEG_FIELDS, gb - starts[s], work);
        }
        free(work);
    }
    free(starts);
    return failed;
}
