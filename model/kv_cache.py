"""A pre-allocated key/value cache shared by many sequences of different lengths.

Row `r` of the cache belongs to one sequence; slot `s` of a row holds the keys and values of that sequence's
token at position `s`, so a new token is written at its own position and a row never moves. One extra slot
per row (index `max_seq_len`) is a sink for padding tokens, which carry position -1 and must not overwrite
anything. Encoder-decoder models also keep each row's cross-attention keys/values, computed once from the
encoder output when the sequence is admitted.

Memory per cached token = 2 (K and V) x num_hidden_layers x num_key_value_heads x head_dim x bytes per
element, plus, for encoder-decoder models, the same again per *source* token for the cross-attention cache.
"""

from __future__ import annotations

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
    ) -> None:
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        shape = (layers, batch_size, heads, max_seq_len + 1, head_dim)  # +1: the padding sink slot
        # zeros, not empty: a padding query attends to slot 0, which must hold finite numbers
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

    def write_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Cache slot of each token: its position, or the sink slot for padding (position -1)."""
        return torch.where(positions < 0, self.max_seq_len, positions)

    def update(
        self,
        layer: int,
        rows: torch.Tensor | None,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, Hkv, T, D) at `slots` (B, T) of `rows` (B,), returns the rows' first kv_len slots."""
        k_layer, v_layer = self.k[layer], self.v[layer]  # (rows, Hkv, S+1, D)
        batch = k.shape[0]
        row_index = (rows if rows is not None else torch.arange(batch, device=k.device))[:, None]  # (B, 1)
        k_layer[row_index, :, slots] = k.transpose(1, 2)  # indexed view is (B, T, Hkv, D)
        v_layer[row_index, :, slots] = v.transpose(1, 2)
        if rows is None:  # rows 0..B-1: a view, no copy
            return k_layer[:batch, :, :kv_len], v_layer[:batch, :, :kv_len]
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
