"""The CPU backend's inference copy of a model: the model's own forward pass, on modules over our kernels.

`on_kernels` builds it from the model's tensors and leaves the model as it was: every linear layer packed
(self-attention's q, k and v fused into one), the norms and the feed-forward activation on the kernels, and
one-query attention on the decode attention kernel. Embeddings, norms' weights and biases are the model's own
tensors; the weight matrices live only in packed form, so once the caller lets go of the model the panels are
the only copy of them.
"""

from __future__ import annotations

import torch
from torch import nn

from model.model import Attention, FeedForward, Transformer
from service.backends.cpu.abi import ACTIVATIONS
from service.backends.cpu.layers import (
    Activation,
    DecodeAttention,
    KernelLinear,
    KernelNorm,
    release_free_memory,
    swappable_norm,
)
from service.backends.cpu.library import CpuKernels, loaded
from service.backends.shared import shared_copy


def kernels_for(dtype: torch.dtype, device: torch.device) -> tuple[CpuKernels | None, str | None]:
    """The kernels for a model of `dtype` on `device`, or None and why not."""
    if device.type != "cpu":
        return None, f"the CPU kernels run on the CPU, not {device.type}"
    if dtype != torch.float32:
        return None, f"the CPU kernels take float32 weights, not {str(dtype).removeprefix('torch.')}"
    library = loaded()
    if isinstance(library, str):
        return None, f"CPU kernels unavailable ({library})"
    return library, None


class KernelAttention(Attention):
    """Attention on the kernels: self-attention's q, k and v as one packed layer, and in the decoder a single query
    per sequence (decode steps, a prompt pass's last layer) on the decode attention kernel."""

    def __init__(self, attention: Attention, library: CpuKernels, decoder: bool) -> None:
        nn.Module.__init__(self)  # not Attention's: its layers are made from `attention`'s weights, below
        self.cross, self.n_heads, self.n_kv_heads, self.head_dim, self.dropout = (
            attention.cross, attention.n_heads, attention.n_kv_heads, attention.head_dim, attention.dropout)
        if self.cross:  # k and v project the encoder output, q the decoder's: no fusing
            self.q_proj, self.k_proj, self.v_proj = (KernelLinear(p, library) for p in (
                attention.q_proj, attention.k_proj, attention.v_proj))
        else:
            self.qkv_proj = KernelLinear([attention.q_proj, attention.k_proj, attention.v_proj], library)
        self.o_proj = KernelLinear(attention.o_proj, library)
        self.q_norm, self.k_norm = (None if n is None else KernelNorm(n, library) if swappable_norm(n) else n
                                    for n in (attention.q_norm, attention.k_norm))
        self.decode_attention = DecodeAttention(library) if decoder else None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        return self.heads(q, self.n_heads), self.heads(k, self.n_kv_heads), self.heads(v, self.n_kv_heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        if q.shape[2] == 1 and mask is not None and self.decode_attention is not None:
            return self.decode_attention(q, k, v, mask)  # (B, H, 1, D)
        return super().attend(q, k, v, mask, is_causal)


def on_kernels(model: Transformer, library: CpuKernels) -> Transformer:
    """`model` for inference on the kernels (module docstring), in eval mode; `model` itself is not touched."""
    fast = shared_copy(model)
    encoder = {id(m) for m in fast.encoder_layers.modules()}
    for parent in [m for m in fast.modules() if not isinstance(m, Attention)]:  # (KernelAttention packs its own)
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                setattr(parent, name, KernelAttention(child, library, decoder=id(parent) not in encoder))
            elif type(child) is nn.Linear:
                setattr(parent, name, KernelLinear(child, library))
            elif swappable_norm(child):
                setattr(parent, name, KernelNorm(child, library))
            elif isinstance(child, FeedForward) and model.config.activation in ACTIVATIONS:
                child.act = Activation(library, model.config.activation, child.act)
    release_free_memory()  # the packing's temporaries
    return fast.eval()
