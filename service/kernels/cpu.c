/* lmserve's float32 CPU kernels for decoding (AVX2 + FMA, OpenMP), loaded by service/cpu_kernels.py.
 *
 * lmserve_linear_f32: y = x @ w^T + bias, where a few rows of activations (one per sequence) meet every weight
 * matrix once per token, and the speed is how fast the weights stream from memory.
 *
 * Each OpenMP thread takes blocks of 4 weight rows and multiplies them with the activation rows 3 at a time
 * (12 accumulators + 3 inputs + 1 weight = the 16 AVX registers), so a weight block is read from memory once
 * and reused from L1 for every activation row. Every output element is summed in the same order whatever
 * the number of rows (8 lanes over the inner dimension, then the lanes, then the tail, then the bias), so a
 * sequence's logits do not depend on what else is in the batch.
 *
 * lmserve_prefill_linear_f32: the same product for prompts, where hundreds of rows meet each weight matrix and
 * the speed is arithmetic. It copies 16 weight rows at a time into a k-major panel that stays in L1 and
 * multiplies it with 6 activation rows at a time (12 accumulators of 8 outputs), BLIS-style. Every output is
 * summed over the inner dimension in order, then the bias, whatever the number of rows: a prompt's keys and
 * values do not depend on which other prompts share its prefill.
 *
 * lmserve_activation_f32: GELU (tanh form) or SiLU in one vectorized pass.
 *
 * lmserve_decode_attention_f32: one query per (sequence, head) against that sequence's cached keys and
 * values, read once, in place in the KV cache.
 *
 * Built by service/cpu_kernels.py:  cc -O3 -mavx2 -mfma -fopenmp -shared -fPIC cpu.c
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* The lane sums of four accumulators (one per weight row) as one vector: [sum(a0), sum(a1), sum(a2), sum(a3)]. */
static inline __m128 lane_sums(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* R weight rows (stride in) times C activation rows (stride in) into y (row stride out); R <= 4, C <= 3 are
 * constants once inlined, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const float *w, const float *x, const float *bias,
                                                       float *y, int64_t in, int64_t out, const int R,
                                                       const int C) {
    __m256 acc[4][3];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
        __m256 xv[3];
        for (int c = 0; c < C; c++) xv[c] = _mm256_loadu_ps(x + c * in + i);
        for (int r = 0; r < R; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * in + i);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
        }
    }
    for (int r = R; r < 4; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();  /* absent rows: sums of zeros */
    for (int c = 0; c < C; c++) {
        float sums[4];
        _mm_storeu_ps(sums, lane_sums(acc[0][c], acc[1][c], acc[2][c], acc[3][c]));
        for (int r = 0; r < R; r++) {
            float s = sums[r];
            for (int64_t j = i; j < in; j++) s += w[r * in + j] * x[c * in + j];
            y[c * out + r] = bias ? s + bias[r] : s;
        }
    }
}

/* Activation rows per pass over the weights: 48 rows of 768..4096 floats (144..768 KiB) stay in L2 while
 * every weight block meets them. Decoding batches fit in one pass, reading each weight once. */
#define ROW_CHUNK 48

/* x (rows, in), w (out, in), bias (out) or NULL, y (rows, out); all contiguous. */
void lmserve_linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t in,
                        int64_t out, int threads) {
    const int64_t blocks = (out + 3) / 4;
#pragma omp parallel num_threads(threads)
    for (int64_t chunk = 0; chunk < rows; chunk += ROW_CHUNK) {
        const int64_t end = chunk + ROW_CHUNK < rows ? chunk + ROW_CHUNK : rows;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t o = 4 * b;
            const float *wb = w + o * in, *bb = bias ? bias + o : 0;
            if (o + 4 <= out) {
                int64_t m = chunk;
                for (; m + 3 <= end; m += 3) tile(wb, x + m * in, bb, y + m * out + o, in, out, 4, 3);
                if (end - m == 2) tile(wb, x + m * in, bb, y + m * out + o, in, out, 4, 2);
                if (end - m == 1) tile(wb, x + m * in, bb, y + m * out + o, in, out, 4, 1);
            } else { /* the last 1..3 weight rows */
                for (int64_t r = o; r < out; r++)
                    for (int64_t m = chunk; m < end; m++)
                        tile(w + r * in, x + m * in, bias ? bias + r : 0, y + m * out + r, in, out, 1, 1);
            }
        }
    }
}

/* ---- prefill: weight panels packed on the fly ---------------------------------------------------------- */

#define PANEL 16      /* weight rows (outputs) per panel: two vectors of accumulators per activation row */
#define TILE_ROWS 6   /* activation rows per micro-tile: 12 accumulators + 2 weights + 1 broadcast */
#define K_BLOCK 256   /* inner-dimension block: a packed panel is 16 KiB and stays in L1 */
#define ROW_BLOCK 192 /* activation rows per pass over the weights: 192 KiB per K_BLOCK, in L2 */

