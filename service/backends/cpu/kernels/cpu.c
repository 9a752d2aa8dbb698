/* lmserve's float32 CPU kernels (AVX2 + FMA, OpenMP), loaded by service/backends/cpu/library.py.
 *
 * lmserve_linear_f32: y = x @ w^T + bias on weights packed once, at load time, into k-major panels of 16
 * outputs: panel p holds w[16p .. 16p+15][k] for every k as 16 consecutive floats (rows past `out` are zeros).
 * One kernel serves every pass, from a single decoding sequence to a prompt of hundreds of tokens:
 * - 4 activation rows and up: BLIS-style micro-tiles of up to 6 rows x 16 outputs (12 accumulators +
 *   2 weight vectors + 1 broadcast = 15 of the 16 AVX registers), the inner dimension in blocks of 256 so a
 *   block of a panel (16 KiB) stays in L1 for every tile, up to 192 rows per pass over the weights so they
 *   stay in L2, the next block prefetched into L2 a share per tile while a block's tiles compute. The
 *   activations are first copied tile by tile in the order the tiles read them (one memory stream per tile, not
 *   one per row), and the inner loop is unrolled 4 times. The rows
 *   are split into tiles of near-equal height (32 rows: 6+6+5+5+5+5, not 6x5+2).
 * - 1 to 3 rows (a few decoding sequences, where the speed is how fast the weights stream from memory): 4, 3 or
 *   2 panels at a time over the whole inner dimension, for 8-12 independent accumulator chains reading that
 *   many memory streams.
 * Every output is summed over the inner dimension in order with one FMA chain, then the bias, whatever the
 * tile, so a sequence's numbers are bit-identical alone or in a batch of any size, prompt or decode.
 *
 * lmserve_activation_f32: GELU (tanh form), SiLU or ReLU in one vectorized pass (also a linear layer's
 * epilogue, with a bias, a multiplier and a residual).
 *
 * lmserve_norm_f32: LayerNorm / RMSNorm; rope_row (the decode step's): rotary embeddings.
 *
 * lmserve_argmax_f32: the index of each row's largest value, as torch.argmax picks it.
 *
 * Decode attention and KV-cache writes are in attention.c.
 *
 * Each exported kernel is one OpenMP parallel region around a *_team function (cpu.h), which decode_step.c
 * chains into a whole decode step in one region.
 *
 * Built by service/backends/cpu/library.py:
 *     cc -O3 -mavx2 -mfma -ffp-contract=off -fopenmp -shared -fPIC cpu.c attention.c decode_step.c
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "cpu.h"

/* ---- activation math ------------------------------------------------------------------------------------ */

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

static inline __m256 activate8(__m256 x, int act) {
    switch (act) {
        case ACT_GELU_TANH: return gated8(x, _mm256_set1_ps(1.5957691216057308f), _mm256_set1_ps(0.0713548162726f));
        case ACT_SILU: return gated8(x, _mm256_set1_ps(1.0f), _mm256_setzero_ps());
        case ACT_RELU: return _mm256_max_ps(_mm256_setzero_ps(), x);  /* NaN stays NaN, as in PyTorch */
        default: return x;
    }
}

/* ---- linear layers on packed weights -------------------------------------------------------------------- */

#define TILE_ROWS 6   /* most activation rows per micro-tile */
#define K_BLOCK 256   /* inner-dimension block: 16 KiB of a panel, in L1 */
#define ROW_BLOCK 192 /* activation rows per pass over the weights: 192 KiB per K_BLOCK, in L2 */
#define WIDE 4        /* most panels per tile for 1-3 activation rows */

/* Lane masks for the first `cols` of a panel's 16 outputs (masked loads and stores only for the last panel:
 * they are slow). */
