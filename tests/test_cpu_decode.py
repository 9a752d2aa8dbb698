"""The CPU decode step (the whole step in one C call) gives bit for bit the logits and the KV cache of the
model's own forward pass on the same kernels, and stands aside for models it doesn't cover."""

from __future__ import annotations

import copy

import pytest
import torch

from service.backends.cpu.decode_step import CpuDecodeStep
from service.engine.runner import DecodeInput, ModelRunner
from service.engine.scheduler import PrefillChunk, ScheduledSequence
from tests.support.kernels import needs_kernels
from tests.support.models import DECODER_ONLY, ENCODER_DECODER, make_model

COVERED = ["llama-gqa", "gpt2"]


def twin_runners(variant: str, rows: int = 5) -> tuple[ModelRunner, ModelRunner]:
    """Two runners on copies of one model: the first decodes with the CPU decode step, the second with the model."""
    model = make_model(variant, max_position_embeddings=64)
    fast, plain = ModelRunner(copy.deepcopy(model), rows, 40), ModelRunner(model, rows, 40)
    plain.cpu_decode = None
    return fast, plain


@needs_kernels
@pytest.mark.parametrize("variant", COVERED)
def test_decode_steps_match_the_models_forward_bit_for_bit(variant):
    fast, plain = twin_runners(variant)
    assert fast.cpu_decode is not None
    g = torch.Generator().manual_seed(1)
    vocab = fast.config.vocab_size
    prompts = {f"s{row}": torch.randint(0, vocab, (n,), generator=g).tolist() for row, n in enumerate([7, 1, 12, 3])}
    chunks = [PrefillChunk(ScheduledSequence(name, len(p), 8, row=row), 0, len(p))
              for row, (name, p) in enumerate(prompts.items())]
    for runner in (fast, plain):
        runner.prefill(chunks, prompts)
    lengths = [len(p) for p in prompts.values()]
    for step in range(6):
        # row 1 sits out every other step (a padding row inside the block); row 3 only joins at step 2
        rows = [r for r in range(4) if not (r == 1 and step % 2) and not (r == 3 and step < 2)]
        inputs = [DecodeInput(r, int(torch.randint(0, vocab, (), generator=g)), lengths[r]) for r in rows]
        got, expected = fast.decode(inputs), plain.decode(inputs)
        assert got.shape == (len(rows), vocab)
        assert torch.equal(got, expected), f"step {step}"
        for r in rows:
            lengths[r] += 1
    assert torch.equal(fast.cache.k, plain.cache.k) and torch.equal(fast.cache.v, plain.cache.v)


@needs_kernels
@pytest.mark.parametrize("variant", [v for v in DECODER_ONLY + ENCODER_DECODER if v not in COVERED])
def test_models_it_does_not_cover_decode_with_their_forward(variant):
    # post-norm, exact (erf) GELU, encoder-decoder: the model's forward pass, on whichever kernels apply
    runner = ModelRunner(make_model(variant), 2, 16)
    assert runner.cpu_kernels and runner.cpu_decode is None
    assert CpuDecodeStep.build(runner.model, runner.cache, runner.cache.write_rows.kernels) is None
