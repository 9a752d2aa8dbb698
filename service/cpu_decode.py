"""The CPU decode step as a fixed list of kernel calls (service/kernels/cpu.c) on preallocated buffers.

A decode step of a small model on a CPU lasts as long as its weights take to stream from memory (~15 ms for
GPT-2 small here); going through the model's modules adds ~2.5 ms of Python to that (module calls, views,
temporaries: ~15 operations per layer). `CpuDecodeStep` runs the same kernels on the same weights in the same
order, layer by layer,

    h = norm(x); qkv = h Wqkv + b; rope(q, k); cache[position] = k, v; a = attention(q, cache)
    x = x + (a Wo + b); h = norm(x); f = act(h Wup + b) [* silu(h Wgate + b)]; x = x + (f Wdown + b)

with the activation, the SwiGLU product and the residual add done by the linear layers as they store their
outputs, so its logits are bit-identical to the model's own forward pass on the CPU kernels
(tests/test_cpu_decode.py), in about 8 calls per layer. It serves decoder-only, pre-norm float32 models whose
layers `use_cpu_kernels` swapped; `CpuDecodeStep.build` returns None for anything else, and the runner then
decodes with the model's forward pass. CUDA's counterpart is the runner's CUDA-graph decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.kv_cache import KVCache
from model.model import Transformer
from service.cpu_kernels import ACTIVATIONS, CpuKernels, KernelLinear, KernelNorm

_NO_ACTIVATION, _SILU = 0, ACTIVATIONS["swiglu"]


@dataclass
class _Layer:
    attn_norm: KernelNorm
    qkv: KernelLinear
    o: KernelLinear
    mlp_norm: KernelNorm
    up: KernelLinear
    gate: KernelLinear | None
    down: KernelLinear


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuDecodeStep:
    def __init__(self, model: Transformer, layers: list[_Layer], cache: KVCache, kernels: CpuKernels) -> None:
        c = model.config
        self.model, self.layers, self.cache, self.kernels = model, layers, cache, kernels
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.activation = ACTIVATIONS[c.activation] if c.activation != "swiglu" else _NO_ACTIVATION
        rows, width = cache.batch_size, (self.heads + 2 * self.kv_heads) * self.head_dim
        # per-step activations, (rows, features): the residual stream alternates between `x` (the embedding's
        # output, then each layer's) and `mid` (after attention), as a linear layer can't add in place
        self.mid, self.h = torch.empty(rows, c.hidden_size), torch.empty(rows, c.hidden_size)
        self.qkv, self.attn = torch.empty(rows, width), torch.empty(rows, self.heads * self.head_dim)
        self.ff = torch.empty(rows, c.intermediate_size)
        self.gated = torch.empty(rows, c.intermediate_size) if c.activation == "swiglu" else None
        self.slots = torch.arange(cache.max_seq_len + 1)
        # each layer's KV cache (rows, Hkv, S + 1, D) never moves: its addresses and strides, once
        self.kv_at = [(cache.k[i].data_ptr(), cache.v[i].data_ptr()) for i in range(len(layers))]
        self.kv_strides = cache.k[0].stride()[:3]
        self.threads = torch.get_num_threads()  # read again at every step

    @classmethod
    def build(cls, model: Transformer, cache: KVCache, kernels: CpuKernels) -> CpuDecodeStep | None:
        """The decode step for `model` (its layers already on the CPU kernels), or None where it doesn't apply."""
        c = model.config
        if (c.is_encoder_decoder or c.norm_position != "pre" or c.activation not in ACTIVATIONS
                or cache.k.dtype != torch.float32 or not isinstance(model.norm, KernelNorm)
                or not isinstance(model.lm_head, KernelLinear)):
            return None
        layers = []
        for block in model.layers:
            attention, mlp = block.self_attn, block.mlp
            layer = _Layer(block.attn_norm, attention.qkv_proj, attention.o_proj, block.mlp_norm, mlp.up_proj,
                           mlp.gate_proj, mlp.down_proj)
            linears = [layer.qkv, layer.o, layer.up, layer.down] + ([layer.gate] if c.activation == "swiglu" else [])
            if not (isinstance(layer.attn_norm, KernelNorm) and isinstance(layer.mlp_norm, KernelNorm)
                    and all(isinstance(linear, KernelLinear) for linear in linears)):
                return None
            layers.append(layer)
        return cls(model, layers, cache, kernels)

    def norm(self, norm: KernelNorm, x: torch.Tensor, y: torch.Tensor) -> None:
        self.kernels.norm(x.data_ptr(), norm.weight.data_ptr(), _pointer(norm.bias), y.data_ptr(), x.shape[0],
                          x.shape[1], norm.eps, norm.rms, self.threads)

    def linear(self, layer: KernelLinear, x: torch.Tensor, y: torch.Tensor, mul: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, activation: int = _NO_ACTIVATION) -> None:
        """y = residual + activation(x W^T + b) * mul, each part optional."""
        self.kernels.linear(x.data_ptr(), layer.packed.data_ptr(), _pointer(layer.bias), y.data_ptr(), x.shape[0],
                            layer.in_features, layer.out_features, self.threads, _pointer(mul), _pointer(residual),
                            activation)

    @torch.inference_mode()
    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of cache rows 0..B-1 (position -1: a row along as padding); returns (B, V) logits."""
        B, kv_len = len(tokens), max(positions) + 1
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        self.threads = torch.get_num_threads()
        position = torch.tensor(positions)[:, None]  # (B, 1)
        x = self.model.embed(torch.tensor(tokens)[:, None], position).view(B, -1)  # (B, C)
        mid, h, qkv, attn, ff = (t[:B] for t in (self.mid, self.h, self.qkv, self.attn, self.ff))
        gated = self.gated[:B] if self.gated is not None else None
        allowed = (self.slots[:kv_len] <= position.clamp(min=0)).view(torch.uint8)  # (B, S): as the model's mask
        write_index = self.cache.write_index(None, position)  # (B * Hkv,)
        scores = torch.empty(self.threads * kv_len)
        rope = self.model.rope
        for layer, (k_cache, v_cache) in zip(self.layers, self.kv_at):
            self.norm(layer.attn_norm, x, h)
            self.linear(layer.qkv, h, qkv)  # (B, (H + 2 Hkv) D): q heads, k heads, v heads
            if rope is not None:  # q and k: the row's first H + Hkv heads
                self.kernels.rope(qkv.data_ptr(), B, qkv.shape[1], H + Hkv, D, rope.data_ptr(), position.data_ptr())
            k_at, v_at = qkv.data_ptr() + 4 * H * D, qkv.data_ptr() + 4 * (H + Hkv) * D  # float32: 4 bytes
            self.kernels.write_kv(k_cache, v_cache, write_index.data_ptr(), k_at, v_at,
                                  B, Hkv, 1, D, qkv.shape[1], D, D, qkv.shape[1], D, D)
            self.kernels.decode_attention(qkv.data_ptr(), k_cache, v_cache, allowed.data_ptr(),
                                          attn.data_ptr(), B, H, Hkv, kv_len, D, *self.kv_strides, qkv.shape[1],
                                          D ** -0.5, scores.data_ptr(), self.threads)
            self.linear(layer.o, attn, mid, residual=x)
            self.norm(layer.mlp_norm, mid, h)
            if layer.gate is not None:  # SwiGLU: down(silu(gate(h)) * up(h))
                self.linear(layer.gate, h, gated, activation=_SILU)
                self.linear(layer.up, h, ff, mul=gated)
            else:
                self.linear(layer.up, h, ff, activation=self.activation)
            self.linear(layer.down, ff, x, residual=mid)
        self.norm(self.model.norm, x, h)
        logits = torch.empty(B, self.model.lm_head.out_features)  # fresh: the caller keeps it past the next step
        self.linear(self.model.lm_head, h, logits)
        return logits