/* out[k * PANEL + j] = rows[j][k] for k < 8, j < 8: an 8x8 transpose from row-major into k-major order */
static inline void transpose8(const float *const rows[8], float *out) {
    __m256 r[8], t[8], s[8];
    for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(rows[j]);
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {
        s[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        s[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        s[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        s[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        _mm256_store_ps(out + j * PANEL, _mm256_permute2f128_ps(s[j], s[j + 4], 0x20));
        _mm256_store_ps(out + (j + 4) * PANEL, _mm256_permute2f128_ps(s[j], s[j + 4], 0x31));
    }
}

/* panel[k][j] = w[o + j][k0 + k] for k < kn, j < PANEL; rows past `out` repeat the last row (never stored) */
static void pack_panel(const float *w, int64_t in, int64_t out, int64_t o, int64_t k0, int64_t kn, float *panel) {
    const float *rows[PANEL];
    for (int j = 0; j < PANEL; j++) rows[j] = w + (o + j < out ? o + j : out - 1) * in + k0;
    int64_t k = 0;
    for (; k + 8 <= kn; k += 8) {
        const float *lo[8], *hi[8];
        for (int j = 0; j < 8; j++) lo[j] = rows[j] + k, hi[j] = rows[j + 8] + k;
        transpose8(lo, panel + k * PANEL);
        transpose8(hi, panel + k * PANEL + 8);
    }
    for (; k < kn; k++)
        for (int j = 0; j < PANEL; j++) panel[k * PANEL + j] = rows[j][k];
}

/* y rows (R of them, row stride out) at PANEL outputs (the first `cols` valid) += panel . x over kn; the
 * running sums live in y between K blocks (first: start from 0; last: add the bias). */
static inline __attribute__((always_inline)) void panel_tile(const float *panel, const float *x, int64_t in,
                                                             int64_t kn, float *y, int64_t out, int cols,
                                                             const float *bias, int first, int last, const int R) {
    static const int32_t lane[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const __m256i n = _mm256_set1_epi32(cols);
    const __m256i m0 = _mm256_cmpgt_epi32(n, _mm256_loadu_si256((const __m256i *)lane));
    const __m256i m1 = _mm256_cmpgt_epi32(n, _mm256_loadu_si256((const __m256i *)(lane + 8)));
    const int full = cols == PANEL;  /* masked loads and stores only for the last panel: they are slow */
    __m256 acc[TILE_ROWS][2];
    for (int r = 0; r < R; r++) {
        if (first) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        else if (full) acc[r][0] = _mm256_loadu_ps(y + r * out), acc[r][1] = _mm256_loadu_ps(y + r * out + 8);
        else acc[r][0] = _mm256_maskload_ps(y + r * out, m0), acc[r][1] = _mm256_maskload_ps(y + r * out + 8, m1);
    }
    for (int64_t k = 0; k < kn; k++) {
        const __m256 w0 = _mm256_load_ps(panel + k * PANEL), w1 = _mm256_load_ps(panel + k * PANEL + 8);
        for (int r = 0; r < R; r++) {
            const __m256 xr = _mm256_broadcast_ss(x + r * in + k);
            acc[r][0] = _mm256_fmadd_ps(w0, xr, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, xr, acc[r][1]);
        }
    }
    if (last && bias) {
        const __m256 b0 = _mm256_maskload_ps(bias, m0), b1 = _mm256_maskload_ps(bias + 8, m1);
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm256_add_ps(acc[r][0], b0);
            acc[r][1] = _mm256_add_ps(acc[r][1], b1);
        }
    }
    for (int r = 0; r < R; r++) {
        if (full) {
            _mm256_storeu_ps(y + r * out, acc[r][0]);
            _mm256_storeu_ps(y + r * out + 8, acc[r][1]);
        } else {
            _mm256_maskstore_ps(y + r * out, m0, acc[r][0]);
            _mm256_maskstore_ps(y + r * out + 8, m1, acc[r][1]);
        }
    }
}

/* x (rows, in), w (out, in), bias (out) or NULL, y (rows, out); all contiguous. */
void lmserve_prefill_linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                                int64_t in, int64_t out, int threads) {
    const int64_t panels = (out + PANEL - 1) / PANEL;
#pragma omp parallel num_threads(threads)
    {
        float panel[K_BLOCK * PANEL] __attribute__((aligned(32)));
        for (int64_t m0 = 0; m0 < rows; m0 += ROW_BLOCK) {
            const int64_t m1 = m0 + ROW_BLOCK < rows ? m0 + ROW_BLOCK : rows;
#pragma omp for schedule(static) nowait
            for (int64_t p = 0; p < panels; p++) {
                const int64_t o = p * PANEL;
                const int cols = out - o < PANEL ? (int)(out - o) : PANEL;
                const float *b = bias ? bias + o : 0;
                for (int64_t k0 = 0; k0 < in; k0 += K_BLOCK) {
                    const int64_t kn = in - k0 < K_BLOCK ? in - k0 : K_BLOCK;
                    const int first = k0 == 0, last = k0 + kn == in;
                    pack_panel(w, in, out, o, k0, kn, panel);
                    int64_t m = m0;
                    for (; m + TILE_ROWS <= m1; m += TILE_ROWS)
                        panel_tile(panel, x + m * in + k0, in, kn, y + m * out + o, out, cols, b, first, last, 6);
                    const float *xm = x + m * in + k0;
                    float *ym = y + m * out + o;
                    switch (m1 - m) {  /* the last 1..5 rows, with as many accumulators */
                        case 5: panel_tile(panel, xm, in, kn, ym, out, cols, b, first, last, 5); break;
                        case 4: panel_tile(panel, xm, in, kn, ym, out, cols, b, first, last, 4); break;
                        case 3: panel_tile(panel, xm, in, kn, ym, out, cols, b, first, last, 3); break;
                        case 2: panel_tile(panel, xm, in, kn, ym, out, cols, b, first, last, 2); break;
                        case 1: panel_tile(panel, xm, in, kn, ym, out, cols, b, first, last, 1); break;
                    }
                }
            }
        }
    }
}

/* ---- activations ---------------------------------------------------------------------------------------- */

/* e^x for 8 floats (Cephes' expf: 2^n times a degree-7 polynomial, within 2 ulp); x clamped to [-87.3, 88.3] */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* x - n ln 2, in two parts */
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* x * sigmoid(a x + b x^3) for 8 floats: GELU's tanh form is a = 2 sqrt(2/pi), b = 0.044715 a (since
 * (1 + tanh(u)) / 2 = sigmoid(2u)); SiLU is a = 1, b = 0 */
static inline __m256 gated8(__m256 x, __m256 a, __m256 b) {
    const __m256 z = _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_mul_ps(b, x), x, a));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
}