static inline void panel_masks(int cols, __m256i *m0, __m256i *m1) {
    static const int32_t lane[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const __m256i n = _mm256_set1_epi32(cols);
    *m0 = _mm256_cmpgt_epi32(n, _mm256_loadu_si256((const __m256i *)lane));
    *m1 = _mm256_cmpgt_epi32(n, _mm256_loadu_si256((const __m256i *)(lane + 8)));
}

/* Stores one row's 16 outputs of a panel, the bias added (when there is one, after the whole sum). */
static inline void store_panel(float *y, __m256 a0, __m256 a1, const float *bias, int cols) {
    __m256i m0, m1;
    panel_masks(cols, &m0, &m1);
    if (bias) {
        a0 = _mm256_add_ps(a0, _mm256_maskload_ps(bias, m0));
        a1 = _mm256_add_ps(a1, _mm256_maskload_ps(bias + 8, m1));
    }
    if (cols == PANEL) {
        _mm256_storeu_ps(y, a0);
        _mm256_storeu_ps(y + 8, a1);
    } else {
        _mm256_maskstore_ps(y, m0, a0);
        _mm256_maskstore_ps(y + 8, m1, a1);
    }
}

/* y = residual + act(y) * mul over a tile of `rows` rows x `cols` (<= 16) outputs, in place; y, mul and residual
 * point at the tile's first element, rows `stride` apart. Not inlined, so that its constants and pointers take
 * no registers from the tiles' accumulators (which would spill). */
static __attribute__((noinline)) void finish_tile(float *y, const Epilogue *e, int64_t offset, int64_t stride,
                                                  int rows, int cols) {
    __m256i mask[2];
    panel_masks(cols, &mask[0], &mask[1]);
    for (int r = 0; r < rows; r++)
        for (int half = 0; half < 2; half++) {
            const int64_t at = offset + r * stride + 8 * half;
            __m256 a = activate8(_mm256_maskload_ps(y + at, mask[half]), e->act);
            if (e->mul) a = _mm256_mul_ps(a, _mm256_maskload_ps(e->mul + at, mask[half]));
            if (e->residual) a = _mm256_add_ps(_mm256_maskload_ps(e->residual + at, mask[half]), a);
            _mm256_maskstore_ps(y + at, mask[half], a);
        }
}

/* R activation rows (row stride in) times one panel block of kn inner steps into y (row stride out); the
 * running sums live in y between K blocks (first block: start from 0; last: add the bias). R is a constant
 * once inlined, so the accumulators live in registers. `ahead`: memory to prefetch into L2, one cache line per
 * inner step for the first `ahead_lines` steps. */
static inline __attribute__((always_inline)) void panel_tile(const float *panel, const float *x,
                                                             int64_t kn, float *y, int64_t out, int cols,
                                                             const float *bias, int first, int last, const int R,
                                                             const float *ahead, int64_t ahead_lines) {
    __m256i m0, m1;
    panel_masks(cols, &m0, &m1);
    __m256 acc[TILE_ROWS][2];
    for (int r = 0; r < R; r++) {
        if (first) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        else if (cols == PANEL) acc[r][0] = _mm256_loadu_ps(y + r * out), acc[r][1] = _mm256_loadu_ps(y + r * out + 8);
        else acc[r][0] = _mm256_maskload_ps(y + r * out, m0), acc[r][1] = _mm256_maskload_ps(y + r * out + 8, m1);
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < kn; k++) {
        const __m256 w0 = _mm256_loadu_ps(panel + k * PANEL), w1 = _mm256_loadu_ps(panel + k * PANEL + 8);
        if (k < ahead_lines) _mm_prefetch((const char *)(ahead + k * PANEL), _MM_HINT_T1);  /* PANEL floats: a line */
        for (int r = 0; r < R; r++) {
            const __m256 xr = _mm256_broadcast_ss(x + k * R + r);
            acc[r][0] = _mm256_fmadd_ps(w0, xr, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, xr, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) store_panel(y + r * out, acc[r][0], acc[r][1], last ? bias : 0, cols);
}

/* R activation rows (row stride in) times G consecutive panels over the whole inner dimension; outputs from `o`.
 * R * G <= 6: up to 12 accumulators. */
static inline __attribute__((always_inline)) void wide_tile(const float *panels, const float *x, int64_t in,
                                                            float *y, int64_t out, int64_t o, const float *bias,
                                                            const int R, const int G) {
    __m256 acc[3][WIDE][2];
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) acc[r][g][0] = acc[r][g][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in; k++) {
        __m256 xr[3];
        for (int r = 0; r < R; r++) xr[r] = _mm256_broadcast_ss(x + r * in + k);
        for (int g = 0; g < G; g++) {
            const float *w = panels + (g * in + k) * PANEL;
            const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
            for (int r = 0; r < R; r++) {
                acc[r][g][0] = _mm256_fmadd_ps(w0, xr[r], acc[r][g][0]);
                acc[r][g][1] = _mm256_fmadd_ps(w1, xr[r], acc[r][g][1]);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const int64_t og = o + g * PANEL;
        const int cols = out - og < PANEL ? (int)(out - og) : PANEL;
        for (int r = 0; r < R; r++)
            store_panel(y + r * out + og, acc[r][g][0], acc[r][g][1], bias ? bias + og : 0, cols);
    }
}

/* The height of the next tile with `left` rows to go in a row block: near-equal tiles (32 rows: 6+6+5+5+5+5) */
static inline int tile_height(int64_t left) {
    const int64_t tiles = (left + TILE_ROWS - 1) / TILE_ROWS;
    return (int)((left + tiles - 1) / tiles);
}

/* x (rows, in) into xp tile by tile as the tiles read it: the tile of rows m..m+R-1 at xp + m * in, k-major
 * (element (k, r) at k * R + r), so that a tile's broadcasts walk one stream instead of R rows far apart.
 * The team shares the tiles; ends with a barrier. */
static void pack_rows(const float *x, float *xp, int64_t rows, int64_t in) {
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    int tile = 0;
    for (int64_t m0 = 0; m0 < rows; m0 += ROW_BLOCK) {
        const int64_t m1 = m0 + ROW_BLOCK < rows ? m0 + ROW_BLOCK : rows;
        for (int64_t m = m0; m < m1; tile++) {
            const int R = tile_height(m1 - m);
            if (tile % team == me)
                for (int64_t k = 0; k < in; k++)
                    for (int r = 0; r < R; r++) xp[m * in + k * R + r] = x[(m + r) * in + k];
            m += R;
        }
    }
#pragma omp barrier
}

/* 1 to 3 activation rows (R), G panels at a time over the whole inner dimension: G memory streams per core,
 * where one stream (a single panel tile) reads slower. */
static void few_rows(const float *x, const float *w, const float *bias, const Epilogue *e, float *y, int64_t in,
                     int64_t out, const int R, const int G) {
    const int64_t panels = (out + PANEL - 1) / PANEL, groups = (panels + G - 1) / G;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t p = g * G;
        if (p + G <= panels) {
            wide_tile(w + p * in * PANEL, x, in, y, out, p * PANEL, bias, R, G);
        } else {
            for (int64_t q = p; q < panels; q++) wide_tile(w + q * in * PANEL, x, in, y, out, q * PANEL, bias, R, 1);
        }
        if (e)
            for (int64_t q = p; q < p + G && q < panels; q++)
                finish_tile(y, e, q * PANEL, out, R, out - q * PANEL < PANEL ? (int)(out - q * PANEL) : PANEL);
    }
}

void linear_team(const float *x, const float *w, const float *bias, const Epilogue *e, float *y, int64_t rows,
                 int64_t in, int64_t out, float *xp) {
    switch (rows) {
        case 1: few_rows(x, w, bias, e, y, in, out, 1, 4); return;
        case 2: few_rows(x, w, bias, e, y, in, out, 2, 3); return;
        case 3: few_rows(x, w, bias, e, y, in, out, 3, 2); return;
    }
    const int64_t panels = (out + PANEL - 1) / PANEL;
    pack_rows(x, xp, rows, in);
    for (int64_t m0 = 0; m0 < rows; m0 += ROW_BLOCK) {
        const int64_t m1 = m0 + ROW_BLOCK < rows ? m0 + ROW_BLOCK : rows;
        /* while a block's tiles compute, they pull the block this thread multiplies next (the next 16 KiB of
         * weights: the same panel's next K block, or the next panel's first) into L2, each tile its share of the
         * lines: spread over the tiles, not all on the first (a prefetch past the end of the weights is
         * harmless) */
        const int64_t tiles = (m1 - m0 + TILE_ROWS - 1) / TILE_ROWS, share = (K_BLOCK + tiles - 1) / tiles;
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < panels; p++) {
            const int64_t o = p * PANEL;
            const int cols = out - o < PANEL ? (int)(out - o) : PANEL;
            const float *b = bias ? bias + o : 0;
            for (int64_t k0 = 0; k0 < in; k0 += K_BLOCK) {
                const int64_t kn = in - k0 < K_BLOCK ? in - k0 : K_BLOCK;
                const int first = k0 == 0, last = k0 + kn == in;
                const float *panel = w + (p * in + k0) * PANEL;
                for (int64_t m = m0, t = 0; m < m1; t++) {
                    const int height = tile_height(m1 - m);
                    const float *xm = xp + m * in + k0 * height;
                    float *ym = y + m * out + o;
                    const float *ahead = panel + (kn + t * share) * PANEL;
                    switch (height) {
                        case 6: panel_tile(panel, xm, kn, ym, out, cols, b, first, last, 6, ahead, share); break;
                        case 5: panel_tile(panel, xm, kn, ym, out, cols, b, first, last, 5, ahead, share); break;
                        case 4: panel_tile(panel, xm, kn, ym, out, cols, b, first, last, 4, ahead, share); break;
                        case 3: panel_tile(panel, xm, kn, ym, out, cols, b, first, last, 3, ahead, share); break;
                        case 2: panel_tile(panel, xm, kn, ym, out, cols, b, first, last, 2, ahead, share); break;
                        default: panel_tile(panel, xm, kn, ym, out, cols, b, first, last, 1, ahead, share); break;
                    }
                    if (e && last) finish_tile(y, e, m * out + o, out, height, cols);
                    m += height;
                }
            }
        }
    }
#pragma omp barrier
}

/* y = residual + act(x @ w^T + bias) * mul: x (rows, in) contiguous; w packed (ceil(out / 16), in, 16); bias (out),
 * mul and residual (rows, out), each NULL when absent; act an ACT_ kind; y (rows, out), which must not overlap
 * x, mul or residual; scratch: rows * in floats (unused, and may be NULL, for 1-3 rows). */
void lmserve_linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t in,
                        int64_t out, int threads, const float *mul, const float *residual, int act, float *scratch) {
    const Epilogue epilogue = {mul, residual, act}, *e = mul || residual || act ? &epilogue : 0;
#pragma omp parallel num_threads(threads)
    linear_team(x, w, bias, e, y, rows, in, out, scratch);
}

/* ---- activations and norms ------------------------------------------------------------------------------- */

/* y = act(x) over n floats (act an ACT_ kind). One pass where PyTorch's tanh-GELU takes several. */
void lmserve_activation_f32(const float *x, float *y, int64_t n, int act, int threads) {
    const int64_t vectors = n / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 32768)
    for (int64_t i = 0; i < vectors; i++) _mm256_storeu_ps(y + 8 * i, activate8(_mm256_loadu_ps(x + 8 * i), act));
    if (n % 8) {  /* the tail through the same vector code, so every element gets the same arithmetic */
        float in[8] = {0}, out[8];
        memcpy(in, x + 8 * vectors, (n % 8) * sizeof(float));
        _mm256_storeu_ps(out, activate8(_mm256_loadu_ps(in), act));
        memcpy(y + 8 * vectors, out, (n % 8) * sizeof(float));
    }
}

