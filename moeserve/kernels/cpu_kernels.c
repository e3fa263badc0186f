/* moeserve's fused CPU kernels: the small ops between the linears of a decode step, one call
 * each instead of 4-10 PyTorch ops (each ~5-20 us of dispatch and allocation at decode sizes).
 *
 * Built at first use by moeserve/kernels/native.py (gcc -O3 -march=native -fopenmp) and called
 * through ctypes with raw pointers; the Python side checks shapes, dtypes and contiguity.
 * Every kernel exists for float32 (suffix _f32) and bfloat16 (_bf16, stored as uint16). Math
 * runs in float32; bfloat16 results are rounded to nearest even, as PyTorch rounds them, and
 * where PyTorch rounds an intermediate to the tensor's dtype these kernels round it too, so the
 * elementwise kernels match the PyTorch ops they replace bit for bit (reductions may differ in
 * the last float32 bit: their summation order is not PyTorch's).
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) {   /* round to nearest even; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16)(bits >> 16);
}

static inline float f32_load(float v) { return v; }
static inline float f32_store(float v) { return v; }
static inline float f32_round(float v) { return v; }
static inline float bf16_load(bf16 v) { return bf16_to_f32(v); }
static inline bf16 bf16_store(float v) { return f32_to_bf16(v); }
static inline float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

#define ATTN_BLOCK 128   /* context positions scored at once (flash-decoding style) */

/* Vector helpers: 16 floats at a time with AVX-512, plain loops elsewhere (AVX2 machines get
 * what gcc vectorizes on its own). d % 16 == 0 takes the AVX-512 loops. */
#ifdef __AVX512F__
#include <immintrin.h>
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const bf16 *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
/* exp(x) for x <= 0 (softmax, SiLU): 2^n * p(r), r = x - n ln2 in
 * [-ln2/2, ln2/2], p the degree-6 Taylor polynomial (relative error < 2e-7). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));   /* below: 0 (scalef gives subnormals down to here) */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#ifdef __AVX512F__
#define VEC_DOT(SUFFIX, qf, kr, d, dot)                                                         \
    if (d % 16 == 0) {                                                                          \
        __m512 vacc = _mm512_setzero_ps();                                                      \
        for (int64_t i = 0; i < d; i += 16)                                                     \
            vacc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + i), _mm512_loadu_ps(kr + i), vacc);     \
        dot = _mm512_reduce_add_ps(vacc);                                                       \
    } else {                                                                                    \
        for (int64_t i = 0; i < d; i++) dot += qf[i] * kr[i];                                   \
    }
#define VEC_AXPY(a, vr, d, acc)                                                                 \
    if (d % 16 == 0) {                                                                          \
        const __m512 va = _mm512_set1_ps(a);                                                    \
        for (int64_t i = 0; i < d; i += 16)                                                     \
            _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(vr + i), _mm512_loadu_ps(acc + i))); \
    } else {                                                                                    \
        for (int64_t i = 0; i < d; i++) acc[i] += a * vr[i];                                    \
    }
#else
#define VEC_DOT(SUFFIX, qf, kr, d, dot)                                                         \
    _Pragma("omp simd reduction(+:dot)")                                                        \
    for (int64_t i = 0; i < d; i++) dot += qf[i] * kr[i];
#define VEC_AXPY(a, vr, d, acc)                                                                 \
    for (int64_t i = 0; i < d; i++) acc[i] += a * vr[i];
#endif

/* row [n] of a cache as float32 into out (n % 16 == 0 takes the vector path). */
#define DEFINE_ROW_TO_F32(SUFFIX, T)                                                            \
static inline void row_to_f32_##SUFFIX(const T *row, int64_t n, float *out) {                   \
    ROW_CONVERT(SUFFIX, row, n, out)                                                            \
}
#ifdef __AVX512F__
#define ROW_CONVERT(SUFFIX, row, n, out)                                                        \
    int64_t i = 0;                                                                              \
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, load16_##SUFFIX(row + i));           \
    for (; i < n; i++) out[i] = SUFFIX##_load(row[i]);
#else
#define ROW_CONVERT(SUFFIX, row, n, out)                                                        \
    for (int64_t i = 0; i < n; i++) out[i] = SUFFIX##_load(row[i]);
#endif
DEFINE_ROW_TO_F32(f32, float)
DEFINE_ROW_TO_F32(bf16, bf16)

/* scores[j] = exp(scores[j] - m) for j < n; returns their sum. */
static float exp_shifted(float *scores, int64_t n, float m) {
    float sum = 0.0f;
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 vm = _mm512_set1_ps(m);
    __m512 vsum = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), vm));
        _mm512_storeu_ps(scores + j, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; j < n; j++) {
        scores[j] = expf(scores[j] - m);
        sum += scores[j];
    }
    return sum;
}

/* Online softmax over one block of n scores per head (scores [NH][ATTN_BLOCK]): the scores
 * become exp(score - new max), the running max m, sum l and output acc [NH][D] are rescaled. */
static void softmax_block(float *scores, int64_t n, int64_t nh, int64_t d, float *m, float *l, float *acc) {
    for (int64_t h = 0; h < nh; h++) {
        float *sh = scores + h * ATTN_BLOCK;
        float block_max = -INFINITY;
        for (int64_t j = 0; j < n; j++) block_max = sh[j] > block_max ? sh[j] : block_max;
        const float new_max = block_max > m[h] ? block_max : m[h];
        const float rescale = expf(m[h] - new_max);
        if (rescale != 1.0f)
            for (int64_t i = 0; i < d; i++) acc[h * d + i] *= rescale;
        l[h] = l[h] * rescale + exp_shifted(sh, n, new_max);
        m[h] = new_max;
    }
}

/* One sequence's attention over context positions [lo, hi), every head at once: each position's
 * key and value rows ([NKV, D], contiguous in the cache) are read once, in slot order, and
 * converted once for the G query heads that share them. Leaves per head the running max m[h],
 * the sum of exp(score - m) l[h] and the unnormalised output acc[h][D].
 * Scratch: qf [NH, D] scaled queries, kv [NKV, D], scores [NH, ATTN_BLOCK]. */
