"""oneDNN-packed linear layers (the CPU engine's default): same function, same parameter count, repackable."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model
from torch import nn

from model.kv_cache import KVCache
from service.cpu_packing import PackedLinear, can_pack, num_parameters, pack_linears
from service.runner import ModelRunner

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 5, 48)])
def test_packed_linear_computes_what_linear_computes(bias, shape):
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    for hint in (1, 32):
        packed = PackedLinear.from_linear(linear, hint)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(packed.weight, linear.weight)  # unpacks exactly


def test_packed_model_matches_the_plain_model_with_a_kv_cache(variant):
    plain = make_model(variant)
    packed = copy.deepcopy(plain)
    assert can_pack(packed)
    layers = pack_linears(packed, batch_hint=4)
    assert layers == sum(isinstance(m, nn.Linear) for m in plain.modules()) > 0
    assert not any(isinstance(m, nn.Linear) for m in packed.modules())
    assert num_parameters(packed) == plain.num_parameters()  # a tied output layer is not counted twice

    config = plain.config
    ids = torch.randint(0, config.vocab_size, (3, 12))
    positions = torch.arange(12).expand(3, 12)
    kwargs = {}
    if config.is_encoder_decoder:
        kwargs = dict(source_ids=torch.randint(0, config.vocab_size, (3, 9)), source_lengths=torch.tensor([9, 5, 7]))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids, positions, **kwargs), plain(ids, positions, **kwargs),
                                   rtol=1e-5, atol=1e-5)
        if not config.is_encoder_decoder:  # and step by step through the KV cache
            caches = [KVCache(config, 3, 16) for _ in range(2)]
            for t in range(12):
                step = [m(ids[:, t:t + 1], positions[:, t:t + 1], cache=c, logits_at=torch.zeros(3, dtype=torch.long))
                        for m, c in zip((packed, plain), caches)]
                torch.testing.assert_close(step[0], step[1], rtol=1e-5, atol=1e-5)


def test_repacking_for_another_batch_size_keeps_the_function():
    model = make_model("llama-gqa")
    pack_linears(model, batch_hint=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.inference_mode():
        before = model(ids)
        pack_linears(model, batch_hint=32)
        assert {m.batch_hint for m in model.modules() if isinstance(m, PackedLinear)} == {32}
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_runner_packs_on_cpu_and_reports_the_real_parameter_count():
    model = make_model("gpt2")
    expected = model.num_parameters()
    runner = ModelRunner(model, max_batch_size=8, max_seq_len=32)
    assert runner.num_parameters == expected
    assert {m.batch_hint for m in model.modules() if isinstance(m, PackedLinear)} == {8}

    unpacked = make_model("gpt2")
    ModelRunner(unpacked, max_batch_size=8, max_seq_len=32, pack_cpu_weights=False)
    assert not any(isinstance(m, PackedLinear) for m in unpacked.modules())


def test_bfloat16_weights_are_left_alone():
    model = make_model("llama-gqa").to(torch.bfloat16)
    assert not can_pack(model)