/* sum(x[i]) (or sum((x[i] - c)^2) when squared) over n floats: 8 lanes in order, then the lanes, then the tail */
static inline float row_sum(const float *x, int64_t n, float c, int squared) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 cv = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), cv);
        acc = squared ? _mm256_fmadd_ps(v, v, acc) : _mm256_add_ps(acc, v);
    }
    float s = _mm_cvtss_f32(lane_sums(acc, acc, acc, acc));
    for (; i < n; i++) s += squared ? (x[i] - c) * (x[i] - c) : x[i] - c;
    return s;
}

/* LayerNorm ((x - mean) / sqrt(var + eps) * weight + bias; bias may be NULL) or, with rms, RMSNorm
 * (weight * (x / sqrt(mean(x^2) + eps))) of each row: x and y (rows, dim), contiguous. */
void norm_team(const float *x, const float *weight, const float *bias, float *y, int64_t rows, int64_t dim, float eps,
               int rms) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        const float mean = rms ? 0.0f : row_sum(xr, dim, 0.0f, 0) / (float)dim;
        const float scale = 1.0f / sqrtf(row_sum(xr, dim, mean, 1) / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) {
            const float h = (xr[i] - mean) * scale;
            yr[i] = rms ? weight[i] * h : h * weight[i] + (bias ? bias[i] : 0.0f);
        }
    }
}