#define DEFINE_ATTEND_RANGE(SUFFIX, T)                                                          \
static void attend_range_##SUFFIX(const float *qf, const T *k, const T *v, const int64_t *slots,\
                                  int64_t lo, int64_t hi, int64_t nh, int64_t nkv, int64_t d,   \
                                  float *kv, float *scores, float *m, float *l, float *acc) {   \
    const int64_t g = nh / nkv, row = nkv * d;                                                  \
    for (int64_t h = 0; h < nh; h++) { m[h] = -INFINITY; l[h] = 0.0f; }                         \
    memset(acc, 0, sizeof(float) * nh * d);                                                     \
    for (int64_t j0 = lo; j0 < hi; j0 += ATTN_BLOCK) {                                          \
        const int64_t n = hi - j0 < ATTN_BLOCK ? hi - j0 : ATTN_BLOCK;                          \
        for (int64_t j = 0; j < n; j++) {                                                       \
            row_to_f32_##SUFFIX(k + slots[j0 + j] * row, row, kv);                              \
            for (int64_t h = 0; h < nh; h++) {                                                  \
                const float *qh = qf + h * d, *kh = kv + (h / g) * d;                           \
                float dot = 0.0f;                                                               \
                VEC_DOT(SUFFIX, qh, kh, d, dot);                                                \
                scores[h * ATTN_BLOCK + j] = dot;                                               \
            }                                                                                   \
        }                                                                                       \
        softmax_block(scores, n, nh, d, m, l, acc);                                             \
        for (int64_t j = 0; j < n; j++) {                                                       \
            row_to_f32_##SUFFIX(v + slots[j0 + j] * row, row, kv);                              \
            for (int64_t h = 0; h < nh; h++) {                                                  \
                const float p = scores[h * ATTN_BLOCK + j];                                     \
                const float *vh = kv + (h / g) * d;                                             \
                float *ah = acc + h * d;                                                        \
                VEC_AXPY(p, vh, d, ah);                                                         \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}
DEFINE_ATTEND_RANGE(f32, float)
DEFINE_ATTEND_RANGE(bf16, bf16)

/* The same with AVX-512 for head dims 64 and 128, in tiles that keep sums in registers:
 * scores 16 positions at a time per head (16 dot products, then one transposing reduction
 * instead of 16 horizontal sums), and the weighted sum of V per kv head with a tile of its
 * query heads' outputs in registers across the block's positions. Scratch kf [16, D]. */
#ifdef __AVX512F__
/* Lane j = the sum of r[j]'s 16 lanes. */
static inline __m512 sum16x16(const __m512 *r) {
    __m512 s[8], w[4];
#pragma GCC unroll 8
    for (int p = 0; p < 8; p++)
        s[p] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]), _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]));
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++)     /* 128-bit lane L of w[q]: rows 4q..4q+3, their part L */
        w[q] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * q], s[2 * q + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s[2 * q], s[2 * q + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Prefetches the cache rows (row_bytes each) of up to 16 slots: the next chunk's keys, the
 * values the block will sum. The context is scattered over cache blocks in any order, which
 * the hardware prefetchers cannot follow. */
#define PREFETCH_ROWS(base, slots, avail, row_bytes, hint)                                      \
    for (int64_t p = 0; p < 16 && p < (avail); p++)                                             \
        for (int64_t b = 0; b < (row_bytes); b += 64)                                           \
            _mm_prefetch((const char *)(base) + (slots)[p] * (row_bytes) + b, hint);

/* scores[h][0..count) for the G heads of one kv head against kf [count, D] (D = 16 * CHUNKS). */
static inline __attribute__((always_inline)) void score_heads(const float *qf, const float *kf, int count,
                                                              int64_t h0, int64_t g, const int chunks,
                                                              float *scores) {
    for (int64_t h = h0; h < h0 + g; h++) {
        const float *qh = qf + h * chunks * 16;
        __m512 q[8], r[16];
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++)
            q[c] = c < chunks ? _mm512_loadu_ps(qh + c * 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            __m512 a = _mm512_setzero_ps();
            if (j < count)
#pragma GCC unroll 8
                for (int c = 0; c < 8; c++)
                    if (c < chunks) a = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(kf + (j * chunks + c) * 16), a);
            r[j] = a;
        }
        _mm512_mask_storeu_ps(scores + h * ATTN_BLOCK, (__mmask16)((1u << count) - 1), sum16x16(r));
    }
}

/* acc[h] += sum_j p[h][j] v_j for heads h0..h0+th of kv head kh, their outputs in registers. */
#define DEFINE_PV_TILE(SUFFIX, T)                                                               \
static inline __attribute__((always_inline)) void pv_tile_##SUFFIX(                              \
        const T *v, const int64_t *slots, int64_t n, int64_t row, int64_t kh, const float *scores, \
        int64_t h0, int th, const int chunks, float *acc) {                                     \
    __m512 a[16];                                                                               \
    _Pragma("GCC unroll 16")                                                                    \
    for (int i = 0; i < 16; i++)                                                                \
        a[i] = i < th * chunks ? _mm512_loadu_ps(acc + h0 * chunks * 16 + i * 16) : _mm512_setzero_ps(); \
    for (int64_t j = 0; j < n; j++) {                                                           \
        const T *vr = v + slots[j] * row + kh * chunks * 16;                                    \
        _Pragma("GCC unroll 8")                                                                 \
        for (int c = 0; c < 8; c++)                                                             \
            if (c < chunks) {                                                                   \
                const __m512 vc = load16_##SUFFIX(vr + c * 16);                                 \
                _Pragma("GCC unroll 4")                                                         \
                for (int t = 0; t < 4; t++)                                                     \
                    if (t < th && t * chunks + c < 16)                                          \
                        a[t * chunks + c] = _mm512_fmadd_ps(                                    \
                            _mm512_set1_ps(scores[(h0 + t) * ATTN_BLOCK + j]), vc, a[t * chunks + c]); \
            }                                                                                   \
    }                                                                                           \
    _Pragma("GCC unroll 16")                                                                    \
    for (int i = 0; i < 16; i++)                                                                \
        if (i < th * chunks) _mm512_storeu_ps(acc + h0 * chunks * 16 + i * 16, a[i]);           \
}
DEFINE_PV_TILE(f32, float)
DEFINE_PV_TILE(bf16, bf16)

#define DEFINE_ATTEND_TILED(SUFFIX, T)                                                          \
static inline __attribute__((always_inline)) void attend_tiled_body_##SUFFIX(                    \
        const float *qf, const T *k, const T *v, const int64_t *slots, int64_t lo, int64_t hi,  \
        int64_t nh, int64_t nkv, const int chunks, float *kf, float *scores, float *m, float *l, \
        float *acc) {                                                                           \
    const int64_t d = chunks * 16, g = nh / nkv, row = nkv * d;                                 \
    const int tile = 4 / (chunks / 4);      /* query heads whose D-wide outputs fill 16 registers */ \
    for (int64_t h = 0; h < nh; h++) { m[h] = -INFINITY; l[h] = 0.0f; }                         \
    memset(acc, 0, sizeof(float) * nh * d);                                                     \
    for (int64_t j0 = lo; j0 < hi; j0 += ATTN_BLOCK) {                                          \
        const int64_t n = hi - j0 < ATTN_BLOCK ? hi - j0 : ATTN_BLOCK;                          \
        for (int64_t js = 0; js < n; js += 16) {                                                \
            const int count = n - js < 16 ? (int)(n - js) : 16;                                 \
            PREFETCH_ROWS(k, slots + j0 + js + 16, hi - (j0 + js + 16), row * (int64_t)sizeof(T), _MM_HINT_T0); \
            PREFETCH_ROWS(v, slots + j0 + js, count, row * (int64_t)sizeof(T), _MM_HINT_T1);    \
            for (int64_t kh = 0; kh < nkv; kh++) {                                              \
                for (int j = 0; j < count; j++)                                                 \
                    row_to_f32_##SUFFIX(k + slots[j0 + js + j] * row + kh * d, d, kf + j * d);  \
                score_heads(qf, kf, count, kh * g, g, chunks, scores + js);                     \
            }                                                                                   \
        }                                                                                       \
        softmax_block(scores, n, nh, d, m, l, acc);                                             \
        for (int64_t kh = 0; kh < nkv; kh++)                                                    \
            for (int64_t h0 = kh * g; h0 < (kh + 1) * g; h0 += tile) {                          \
                const int th = (kh + 1) * g - h0 < tile ? (int)((kh + 1) * g - h0) : tile;      \
                pv_tile_##SUFFIX(v, slots + j0, n, row, kh, scores, h0, th, chunks, acc);       \
            }                                                                                   \
    }                                                                                           \
}                                                                                               \
static void attend_tiled_##SUFFIX(const float *qf, const T *k, const T *v, const int64_t *slots, \
                                  int64_t lo, int64_t hi, int64_t nh, int64_t nkv, int64_t d,   \
                                  float *kf, float *scores, float *m, float *l, float *acc) {   \
    if (d == 64)                                                                                \
        attend_tiled_body_##SUFFIX(qf, k, v, slots, lo, hi, nh, nkv, 4, kf, scores, m, l, acc); \
    else                                                                                        \
        attend_tiled_body_##SUFFIX(qf, k, v, slots, lo, hi, nh, nkv, 8, kf, scores, m, l, acc); \
}
DEFINE_ATTEND_TILED(f32, float)
DEFINE_ATTEND_TILED(bf16, bf16)
#define ATTN_TILED(d) ((d) == 64 || (d) == 128)
#else
#define ATTN_TILED(d) 0
#define attend_tiled_f32 attend_range_f32
#define attend_tiled_bf16 attend_range_bf16
#endif

