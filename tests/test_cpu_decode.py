"""The CPU decode step (the whole step in one C call) gives bit for bit the logits and the KV cache of the
model's own forward pass on the same kernels, serves exactly the models `decode_step_support` accepts, and every
architecture computes on the CPU backend what it computes on plain PyTorch."""

from __future__ import annotations

import pytest
import torch

from service.backends.cpu.decode_step import decode_step_support
from service.engine.runner import DecodeInput, ModelRunner
from service.engine.scheduler import PrefillChunk, ScheduledSequence
from tests.support.kernels import needs_kernels
from tests.support.models import make_config, make_model

COVERED = ["llama-gqa", "gpt2"]
CPU = torch.device("cpu")


def run_steps(runners: list[ModelRunner], compare, steps: int = 6) -> None:
    """The same prompts and decode steps through each runner, `compare(logits of each runner)` after every pass:
    prompts of different lengths in one prefill, then decode steps where row 1 sits out every other step (a padding
    row inside the block) and row 3 only joins at step 2."""
    g = torch.Generator().manual_seed(1)
    config = runners[0].config
    vocab = config.vocab_size
    prompts = {f"s{row}": torch.randint(0, vocab, (n,), generator=g).tolist() for row, n in enumerate([7, 1, 12, 3])}
    chunks = [PrefillChunk(ScheduledSequence(name, len(p), 8, row=row), 0, len(p))
              for row, (name, p) in enumerate(prompts.items())]
    if config.is_encoder_decoder:
        sources = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 4, 6, 1)]
        for runner in runners:
            runner.encode_sources(list(range(4)), sources)
    outputs = [runner.prefill(chunks, prompts) for runner in runners]
    compare([torch.stack(list(out.values())) for out in outputs])
    lengths = [len(p) for p in prompts.values()]
    for step in range(steps):
        rows = [r for r in range(4) if not (r == 1 and step % 2) and not (r == 3 and step < 2)]
        inputs = [DecodeInput(r, int(torch.randint(0, vocab, (), generator=g)), lengths[r]) for r in rows]
        logits = [runner.decode(inputs) for runner in runners]
        assert logits[0].shape == (len(rows), vocab)
        compare(logits)
        for r in rows:
            lengths[r] += 1


@needs_kernels
@pytest.mark.parametrize("variant", COVERED)
def test_decode_steps_match_the_models_forward_bit_for_bit(variant):
    model = make_model(variant, max_position_embeddings=64)
    fast, plain = ModelRunner(model, 5, 40), ModelRunner(model, 5, 40)
    assert fast.cpu_decode is not None
    plain.cpu_decode = None  # decodes with the model's forward pass on the kernel layers
    run_steps([fast, plain], lambda logits: torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0))
    assert torch.equal(fast.cache.k, plain.cache.k) and torch.equal(fast.cache.v, plain.cache.v)


def test_the_decode_step_covers_decoder_only_pre_norm_float32_models_on_the_cpu(variant):
    config = make_config(variant)
    covered, why = decode_step_support(config, torch.float32, CPU)
    assert covered == (variant in COVERED) and (why is None) == covered
    assert not decode_step_support(config, torch.bfloat16, CPU)[0]
    assert not decode_step_support(config, torch.float32, torch.device("cuda"))[0]
    if not covered:
        assert why and why.startswith("the C decode step")


@needs_kernels
def test_every_architecture_computes_on_the_cpu_backend_what_it_computes_on_pytorch(variant):
    """The C decode step or the kernel layers, whichever the backend picks, against the plain PyTorch forward
    (every variant of tests/support/models.py: the conftest fixture)."""
    model = make_model(variant, max_position_embeddings=64)
    fast, plain = ModelRunner(model, 5, 40), ModelRunner(model, 5, 40, cpu_kernels=False)
    covered, why = decode_step_support(model.config, torch.float32, CPU)
    assert fast.backend_info == {"prefill": "cpu-kernels", "decode": "cpu-decode-step" if covered else "cpu-kernels",
                                 "decode_fallback_reason": why}
    assert (fast.cpu_decode is not None) == covered
    assert plain.backend_info["prefill"] == plain.backend_info["decode"] == "pytorch"
    run_steps([fast, plain], lambda logits: torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4))
    for got, expected in ((fast.cache.k, plain.cache.k), (fast.cache.v, plain.cache.v)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if model.config.is_encoder_decoder:
        torch.testing.assert_close(fast.cache.cross_k, plain.cache.cross_k, rtol=1e-5, atol=1e-5)
