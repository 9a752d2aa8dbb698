/* What the kernels (cpu.c, attention.c) share with each other and with the fused decode step (decode_step.c).
 *
 * The *_team functions are to be called by every thread of an OpenMP parallel region: each splits its work over
 * the team with orphaned worksharing and returns after a barrier, so one region can run a whole decode step. The
 * exported lmserve_* kernels are each a parallel region around one of them.
 */
#pragma once
#include <immintrin.h>
#include <stdint.h>

/* The lane sums of four accumulators as one vector: [sum(a0), sum(a1), sum(a2), sum(a3)]. */
static inline __m128 lane_sums(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* What Python mirrors (service/backends/cpu/abi.py) and checks through lmserve_abi when it loads the library */
enum { ACT_NONE = 0, ACT_GELU_TANH = 1, ACT_SILU = 2, ACT_RELU = 3 };
#define PANEL 16        /* outputs per packed weight panel: two vectors of accumulators per activation row */
#define HEADS_AT_ONCE 4 /* heads of a sequence that attention reads side by side */

/* What a linear layer may do with its outputs (sum + bias) before they leave: activation, * mul, + residual.
 * mul and residual are (rows, out) like y, or NULL. */
typedef struct {
    const float *mul, *residual;
    int act;
} Epilogue;

/* y = epilogue(x @ w^T + bias), as lmserve_linear_f32 (e NULL: plain); scratch: rows * in floats (rows > 3) */
void linear_team(const float *x, const float *w, const float *bias, const Epilogue *e, float *y, int64_t rows,
                 int64_t in, int64_t out, float *scratch);

/* LayerNorm / RMSNorm of each row, as lmserve_norm_f32 */
void norm_team(const float *x, const float *weight, const float *bias, float *y, int64_t rows, int64_t dim, float eps,
               int rms);

/* one query per (sequence, head) against the KV cache, as lmserve_decode_attention_f32; `scores`: this thread's
 * HEADS_AT_ONCE * S floats */
void attention_team(const float *q, const float *k, const float *v, const uint8_t *mask, float *y, int64_t B,
                    int64_t H, int64_t Hkv, int64_t S, int64_t D, int64_t stride_b, int64_t stride_h,
                    int64_t stride_s, int64_t q_stride, float scale, float *scores);

/* rotary embedding of `heads` consecutive heads of dim D at x, at `position`, as the model's apply_rope */
void rope_row(float *x, int64_t heads, int64_t D, const float *table, int64_t position);