/* Decode attention over a paged KV cache, no gather: each sequence's one query token attends to
 * its context positions [start, len) read in place through its slot list.
 *   q        [B, NH, D]          queries (this step's token of each sequence), rows q_stride apart
 *   k, v     [S, NKV, D]         the layer's cache, flat slots (block * block_size + offset)
 *   slots    [B, lmax] int64     each sequence's cache slot of every context position
 *   lens     [B] int64           context length including the new token (<= lmax)
 *   starts   [B] int64 or NULL   first attended position (sliding window / chunked attention)
 *   sinks    [NH] float32 or NULL  gpt-oss: a per-head logit in every softmax denominator
 *   out      [B, NH, D]
 * Tasks are (sequence, split): with fewer sequences than threads each context is split into
 * `nsplit` ranges whose partial softmax states are merged at the end (flash-decoding). */
#define DEFINE_DECODE_ATTENTION(SUFFIX, T)                                                      \
void decode_attention_##SUFFIX(const T *q, int64_t q_stride, const T *k, const T *v,             \
                               const int64_t *slots, int64_t lmax, const int64_t *lens,         \
                               const int64_t *starts, const float *sinks, float scale,          \
                               int64_t batch, int64_t nh, int64_t nkv, int64_t d, T *out) {     \
    const int64_t threads = omp_get_max_threads();                                              \
    const int64_t nsplit = batch >= threads ? 1 : (threads + batch - 1) / batch;               \
    const int64_t tasks = batch * nsplit;                                                       \
    float *part_m = malloc(sizeof(float) * tasks * nh);                                         \
    float *part_l = malloc(sizeof(float) * tasks * nh);                                         \
    float *part_acc = malloc(sizeof(float) * tasks * nh * d);                                   \
    _Pragma("omp parallel")                                                                     \
    {                                                                                           \
        float *qf = malloc(sizeof(float) * nh * d);                                             \
        float *kv = malloc(sizeof(float) * (nkv > 16 ? nkv : 16) * d);  /* a row, or kf [16, D] */ \
        float *scores = malloc(sizeof(float) * nh * ATTN_BLOCK);                                \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t task = 0; task < tasks; task++) {                                          \
            const int64_t b = task / nsplit, split = task % nsplit;                             \
            const int64_t start = starts && starts[b] > 0 ? starts[b] : 0;                      \
            const int64_t span = (lens[b] - start + nsplit - 1) / nsplit;                       \
            const int64_t lo = start + split * span;                                            \
            const int64_t hi = lo + span < lens[b] ? lo + span : lens[b];                       \
            row_to_f32_##SUFFIX(q + b * q_stride, nh * d, qf);                                  \
            for (int64_t i = 0; i < nh * d; i++) qf[i] *= scale;                                \
            (ATTN_TILED(d) ? attend_tiled_##SUFFIX : attend_range_##SUFFIX)(                    \
                qf, k, v, slots + b * lmax, lo, hi, nh, nkv, d, kv, scores, part_m + task * nh, \
                part_l + task * nh, part_acc + task * nh * d);                                  \
        }                                                                                       \
        free(qf);                                                                               \
        free(kv);                                                                               \
        free(scores);                                                                           \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t bh = 0; bh < batch * nh; bh++) {                                           \
            const int64_t b = bh / nh, h = bh % nh;                                             \
            float m = sinks ? sinks[h] : -INFINITY;                                             \
            for (int64_t s = 0; s < nsplit; s++) {                                              \
                const float ms = part_m[(b * nsplit + s) * nh + h];                             \
                m = ms > m ? ms : m;                                                            \
            }                                                                                   \
            float denom = sinks ? expf(sinks[h] - m) : 0.0f;                                    \
            float o[d];                                                                         \
            memset(o, 0, sizeof(float) * d);                                                    \
            for (int64_t s = 0; s < nsplit; s++) {                                              \
                const int64_t t = (b * nsplit + s) * nh + h;                                    \
                if (part_l[t] == 0.0f) continue;                                                \
                const float w = expf(part_m[t] - m);                                            \
                denom += part_l[t] * w;                                                         \
                const float *a = part_acc + t * d;                                              \
                for (int64_t i = 0; i < d; i++) o[i] += a[i] * w;                               \
            }                                                                                   \
            const float factor = denom > 0.0f ? 1.0f / denom : 0.0f;                            \
            T *oh = out + (b * nh + h) * d;                                                     \
            for (int64_t i = 0; i < d; i++) oh[i] = SUFFIX##_store(o[i] * factor);              \
        }                                                                                       \
    }                                                                                           \
    free(part_m);                                                                               \
    free(part_l);                                                                               \
    free(part_acc);                                                                             \
}

DEFINE_DECODE_ATTENTION(f32, float)
DEFINE_DECODE_ATTENTION(bf16, bf16)

/* ---- argmax over each row, as torch.argmax: the first index of the largest value, or of the
 * first NaN if the row has one (NaN counts as the largest). x [rows, n] rows x_stride apart
 * (n < 2^31), out [rows] int64. torch's own CPU argmax took ~30 us per 32k-entry row here. */
#ifdef __AVX512F__
#define ARGMAX_VECTOR(SUFFIX)                                                                   \
    if (n >= 16) {                                                                              \
        const __m512i step = _mm512_set1_epi32(16);                                             \
        __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); \
        __m512 vmax = load16_##SUFFIX(xr);                                                      \
        __m512i vbest = index;                                                                  \
        __mmask16 nan = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);                           \
        for (i = 16; !nan && i + 16 <= n; i += 16) {                                            \
            const __m512 v = load16_##SUFFIX(xr + i);                                           \
            index = _mm512_add_epi32(index, step);                                              \
            nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);                                       \
            const __mmask16 greater = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);                 \
            vmax = _mm512_mask_mov_ps(vmax, greater, v);                                        \
            vbest = _mm512_mask_mov_epi32(vbest, greater, index);                               \
        }                                                                                       \
        if (nan) {                  /* in the 16 values before i */                             \
            out[r] = i - 16 + __builtin_ctz(nan);                                               \
            continue;                                                                           \
        }                                                                                       \
        best_value = _mm512_reduce_max_ps(vmax);                                                \
        const __mmask16 at_max = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(best_value), _CMP_EQ_OQ); \
        best = _mm512_mask_reduce_min_epi32(at_max, vbest);                                     \
    }
#else
#define ARGMAX_VECTOR(SUFFIX)
#endif
#define DEFINE_ARGMAX(SUFFIX, T)                                                                \
void argmax_##SUFFIX(const T *x, int64_t x_stride, int64_t rows, int64_t n, int64_t *out) {     \
    _Pragma("omp parallel for schedule(static) if (rows > 1)")                                 \
    for (int64_t r = 0; r < rows; r++) {                                                        \
        const T *xr = x + r * x_stride;                                                         \
        int64_t i = 0, best = 0;                                                                \
        float best_value = -INFINITY;                                                           \
        ARGMAX_VECTOR(SUFFIX)                                                                   \
        for (; i < n; i++) {                                                                    \
            const float v = SUFFIX##_load(xr[i]);                                               \
            if (v != v) { best = i; break; }                                                    \
            if (v > best_value || i == 0) { best_value = v; best = i; }                         \
        }                                                                                       \
        out[r] = best;                                                                          \
    }                                                                                           \
}
DEFINE_ARGMAX(f32, float)
DEFINE_ARGMAX(bf16, bf16)

/* RMSNorm as the reference models compute it: normed = x * rsqrt(mean(x^2) + eps) in float32,
 * rounded to x's dtype, then times the weight (rounded again).
 *   x [T, H] rows `x_stride` apart; weight [H] in x's dtype; out [T, H] contiguous. */
