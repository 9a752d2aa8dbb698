"""PyTorch modules over our float32 CPU kernels: packed linear layers, norms, the feed-forward activation,
one-query attention, KV-cache writes and argmax.

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

from model.model import Attention, FeedForward, RMSNorm
from service.backends.cpu import pages
from service.backends.cpu.library import ACTIVATIONS, CpuKernels, kernels

PANEL = 16  # outputs per packed panel (the kernel's PANEL)
HEADS_AT_ONCE = 4  # heads attended side by side (cpu.h's HEADS_AT_ONCE): 4 rows of scores per thread


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
    """`nn.Linear` for inference on the CPU kernel. The weight lives only in packed form (the `packed` buffer);
    `weight` unpacks a copy for whoever asks (a layer cast or moved after the swap computes with it). The bias
    stays the original parameter. A tied output layer packs its own copy of the embedding table, which the
    embedding keeps."""

    def __init__(self, linear: nn.Linear, kernels: CpuKernels) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", pack(linear.weight), persistent=False)
        self.bias = linear.bias
        self.kernels = kernels

    @property
    def weight(self) -> torch.Tensor:
        return unpack(self.packed, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, bias = self.packed, self.bias  # (a module's attribute lookups cost a microsecond each)
        if not (x.dtype is packed.dtype is torch.float32 and x.is_cpu and packed.is_cpu):
            return F.linear(x, self.weight, bias)  # the model was moved or cast after the swap
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
    """The feed-forward activation on the CPU kernel, in one vectorized pass: GELU's tanh form (3-5x faster than
    PyTorch's here), SwiGLU's SiLU or ReLU. Other dtypes, layouts or devices go to PyTorch."""

    def __init__(self, kernels: CpuKernels, activation: str, fallback: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.kernels, self.kind, self.fallback = kernels, ACTIVATIONS[activation], fallback

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not (h.dtype == torch.float32 and h.device.type == "cpu" and h.is_contiguous()):
            return self.fallback(h)
        y = torch.empty_like(h)
        self.kernels.activation(h.data_ptr(), y.data_ptr(), h.numel(), self.kind, torch.get_num_threads())
        return y


class KernelNorm(nn.Module):
    """`nn.LayerNorm` or `RMSNorm` on the CPU kernel: the decode step (service/cpu_decode.py) calls the same
    kernel, so prompt passes and decode steps normalise identically. Other dtypes or devices go to PyTorch."""

    def __init__(self, norm: nn.LayerNorm | RMSNorm, kernels: CpuKernels) -> None:
        super().__init__()
        self.rms, self.eps, self.kernels = isinstance(norm, RMSNorm), norm.eps, kernels
        self.weight, self.bias = norm.weight, getattr(norm, "bias", None)

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


class CacheWriter:
    """`KVCache.write_rows` on the CPU kernel: a pass's keys and values k, v (B, Hkv, T, D), any strides with
    contiguous rows, into rows `index` (B*Hkv*T,) of a layer's caches viewed as (rows, D). Returns False (the
    cache then uses index_put_) for dtypes, devices or layouts it doesn't take."""

    def __init__(self, kernels: CpuKernels) -> None:
        self.kernels = kernels

    def __call__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> bool:
        if not (k.dtype is v.dtype is k_cache.dtype is v_cache.dtype is torch.float32 and k_cache.is_cpu and k.is_cpu
                and k_cache.is_contiguous() and v_cache.is_contiguous() and k.stride(-1) == v.stride(-1) == 1
                and index.dtype is torch.long and index.is_contiguous() and k.shape == v.shape):
            return False
        B, H, T, D = k.shape
        self.kernels.write_kv(k_cache.data_ptr(), v_cache.data_ptr(), index.data_ptr(), k.data_ptr(), v.data_ptr(),
                              B, H, T, D, *k.stride()[:3], *v.stride()[:3])
        return True


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of a (B, V) tensor (the same indices: the first largest, NaN as the largest), on the
    kernel for float32 CPU tensors once the process has loaded the kernels (an engine on them has; this never
    builds them). Greedy sampling takes one per row of logits every step: 16 us for GPT-2's 50257 against PyTorch's
    59, 0.18 ms for 32 rows against 1.85."""
    loaded = kernels.cache_info().currsize > 0
    library = kernels() if loaded and x.dtype is torch.float32 and x.is_cpu and x.dim() == 2 and x.shape[1] else None
    if library is None or x.shape[1] >= 2**31:
        return x.argmax(dim=-1)
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    library.argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def applicable(model: nn.Module) -> bool:
    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def release_free_memory() -> None:
    """Hands memory that was freed back to the OS where the C library can (glibc's `malloc_trim`): glibc keeps the
    row-major weights released by repacking in its heap, so the process would go on counting them."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc
        return
    trim(0)


def fuse_qkv(attention: Attention, library: CpuKernels) -> None:
    """Self-attention's q, k and v projections as one kernel layer: one pass over the activations and one longer
    stream of weights instead of three (at one decoding sequence the three 768x768 matrices of GPT-2 small stream
    at ~0.86 of a plain memory pass, a 2304-row one at ~1.0). Each output is the same sum as before."""
    parts = (attention.q_proj, attention.k_proj, attention.v_proj)
    if attention.cross or not all(type(p) is nn.Linear and p.weight.is_contiguous() for p in parts) or len(
            {p.bias is None for p in parts}) != 1:
        return
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    attention.qkv_proj = KernelLinear(fused, library)
    attention.q_proj = attention.k_proj = attention.v_proj = None  # released: the fused layer holds them


def use_cpu_kernels(model: nn.Module, library: CpuKernels | None = None) -> int:
    """Swaps every `nn.Linear` of a float32 CPU Transformer for a `KernelLinear` (its weight repacked, the
    original released: inference only, and `state_dict` no longer holds the linear weights; self-attention's
    q, k and v fused into one), its norms for `KernelNorm`s, its feed-forward activation (tanh-GELU, SiLU or
    ReLU) for an `Activation`, and gives it
    the decode attention kernel; returns how many linear layers run on the kernel (counting those swapped by an
    earlier call), 0 where the kernels are unavailable."""
    library = library or kernels()
    if library is None or not applicable(model):
        return 0
    count = 0
    for attention in [m for m in model.modules() if isinstance(m, Attention)]:
        fuse_qkv(attention, library)
    # the parents only: holding every module would keep each original weight alive until the end
    parents = [m for m in model.modules() if any(isinstance(c, (nn.Linear, KernelLinear)) or swappable_norm(c)
                                                 for c in m.children())]
    for module in parents:
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.is_contiguous():
                child = KernelLinear(child, library)
                setattr(module, name, child)
            elif swappable_norm(child):
                setattr(module, name, KernelNorm(child, library))
            count += isinstance(child, KernelLinear)
    activation = getattr(getattr(model, "config", None), "activation", None)
    if activation in ACTIVATIONS:
        for module in model.modules():
            if isinstance(module, FeedForward) and not isinstance(module.act, Activation):
                module.act = Activation(library, activation, module.act)
    model.decode_attention = DecodeAttention(library)
    release_free_memory()
    return count
