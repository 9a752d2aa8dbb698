/* The decode step of a decoder-only, pre-norm float32 Transformer in one call and one OpenMP parallel region.
 *
 * Per token, the embedding, then for each layer
 *
 *     h = norm(x); qkv = h Wqkv + b; rope(q, k); cache[position] = k, v; a = attention(q, cache)
 *     mid = x + (a Wo + b); h = norm(mid); f = act(h Wup + b) [* silu(h Wgate + b)]; x = mid + (f Wdown + b)
 *
 * then the final norm and the output layer, each stage split over the team and ended by a barrier (cpu.h). From
 * Python the same stages would be a hundred or so calls a step, each a ctypes call and a parallel region to
 * start; the kernels and the order of every sum are those of the model's own forward pass on the kernels, so
 * the logits and the KV cache are bit-identical to it (tests/test_cpu_decode.py). This is a second copy of the
 * forward pass: service/backends/cpu/decode_step.py says which models it covers (decode_step_support) and fills
 * the structs below, whose layout lmserve_abi reports.
 */
#include <omp.h>
#include <stddef.h>
#include <string.h>

#include "cpu.h"

typedef struct {
    const float *attn_norm_weight, *attn_norm_bias, *qkv, *qkv_bias, *o, *o_bias;
    const float *mlp_norm_weight, *mlp_norm_bias, *gate, *gate_bias, *up, *up_bias, *down, *down_bias;
    float *k_cache, *v_cache; /* (rows, Hkv, S + 1, D) at the model's kv strides */
} StepLayer;                  /* weights packed as lmserve_linear_f32 takes them; a bias or the gate may be NULL */

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, vocab;
    int64_t sink_slot;                      /* the cache slot that padding rows (position < 0) write to */
    int64_t kv_stride_b, kv_stride_h, kv_stride_s;
    float norm_eps, attn_scale, embed_scale;
    int32_t rms, act;                       /* RMSNorm (else LayerNorm); the ACT_ applied to up (or gate, if any) */
    const float *token_embedding;           /* (vocab, hidden) */
    const float *position_embedding;        /* (positions, hidden): learned or sinusoidal; NULL if none */
    const float *rope;                      /* (positions, 2, D) cos and sin; NULL without */
    const float *norm_weight, *norm_bias, *lm_head, *lm_head_bias;
    const StepLayer *layer;
    float *x, *mid, *h, *qkv, *attn, *ff, *gated; /* (rows, features) work buffers; gated only with a gate */
    float *packed;                          /* rows x max(hidden, heads x head_dim, intermediate): a linear layer's
                                               activations in tile order */
    uint8_t *mask;                          /* rows x (S + 1) bytes */
} StepModel;

/* One token per row b < B at positions[b] (-1: a padding row, computed and thrown away) into logits (B, vocab);
 * kv_len = 1 + the largest position; scores: threads x HEADS_AT_ONCE x kv_len floats. */
void lmserve_decode_step_f32(const StepModel *m, const int64_t *tokens, const int64_t *positions, int64_t B,
                             int64_t kv_len, float *logits, float *scores, int threads) {
    const int64_t C = m->hidden, H = m->heads, Hkv = m->kv_heads, D = m->head_dim, F = m->intermediate;
    const int64_t width = (H + 2 * Hkv) * D; /* a qkv row: q heads, k heads, v heads */
    float *x = m->x, *mid = m->mid, *h = m->h, *qkv = m->qkv;
#pragma omp parallel num_threads(threads)
    {
        float *p = scores + omp_get_thread_num() * HEADS_AT_ONCE * kv_len; /* this thread's attention scores */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const int64_t at = positions[b] > 0 ? positions[b] : 0;
            const float *token = m->token_embedding + tokens[b] * C;
            const float *place = m->position_embedding ? m->position_embedding + at * C : 0;
            for (int64_t i = 0; i < C; i++) x[b * C + i] = place ? token[i] * m->embed_scale + place[i]
                                                                  : token[i] * m->embed_scale;
            for (int64_t s = 0; s < kv_len; s++) m->mask[b * kv_len + s] = s <= at;
        }
        for (int64_t l = 0; l < m->layers; l++) {
            const StepLayer *L = m->layer + l;
            norm_team(x, L->attn_norm_weight, L->attn_norm_bias, h, B, C, m->norm_eps, m->rms);
            linear_team(h, L->qkv, L->qkv_bias, 0, qkv, B, C, width, m->packed);
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                float *row = qkv + b * width;
                if (m->rope) rope_row(row, H + Hkv, D, m->rope, positions[b]);
                const int64_t slot = positions[b] < 0 ? m->sink_slot : positions[b];
                for (int64_t g = 0; g < Hkv; g++) {
                    const int64_t to = b * m->kv_stride_b + g * m->kv_stride_h + slot * m->kv_stride_s;
                    memcpy(L->k_cache + to, row + (H + g) * D, D * sizeof(float));
                    memcpy(L->v_cache + to, row + (H + Hkv + g) * D, D * sizeof(float));
                }
            }
            attention_team(qkv, L->k_cache, L->v_cache, m->mask, m->attn, B, H, Hkv, kv_len, D, m->kv_stride_b,
                           m->kv_stride_h, m->kv_stride_s, width, m->attn_scale, p);
            const Epilogue after_attention = {0, x, ACT_NONE};
            linear_team(m->attn, L->o, L->o_bias, &after_attention, mid, B, H * D, C, m->packed);
            norm_team(mid, L->mlp_norm_weight, L->mlp_norm_bias, h, B, C, m->norm_eps, m->rms);
            const Epilogue activated = {0, 0, m->act}, times_gate = {m->gated, 0, ACT_NONE};
            if (L->gate) { /* SwiGLU: down(act(gate(h)) * up(h)) */
                linear_team(h, L->gate, L->gate_bias, &activated, m->gated, B, C, F, m->packed);
                linear_team(h, L->up, L->up_bias, &times_gate, m->ff, B, C, F, m->packed);
            } else {
                linear_team(h, L->up, L->up_bias, m->act ? &activated : 0, m->ff, B, C, F, m->packed);
            }
            const Epilogue after_mlp = {0, mid, ACT_NONE};
            linear_team(m->ff, L->down, L->down_bias, &after_mlp, x, B, F, C, m->packed);
        }
        norm_team(x, m->norm_weight, m->norm_bias, h, B, C, m->norm_eps, m->rms);
        linear_team(h, m->lm_head, m->lm_head_bias, 0, logits, B, C, m->vocab, m->packed);
    }
}

/* What Python's mirror (service/backends/cpu/abi.py: expected()) must match, in its order: the constants, the
 * structs' sizes and the offsets where their fields change type or purpose. Writes up to `capacity` values into
 * out; returns how many there are. */
int64_t lmserve_abi(int64_t *out, int64_t capacity) {
    const int64_t abi[] = {
        PANEL, HEADS_AT_ONCE, ACT_GELU_TANH, ACT_SILU, ACT_RELU,
        sizeof(StepLayer), offsetof(StepLayer, k_cache),
        sizeof(StepModel), offsetof(StepModel, sink_slot), offsetof(StepModel, norm_eps), offsetof(StepModel, rms),
        offsetof(StepModel, token_embedding), offsetof(StepModel, layer), offsetof(StepModel, x),
        offsetof(StepModel, mask),
    };
    const int64_t count = (int64_t)(sizeof abi / sizeof abi[0]);
    for (int64_t i = 0; i < count && i < capacity; i++) out[i] = abi[i];
    return count;
}