#define DEFINE_RMS_NORM(SUFFIX, T)                                                              \
void rms_norm_##SUFFIX(const T *x, int64_t x_stride, const T *weight, float eps, int64_t rows,  \
                       int64_t h, T *out) {                                                     \
    _Pragma("omp parallel for schedule(static) if (rows > 4)")                                 \
    for (int64_t r = 0; r < rows; r++) {                                                        \
        const T *xr = x + r * x_stride;                                                         \
        T *o = out + r * h;                                                                     \
        float sum = 0.0f;                                                                       \
        _Pragma("omp simd reduction(+:sum)")                                                    \
        for (int64_t i = 0; i < h; i++) {                                                       \
            const float f = SUFFIX##_load(xr[i]);                                               \
            sum += f * f;                                                                       \
        }                                                                                       \
        const float inv = 1.0f / sqrtf(sum / (float)h + eps);                                  \
        for (int64_t i = 0; i < h; i++) {                                                       \
            const float normed = SUFFIX##_round(SUFFIX##_load(xr[i]) * inv);                    \
            o[i] = SUFFIX##_store(SUFFIX##_load(weight[i]) * normed);                           \
        }                                                                                       \
    }                                                                                           \
}

DEFINE_RMS_NORM(f32, float)
DEFINE_RMS_NORM(bf16, bf16)

/* Neox rotary embedding (dims i and i + rot/2 form a pair) on queries and keys in place, then
 * this step's keys and values written to the layer's cache.
 *   qk [T, NH + NKV, Dh] rows `qk_stride` apart (heads contiguous); the first `rot` dims of a
 *      head rotate (partial rotary), with cos/sin [P, rot] float32 tables (halves duplicated)
 *      rounded to the dtype first, as RotaryEmbedding does: x * cos + rotate_half(x) * sin,
 *      each product and the sum rounded to the dtype.
 *   v [T, NKV, Dh] rows `v_stride` apart; positions [T]; slot_mapping [T]
 *   k_cache, v_cache [S, NKV, Dh]: row slot_mapping[t] gets token t's key and value. */
#define DEFINE_ROPE_CACHE(SUFFIX, T)                                                            \
void rope_write_cache_##SUFFIX(T *qk, int64_t qk_stride, const T *v, int64_t v_stride,           \
                               const float *cos_table, const float *sin_table, int64_t rot,      \
                               const int64_t *positions, const int64_t *slot_mapping,            \
                               int64_t tokens, int64_t nh, int64_t nkv, int64_t dh,              \
                               T *k_cache, T *v_cache) {                                         \
    const int64_t half = rot / 2;                                                               \
    _Pragma("omp parallel for schedule(static) if (tokens > 4)")                               \
    for (int64_t t = 0; t < tokens; t++) {                                                      \
        const float *cos_row = cos_table + positions[t] * rot;                                  \
        const float *sin_row = sin_table + positions[t] * rot;                                  \
        T *row = qk + t * qk_stride;                                                            \
        for (int64_t hd = 0; hd < nh + nkv; hd++) {                                             \
            T *x = row + hd * dh;                                                               \
            for (int64_t i = 0; i < half; i++) {                                                \
                const float a = SUFFIX##_load(x[i]), b = SUFFIX##_load(x[i + half]);            \
                const float c0 = SUFFIX##_round(cos_row[i]), s0 = SUFFIX##_round(sin_row[i]);   \
                const float c1 = SUFFIX##_round(cos_row[i + half]);                             \
                const float s1 = SUFFIX##_round(sin_row[i + half]);                             \
                const float lo = SUFFIX##_round(a * c0) + SUFFIX##_round(-b * s0);              \
                const float hi = SUFFIX##_round(b * c1) + SUFFIX##_round(a * s1);               \
                x[i] = SUFFIX##_store(lo);                                                      \
                x[i + half] = SUFFIX##_store(hi);                                               \
            }                                                                                   \
        }                                                                                       \
        const int64_t slot = slot_mapping[t];                                                   \
        memcpy(k_cache + slot * nkv * dh, row + nh * dh, sizeof(T) * nkv * dh);                 \
        const T *vr = v + t * v_stride;                                                         \
        memcpy(v_cache + slot * nkv * dh, vr, sizeof(T) * nkv * dh);                            \
    }                                                                                           \
}

DEFINE_ROPE_CACHE(f32, float)
DEFINE_ROPE_CACHE(bf16, bf16)

/* ---- Routed experts on the CPU: sort routes by expert, gather, SwiGLU, weighted combine ---- */

/* Groups routes by local expert with a stable counting sort (the order torch.argsort(stable=True)
 * gives over the local ids), routes of other ranks' experts or dropped by a capacity limit last.
 *   ids [R] int64 global expert of each route (token-major: route r is token r / K)
 *   kept [R] bool or NULL; first, num_local: this rank's experts [first, first + num_local)
 *   order [R] int64 out: route indices grouped by expert; sizes [num_local + 1] int64 out. */
void moe_sort_routes(const int64_t *ids, const uint8_t *kept, int64_t routes, int64_t first, int64_t num_local,
                     int64_t *order, int64_t *sizes) {
    int64_t next[num_local + 1];
    memset(sizes, 0, sizeof(int64_t) * (num_local + 1));
    for (int64_t r = 0; r < routes; r++) {
        const int64_t e = ids[r] - first;
        const int local = e >= 0 && e < num_local && (!kept || kept[r]);
        sizes[local ? e : num_local]++;
    }
    int64_t offset = 0;
    for (int64_t e = 0; e <= num_local; e++) { next[e] = offset; offset += sizes[e]; }
    for (int64_t r = 0; r < routes; r++) {
        const int64_t e = ids[r] - first;
        const int local = e >= 0 && e < num_local && (!kept || kept[r]);
        order[next[local ? e : num_local]++] = r;
    }
}

/* out [n, H] (float32 or x's dtype) = rows order[i] / K of x [T, H] (rows x_stride apart). */
#define DEFINE_GATHER_ROWS(SUFFIX, T)                                                           \
void gather_rows_##SUFFIX(const T *x, int64_t x_stride, const int64_t *order, int64_t n, int64_t k, \
                          int64_t h, int to_f32, void *out) {                                   \
    for (int64_t i = 0; i < n; i++) {                                                           \
        const T *src = x + (order[i] / k) * x_stride;                                           \
        if (to_f32) row_to_f32_##SUFFIX(src, h, (float *)out + i * h);                          \
        else memcpy((T *)out + i * h, src, sizeof(T) * h);                                      \
    }                                                                                           \
}
DEFINE_GATHER_ROWS(f32, float)
DEFINE_GATHER_ROWS(bf16, bf16)

/* SwiGLU as F.silu(gate).mul_(up) computes it: gate_up [n, 2I] (gate columns, then up), out
 * [n, I]; silu = g / (1 + exp(-g)) rounded to the dtype, then the product. */
#ifdef __AVX512F__
static inline __m512 silu16(__m512 g) {   /* exp16 takes x <= 0: exp(-|g|), then the identity for g < 0 */
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));   /* exp(-|g|) */
    const __m512 one = _mm512_set1_ps(1.0f);
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    /* g >= 0: g / (1 + e); g < 0: g * e / (1 + e)  (exp(-g) = 1 / e) */
    const __m512 num = _mm512_mask_mul_ps(g, neg, g, e);
    return _mm512_div_ps(num, _mm512_add_ps(one, e));
}
static inline __m512 round16_f32(__m512 v) { return v; }
static inline __m512 round16_bf16(__m512 v) {   /* to the nearest bf16, kept as float32 */
    __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xffff0000)));
}
static inline void store16_f32(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store16_bf16(bf16 *p, __m512 v) {   /* v already holds bf16 values */
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#define SWIGLU_VECTOR(SUFFIX)                                                                   \
    for (; i + 16 <= inter; i += 16) {                                                          \
        const __m512 silu = round16_##SUFFIX(silu16(load16_##SUFFIX(gate + i)));                \
        store16_##SUFFIX(o + i, round16_##SUFFIX(_mm512_mul_ps(silu, load16_##SUFFIX(up + i)))); \
    }
#else
#define SWIGLU_VECTOR(SUFFIX)
#endif
#define DEFINE_SWIGLU(SUFFIX, T)                                                                \
static inline void swiglu_row_##SUFFIX(const T *gate, const T *up, int64_t inter, T *o) {        \
    int64_t i = 0;                                                                              \
    SWIGLU_VECTOR(SUFFIX)                                                                       \
    for (; i < inter; i++) {                                                                    \
        const float g = SUFFIX##_load(gate[i]);                                                 \
        const float silu = SUFFIX##_round(g / (1.0f + expf(-g)));                               \
        o[i] = SUFFIX##_store(silu * SUFFIX##_load(up[i]));                                     \
    }                                                                                           \
}                                                                                               \
void swiglu_##SUFFIX(const T *gate_up, int64_t n, int64_t inter, T *out) {                      \
    _Pragma("omp parallel for schedule(static) if (n * inter > 16384)")                         \
    for (int64_t r = 0; r < n; r++)                                                             \
        swiglu_row_##SUFFIX(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, inter, out + r * inter); \
}
DEFINE_SWIGLU(f32, float)
DEFINE_SWIGLU(bf16, bf16)

