"""The CPU decode step as one call into our kernels (kernels/decode_step.c).

A decode step of a small model on a CPU lasts about as long as its weights take to stream from memory. Going
through the model's modules adds Python to every layer (module calls, views, temporaries), and even a list of
kernel calls on preallocated buffers adds a ctypes call and a parallel region to start per stage.
`CpuDecodeStep` describes the model once, in C structs of pointers to its packed weights, norms, embeddings and
KV cache (abi.py mirrors them), and each step is then one call: the embedding, every layer, the final norm and
the output layer in one OpenMP parallel region, with the same kernels in the same order as the model's own
forward pass on them, so its logits and KV cache are bit-identical to that (tests/test_cpu_decode.py).

decode_step.c is thus a second copy of the forward pass, for the models `decode_step_support` accepts; the
runner decodes every other model with the forward pass (on the kernel layers where they apply). CUDA's
counterpart is the CUDA-graph decoder (service/backends/cuda_graphs.py).
"""

from __future__ import annotations

import ctypes

import torch

from model.config import ModelConfig
from model.kv_cache import KVCache
from model.model import Transformer
from service.backends.cpu.abi import ACTIVATIONS, HEADS_AT_ONCE, StepLayer, StepModel
from service.backends.cpu.library import CpuKernels


def decode_step_support(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[bool, str | None]:
    """Whether decode_step.c computes this model's decode step, and if not, why. It implements decoder-only,
    pre-norm float32 models on the CPU: learned, sinusoidal or rotary positions (any rotary scaling, scaled
    embeddings or not), LayerNorm or RMSNorm (with Gemma's unit offset), GELU (tanh form), ReLU, SwiGLU or GeGLU
    feed-forwards, grouped-query attention, any head size, biases or none, tied or untied output layers; not
    per-head q/k norms (Qwen3)."""
    if device.type != "cpu" or dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        return False, f"the C decode step runs float32 on the CPU, not {name} on {device.type}"
    if config.is_encoder_decoder:
        return False, "the C decode step has no cross-attention (an encoder-decoder model)"
    if config.norm_position != "pre":
        return False, "the C decode step is pre-norm only (a post-norm model)"
    if config.activation not in ACTIVATIONS:
        return False, f"the C decode step has no {config.activation!r} activation"
    if config.qk_norm:
        return False, "the C decode step has no per-head q/k norms (qk_norm, as Qwen3)"
    return True, None


def _pointer_to(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuDecodeStep:
    """The decode step of a model `decode_step_support` accepts, as `on_kernels` made it (packed, fused q/k/v,
    kernel norms), over its KV cache."""

    def __init__(self, model: Transformer, cache: KVCache, kernels: CpuKernels) -> None:
        c, final_norm = model.config, model.norm
        rows, width = cache.batch_size, (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        self.vocab, self.step = c.vocab_size, kernels.decode_step
        # per-step activations, (rows, features), kept here: the structs below only point at them
        self.buffers = {name: torch.empty(rows, size) for name, size in (
            ("x", c.hidden_size), ("mid", c.hidden_size), ("h", c.hidden_size), ("qkv", width),
            ("attn", c.num_attention_heads * c.head_dim), ("ff", c.intermediate_size),
            ("gated", c.intermediate_size if c.gated else 0),
            ("packed", max(c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size)))}
        self.mask = torch.empty(rows * (cache.max_seq_len + 1), dtype=torch.uint8)
        # positions: the learned table, or the sinusoidal one as the embedding adds it (cast once, not per step)
        self.positions = (model.embed_positions.weight if model.embed_positions is not None
                          else None if model.sinusoid is None else model.sinusoid.float().contiguous())
        self.layers = (StepLayer * len(model.layers))()
        for i, block in enumerate(model.layers):
            attention, mlp = block.self_attn, block.mlp
            self.layers[i] = StepLayer(*map(_pointer_to, (
                block.attn_norm.weight, block.attn_norm.bias, attention.qkv_proj.packed, attention.qkv_proj.bias,
                attention.o_proj.packed, attention.o_proj.bias, block.mlp_norm.weight, block.mlp_norm.bias,
                None if mlp.gate_proj is None else mlp.gate_proj.packed,
                None if mlp.gate_proj is None else mlp.gate_proj.bias, mlp.up_proj.packed, mlp.up_proj.bias,
                mlp.down_proj.packed, mlp.down_proj.bias, cache.k[i], cache.v[i])))
        self.model = StepModel(
            len(model.layers), c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, cache.max_seq_len, *cache.k[0].stride()[:3],
            final_norm.eps, c.head_dim ** -0.5, model.embed_scale, final_norm.rms, ACTIVATIONS[c.activation],
            *map(_pointer_to, (model.embed_tokens.weight, self.positions, model.rope, final_norm.weight,
                               final_norm.bias, model.lm_head.packed, model.lm_head.bias)),
            self.layers, *map(_pointer_to, (*self.buffers.values(), self.mask)))
        self.address = ctypes.addressof(self.model)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of cache rows 0..B-1 (position -1: a row along as padding); returns (B, V) logits."""
        B = len(tokens)
        ids = torch.tensor(tokens + positions, dtype=torch.int64)  # (2B,): the tokens, then their positions
        logits = torch.empty(B, self.vocab)  # fresh: the caller keeps it past the next step
        threads, kv_len = torch.get_num_threads(), max(positions) + 1
        scores = torch.empty(threads * HEADS_AT_ONCE * kv_len)  # each thread's attention scores
        at = ids.data_ptr()
        self.step(self.address, at, at + 8 * B, B, kv_len, logits.data_ptr(), scores.data_ptr(), threads)
        return logits
