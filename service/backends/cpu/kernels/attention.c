/* lmserve's decode attention and KV-cache writes (float32, AVX2 + FMA, OpenMP); built with cpu.c.
 *
 * lmserve_decode_attention_f32: one query per (sequence, head) against that sequence's cached keys and values,
 * read once, in place in the KV cache. A decode step's attention reads the whole cache from memory, so what
 * counts is how many streams are in flight: a sequence's heads are taken HEADS_AT_ONCE at a time, side by side
 * (their key rows, then their value rows, interleaved), which reads faster than one head at a time. Each head's
 * numbers are exactly those of attending to it alone.
 *
 * lmserve_write_kv_f32: a pass's new keys and values into their KV-cache slots (a row copy per head and token,
 * where PyTorch's index_put_ spends most of its time on indexing).
 */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "cpu.h"

/* y += p * x over n floats */
static inline void axpy(float p, const float *x, float *y, int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += p * x[i];
}

/* Where attention finds things: the queries, the caches, the mask and the output (see attention_team). */
typedef struct {
    const float *q, *k, *v;
    const uint8_t *mask;
    float *y;
    int64_t H, group, S, D, stride_b, stride_h, stride_s, q_stride;
    float scale;
} Attending;

/* Heads h0..h0+n-1 (n <= HEADS_AT_ONCE, a constant once inlined) of sequence b; p: n * S floats. Per head: the
 * masked scores, their largest, then the value rows weighted by exp(score - largest), divided by the weights'
 * sum; the heads' loops interleaved, each head's sums in the same order as alone. */
static inline __attribute__((always_inline)) void attend_heads(const Attending *a, int64_t b, int64_t h0, float *p,
                                                               const int n) {
    const float *q[HEADS_AT_ONCE], *k[HEADS_AT_ONCE], *v[HEADS_AT_ONCE];
    float top[HEADS_AT_ONCE], total[HEADS_AT_ONCE], *out[HEADS_AT_ONCE];
    const uint8_t *allowed = a->mask + b * a->S;
    const int64_t S = a->S, D = a->D, stride_s = a->stride_s;
    for (int i = 0; i < n; i++) {
        const int64_t at = b * a->stride_b + (h0 + i) / a->group * a->stride_h; /* the head's key/value group */
        q[i] = a->q + b * a->q_stride + (h0 + i) * D;
        k[i] = a->k + at, v[i] = a->v + at;
        out[i] = a->y + (b * a->H + h0 + i) * D;
        top[i] = -INFINITY, total[i] = 0.0f;
    }
    const int64_t D8 = D & ~(int64_t)7;
    for (int64_t s = 0; s < S; s++) {
        if (!allowed[s]) {
            for (int i = 0; i < n; i++) p[i * S + s] = -INFINITY;
            continue;
        }
        /* the heads' dot products side by side, their lanes summed in one go (each in the order it would be
         * alone: 8 lanes, then the lanes, then the tail) */
        __m256 acc[HEADS_AT_ONCE];
        for (int i = 0; i < n; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D8; d += 8)
            for (int i = 0; i < n; i++)
                acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q[i] + d), _mm256_loadu_ps(k[i] + s * stride_s + d), acc[i]);
        float sums[4];
        _mm_storeu_ps(sums, lane_sums(acc[0], n > 1 ? acc[1] : acc[0], n > 2 ? acc[2] : acc[0],
                                      n > 3 ? acc[3] : acc[0]));
        for (int i = 0; i < n; i++) {
            float score = sums[i];
            for (int64_t d = D8; d < D; d++) score += q[i][d] * k[i][s * stride_s + d];
            score *= a->scale;
            p[i * S + s] = score;
            top[i] = score > top[i] ? score : top[i];
        }
    }
    for (int i = 0; i < n; i++) memset(out[i], 0, D * sizeof(float));
    for (int64_t s = 0; s < S; s++) {
        if (!allowed[s]) continue;
        for (int i = 0; i < n; i++) {
            const float e = expf(p[i * S + s] - top[i]);
            total[i] += e;
            axpy(e, v[i] + s * stride_s, out[i], D);
        }
    }
    for (int i = 0; i < n; i++) {
        const float inv = 1.0f / total[i];
        for (int64_t d = 0; d < D; d++) out[i][d] *= inv;
    }
}

/* softmax(q k^T * scale, masked) v for one query per (sequence b, head h):
 * q (B, H, D) with row stride q_stride (heads contiguous within a row); key/value (b, g, s, :) at
 * k/v + b*stride_b + g*stride_h + s*stride_s, where g = h / (H / Hkv) is the head's key/value group; mask (B, S)
 * bytes, nonzero = may attend (at least one per row); y (B, H, D). `p`: HEADS_AT_ONCE * S floats of this
 * thread's. */
void attention_team(const float *q, const float *k, const float *v, const uint8_t *mask, float *y, int64_t B,
                    int64_t H, int64_t Hkv, int64_t S, int64_t D, int64_t stride_b, int64_t stride_h,
                    int64_t stride_s, int64_t q_stride, float scale, float *p) {
    const Attending a = {q, k, v, mask, y, H, H / Hkv, S, D, stride_b, stride_h, stride_s, q_stride, scale};
    const int64_t per_row = (H + HEADS_AT_ONCE - 1) / HEADS_AT_ONCE;
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < B * per_row; unit++) {
        const int64_t b = unit / per_row, h0 = unit % per_row * HEADS_AT_ONCE;
        switch (H - h0 < HEADS_AT_ONCE ? H - h0 : HEADS_AT_ONCE) {
            case 4: attend_heads(&a, b, h0, p, 4); break;
            case 3: attend_heads(&a, b, h0, p, 3); break;
            case 2: attend_heads(&a, b, h0, p, 2); break;
            default: attend_heads(&a, b, h0, p, 1); break;
        }
    }
}

/* `scores` holds HEADS_AT_ONCE * S floats per thread. */
void lmserve_decode_attention_f32(const float *q, const float *k, const float *v, const uint8_t *mask, float *y,
                                  int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D, int64_t stride_b,
                                  int64_t stride_h, int64_t stride_s, int64_t q_stride, float scale, float *scores,
                                  int threads) {
#pragma omp parallel num_threads(threads)
    attention_team(q, k, v, mask, y, B, H, Hkv, S, D, stride_b, stride_h, stride_s, q_stride, scale,
                   scores + (int64_t)omp_get_thread_num() * HEADS_AT_ONCE * S);
}

/* ---- KV-cache writes ------------------------------------------------------------------------------------- */

/* k and v (B, H, T, D) at strides (kb, kh, kt, 1) and (vb, vh, vt, 1) into rows index[(b * H + h) * T + t] of
 * k_cache and v_cache, each viewed as (rows, D). */
void lmserve_write_kv_f32(float *k_cache, float *v_cache, const int64_t *index, const float *k, const float *v,
                          int64_t B, int64_t H, int64_t T, int64_t D, int64_t kb, int64_t kh, int64_t kt,
                          int64_t vb, int64_t vh, int64_t vt) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const int64_t row = index[(b * H + h) * T + t];
                memcpy(k_cache + row * D, k + b * kb + h * kh + t * kt, D * sizeof(float));
                memcpy(v_cache + row * D, v + b * vb + h * vh + t * vt, D * sizeof(float));
            }
}