/* The weighted sum of each token's routes, in float32 and in route order, then rounded once:
 *   y [routed, H] expert outputs of the sorted routes (float32, or `y_bf16`); rows past `routed`
 *   (other ranks' experts, dropped routes) count as zero. order [R] as moe_sort_routes gave it;
 *   weights [R] float32 token-major, or NULL (Llama 4: the weight already scaled the input).
 *   out [T, H] in the model dtype. */
#define DEFINE_COMBINE(SUFFIX, T)                                                               \
static void combine_token_##SUFFIX(const void *y, int y_bf16, int64_t routed, const int64_t *pos, \
                                   const float *weights, int64_t t, int64_t k, int64_t h, T *out) { \
    float acc[h];                                                                               \
    memset(acc, 0, sizeof(float) * h);                                                          \
    for (int64_t kk = 0; kk < k; kk++) {                                                        \
        const int64_t p = pos[t * k + kk];                                                      \
        if (p >= routed) continue;                                                              \
        const float w = weights ? weights[t * k + kk] : 1.0f;                                   \
        if (y_bf16) {                                                                           \
            const bf16 *yr = (const bf16 *)y + p * h;                                           \
            for (int64_t i = 0; i < h; i++) acc[i] += (weights ? bf16_load(yr[i]) * w : bf16_load(yr[i])); \
        } else {                                                                                \
            const float *yr = (const float *)y + p * h;                                         \
            for (int64_t i = 0; i < h; i++) acc[i] += (weights ? yr[i] * w : yr[i]);            \
        }                                                                                       \
    }                                                                                           \
    T *o = out + t * h;                                                                         \
    for (int64_t i = 0; i < h; i++) o[i] = SUFFIX##_store(acc[i]);                              \
}                                                                                               \
void moe_combine_##SUFFIX(const void *y, int y_bf16, int64_t routed, const int64_t *order,      \
                          const float *weights, int64_t tokens, int64_t k, int64_t h, T *out) { \
    int64_t *pos = malloc(sizeof(int64_t) * tokens * k);                                        \
    for (int64_t i = 0; i < tokens * k; i++) pos[order[i]] = i;                                 \
    _Pragma("omp parallel for schedule(static) if (tokens > 4)")                                \
    for (int64_t t = 0; t < tokens; t++)                                                        \
        combine_token_##SUFFIX(y, y_bf16, routed, pos, weights, t, k, h, out);                  \
    free(pos);                                                                                  \
}
DEFINE_COMBINE(f32, float)
DEFINE_COMBINE(bf16, bf16)

/* ---- int8 linear: int8 weights per output channel, activations quantized per row ----
 *
 * Weights are packed once as [N/16][K/4][16][4] int8: for each group of 16 output channels, each
 * run of 4 inputs holds the 16 channels' 4 weights, the operand layout of AVX512-VNNI's vpdpbusd
 * (16 lanes, each the sum of 4 u8 x s8 products). A row's activations are quantized
 * symmetrically to s8 (scale = max|x| / 127, round to nearest even) and stored +128 as u8, so
 *   sum_k x_u8 w = sum_k x_s8 w + 128 sum_k w,
 * and the per-channel sum of weights (wsum) removes the offset. The output is
 *   y[m, n] = (acc - 128 wsum[n]) * x_scale[m] * w_scale[n] (+ bias[n]).
 * One scale per row, so a token's result does not depend on the rows beside it in the batch.
 * N is padded to 16 and K to 4 with zero weights (their activations quantize to 128 = zero). */

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

/* Quantizes a float weight w [N, K] per output channel, as layers/linear.py's
 * quantize_per_channel does (scale = max|row| / 127, at least FLT_MIN; q = round(w / scale),
 * nearest even, clamped to +-127), straight into the packed layout: no float temporaries.
 * packed [N16/16][K4/4][16][4] int8 (zero padded), wsum [N16] int32 per-channel sums of q,
 * scale [N] float32. */
#define DEFINE_INT8_QUANTIZE_PACK(SUFFIX, T)                                                    \
void int8_quantize_pack_##SUFFIX(const T *w, int64_t n, int64_t k, int8_t *packed, int32_t *wsum, \
                                 float *scale) {                                                \
    const int64_t n16 = round_up(n, 16), k4 = round_up(k, 4);                                   \
    memset(packed, 0, (size_t)(n16 * k4));                                                      \
    _Pragma("omp parallel for schedule(static)")                                                \
    for (int64_t o = 0; o < n16; o++) {                                                         \
        int32_t sum = 0;                                                                        \
        if (o < n) {                                                                            \
            const T *row = w + o * k;                                                           \
            float amax = 0.0f;                                                                  \
            for (int64_t i = 0; i < k; i++) {                                                   \
                const float a = fabsf(SUFFIX##_load(row[i]));                                   \
                amax = a > amax ? a : amax;                                                     \
            }                                                                                   \
            float s = amax / 127.0f;                                                            \
            s = s < FLT_MIN ? FLT_MIN : s;                                                      \
            scale[o] = s;                                                                       \
            for (int64_t i = 0; i < k; i++) {                                                   \
                float q = nearbyintf(SUFFIX##_load(row[i]) / s);                                \
                q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);                          \
                packed[((o / 16) * (k4 / 4) + i / 4) * 64 + (o % 16) * 4 + i % 4] = (int8_t)q; \
                sum += (int32_t)q;                                                              \
            }                                                                                   \
        }                                                                                       \
        wsum[o] = sum;                                                                          \
    }                                                                                           \
}
DEFINE_INT8_QUANTIZE_PACK(f32, float)
DEFINE_INT8_QUANTIZE_PACK(bf16, bf16)

/* Row x (K values) -> its K4 bytes (u8 = s8 + 128, padding 128) in 4-byte runs `step` bytes
 * apart (the rows of one pass interleaved, see int8_linear); returns the row's scale. The vector
 * loops give the scalar ones' bytes: max ignores NaN the same way, nearest-even rounding of the
 * same float product, the same clamp. */
#ifdef __AVX512F__
#define QUANTIZE_AMAX_VECTOR(SUFFIX)                                                            \
    {                                                                                           \
        const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));           \
        __m512 vmax = _mm512_setzero_ps();                                                      \
        for (; i + 16 <= k; i += 16)                                                            \
            vmax = _mm512_max_ps(_mm512_and_ps(load16_##SUFFIX(x + i), magnitude), vmax);       \
        amax = _mm512_reduce_max_ps(vmax);                                                      \
    }
#define QUANTIZE_STORE_VECTOR(SUFFIX)                                                           \
    for (; i + 16 <= k; i += 16) {                                                              \
        __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(load16_##SUFFIX(x + i), _mm512_set1_ps(inv)), \
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);         \
        q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));  \
        const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q),      \
                                                                    _mm512_set1_epi32(128)));   \
        int32_t run[4];                                                                         \
        _mm_storeu_si128((__m128i *)run, bytes);                                                \
        for (int j = 0; j < 4; j++) memcpy(xq + (i / 4 + j) * step, run + j, 4);               \
    }
