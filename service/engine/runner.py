"""The tensors side of the engine: owns the model and the KV cache, and runs the scheduler's plan.

One step = row moves (cache compaction), the prefill chunks in one forward pass (back to back, no padding: each
token attends over its own sequence's cache row), then one decode forward over cache rows 0..m, where m is the
highest decoding row: rows in that block that are not decoding this step (still prefilling) ride along as
padding (position -1), so decode never gathers cache rows. On CUDA the decode forward is captured as CUDA graphs
for a few bucketed batch sizes and replayed; on CPU float32 models run on our own kernels
(service/backends/cpu/), and decode steps of decoder-only pre-norm models run as one call into the kernels
(service/backends/cpu/decode_step.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.kv_cache import KVCache
from model.model import Ragged, Transformer
from service.backends.cpu import pages
from service.backends.cpu.decode_step import CpuDecodeStep
from service.backends.cpu.layers import CacheWriter, use_cpu_kernels
from service.backends.cpu.library import kernels
from service.backends.cuda_graphs import CudaGraphDecoder
from service.engine.scheduler import PrefillChunk

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class DecodeInput:
    row: int
    token: int
    position: int


class ModelRunner:
    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, max_source_len: int | None = None,
                 cuda_graphs: bool = True, cpu_kernels: bool = True) -> None:
        self.model = model.eval()
        self.device = model.device
        self.dtype = model.embed_tokens.weight.dtype
        self.config = model.config
        self.num_parameters = model.num_parameters()  # before the CPU kernels repack (and release) the weights
        self.cpu_kernels = bool(cpu_kernels and use_cpu_kernels(model))
        if self.cpu_kernels:
            log.info("linear layers (packed, q/k/v fused), activations, decode attention and KV writes "
                     "on lmserve's CPU kernels")
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.cache = KVCache(self.config, max_batch_size, max_seq_len, device=self.device, dtype=self.dtype,
                             max_source_len=max_source_len, zeros=pages.zeros if self.device.type == "cpu" else None)
        self.cpu_decode: CpuDecodeStep | None = None
        if self.cpu_kernels:
            self.cache.write_rows = CacheWriter(kernels())
            self.cpu_decode = CpuDecodeStep.build(model, self.cache, kernels())
        self.graphs: CudaGraphDecoder | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = CudaGraphDecoder(model, self.cache, [b for b in GRAPH_BATCH_SIZES if b <= max_batch_size])

    def tensor(self, data: list) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    # ---- cache bookkeeping ---------------------------------------------------------------------------

    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        """Copies cache rows (self and cross attention) as the scheduler compacted them."""
        c = self.cache
        for src, dst in moves:
            c.k[:, dst] = c.k[:, src]
            c.v[:, dst] = c.v[:, src]
            if c.cross_k is not None:
                c.cross_k[:, dst] = c.cross_k[:, src]
                c.cross_v[:, dst] = c.cross_v[:, src]
                c.source_lengths[dst] = c.source_lengths[src]

    @torch.inference_mode()
    def encode_sources(self, rows: list[int], sources: list[list[int]]) -> None:
        """Encoder pass for newly admitted encoder-decoder sequences: their cross-attention K/V, once."""
        longest = max(len(s) for s in sources)
        ids = torch.zeros(len(sources), longest, dtype=torch.long)
        for i, s in enumerate(sources):
            ids[i, :len(s)] = torch.tensor(s)
        lengths = self.tensor([len(s) for s in sources])
        memory = self.model.encode(ids.to(self.device), lengths)
        self.model.write_cross_cache(self.cache, self.tensor(rows), memory, lengths)

    # ---- forward passes ------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk], token_ids: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Runs prompt chunks into the cache in one forward pass, back to back without padding; returns (V,)
        logits for each sequence whose prompt completed."""
        if not chunks:
            return {}
        ids = [t for c in chunks for t in token_ids[c.seq.request_id][c.start:c.end]]
        positions = [p for c in chunks for p in range(c.start, c.end)]
        ragged = Ragged(lengths=[c.end - c.start for c in chunks], rows=[c.seq.row for c in chunks],
                        ends=[c.end for c in chunks])
        logits = self.model(self.tensor(ids)[None], self.tensor(positions)[None], cache=self.cache,
                            ragged=ragged)  # (S, V)
        return {c.seq.request_id: logits[i] for i, c in enumerate(chunks) if c.completes_prompt}

    @torch.inference_mode()
    def decode(self, inputs: list[DecodeInput]) -> torch.Tensor:
        """One new token for each input; returns (len(inputs), V) logits in input order."""
        block = max(i.row for i in inputs) + 1  # cache rows 0..block-1, non-decoding ones as padding
        if self.graphs is not None and block <= self.graphs.max_batch:
            logits = self.graphs.run(inputs)
        else:
            tokens = [0] * block
            positions = [-1] * block
            for i in inputs:
                tokens[i.row], positions[i.row] = i.token, i.position
            if self.cpu_decode is not None:
                logits = self.cpu_decode(tokens, positions)
            else:
                logits = self.model(self.tensor(tokens)[:, None], self.tensor(positions)[:, None], cache=self.cache,
                                    logits_at=torch.zeros(block, dtype=torch.long, device=self.device),
                                    kv_len=max(positions) + 1)  # (block, V)
        rows = [i.row for i in inputs]
        if rows == list(range(len(rows))):  # the usual case: a view, no gather
            return logits[:len(rows)]
        return logits[self.tensor(rows)]

    @torch.inference_mode()
    def last_token_logits(self, prompts: list[list[int]], sources: list[list[int]] | None = None) -> torch.Tensor:
        """(B, V) next-token logits after each prompt, in one cache-free forward that computes only the last
        position's logits."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        positions = torch.full((len(prompts), width), -1, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
            positions[i, :len(p)] = torch.arange(len(p))
        kwargs = {}
        if sources is not None:
            longest = max(len(s) for s in sources)
            src = torch.zeros(len(sources), longest, dtype=torch.long)
            for i, s in enumerate(sources):
                src[i, :len(s)] = torch.tensor(s)
            kwargs = dict(source_ids=src.to(self.device), source_lengths=self.tensor([len(s) for s in sources]))
        return self.model(ids.to(self.device), positions.to(self.device),
                          logits_at=self.tensor([len(p) - 1 for p in prompts]), **kwargs)
