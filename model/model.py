"""The Transformer, read top to bottom: embeddings + positions, attention, FFN, Add & Norm, Linear + Softmax.

One `Transformer` class covers the original encoder-decoder (post-norm "Add & Norm", sinusoidal positions,
ReLU FFN) and modern decoder-only models (pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention); see
`ModelConfig` for the switches.

Conventions for `forward(ids, positions, cache, logits_at, source)`:
- `positions` (B, T) holds each token's position in its sequence; -1 marks padding. Padding neither
  attends nor is attended to, and is never written into the KV cache.
- `cache` says how the pass uses a `KVCache`: a `CacheRows` writes each row's new keys/values at their
  positions in its cache row, and each token attends to its row's slots 0..position, so rows of different
  lengths share a batch; a `Ragged` holds several sequences back to back on one row, no padding, each token
  writing to and attending over its own sequence's cache row (an engine's prompt pass).
- `logits_at` (B,) picks one position per row to project to the vocabulary, so decoding never builds a
  (B, T, vocab) tensor; None returns logits for every position (training).
- `source`: an encoder-decoder pass's source tokens or encoder output (`Source`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kv_cache import CacheRows, KVCache, Ragged
from model.positions import apply_rope, rope_table, sinusoidal_table


class RMSNorm(nn.Module):
    """x / rms(x) * weight; with `unit_offset` (Gemma) the stored weight is the scale minus 1, applied in fp32."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # statistics in fp32 even for bf16/fp16 activations
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "rmsnorm":
        return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


# ---- attention ------------------------------------------------------------------------------------------