#else
#define QUANTIZE_AMAX_VECTOR(SUFFIX)
#define QUANTIZE_STORE_VECTOR(SUFFIX)
#endif
#define DEFINE_QUANTIZE_ROW(SUFFIX, T)                                                          \
static float quantize_row_##SUFFIX(const T *x, int64_t k, int64_t k4, int64_t step, uint8_t *xq) { \
    float amax = 0.0f;                                                                          \
    int64_t i = 0;                                                                              \
    QUANTIZE_AMAX_VECTOR(SUFFIX)                                                                \
    for (; i < k; i++) {                                                                        \
        const float a = fabsf(SUFFIX##_load(x[i]));                                             \
        amax = a > amax ? a : amax;                                                             \
    }                                                                                           \
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;                                     \
    const float inv = 1.0f / scale;                                                             \
    i = 0;                                                                                      \
    QUANTIZE_STORE_VECTOR(SUFFIX)                                                               \
    for (; i < k; i++) {                                                                        \
        float q = nearbyintf(SUFFIX##_load(x[i]) * inv);                                        \
        q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);                                  \
        xq[i / 4 * step + i % 4] = (uint8_t)((int)q + 128);                                     \
    }                                                                                           \
    for (; i < k4; i++) xq[i / 4 * step + i % 4] = 128;                                         \
    return scale;                                                                               \
}
DEFINE_QUANTIZE_ROW(f32, float)
DEFINE_QUANTIZE_ROW(bf16, bf16)

/* CALL(R) with the row count as a constant 1..8 (1..16), so the callee's accumulators stay in
 * registers. */
#define DISPATCH_ROWS16(rows, CALL)                                                             \
    switch (rows) {                                                                             \
    case 16: CALL(16); return;                                                                  \
    case 15: CALL(15); return;                                                                  \
    case 14: CALL(14); return;                                                                  \
    case 13: CALL(13); return;                                                                  \
    case 12: CALL(12); return;                                                                  \
    case 11: CALL(11); return;                                                                  \
    case 10: CALL(10); return;                                                                  \
    case 9: CALL(9); return;                                                                    \
    }                                                                                           \
    DISPATCH_ROWS(rows, CALL)
#define DISPATCH_ROWS(rows, CALL)                                                               \
    switch (rows) {                                                                             \
    case 8: CALL(8); return;                                                                    \
    case 7: CALL(7); return;                                                                    \
    case 6: CALL(6); return;                                                                    \
    case 5: CALL(5); return;                                                                    \
    case 4: CALL(4); return;                                                                    \
    case 3: CALL(3); return;                                                                    \
    case 2: CALL(2); return;                                                                    \
    default: CALL(1); return;                                                                   \
    }

/* Rows of x one pass over a weight group takes: 16 accumulators + the weight + a broadcast fit
 * AVX-512's 32 registers, and each 64-byte weight load feeds up to 16 vpdpbusd (measured against
 * passes of 8: 1.1-1.5x at 16 rows, 1.05-1.35x at 32-512). */
#define INT8_MAX_ROWS 16

/* acc[r][lane] for `rows` rows (<= INT8_MAX_ROWS) against one group of 16 channels. */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define INT8_VNNI 1
/* Bytes ahead of the weight read that a pass of 2+ rows prefetches: the hardware prefetcher
 * alone leaves the loads and the dot products taking turns (measured 1.05-1.2x at 4-16 rows;
 * nothing at 1 row, where the loop is only loads). */
#define INT8_PREFETCH 2048
static inline __attribute__((always_inline)) void group_dot(const int8_t *wg, const uint8_t *xq, int64_t xq_step,
                                                            int64_t k4, const int rows, int32_t *acc) {
    __m512i a[INT8_MAX_ROWS];
#pragma GCC unroll 16
    for (int r = 0; r < INT8_MAX_ROWS; r++) a[r] = _mm512_setzero_si512();
    for (int64_t c = 0; c < k4 / 4; c++) {
        const __m512i w = _mm512_loadu_si512((const void *)(wg + c * 64));
        if (rows > 1) _mm_prefetch((const char *)(wg + c * 64 + INT8_PREFETCH), _MM_HINT_T0);
#pragma GCC unroll 16
        for (int r = 0; r < INT8_MAX_ROWS; r++)
            if (r < rows) {
                int32_t x4;
                memcpy(&x4, xq + c * xq_step + r * 4, 4);
                a[r] = _mm512_dpbusd_epi32(a[r], _mm512_set1_epi32(x4), w);
            }
    }
#pragma GCC unroll 16
    for (int r = 0; r < INT8_MAX_ROWS; r++)
        if (r < rows) _mm512_storeu_si512((void *)(acc + r * 16), a[r]);
}
#endif

static void group_dot_any(const int8_t *wg, const uint8_t *xq, int64_t xq_step, int64_t k4, int rows,
                          int32_t *acc) {
#ifdef INT8_VNNI
#define INT8_GROUP_DOT(ROWS) group_dot(wg, xq, xq_step, k4, ROWS, acc)
    DISPATCH_ROWS16(rows, INT8_GROUP_DOT)
#else
    for (int r = 0; r < rows; r++)
        for (int lane = 0; lane < 16; lane++) {
            int32_t sum = 0;
            for (int64_t c = 0; c < k4 / 4; c++)
                for (int j = 0; j < 4; j++)
                    sum += (int32_t)xq[c * xq_step + r * 4 + j] * (int32_t)wg[c * 64 + lane * 4 + j];
            acc[r * 16 + lane] = sum;
        }
#endif
}

/* out[0..count) = (acc - 128 wsum) * x_scale * w_scale (+ bias) for one row and one group of 16
 * channels (wsum / wscale / bias start at the group; count < 16 only for the last group). */
#define DEFINE_DEQUANT(SUFFIX, T)                                                               \
static inline void dequant_store_##SUFFIX(const int32_t *acc, const int32_t *wsum, const float *wscale, \
                                          const float *bias, float x_scale, int count, T *out) { \
    DEQUANT_VECTOR(SUFFIX)                                                                      \
    for (int lane = 0; lane < count; lane++) {                                                  \
        float v = (float)(acc[lane] - 128 * wsum[lane]) * (x_scale * wscale[lane]);            \
        if (bias) v += bias[lane];                                                              \
        out[lane] = SUFFIX##_store(v);                                                          \
    }                                                                                           \
}
#ifdef __AVX512F__
#define DEQUANT_VECTOR(SUFFIX)                                                                  \
    if (count == 16) {                                                                          \
        const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512((const void *)acc),               \
                                           _mm512_slli_epi32(_mm512_loadu_si512((const void *)wsum), 7)); \
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a),                                         \
                                 _mm512_mul_ps(_mm512_set1_ps(x_scale), _mm512_loadu_ps(wscale))); \
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));                                  \
        store16_##SUFFIX(out, round16_##SUFFIX(v));                                             \
        return;                                                                                 \
    }
#else
#define DEQUANT_VECTOR(SUFFIX)
#endif
DEFINE_DEQUANT(f32, float)
DEFINE_DEQUANT(bf16, bf16)

/* x is quantized into blocks of `pass` rows laid out [K4/4][pass][4]: a pass reads its rows' 4
 * bytes for one step of K side by side, at fixed offsets from one pointer. Row r's first byte: */
static inline int64_t xq_offset(int64_t r, int pass, int64_t k4) { return (r - r % pass) * k4 + r % pass * 4; }
static inline int pass_rows(int64_t m) { return m < INT8_MAX_ROWS ? (int)m : INT8_MAX_ROWS; }

/* Rows y [m, N] (rows n apart), channels g*16.. of one group: the m quantized rows (xq, scales
 * xs) through the group's weights wg, in passes of `pass` rows. */