void lmserve_norm_f32(const float *x, const float *weight, const float *bias, float *y, int64_t rows, int64_t dim,
                      float eps, int rms, int threads) {
#pragma omp parallel num_threads(threads) if (rows * dim >= 65536)
    norm_team(x, weight, bias, y, rows, dim, eps, rms);
}

/* Rotary embedding in place, Llama's half-split layout: for each of `heads` heads of dim D from x,
 * x = x * cos + rotate_half(x) * sin at `position`'s cos and sin (table (P, 2, D)); a negative position (padding)
 * counts as 0. Rounds as PyTorch's apply_rope does (built with
 * -ffp-contract=off: no product is fused into a sum), so a decode step rotates exactly as a prompt pass. */
void rope_row(float *x, int64_t heads, int64_t D, const float *table, int64_t position) {
    const int64_t half = D / 2;
    const float *cosine = table + (position > 0 ? position : 0) * 2 * D, *sine = cosine + D;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * D;
        for (int64_t i = 0; i < half; i++) {
            const float x1 = v[i], x2 = v[i + half];
            v[i] = x1 * cosine[i] + -x2 * sine[i];  /* -ffp-contract=off: two products, then the sum */
            v[i + half] = x2 * cosine[i + half] + x1 * sine[i + half];
        }
    }
}

