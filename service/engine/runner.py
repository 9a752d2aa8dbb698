"""The tensors side of the engine: owns the model and the KV cache, and runs the scheduler's plan.

One step = row moves (cache compaction), the prefill chunks in one forward pass (back to back, no padding: each
token attends over its own sequence's cache row), then one decode forward over cache rows 0..m, where m is the
highest decoding row: rows in that block that are not decoding this step (still prefilling) ride along as
padding (position -1), so decode never gathers cache rows.

Which code runs each pass is the backends' call (`backend_info`, logged at start): on CUDA the decode forward is
captured as CUDA graphs for a few bucketed batch sizes and replayed; on CPU float32 models run on a copy built
for our kernels (service/backends/cpu/), and the decode steps of the models `decode_step_support` accepts run as
one call into them. Everything else runs the model's PyTorch forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.kv_cache import CacheRows, KVCache, Ragged
from model.model import Source, Transformer
from service.backends.cpu import pages
from service.backends.cpu.decode_step import CpuDecodeStep, decode_step_support
from service.backends.cpu.layers import KernelKVCache, release_free_memory
from service.backends.cpu.transformer import kernels_for, on_kernels
from service.backends.cuda_graphs import CudaGraphDecoder
from service.backends.shared import shared_copy
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
        self.device, self.dtype, self.config = model.device, model.embed_tokens.weight.dtype, model.config
        self.num_parameters = model.num_parameters()
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        cache_args = (self.config, max_batch_size, max_seq_len)
        cache_options = dict(device=self.device, dtype=self.dtype, max_source_len=max_source_len)
        library, why = None, None  # why: what keeps decoding off its fastest path
        if self.device.type == "cpu":
            library, why = kernels_for(self.dtype, self.device) if cpu_kernels else (None, "CPU kernels switched off")
        self.cpu_kernels = library is not None
        self.cpu_decode: CpuDecodeStep | None = None
        self.graphs: CudaGraphDecoder | None = None
        # the runner runs a copy of `model` of its own (sharing its tensors, or with the kernels' packed weights)
        # and leaves `model` as it was
        if library is not None:
            self.model: Transformer = on_kernels(model, library)
            self.cache: KVCache = KernelKVCache(library, *cache_args, **cache_options)
            covered, why = decode_step_support(self.config, self.dtype, self.device)
            if covered:
                self.cpu_decode = CpuDecodeStep(self.model, self.cache, library)
        else:
            self.model = shared_copy(model).eval()
            zeros = pages.zeros if self.device.type == "cpu" else None
            self.cache = KVCache(*cache_args, **cache_options, zeros=zeros)
        if self.device.type == "cuda" and cuda_graphs:
            sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_batch_size]
            self.graphs = CudaGraphDecoder(self.model, self.cache, sizes)
        elif self.device.type == "cuda":
            why = "CUDA graphs switched off"
        prefill = "cpu-kernels" if self.cpu_kernels else "pytorch"
        decode = "cpu-decode-step" if self.cpu_decode else "cuda-graphs" if self.graphs else prefill
        self.backend_info: dict[str, str | None] = {"prefill": prefill, "decode": decode,
                                                    "decode_fallback_reason": why}
        log.info("prompt passes on %s, decode steps on %s%s", prefill, decode, f" ({why})" if why else "")

    def release_unused_memory(self) -> None:
        """Hands the memory of weights nobody holds any more back to the OS (glibc keeps freed heap memory counted as
        resident): once whoever loaded the model has let go of it, the packed copy is the only one."""
        if self.cpu_kernels:
            release_free_memory()

    def tensor(self, data: list) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def padded(self, rows: list[list[int]], fill: int) -> torch.Tensor:
        """(len(rows), longest) on the device: each row's values, then `fill`."""
        width = max(len(r) for r in rows)
        return self.tensor([r + [fill] * (width - len(r)) for r in rows])

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
        lengths = self.tensor([len(s) for s in sources])
        memory = self.model.encode(self.padded(sources, 0), lengths)
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
        ragged = Ragged(self.cache, lengths=[c.end - c.start for c in chunks], rows=[c.seq.row for c in chunks],
                        ends=[c.end for c in chunks])
        logits = self.model(self.tensor(ids)[None], self.tensor(positions)[None], ragged)  # (S, V)
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
                logits = self.model(self.tensor(tokens)[:, None], self.tensor(positions)[:, None],
                                    CacheRows(self.cache, kv_len=max(positions) + 1),
                                    logits_at=torch.zeros(block, dtype=torch.long, device=self.device))  # (block, V)
        rows = [i.row for i in inputs]
        if rows == list(range(len(rows))):  # the usual case: a view, no gather
            return logits[:len(rows)]
        return logits[self.tensor(rows)]

    @torch.inference_mode()
    def last_token_logits(self, prompts: list[list[int]], sources: list[list[int]] | None = None) -> torch.Tensor:
        """(B, V) next-token logits after each prompt, in one cache-free forward that computes only the last
        position's logits."""
        positions = self.padded([list(range(len(p))) for p in prompts], -1)  # -1: padding
        source = None
        if sources is not None:
            source = Source(self.padded(sources, 0), self.tensor([len(s) for s in sources]))
        return self.model(self.padded(prompts, 0), positions, logits_at=self.tensor([len(p) - 1 for p in prompts]),
                          source=source)