#define DEFINE_INT8_GROUP(SUFFIX, T)                                                            \
static inline void int8_group_##SUFFIX(const int8_t *wg, const uint8_t *xq, const float *xs, int64_t m, \
                                       int pass, int64_t k4, int64_t g, const int32_t *wsum,   \
                                       const float *wscale, const float *bias, int64_t n, T *y) { \
    int32_t acc[INT8_MAX_ROWS * 16];                                                            \
    const int count = n - g * 16 < 16 ? (int)(n - g * 16) : 16;                                 \
    for (int64_t r0 = 0; r0 < m; r0 += pass) {                                                  \
        const int rows = m - r0 < pass ? (int)(m - r0) : pass;                                  \
        group_dot_any(wg, xq + r0 * k4, pass * 4, k4, rows, acc);                               \
        for (int r = 0; r < rows; r++)                                                          \
            dequant_store_##SUFFIX(acc + r * 16, wsum + g * 16, wscale + g * 16,                \
                                   bias ? bias + g * 16 : NULL, xs[r0 + r], count,              \
                                   y + (r0 + r) * n + g * 16);                                  \
    }                                                                                           \
}
DEFINE_INT8_GROUP(f32, float)
DEFINE_INT8_GROUP(bf16, bf16)

/* y [M, N] (rows N apart, x's dtype) = x [M, K] (rows x_stride apart) through a packed weight. */
#define DEFINE_INT8_LINEAR(SUFFIX, T)                                                           \
void int8_linear_##SUFFIX(const T *x, int64_t x_stride, int64_t m, int64_t k, const int8_t *packed, \
                          const int32_t *wsum, const float *wscale, const float *bias, int64_t n, \
                          T *y) {                                                               \
    if (m <= 0) return;                                                                         \
    const int64_t k4 = round_up(k, 4), groups = round_up(n, 16) / 16;                           \
    const int pass = pass_rows(m);                                                              \
    uint8_t *xq = malloc((size_t)(round_up(m, pass) * k4));                                     \
    float *xs = malloc(sizeof(float) * m);                                                      \
    _Pragma("omp parallel")                                                                     \
    {                                                                                           \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t r = 0; r < m; r++)                                                         \
            xs[r] = quantize_row_##SUFFIX(x + r * x_stride, k, k4, pass * 4, xq + xq_offset(r, pass, k4)); \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t g = 0; g < groups; g++)                                                    \
            int8_group_##SUFFIX(packed + g * k4 * 16, xq, xs, m, pass, k4, g, wsum, wscale, bias, n, y); \
    }                                                                                           \
    free(xq);                                                                                   \
    free(xs);                                                                                   \
}
DEFINE_INT8_LINEAR(f32, float)
DEFINE_INT8_LINEAR(bf16, bf16)

/* ---- one MoE layer's routed experts through int8 weights, in one call ----
 *
 * What Experts._forward_native does with the kernels above (sort the routes by expert, each
 * expert's w13 over its rows, SwiGLU, its w2, the weighted combine), bit for bit, inside one
 * parallel region: each phase's work is spread over the threads across all experts at once
 * (thread 0 streams the first experts' weights while thread 1 streams the last ones'), and the
 * layer costs one call instead of ~4 + 2 per expert.
 *   x [T, H] rows x_stride apart; ids [T, K] int64 global expert ids (kept [T, K] bool or NULL);
 *   weights [T, K] float32; experts first..first+num_local are this rank's: w13 / w2 [3, E_local]
 *   addresses of each expert's packed weights, per-channel sums and scales (int8_quantize_pack);
 *   out [T, H]. Routes of other ranks' experts or dropped ones add nothing. */
typedef struct {
    int64_t expert, start, rows;   /* local expert, its first sorted route, its route count */
    int64_t xq_row;                /* its first row in the quantized blocks (rows padded to passes) */
} ExpertRows;

/* What both MoE layer kernels start from: the routes sorted by local expert (order [R], its
 * inverse pos [R], sizes [E_local + 1] as moe_sort_routes), the local experts with routes in
 * act (*active of them) and their padded row total (*xq_rows, may be NULL); returns the routed
 * count (routes of other ranks' experts and dropped ones sort last). */
static int64_t moe_routes(const int64_t *ids, const uint8_t *kept, int64_t routes, int64_t first, int64_t num_local,
                          int64_t *order, int64_t *pos, int64_t *sizes, ExpertRows *act, int64_t *active,
                          int64_t *xq_rows) {
    moe_sort_routes(ids, kept, routes, first, num_local, order, sizes);
    for (int64_t i = 0; i < routes; i++) pos[order[i]] = i;
    int64_t n = 0, start = 0, padded = 0;
    for (int64_t e = 0; e < num_local; e++) {
        if (sizes[e]) {
            act[n++] = (ExpertRows){e, start, sizes[e], padded};
            padded += round_up(sizes[e], pass_rows(sizes[e]));
        }
        start += sizes[e];
    }
    *active = n;
    if (xq_rows) *xq_rows = padded;
    return routes - sizes[num_local];
}

#define DEFINE_MOE_INT8(SUFFIX, T)                                                              \
void moe_int8_##SUFFIX(const T *x, int64_t x_stride, int64_t tokens, int64_t k, const int64_t *ids, \
                       const uint8_t *kept, const float *weights, int64_t first, int64_t num_local, \
                       int64_t h, int64_t inter, const int64_t *w13, const int64_t *w2, T *out) { \
    const int64_t routes = tokens * k, n13 = 2 * inter;                                         \
    const int64_t k4_13 = round_up(h, 4), k4_2 = round_up(inter, 4);                            \
    const int64_t groups13 = round_up(n13, 16) / 16, groups2 = round_up(h, 16) / 16;            \
    int64_t *order = malloc(sizeof(int64_t) * routes * 2), *pos = order + routes;               \
    int64_t sizes[num_local + 1];                                                               \
    ExpertRows act[num_local > 0 ? num_local : 1];                                              \
    int64_t active, xq_rows;                                                                    \
    const int64_t routed = moe_routes(ids, kept, routes, first, num_local, order, pos, sizes, act, &active, \
                                      &xq_rows);                                                \
    uint8_t *xq13 = malloc((size_t)(xq_rows * k4_13 + 1)), *xq2 = malloc((size_t)(xq_rows * k4_2 + 1)); \
    float *xs = malloc(sizeof(float) * (routed + 1) * 2), *hs = xs + routed + 1;                \
    T *gate_up = malloc(sizeof(T) * (routed * n13 + 1));                                        \
    T *hidden = malloc(sizeof(T) * (routed * inter + 1));                                       \
    T *y = malloc(sizeof(T) * (routed * h + 1));                                                \
    _Pragma("omp parallel")                                                                     \
    {                                                                                           \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t a = 0; a < active; a++)      /* each expert's rows, quantized for w13 */   \
            for (int64_t r = 0; r < act[a].rows; r++) {                                         \
                const int64_t i = act[a].start + r;                                             \
                const int pass = pass_rows(act[a].rows);                                        \
                xs[i] = quantize_row_##SUFFIX(x + order[i] / k * x_stride, h, k4_13, pass * 4,  \
                                              xq13 + act[a].xq_row * k4_13 + xq_offset(r, pass, k4_13)); \
            }                                                                                   \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t w = 0; w < active * groups13; w++) {                                       \
            const ExpertRows *ex = act + w / groups13;                                          \
            const int64_t g = w % groups13, e = ex->expert;                                     \
            int8_group_##SUFFIX((const int8_t *)w13[e] + g * k4_13 * 16, xq13 + ex->xq_row * k4_13, xs + ex->start, \
                                ex->rows, pass_rows(ex->rows), k4_13, g, (const int32_t *)w13[num_local + e], \
                                (const float *)w13[2 * num_local + e], NULL, n13, gate_up + ex->start * n13); \
        }                                                                                       \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t a = 0; a < active; a++)      /* SwiGLU, quantized for w2 */                \
            for (int64_t r = 0; r < act[a].rows; r++) {                                         \
                const int64_t i = act[a].start + r;                                             \
                const int pass = pass_rows(act[a].rows);                                        \
                T *hr = hidden + i * inter;                                                     \
                swiglu_row_##SUFFIX(gate_up + i * n13, gate_up + i * n13 + inter, inter, hr);   \
                hs[i] = quantize_row_##SUFFIX(hr, inter, k4_2, pass * 4,                        \
                                              xq2 + act[a].xq_row * k4_2 + xq_offset(r, pass, k4_2)); \
            }                                                                                   \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t w = 0; w < active * groups2; w++) {                                        \
            const ExpertRows *ex = act + w / groups2;                                           \
            const int64_t g = w % groups2, e = ex->expert;                                      \
            int8_group_##SUFFIX((const int8_t *)w2[e] + g * k4_2 * 16, xq2 + ex->xq_row * k4_2,  \
                                hs + ex->start, ex->rows, pass_rows(ex->rows), k4_2, g,         \
                                (const int32_t *)w2[num_local + e], (const float *)w2[2 * num_local + e], \
                                NULL, h, y + ex->start * h);                                    \
        }                                                                                       \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t t = 0; t < tokens; t++)                                                    \
            combine_token_##SUFFIX(y, sizeof(T) == 2, routed, pos, weights, t, k, h, out);      \
    }                                                                                           \
    free(order); free(xq13); free(xq2); free(xs); free(gate_up); free(hidden); free(y);         \
}
DEFINE_MOE_INT8(f32, float)
DEFINE_MOE_INT8(bf16, bf16)