/* ---- argmax ---------------------------------------------------------------------------------------------- */

/* The index of the largest of n floats, the first one where several are (a NaN counts as the largest): as
 * torch.argmax, in one vectorized pass where PyTorch's CPU argmax spends ~1.3 ns a float. */
static int64_t row_argmax(const float *x, int64_t n) {
    int64_t i = 0, found = 0;
    float top = x[0];
    if (n >= 8) { /* each lane: its largest value and where it first came */
        __m256 best = _mm256_loadu_ps(x), nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
        __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), index = at;
        for (i = 8; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            index = _mm256_add_epi32(index, _mm256_set1_epi32(8));
            const __m256 larger = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
            best = _mm256_blendv_ps(best, v, larger);
            at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(index), larger));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        if (_mm256_movemask_ps(nan)) {
            for (int64_t j = 0;; j++)
                if (x[j] != x[j]) return j;
        }
        float lanes[8];
        int32_t where[8];
        _mm256_storeu_ps(lanes, best);
        _mm256_storeu_si256((__m256i *)where, at);
        top = lanes[0], found = where[0];
        for (int j = 1; j < 8; j++)
            if (lanes[j] > top || (lanes[j] == top && where[j] < found)) top = lanes[j], found = where[j];
    }
    for (; i < n; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > top) top = x[i], found = i;
    }
    return found;
}

/* out[r] = argmax of row r of x (rows, n); n < 2^31 */
void lmserve_argmax_f32(const float *x, int64_t rows, int64_t n, int64_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) out[r] = row_argmax(x + r * n, n);
}
