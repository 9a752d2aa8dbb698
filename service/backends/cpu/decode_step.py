"""The CPU decode step as one call into our kernels (service/kernels/decode_step.c).

A decode step of a small model on a CPU lasts as long as its weights take to stream from memory (~13 ms for
GPT-2 small here). Going through the model's modules adds ~2.5 ms of Python to that (module calls, views,
temporaries: ~15 operations per layer), and even a list of kernel calls on preallocated buffers adds ~1 ms
(~100 ctypes calls, each starting a parallel region). `CpuDecodeStep` describes the model once, in C structs of
pointers to its packed weights, norms, embeddings and KV cache, and each step is then one call: the embedding,
every layer, the final norm and the output layer in one OpenMP parallel region, with the same kernels in the same
order as the model's own forward pass on them, so its logits and KV cache are bit-identical to that
(tests/test_cpu_decode.py). It serves decoder-only, pre-norm float32 models whose layers `use_cpu_kernels`
swapped; `CpuDecodeStep.build` returns None for anything else, and the runner then decodes with the model's
forward pass. CUDA's counterpart is the runner's CUDA-graph decoder.
"""

from __future__ import annotations

import ctypes

import torch

from model.kv_cache import KVCache
from model.model import Transformer
from service.backends.cpu.layers import HEADS_AT_ONCE, KernelLinear, KernelNorm
from service.backends.cpu.library import ACTIVATIONS, CpuKernels

_int64, _float, _int32, _pointer = ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p


class StepLayer(ctypes.Structure):
    """decode_step.c's StepLayer: one layer's norms, packed weights, biases and KV cache."""

    _fields_ = [(name, _pointer) for name in (
        "attn_norm_weight", "attn_norm_bias", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm_weight", "mlp_norm_bias",
        "gate", "gate_bias", "up", "up_bias", "down", "down_bias", "k_cache", "v_cache")]


class StepModel(ctypes.Structure):
    """decode_step.c's StepModel: the sizes, the model's other weights, the layers and the work buffers."""

    _fields_ = ([(name, _int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                                             "vocab", "sink_slot", "kv_stride_b", "kv_stride_h", "kv_stride_s")]
                + [("norm_eps", _float), ("attn_scale", _float), ("embed_scale", _float), ("rms", _int32),
                   ("act", _int32)]
                + [(name, _pointer) for name in ("token_embedding", "position_embedding", "rope", "norm_weight",
                                                 "norm_bias", "lm_head", "lm_head_bias")]
                + [("layer", ctypes.POINTER(StepLayer))]
                + [(name, _pointer) for name in ("x", "mid", "h", "qkv", "attn", "ff", "gated", "packed", "mask")])


def _pointer_to(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _norms_alike(norms: list) -> bool:
    return all(isinstance(n, KernelNorm) for n in norms) and len({(n.rms, n.eps) for n in norms}) == 1


class CpuDecodeStep:
    def __init__(self, model: Transformer, cache: KVCache, kernels: CpuKernels) -> None:
        c, final_norm = model.config, model.norm
        rows, width = cache.batch_size, (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        self.vocab, self.step = c.vocab_size, kernels.decode_step
        # per-step activations, (rows, features), kept here: the structs below only point at them
        self.buffers = {name: torch.empty(rows, size) for name, size in (
            ("x", c.hidden_size), ("mid", c.hidden_size), ("h", c.hidden_size), ("qkv", width),
            ("attn", c.num_attention_heads * c.head_dim), ("ff", c.intermediate_size),
            ("gated", c.intermediate_size if c.activation == "swiglu" else 0),
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

    @classmethod
    def build(cls, model: Transformer, cache: KVCache, kernels: CpuKernels) -> CpuDecodeStep | None:
        """The decode step for `model` (its layers already on the CPU kernels), or None where it doesn't apply."""
        c = model.config
        if (c.is_encoder_decoder or c.norm_position != "pre" or c.activation not in ACTIVATIONS
                or cache.k.dtype != torch.float32 or not isinstance(model.lm_head, KernelLinear)
                or model.embed_tokens.weight.dtype != torch.float32):
            return None
        norms = [model.norm] + [n for block in model.layers for n in (block.attn_norm, block.mlp_norm)]
        linears = [linear for block in model.layers for linear in (
            block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.up_proj, block.mlp.down_proj)]
        gates = [block.mlp.gate_proj for block in model.layers]
        if not (_norms_alike(norms) and all(isinstance(linear, KernelLinear) for linear in linears)
                and all(isinstance(g, KernelLinear) if c.activation == "swiglu" else g is None for g in gates)):
            return None
        return cls(model, cache, kernels)

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
