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
 * lmserve_decode_attention_f32: one query per (sequence, head) against that sequence's cached keys and
 * values, read once, in place in the KV cache.
 *
 * Built by service/cpu_kernels.py:  cc -O3 -mavx2 -mfma -fopenmp -shared -fPIC cpu.c
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

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
