"""Modules over our float32 CPU kernels: packed linear layers, norms, the feed-forward activation, one-query
attention, a KV cache whose writes run on the kernel, and argmax.

Decoding multiplies a few rows of activations (one per sequence) by every weight matrix, once per token, so its
speed is how fast the weights stream from memory; prompts multiply hundreds of rows, and their speed is
arithmetic. `KernelLinear` holds each weight matrix packed into k-major panels of 16 outputs (the layout a
register-tiled kernel reads in order). One kernel serves every pass: a single row streams 4 panels at a time,
several rows run 6x16 register tiles. Every output is summed in one fixed order whatever the number of rows, so a
sequence's numbers are bit-identical alone or in a batch, in a prompt pass or a decode step.

Decode attention (one query per sequence) reads each sequence's keys and values once, in place in the KV cache,
4 heads side by side; PyTorch's SDPA is made for long queries, and prompt passes use it. docs/performance.md has
the measurements behind these choices.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.kv_cache import KVCache
from model.model import RMSNorm
from service.backends.cpu import pages
from service.backends.cpu.abi import ACTIVATIONS, HEADS_AT_ONCE, PANEL
from service.backends.cpu.library import CpuKernels, kernels, loaded


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) row-major -> (ceil(out / 16), in, 16): panel p holds outputs 16p..16p+15 for each input in
    turn; outputs past `out` are zeros."""
    out, features = weight.shape
    panels = -(-out // PANEL)
    padded = F.pad(weight.detach(), (0, 0, 0, panels * PANEL - out))  # (panels * 16, in)
    packed = pages.zeros((panels, features, PANEL), weight.dtype)  # on 2 MiB pages: decoding streams it
    return packed.copy_(padded.view(panels, PANEL, features).transpose(1, 2))


def unpack(packed: torch.Tensor, out: int) -> torch.Tensor:
    """The (out, in) row-major matrix back from its panels (a copy)."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:out]


class KernelLinear(nn.Module):
    """`nn.Linear` for inference on the CPU kernel, or several side by side (their outputs concatenated: one pass
    over the input and one longer stream of weights, each output the same sum as in its own layer). The weight
    lives only in packed form (the `packed` buffer); `weight` unpacks a copy for whoever asks (a layer cast or
    moved after packing computes with it). A single layer's bias stays its original parameter."""

    def __init__(self, linear: nn.Linear | list[nn.Linear], kernels: CpuKernels) -> None:
        super().__init__()
        parts = linear if isinstance(linear, list) else [linear]
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        weight = parts[0].weight if len(parts) == 1 else torch.cat([p.weight.detach() for p in parts])
        self.register_buffer("packed", pack(weight), persistent=False)
        self.bias = parts[0].bias
        if len(parts) > 1 and self.bias is not None:
            self.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        self.kernels = kernels

    @property
    def weight(self) -> torch.Tensor:
        return unpack(self.packed, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, bias = self.packed, self.bias  # (a module's attribute lookups add up over a pass)
        if not (x.dtype is packed.dtype is torch.float32 and x.is_cpu and packed.is_cpu):
            return F.linear(x, self.weight, bias)  # cast or moved after packing
        rows = x.reshape(-1, self.in_features).contiguous()  # (N, in)
        n = rows.shape[0]
        y = torch.empty(n, self.out_features)  # (N, out)
        scratch = torch.empty(n * self.in_features) if n > 3 else None  # the kernel's copy of x in tile order
        if n:
            self.kernels.linear(rows.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(),
                                y.data_ptr(), n, self.in_features, self.out_features, torch.get_num_threads(),
                                None, None, 0, None if scratch is None else scratch.data_ptr())
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Activation:
    """The feed-forward activation on the CPU kernel, in one vectorized pass: GELU's tanh form, SwiGLU's SiLU or
    ReLU. Other dtypes, layouts or devices go to PyTorch."""

    def __init__(self, kernels: CpuKernels, activation: str, fallback: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.kernels, self.kind, self.fallback = kernels, ACTIVATIONS[activation], fallback

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not (h.dtype == torch.float32 and h.device.type == "cpu" and h.is_contiguous()):
            return self.fallback(h)
        y = torch.empty_like(h)
        self.kernels.activation(h.data_ptr(), y.data_ptr(), h.numel(), self.kind, torch.get_num_threads())
        return y


class KernelNorm(nn.Module):
    """`nn.LayerNorm` or `RMSNorm` on the CPU kernel: the decode step (decode_step.py) calls the same kernel, so
    prompt passes and decode steps normalise identically. Other dtypes or devices go to PyTorch."""

    def __init__(self, norm: nn.LayerNorm | RMSNorm, kernels: CpuKernels) -> None:
        super().__init__()
        self.rms, self.eps, self.kernels = isinstance(norm, RMSNorm), norm.eps, kernels
        weight = norm.weight
        if getattr(norm, "unit_offset", False):  # a (1 + weight) scale (Gemma) is applied as weight + 1
            weight = nn.Parameter((weight.detach().float() + 1.0).to(weight.dtype), requires_grad=False)
        self.weight, self.bias = weight, getattr(norm, "bias", None)
        self.unit_offset = False  # for RMSNorm.forward, the fallback: the offset is in the weight already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if not (x.dtype is weight.dtype is torch.float32 and x.is_cpu and weight.is_cpu):
            return RMSNorm.forward(self, x) if self.rms else F.layer_norm(x, weight.shape, weight, bias, self.eps)
        rows = x.reshape(-1, weight.shape[0]).contiguous()  # (N, C)
        y = torch.empty_like(rows)
        self.kernels.norm(rows.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                          rows.shape[0], rows.shape[1], self.eps, self.rms, torch.get_num_threads())
        return y.view(x.shape)


def swappable_norm(module: nn.Module) -> bool:
    return isinstance(module, RMSNorm) or (type(module) is nn.LayerNorm and module.elementwise_affine
                                           and len(module.normalized_shape) == 1)


class DecodeAttention:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask)` for one query per sequence: q (B, H, 1, D),
    k/v (B, Hkv, S, D) (views into the KV cache are read in place), mask (B, 1, 1, S) bool. Other shapes,
    dtypes or layouts go to PyTorch's SDPA."""

    def __init__(self, kernels: CpuKernels) -> None:
        self.kernels = kernels

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        S = k.shape[2]
        if not (T == 1 and q.dtype == k.dtype == v.dtype == torch.float32 and k.stride() == v.stride()
                and k.stride(-1) == 1 and mask.shape == (B, 1, 1, S) and q.device.type == "cpu"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != H)
        q = q.contiguous()  # (B, H, 1, D)
        allowed = mask.reshape(B, S).contiguous().view(torch.uint8)  # (B, S)
        y = torch.empty_like(q)  # (B, H, 1, D)
        threads = torch.get_num_threads()
        scores = torch.empty(threads * HEADS_AT_ONCE * S)
        self.kernels.decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), allowed.data_ptr(), y.data_ptr(),
                                      B, H, k.shape[1], S, D, k.stride(0), k.stride(1), k.stride(2), H * D, D ** -0.5,
                                      scores.data_ptr(), threads)
        return y


class KernelKVCache(KVCache):
    """A KV cache on 2 MiB pages (pages.py) whose writes (a pass's keys and values into their slots) run on the
    kernel: one row copy per head and token. Other dtypes or layouts go to `KVCache.write`'s index_put_."""

    def __init__(self, kernels: CpuKernels, *args, **kwargs) -> None:
        super().__init__(*args, zeros=pages.zeros, **kwargs)
        self.kernels = kernels

    def write(self, layer: int, write_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k, v (B, Hkv, T, D) (any strides with contiguous rows) at `write_index` (B*Hkv*T,)."""
        k_cache, v_cache = self.k[layer], self.v[layer]  # (rows, Hkv, S+1, D), contiguous
        if not (k.dtype is v.dtype is k_cache.dtype is torch.float32 and k.is_cpu and k_cache.is_cpu
                and k.stride(-1) == v.stride(-1) == 1 and write_index.dtype is torch.long
                and write_index.is_contiguous() and k.shape == v.shape):
            return super().write(layer, write_index, k, v)
        B, H, T, D = k.shape
        self.kernels.write_kv(k_cache.data_ptr(), v_cache.data_ptr(), write_index.data_ptr(), k.data_ptr(),
                              v.data_ptr(), B, H, T, D, *k.stride()[:3], *v.stride()[:3])


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of a (B, V) tensor (the same indices: the first largest, NaN as the largest), on the
    kernel for float32 CPU tensors once the process has loaded the kernels (an engine on them has; this never
    builds them). Greedy sampling takes one per row of logits every step."""
    ready = loaded.cache_info().currsize > 0
    library = kernels() if ready and x.dtype is torch.float32 and x.is_cpu and x.dim() == 2 and x.shape[1] else None
    if library is None or x.shape[1] >= 2**31:
        return x.argmax(dim=-1)
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    library.argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def release_free_memory() -> None:
    """Hands memory that was freed back to the OS where the C library can (glibc's `malloc_trim`): glibc keeps the
    row-major weights released by repacking in its heap, so the process would go on counting them."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc
        return
    trim(0)