@dataclass
class PassContext:
    """What every layer needs to know about this forward pass; built once per pass, not per layer."""

    mask: torch.Tensor | None = None  # (B, 1, T, S) bool, True = may attend; None with is_causal (or ragged)
    is_causal: bool = False
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, T, D)
    cache: KVCache | None = None
    rows: torch.Tensor | None = None  # (B,) the batch rows' cache rows; None: 0..B-1
    write_index: torch.Tensor | None = None  # (B*Hkv*T,) where this pass's keys/values go in the cache
    kv_len: int = 0
    ragged: Ragged | None = None
    source_lengths: list[int] | None = None  # ragged encoder-decoder passes: each sequence's cached source tokens
    memory: torch.Tensor | None = None  # encoder output (B, S_src, C) when no cache holds its K/V
    cross_mask: torch.Tensor | None = None  # (B, 1, 1, S_src)

    def one_per_sequence(self) -> PassContext:
        """A ragged pass's context for the rest of a layer whose self-attention kept one token per sequence."""
        return replace(self, ragged=replace(self.ragged, lengths=[1] * len(self.ragged.lengths)))


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads; self-attention or cross-attention (K/V from the encoder)."""

    def __init__(self, config: ModelConfig, cross: bool = False) -> None:
        super().__init__()
        self.cross = cross
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.dropout = config.dropout
        dim, qkv_bias = config.hidden_size, config.qkv_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=config.attention_bias)
        use_qk_norm = config.qk_norm and not cross
        self.q_norm = make_norm(config, self.head_dim) if use_qk_norm else None  # (Qwen3) over each head
        self.k_norm = make_norm(config, self.head_dim) if use_qk_norm else None

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, T, n*D) -> (B, n, T, D)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k_proj(x), self.n_kv_heads), self.heads(self.v_proj(x), self.n_kv_heads)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.q_proj(x), self.n_heads), *self.project_kv(x)

    def self_qkv(self, x: torch.Tensor, ctx: PassContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's queries, keys and values: projected, each head normed (qk_norm) and rotated (RoPE)."""
        q, k, v = self.project_qkv(x)  # (B, H, T, D), (B, Hkv, T, D) x 2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v: q (B, H, T, D) over k, v (B, Hkv, S, D) -> (B, H, T, D)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=self.n_kv_heads != self.n_heads)

    def forward(self, x: torch.Tensor, ctx: PassContext, layer: int, logits_at: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (B, 1, C) with `logits_at` (B,): only that position's query per row (every
        position's keys and values still go into the cache)."""
        B, T, _ = x.shape
        C = self.n_heads * self.head_dim
        if ctx.ragged is not None:
            y = self.ragged_attention(x, ctx, layer, logits_at)  # (1, H, T', D)
            return self.o_proj(y.transpose(1, 2).reshape(1, y.shape[2], C))
        mask, is_causal = ctx.mask, ctx.is_causal
        if self.cross:
            q = self.heads(self.q_proj(x), self.n_heads)  # (B, H, T, D)
            mask, is_causal = ctx.cross_mask, False
            if ctx.memory is not None:
                k, v = self.project_kv(ctx.memory)
            else:
                k, v = ctx.cache.cross(layer, ctx.rows, B, ctx.cross_mask.shape[-1])
        else:
            q, k, v = self.self_qkv(x, ctx)  # (B, H, T, D), (B, Hkv, T, D) x 2
            if ctx.cache is not None:
                k, v = ctx.cache.update(layer, ctx.rows, ctx.write_index, k, v, ctx.kv_len)
        if logits_at is not None:
            rows = torch.arange(B, device=x.device)
            q, T = q[rows, :, logits_at][:, :, None], 1  # (B, H, 1, D)
            if mask is not None:
                mask = mask[rows, :, logits_at][:, :, None]  # (B, 1, 1, S)
            else:  # a plain causal pass: the kept query sees keys 0..logits_at
                mask = (torch.arange(k.shape[2], device=x.device) <= logits_at[:, None])[:, None, None]
                is_causal = False
        y = self.attend(q, k, v, mask, is_causal)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def ragged_attention(self, x: torch.Tensor, ctx: PassContext, layer: int, logits_at: torch.Tensor | None
                         ) -> torch.Tensor:
        """Attention for sequences back to back on one row (`ctx.ragged`), one sequence at a time over its own row
        of the cache, in place: (1, T, C) -> (1, H, T, D), or (1, H, S, D) with `logits_at` (each sequence's last
        query only)."""
        r, cache = ctx.ragged, ctx.cache
        lengths, firsts = r.lengths, [end - n for end, n in zip(r.ends, r.lengths)]  # queries, first query's position
        if self.cross:
            q = self.heads(self.q_proj(x), self.n_heads)  # (1, H, T, D)
            ends, k_cache, v_cache, firsts = ctx.source_lengths, cache.cross_k[layer], cache.cross_v[layer], None
        else:
            q, k, v = self.self_qkv(x, ctx)  # (1, H, T, D), (1, Hkv, T, D) x 2
            cache.write(layer, ctx.write_index, k, v)
            ends, k_cache, v_cache = r.ends, cache.k[layer], cache.v[layer]
            if logits_at is not None:
                q, lengths, firsts = q[:, :, logits_at], [1] * len(lengths), None  # each one's last query: sees all
        outputs, start = [], 0
        for s, (row, n, end) in enumerate(zip(r.rows, lengths, ends)):
            causal, mask = firsts is not None and firsts[s] == 0 and n > 1, None  # a whole prompt: the causal kernel
            if firsts is not None and firsts[s] > 0 and n > 1:  # a chunk continuing a cached prefix
                mask = torch.arange(end, device=x.device) <= firsts[s] + torch.arange(n, device=x.device)[:, None]
            outputs.append(self.attend(q[:, :, start:start + n], k_cache[row:row + 1, :, :end],
                                       v_cache[row:row + 1, :, :end], mask, causal))  # (1, H, n, D)
            start += n
        return torch.cat(outputs, dim=2)


class FeedForward(nn.Module):
    """Position-wise FFN: down(act(up(x))), or down(act(gate(x)) * up(x)) when gated (SwiGLU: SiLU, GeGLU: GELU)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias) if config.gated else None
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        gelu_tanh = lambda h: F.gelu(h, approximate="tanh")  # noqa: E731
        self.act: Callable[[torch.Tensor], torch.Tensor] = {
            "relu": F.relu,
            "gelu": F.gelu,
            "gelu_tanh": gelu_tanh,
            "swiglu": F.silu,
            "geglu": gelu_tanh,
        }[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """One layer: self-attention, [cross-attention,] FFN, each wrapped in a residual Add & Norm."""

    def __init__(self, config: ModelConfig, cross_attention: bool = False) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = Attention(config)
        self.attn_norm = make_norm(config)
        self.cross_attn = Attention(config, cross=True) if cross_attention else None
        self.cross_attn_norm = make_norm(config) if cross_attention else None
        self.mlp = FeedForward(config)
        self.mlp_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def residual(self, x: torch.Tensor, norm: nn.Module, sublayer: Callable, kept: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Add & Norm around `sublayer`; `kept` is the part of x its output adds to (default: all of x)."""
        kept = x if kept is None else kept
        if self.pre_norm:
            return kept + self.dropout(sublayer(norm(x)))  # x + f(Norm(x))
        return norm(kept + self.dropout(sublayer(x)))  # Norm(x + f(x)): the original "Add & Norm"

    def forward(self, x: torch.Tensor, ctx: PassContext, layer: int, logits_at: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). With `logits_at` (B,) -> (B, 1, C): only that position per row goes on past
        self-attention (the last layer of a prompt pass: the rest only add their keys and values to the cache)."""
        kept = None
        if logits_at is not None and ctx.ragged is not None:  # sequences back to back: (1, S, C)
            kept = x[:, logits_at]
        elif logits_at is not None:  # (B, 1, C)
            kept = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]
        x = self.residual(x, self.attn_norm, lambda h: self.self_attn(h, ctx, layer, logits_at), kept)
        if logits_at is not None and ctx.ragged is not None:
            ctx = ctx.one_per_sequence()  # for the rest of the layer
        if self.cross_attn is not None:
            x = self.residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, ctx, layer))
        return self.residual(x, self.mlp_norm, self.mlp)


# ---- the model ------------------------------------------------------------------------------------------


class Source(NamedTuple):
    """An encoder-decoder pass's source side: the source tokens (encoded in the pass: training), or their encoder
    output computed once (`Transformer.encode`) for several passes."""

    ids: torch.Tensor | None = None  # (B, S) source token ids
    lengths: torch.Tensor | None = None  # (B,) each row's real tokens (right padding past them); None: all S
    memory: torch.Tensor | None = None  # (B, S, C) the encoder output, instead of ids


def padding_aware_mask(positions: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, T, T) mask over the tokens of this pass: real keys only (and only earlier ones when causal).

    A padding query still sees itself, so no row of the mask is empty (an empty row gives NaN)."""
    real_key = (positions >= 0)[:, None, :]  # (B, 1, T)
    allowed = real_key & (positions[:, None, :] <= positions[:, :, None]) if causal else real_key.expand(
        -1, positions.shape[1], -1)
    eye = torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)
    return (allowed | eye)[:, None]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.position_embedding == "learned" else None)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(Block(config) for _ in range(config.num_encoder_layers))
        self.layers = nn.ModuleList(
            Block(config, cross_attention=config.is_encoder_decoder) for _ in range(config.num_hidden_layers))
        # pre-norm stacks end with a norm; post-norm outputs are already normalised
        pre = config.norm_position == "pre"
        self.encoder_norm = make_norm(config) if pre and config.is_encoder_decoder else None
        self.norm = make_norm(config) if pre else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_buffers()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the projections into the residual
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * (config.num_hidden_layers + config.num_encoder_layers)))
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)computes the position tables: they are derived from the config, never stored in checkpoints."""
        device = device or self.embed_tokens.weight.device
        c = self.config
        rope = sinusoid = None
        if c.position_embedding == "rope":
            rope = rope_table(c).to(device)
        elif c.position_embedding == "sinusoidal":
            sinusoid = sinusoidal_table(c.max_position_embeddings, c.hidden_size).to(device)
        self.register_buffer("rope", rope, persistent=False)
        self.register_buffer("sinusoid", sinusoid, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)  # (B, T, C)
        if self.embed_scale != 1.0:  # the scale rounded to the weights' dtype first, as Gemma does
            x = x * float(torch.tensor(self.embed_scale, dtype=x.dtype))
        safe_positions = positions.clamp(min=0)
        if self.embed_positions is not None:
            x = x + self.embed_positions(safe_positions)
        elif self.sinusoid is not None:
            x = x + self.sinusoid[safe_positions].to(x.dtype)
        return self.dropout(x)

    def rope_for(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.rope is None:
            return None
        table = self.rope[positions.clamp(min=0)]  # (B, T, 2, D)
        return table[:, :, 0], table[:, :, 1]

    def encode(self, source_ids: torch.Tensor, source_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder pass (bidirectional self-attention) over right-padded sources: (B, S) -> (B, S, C)."""
        B, S = source_ids.shape
        positions = torch.arange(S, device=source_ids.device).expand(B, S)
        if source_lengths is not None:
            positions = positions.masked_fill(positions >= source_lengths[:, None], -1)
        ctx = PassContext(mask=padding_aware_mask(positions, causal=False), rope=self.rope_for(positions))
        x = self.embed(source_ids, positions)
        for i, layer in enumerate(self.encoder_layers):
            x = layer(x, ctx, i)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def write_cross_cache(self, cache: KVCache, rows: torch.Tensor, memory: torch.Tensor,
                          source_lengths: torch.Tensor) -> None:
        """Computes every decoder layer's cross-attention K/V once per admitted sequence."""
        for i, layer in enumerate(self.layers):
            cache.write_cross(i, rows, *layer.cross_attn.project_kv(memory))
        cache.source_lengths[rows] = source_lengths

    def _self_attention_context(self, positions: torch.Tensor | None, B: int, T: int, device: torch.device,
                                cache: CacheRows | Ragged | None) -> tuple[PassContext, torch.Tensor]:
        """This pass's rotary angles and self-attention mask (with a cache: which slots), and its positions."""
        contiguous = positions is None
        if positions is None:
            positions = torch.arange(T, device=device).expand(B, T)
        ctx = PassContext(rope=self.rope_for(positions))
        if isinstance(cache, Ragged):  # each token's own cache row
            token_rows = torch.tensor(cache.rows).repeat_interleave(torch.tensor(cache.lengths)).to(device)  # (T,)
            ctx.cache, ctx.ragged = cache.cache, cache
            ctx.write_index = cache.cache.write_index(token_rows[None], positions)
        elif cache is not None:
            ctx.cache, ctx.rows = cache.cache, cache.rows
            ctx.write_index = cache.cache.write_index(cache.rows, positions)
            ctx.kv_len = cache.kv_len if cache.kv_len is not None else int(positions.max()) + 1
            slots = torch.arange(ctx.kv_len, device=device)
            ctx.mask = (slots <= positions.clamp(min=0)[:, :, None])[:, None]  # (B, 1, T, S)
        elif contiguous or bool((positions == torch.arange(T, device=device)).all()):
            ctx.is_causal = True  # plain sequences from position 0: the fast causal kernel
        else:
            ctx.mask = padding_aware_mask(positions, causal=True)
        return ctx, positions

    def _add_cross_attention(self, ctx: PassContext, B: int, source: Source | None) -> None:
        """Cross-attention over the source's encoder output, or over the K/V the cache holds for these rows
        (then over all of the cache's source slots, masked by length: no device sync, CUDA-graph friendly)."""
        cache = ctx.cache
        if ctx.ragged is not None:  # each sequence over its own cached source
            rows = torch.tensor(ctx.ragged.rows, device=cache.source_lengths.device)
            ctx.source_lengths = cache.source_lengths[rows].tolist()
            return
        if source is not None:
            memory = source.memory if source.memory is not None else self.encode(source.ids, source.lengths)
            src_len, lengths = memory.shape[1], source.lengths
            if lengths is None:
                lengths = torch.full((B,), src_len, device=memory.device)
            ctx.memory = memory
        elif cache is not None:
            lengths = cache.source_lengths[ctx.rows] if ctx.rows is not None else cache.source_lengths[:B]
            src_len = cache.cross_k.shape[3]
        else:
            raise ValueError("an encoder-decoder pass needs a source, or a cache holding its cross-attention K/V")
        ctx.cross_mask = (torch.arange(src_len, device=lengths.device) < lengths[:, None])[:, None, None]

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: CacheRows | Ragged | None = None,
        logits_at: torch.Tensor | None = None,
        source: Source | None = None,
    ) -> torch.Tensor:
        """Decoder pass: token ids (B, T) -> logits (B, V) at `logits_at` (B,), or (B, T, V) for every position.

        A `Ragged` cache holds several sequences back to back in ids (1, T) (an engine's prompt pass); the logits
        are then (S, V), at each sequence's last token. Encoder-decoder models attend over `source`, or without
        one over the cross-attention K/V that `write_cross_cache` stored in the cache's rows."""
        B, T = ids.shape
        if isinstance(cache, Ragged):
            if B != 1 or positions is None or sum(cache.lengths) != T or logits_at is not None:
                raise ValueError("ragged passes take ids (1, sum(lengths)) and their positions, and no logits_at")
            logits_at = torch.tensor(cache.last_tokens, device=ids.device)
        ctx, positions = self._self_attention_context(positions, B, T, ids.device, cache)
        if self.config.is_encoder_decoder:
            self._add_cross_attention(ctx, B, source)
        x = self.embed(ids, positions)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # the last layer carries on only the positions asked for: the others' outputs would go nowhere
            x = layer(x, ctx, i, logits_at=logits_at if i == last and T > 1 else None)
        if logits_at is not None:  # (B, 1, C) or ragged (1, S, C) -> (B or S, C): the positions asked for
            x = x[0] if ctx.ragged is not None else x[:, 0]
        if self.norm is not None:
            x = self.norm(x)
        return self.lm_head(x).float()  # logits in fp32 whatever the weights' dtype


# ---- probabilities --------------------------------------------------------------------------------------


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature  # x / 1 == x: skip a pass over (B, V)


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Numerically stable log-softmax over the vocabulary, accumulated in fp32."""
    return torch.log_softmax(_scaled(logits, temperature), dim=-1)


def probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T): the next-token distribution, in fp32."""
    return torch.softmax(_scaled(logits, temperature), dim=-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) in nats, without log(0) trouble."""
    logp = log_probs(logits, temperature)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1)  # 0 * log 0 = 0 for masked (-inf) logits