/* ---- bf16 linear: AVX512-BF16 (vdpbf16ps), weights packed on huge pages ----
 *
 * Weights packed once as [N/16][K/2][16][2] bf16: for each group of 16 output channels, each
 * pair of inputs holds the 16 channels' 2 weights, the operand layout of vdpbf16ps (16 float32
 * lanes, each += the sum of 2 bf16 products). Rows of x (bf16) are read two values at a time
 * and broadcast; sums in float32; the output rounded to bf16 once. N is padded to 16 and K to 2
 * with zeros. */

/* w [N, K] bf16 -> packed [N16/16][K2/2][16][2] (zero padded). */
void bf16_pack(const bf16 *w, int64_t n, int64_t k, bf16 *packed) {
    const int64_t n16 = round_up(n, 16), k2 = round_up(k, 2);
    memset(packed, 0, sizeof(bf16) * (size_t)(n16 * k2));
    for (int64_t o = 0; o < n; o++)
        for (int64_t i = 0; i < k; i++)
            packed[((o / 16) * (k2 / 2) + i / 2) * 32 + (o % 16) * 2 + i % 2] = w[o * k + i];
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define BF16_DP 1
static inline __attribute__((always_inline)) void group_dot_bf16(const bf16 *wg, const bf16 *x, int64_t x_stride,
                                                                 int64_t k2, const int rows, float *acc) {
    __m512 a[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++) a[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k2 / 2; c++) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512((const void *)(wg + c * 32));
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++)
            if (r < rows) {
                int32_t x2;
                memcpy(&x2, x + r * x_stride + c * 2, 4);
                a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(x2), w);
            }
    }
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++)
        if (r < rows) _mm512_storeu_ps(acc + r * 16, a[r]);
}
#endif

static void group_dot_bf16_any(const bf16 *wg, const bf16 *x, int64_t x_stride, int64_t k2, int rows, float *acc) {
#ifdef BF16_DP
#define BF16_GROUP_DOT(ROWS) group_dot_bf16(wg, x, x_stride, k2, ROWS, acc)
    DISPATCH_ROWS(rows, BF16_GROUP_DOT)
#else
    for (int r = 0; r < rows; r++)
        for (int lane = 0; lane < 16; lane++) {
            float sum = 0.0f;
            for (int64_t c = 0; c < k2 / 2; c++)
                for (int j = 0; j < 2; j++)
                    sum += bf16_to_f32(x[r * x_stride + c * 2 + j]) * bf16_to_f32(wg[c * 32 + lane * 2 + j]);
            acc[r * 16 + lane] = sum;
        }
#endif
}

/* Rows y [m, N] (rows n apart), channels g*16.. of one group: x [m, K] (rows x_stride apart)
 * through the group's packed weights wg, in passes of 8 rows (+ bias [N] float32 or NULL). */
static inline void bf16_group(const bf16 *wg, const bf16 *x, int64_t x_stride, int64_t m, int64_t k2, int64_t g,
                              const float *bias, int64_t n, bf16 *y) {
    float acc[8 * 16];
    const int count = n - g * 16 < 16 ? (int)(n - g * 16) : 16;
    for (int64_t r0 = 0; r0 < m; r0 += 8) {
        const int rows = m - r0 < 8 ? (int)(m - r0) : 8;
        group_dot_bf16_any(wg, x + r0 * x_stride, x_stride, k2, rows, acc);
        for (int r = 0; r < rows; r++) {
            bf16 *yr = y + (r0 + r) * n + g * 16;
            for (int lane = 0; lane < count; lane++) {
                const float v = acc[r * 16 + lane] + (bias ? bias[g * 16 + lane] : 0.0f);
                yr[lane] = f32_to_bf16(v);
            }
        }
    }
}

/* y [M, N] bf16 = x [M, K] bf16 (rows x_stride apart, K even or the row padded by the caller)
 * through bf16_pack's weight (+ bias [N] float32). */
void bf16_linear(const bf16 *x, int64_t x_stride, int64_t m, int64_t k, const bf16 *packed, const float *bias,
                 int64_t n, bf16 *y) {
    const int64_t k2 = round_up(k, 2), groups = round_up(n, 16) / 16;
    _Pragma("omp parallel for schedule(static)")
    for (int64_t g = 0; g < groups; g++)
        bf16_group(packed + g * k2 * 16, x, x_stride, m, k2, g, bias, n, y);
}

/* moe_int8 for bf16 weights (bf16_pack) and bf16 activations, H and I even: the same steps
 * as Experts._forward_native's chain (gather, w13, SwiGLU, w2, combine) in one parallel region,
 * bit for bit. w13 / w2 [E_local] addresses of each expert's packed weight. */
void moe_bf16(const bf16 *x, int64_t x_stride, int64_t tokens, int64_t k, const int64_t *ids, const uint8_t *kept,
              const float *weights, int64_t first, int64_t num_local, int64_t h, int64_t inter, const int64_t *w13,
              const int64_t *w2, bf16 *out) {
    const int64_t routes = tokens * k, n13 = 2 * inter;
    const int64_t groups13 = round_up(n13, 16) / 16, groups2 = round_up(h, 16) / 16;
    int64_t *order = malloc(sizeof(int64_t) * routes * 2), *pos = order + routes;
    int64_t sizes[num_local + 1];
    ExpertRows act[num_local > 0 ? num_local : 1];
    int64_t active;
    const int64_t routed = moe_routes(ids, kept, routes, first, num_local, order, pos, sizes, act, &active, NULL);
    bf16 *rows = malloc(sizeof(bf16) * (routed * (h + n13 + inter + h) + 1));
    bf16 *gate_up = rows + routed * h, *hidden = gate_up + routed * n13, *y = hidden + routed * inter;
    _Pragma("omp parallel")
    {
        _Pragma("omp for schedule(static)")
        for (int64_t i = 0; i < routed; i++)
            memcpy(rows + i * h, x + order[i] / k * x_stride, sizeof(bf16) * h);
        _Pragma("omp for schedule(static)")
        for (int64_t w = 0; w < active * groups13; w++) {
            const ExpertRows *ex = act + w / groups13;
            const int64_t g = w % groups13;
            bf16_group((const bf16 *)w13[ex->expert] + g * h * 16, rows + ex->start * h, h, ex->rows, h, g, NULL,
                       n13, gate_up + ex->start * n13);
        }
        _Pragma("omp for schedule(static)")
        for (int64_t i = 0; i < routed; i++)
            swiglu_row_bf16(gate_up + i * n13, gate_up + i * n13 + inter, inter, hidden + i * inter);
        _Pragma("omp for schedule(static)")
        for (int64_t w = 0; w < active * groups2; w++) {
            const ExpertRows *ex = act + w / groups2;
            const int64_t g = w % groups2;
            bf16_group((const bf16 *)w2[ex->expert] + g * inter * 16, hidden + ex->start * inter, inter, ex->rows,
                       inter, g, NULL, h, y + ex->start * h);
        }
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < tokens; t++)
            combine_token_bf16(y, 1, routed, pos, weights, t, k, h, out);
    }
    free(order);
    free(rows);
}