/* y = act(x) over n floats; kind 0: GELU (tanh approximation), 1: SiLU. One pass where PyTorch's tanh-GELU
 * takes several (2-6 ns per float on our EPYC). */
void lmserve_activation_f32(const float *x, float *y, int64_t n, int kind, int threads) {
    const float a = kind == 0 ? 1.5957691216057308f : 1.0f, b = kind == 0 ? 0.0713548162726f : 0.0f;
    const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
    const int64_t vectors = n / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 32768)
    for (int64_t i = 0; i < vectors; i++) _mm256_storeu_ps(y + 8 * i, gated8(_mm256_loadu_ps(x + 8 * i), av, bv));
    if (n % 8) {  /* the tail through the same vector code, so every element gets the same arithmetic */
        float in[8] = {0}, out[8];
        memcpy(in, x + 8 * vectors, (n % 8) * sizeof(float));
        _mm256_storeu_ps(out, gated8(_mm256_loadu_ps(in), av, bv));
        memcpy(y + 8 * vectors, out, (n % 8) * sizeof(float));
    }
}

/* ---- decode attention ---------------------------------------------------------------------------------- */

/* sum(a[i] * b[i]) over n floats: 8 lanes, then the lanes, then the tail */
static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = _mm_cvtss_f32(lane_sums(acc, acc, acc, acc));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += p * x over n floats */
static inline void axpy(float p, const float *x, float *y, int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += p * x[i];
}

/* softmax(q k^T * scale, masked) v for one query per (sequence b, head h):
 * q (B, H, D) contiguous; key/value (b, g, s, :) at k/v + b*stride_b + g*stride_h + s*stride_s, where
 * g = h / (H / Hkv) is the head's key/value group; mask (B, S) bytes, nonzero = may attend (at least one per
 * row); y (B, H, D). `scores` holds S floats per thread. */
void lmserve_decode_attention_f32(const float *q, const float *k, const float *v, const uint8_t *mask, float *y,
                                  int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D, int64_t stride_b,
                                  int64_t stride_h, int64_t stride_s, float scale, float *scores, int threads) {
    const int64_t group = H / Hkv;
#pragma omp parallel num_threads(threads)
    {
        float *p = scores + (int64_t)omp_get_thread_num() * S;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, g = (bh % H) / group;
            const float *qh = q + bh * D, *kh = k + b * stride_b + g * stride_h, *vh = v + b * stride_b + g * stride_h;
            const uint8_t *allowed = mask + b * S;
            float top = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                p[s] = allowed[s] ? dot(qh, kh + s * stride_s, D) * scale : -INFINITY;
                top = p[s] > top ? p[s] : top;
            }
            float *out = y + bh * D;
            for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                if (!allowed[s]) continue;
                const float e = expf(p[s] - top);
                total += e;
                axpy(e, vh + s * stride_s, out, D);
            }
            const float inv = 1.0f / total;
            for (int64_t d = 0; d < D; d++) out[d] *= inv;
        }
    }
}
