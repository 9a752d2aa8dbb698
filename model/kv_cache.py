"""A pre-allocated key/value cache shared by many sequences of different lengths.

Row `r` of the cache belongs to one sequence; slot `s` of a row holds the keys and values of that sequence's
token at position `s`, so a new token is written at its own position and a row never moves. One extra slot
per row (index `max_seq_len`) is a sink for padding tokens, which carry position -1 and must not overwrite
anything. Encoder-decoder models also keep each row's cross-attention keys/values, computed once from the
encoder output when the sequence is admitted.

A forward pass says how it uses the cache with a `CacheRows` (each batch row continues one cache row) or a
`Ragged` (several sequences back to back on one row, each continuing its own cache row).

Memory per cached token = 2 (K and V) x num_hidden_layers x num_key_value_heads x head_dim x bytes per
element, plus, for encoder-decoder models, the same again per *source* token for the cross-attention cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import ModelConfig


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Self-attention cache bytes for one token of one sequence (the cross cache costs the same per source token)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_source_len: int | None = None,
        zeros: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        shape = (layers, batch_size, heads, max_seq_len + 1, head_dim)  # +1: the padding sink slot
        # zeros, not empty: a padding query attends to slot 0, which must hold finite numbers. An engine may bring
        # its own allocator `zeros(shape, dtype)` (the CPU backend's puts the cache on 2 MiB pages)
        if zeros is not None:
            self.k, self.v = zeros(shape, dtype), zeros(shape, dtype)
        else:
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cross_k = self.cross_v = self.source_lengths = None
        if config.is_encoder_decoder:
            src_len = max_source_len or config.max_position_embeddings
            cross_shape = (layers, batch_size, heads, src_len, head_dim)
            self.cross_k = torch.zeros(cross_shape, device=device, dtype=dtype)
            self.cross_v = torch.zeros(cross_shape, device=device, dtype=dtype)
            self.source_lengths = torch.ones(batch_size, device=device, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v, self.cross_k, self.cross_v]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def write_index(self, rows: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Flat index (B*Hkv*T,) into a layer's (rows*Hkv*(S+1), D) view for the keys/values of tokens at
        `positions` (B, T) in cache `rows` (B,) (default 0..B-1), or each token's own row (B, T); padding
        (position -1) goes to the sink slot. Computed once per forward pass and shared by every layer."""
        batch, heads, slots_per_row = positions.shape[0], self.k.shape[2], self.max_seq_len + 1
        slots = torch.where(positions < 0, self.max_seq_len, positions)  # (B, T)
        if rows is None:
            rows = torch.arange(batch, device=positions.device)
        rows = rows[:, None] if rows.dim() == 1 else rows  # (B, 1) or (B, T)
        head = torch.arange(heads, device=positions.device)[None, :, None]  # (1, H, 1)
        return ((rows[:, None, :] * heads + head) * slots_per_row + slots[:, None, :]).reshape(-1)  # (B*H*T,)

    def write(self, layer: int, write_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k, v (B, Hkv, T, D) at `write_index` (from write_index())."""
        k_layer, v_layer = self.k[layer], self.v[layer]  # (rows, Hkv, S+1, D)
        head_dim = k.shape[-1]
        # index_put_, not index_copy_: the same scattered rows for less indexing work on CPU
        k_layer.view(-1, head_dim).index_put_((write_index,), k.reshape(-1, head_dim))
        v_layer.view(-1, head_dim).index_put_((write_index,), v.reshape(-1, head_dim))

    def update(
        self,
        layer: int,
        rows: torch.Tensor | None,
        write_index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, Hkv, T, D) at `write_index`, returns the rows' first kv_len slots (B, Hkv, kv_len, D)."""
        self.write(layer, write_index, k, v)
        k_layer, v_layer = self.k[layer], self.v[layer]  # (rows, Hkv, S+1, D)
        if rows is None:  # rows 0..B-1: a view, no copy
            return k_layer[:k.shape[0], :, :kv_len], v_layer[:k.shape[0], :, :kv_len]
        return k_layer[rows, :, :kv_len], v_layer[rows, :, :kv_len]

    def write_cross(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the cross-attention keys/values (B, Hkv, S_src, D) of newly admitted sequences."""
        src_len = k.shape[2]
        if src_len > self.cross_k.shape[3]:
            raise ValueError(f"source of {src_len} tokens exceeds the cache's {self.cross_k.shape[3]}")
        self.cross_k[layer, rows, :, :src_len] = k
        self.cross_v[layer, rows, :, :src_len] = v

    def cross(self, layer: int, rows: torch.Tensor | None, batch: int, src_len: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' cross-attention keys/values over their first src_len source tokens."""
        if rows is None:
            return self.cross_k[layer, :batch, :, :src_len], self.cross_v[layer, :batch, :, :src_len]
        return self.cross_k[layer, rows, :, :src_len], self.cross_v[layer, rows, :, :src_len]


@dataclass
class CacheRows:
    """A pass whose batch rows continue rows of `cache`: row b's keys and values are written at their positions in
    cache row rows[b], and each token attends over that row's slots 0..position."""

    cache: KVCache
    rows: torch.Tensor | None = None  # (B,) each batch row's cache row; None: rows 0..B-1 (views, no gather)
    kv_len: int | None = None  # slots attention reads (> every position); None: the largest position + 1 (a sync)


@dataclass
class Ragged:
    """Several sequences' tokens back to back on one row (B = 1, no padding), each continuing its own row of
    `cache` and attending over it alone: an engine's prompt pass. Its logits are each sequence's last token's."""

    cache: KVCache
    lengths: list[int]  # each sequence's tokens in this pass
    rows: list[int]  # each sequence's cache row
    ends: list[int]  # each sequence's length once this pass is done (its last position here + 1)

    @property
    def last_tokens(self) -> list[int]:
        """Where each sequence's last token sits on the row."""
        return [end - 1 for end in itertools.accumulate(self.lengths)]
