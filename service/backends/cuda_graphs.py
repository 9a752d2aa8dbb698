"""The CUDA decode step as CUDA graphs, one per bucketed batch size."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from model.kv_cache import CacheRows, KVCache
from model.model import Transformer

log = logging.getLogger(__name__)


class DecodeInput(Protocol):
    row: int
    token: int
    position: int


class CudaGraphDecoder:
    """Decode steps captured as CUDA graphs, one per bucketed batch size (as gpt-fast does with
    torch.compile's reduce-overhead mode): static input buffers, attention over every cache slot with the
    position mask, replayed with one launch instead of hundreds of kernel launches per token."""

    def __init__(self, model: Transformer, cache: KVCache, batch_sizes: list[int]) -> None:
        self.model, self.cache = model, cache
        device = model.device
        self.max_batch = max(batch_sizes)
        self.tokens = torch.zeros(self.max_batch, 1, dtype=torch.long, device=device)
        self.positions = torch.full((self.max_batch, 1), -1, dtype=torch.long, device=device)
        self.zeros = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for b in sorted(batch_sizes, reverse=True):  # largest first so smaller graphs reuse its memory pool
                for _ in range(2):  # warm up kernels (cuBLAS handles, autotuning) outside capture
                    self._forward(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[b] = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.current_stream().wait_stream(stream)
        cache.k.zero_()
        cache.v.zero_()
        log.info("captured CUDA graphs for decode batch sizes %s", sorted(batch_sizes))

    def _forward(self, b: int) -> torch.Tensor:
        # cache rows 0..b-1, attention over every slot (masked by position): the same shapes at every replay
        return self.model(self.tokens[:b], self.positions[:b], CacheRows(self.cache, kv_len=self.cache.max_seq_len),
                          logits_at=self.zeros[:b])

    def run(self, inputs: list[DecodeInput]) -> torch.Tensor:
        block = max(i.row for i in inputs) + 1
        b = next(size for size in sorted(self.graphs) if size >= block)
        tokens = torch.zeros(b, 1, dtype=torch.long)
        positions = torch.full((b, 1), -1, dtype=torch.long)
        for i in inputs:
            tokens[i.row, 0], positions[i.row, 0] = i.token, i.position
        self.tokens[:b].copy_(tokens, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.graphs[b].replay()
        return self.outputs[b]
