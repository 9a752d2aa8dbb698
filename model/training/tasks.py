"""What the trainer trains on: next-token prediction over text, or numbers -> words for encoder-decoders.

A task owns its tokenizer, draws global batches deterministically (every process draws the same batch and
keeps its own slice, so a data-parallel run follows the single-process run), evaluates on its held-out
split, and saves/restores its sampler state for `--resume`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.model import Source, Transformer
from model.tokenizer import Tokenizer
from model.training.config import TrainConfig
from model.training.data import (
    NUMBERS_PRESET,
    NumberSampler,
    cached_token_file,
    load_text_corpus,
    number_pairs,
    numbers_heldout,
    sample_windows,
)
from model.training.evaluate import EvalResult, evaluate_numbers, evaluate_text, seq2seq_batch

TOKENIZER_SAMPLE_NUMBERS = 20_000  # number pairs the numbers tokenizer is trained on


@dataclass
class Batch:
    args: tuple[torch.Tensor, ...]  # positional arguments of Transformer.forward: ids (B, T)[, positions (B, T)]
    kwargs: dict[str, torch.Tensor]  # encoder-decoder batches: source_ids (B, S) and source_lengths (B,)
    labels: torch.Tensor  # next-token targets, -100 where nothing is predicted
    num_tokens: int

    def inputs(self, device: torch.device) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """Transformer.forward's arguments on `device`."""
        args, kwargs = tuple(a.to(device) for a in self.args), {k: v.to(device) for k, v in self.kwargs.items()}
        if not kwargs:
            return args, {}
        return args, {"source": Source(kwargs["source_ids"], kwargs["source_lengths"])}

    def shard(self, rank: int, world: int) -> Batch:
        """This process's contiguous slice of the global batch."""
        def part(t: torch.Tensor) -> torch.Tensor:
            size = t.shape[0] // world
            return t[rank * size:(rank + 1) * size]
        labels = part(self.labels)
        return Batch(tuple(part(a) for a in self.args), {k: part(v) for k, v in self.kwargs.items()}, labels,
                     int((labels != -100).sum()))


class Task:
    tokenizer: Tokenizer
    max_positions: int

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def train_batch(self, rank: int, world: int) -> Batch:
        return self.global_batch().shard(rank, world)

    def global_batch(self) -> Batch:
        raise NotImplementedError

    def evaluate(self, model: Transformer, limit: int | None = None) -> EvalResult:
        raise NotImplementedError

    def state(self) -> Any:
        return None

    def set_state(self, state: Any) -> None:
        pass


def _shared_tokenizer(out: Path, resume_from: Path | None, cfg: TrainConfig, main_process: bool,
                      distributed: bool, train_texts) -> Tokenizer:
    """The run's tokenizer: the resumed checkpoint's, a given file, or one trained once by rank 0."""
    if resume_from is not None:
        return Tokenizer.from_file(resume_from / "tokenizer.json")
    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer)
    path = out / "tokenizer.json"
    if main_process:
        Tokenizer.train(train_texts(), vocab_size=cfg.vocab_size, split_digits=cfg.split_digits).save(path)
    if distributed:
        dist.barrier()
    return Tokenizer.from_file(path)


class TextTask(Task):
    """Next-token prediction on random windows of a tokenised corpus; held-out bits per byte."""

    def __init__(self, cfg: TrainConfig, out: Path, resume_from: Path | None, main_process: bool,
                 distributed: bool) -> None:
        super().__init__(cfg)
        self.corpus = load_text_corpus(cfg.data, text_field=cfg.text_field)
        self.tokenizer = _shared_tokenizer(out, resume_from, cfg, main_process, distributed,
                                           lambda: (text for _, text in self.corpus.train))
        self.max_positions = cfg.seq_len
        cache = Path(cfg.cache_dir)
        if main_process:
            cached_token_file(self.corpus.train, self.tokenizer, cache, "train")
        if distributed:
            dist.barrier()
        self.tokens = cached_token_file(self.corpus.train, self.tokenizer, cache, "train")

    def global_batch(self) -> Batch:
        x, y = sample_windows(self.tokens, self.cfg.batch_size, self.cfg.seq_len, self.generator)
        return Batch((x,), {}, y, y.numel())

    def evaluate(self, model: Transformer, limit: int | None = None) -> EvalResult:
        return evaluate_text(model, self.tokenizer, self.corpus.heldout, self.cfg.seq_len, limit_bytes=limit)


class NumbersTask(Task):
    """The original Transformer's job in miniature: translate "40213" into "forty thousand two hundred thirteen"."""

    def __init__(self, cfg: TrainConfig, out: Path, resume_from: Path | None, main_process: bool,
                 distributed: bool) -> None:
        super().__init__(cfg)
        self.heldout = numbers_heldout()
        self.sampler = NumberSampler(self.heldout, seed=cfg.seed)

        def sample_texts():
            sampler = NumberSampler(self.heldout, seed=cfg.seed + 1)
            for digits, words in number_pairs(sampler.sample() for _ in range(TOKENIZER_SAMPLE_NUMBERS)):
                yield digits
                yield words
        self.tokenizer = _shared_tokenizer(out, resume_from, cfg, main_process, distributed, sample_texts)
        self.max_positions = cfg.seq_len

    def global_batch(self) -> Batch:
        pairs = number_pairs(self.sampler.sample() for _ in range(self.cfg.batch_size))
        source, lengths, decoder_in, positions, labels = seq2seq_batch(self.tokenizer, pairs)
        return Batch((decoder_in, positions), {"source_ids": source, "source_lengths": lengths}, labels,
                     int((labels != -100).sum()))

    def evaluate(self, model: Transformer, limit: int | None = None) -> EvalResult:
        numbers = self.heldout[:max(1, limit // 10)] if limit else self.heldout
        return evaluate_numbers(model, self.tokenizer, numbers)

    def state(self) -> Any:
        return self.sampler.state()

    def set_state(self, state: Any) -> None:
        version, internal, gauss = state  # JSON turned the tuples into lists
        self.sampler.set_state((version, tuple(internal), gauss))


def make_task(cfg: TrainConfig, out: Path, resume_from: Path | None, main_process: bool, distributed: bool) -> Task:
    kind = NumbersTask if cfg.data == NUMBERS_PRESET else TextTask
    return kind(cfg, out, resume_from, main_process, distributed)
