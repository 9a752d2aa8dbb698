"""Our CPU kernels (the CPU engine's default): linear layers on packed weights, activations and decode attention
compute what PyTorch computes, each sequence's result is bit-identical whatever else is in the batch (prompt or
decode), the runner's copy on them leaves the model it was given untouched and holds its weights once (packed),
and where the kernels can't be built or disagree with Python's mirror of them the engine runs on PyTorch."""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.kv_cache import CacheRows, KVCache
from model.model import FeedForward, Source
from service.backends.cpu import abi
from service.backends.cpu import library as cpu_library
from service.backends.cpu.abi import ACTIVATIONS
from service.backends.cpu.layers import (
    Activation,
    DecodeAttention,
    KernelKVCache,
    KernelLinear,
    argmax,
    pack,
    unpack,
)
from service.backends.cpu.library import CpuKernels
from service.backends.cpu.transformer import KernelAttention, on_kernels
from service.engine import runner as runner_module
from service.engine.runner import DecodeInput, ModelRunner
from service.engine.scheduler import PrefillChunk, ScheduledSequence
from tests.support.kernels import needs_kernels
from tests.support.models import check_ragged_pass, make_config, make_model


@pytest.fixture(scope="module")
def kernel():
    library = cpu_library.kernels()
    assert library is not None, "the CPU supports the kernels and cc is present, yet they did not build"
    return library


def test_packing_keeps_every_weight():
    w = torch.randn(37, 5)
    packed = pack(w)
    assert packed.shape == (3, 5, 16) and packed.is_contiguous()
    assert torch.equal(packed[1, 4, 2], w[18, 4]) and torch.equal(packed[2, :, 5:], torch.zeros(5, 11))
    assert torch.equal(unpack(packed, 37), w)


@needs_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("features", [(48, 80), (13, 7), (3, 1), (64, 1001), (3072, 8), (300, 33)])
def test_kernel_linear_computes_what_linear_computes(kernel, bias, features):
    torch.manual_seed(0)
    linear = nn.Linear(*features, bias=bias)
    layer = KernelLinear(linear, kernel)
    # tails of every block: 256 inputs, 16 outputs, 1/6/192 rows, tiles of every height
    for rows in (0, 1, 2, 3, 4, 5, 6, 7, 11, 32, 47, 48, 49, 100, 193):
        x = torch.randn(rows, features[0])
        expected = F.linear(x.double(), linear.weight.double(),
                            None if linear.bias is None else linear.bias.double())
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 5, features[0])  # any leading shape
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_each_row_is_bit_identical_whatever_else_is_in_the_batch(kernel):
    torch.manual_seed(0)
    layer = KernelLinear(nn.Linear(300, 37), kernel)  # tails in both dimensions
    x = torch.randn(400, 300)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(400)])
        for rows in (2, 3, 4, 7, 48, 49, 50, 191, 192, 193, 400):
            assert torch.equal(layer(x[:rows]), alone[:rows])
        assert torch.equal(layer(x[150:350]), alone[150:350])


@needs_kernels
@pytest.mark.parametrize("activation, reference", [
    ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh")), ("swiglu", F.silu), ("relu", F.relu)])
def test_activation_computes_what_pytorch_computes(kernel, activation, reference):
    torch.manual_seed(0)
    act = Activation(kernel, activation, reference)
    for n in (1, 7, 8, 13, 3072, 40000 + 3):  # tails, and enough to run on every thread
        h = torch.randn(n) * 5
        h[0] = -100.0 if n > 1 else 100.0  # the saturated ends
        torch.testing.assert_close(act(h).double(), reference(h.double()), rtol=1e-6, atol=2e-6)
    h = torch.randn(6, 10)
    assert torch.equal(act(h.T), reference(h.T))  # a layout the kernel doesn't take: PyTorch computes it
    assert torch.equal(act(h.double()), reference(h.double()))


def counting(kernel: CpuKernels) -> tuple[CpuKernels, list[tuple[int, int]]]:
    """The same kernels, recording (rows, output features) for every linear-layer call."""
    calls: list[tuple[int, int]] = []

    def linear(*args):
        calls.append((args[4], args[6]))
        return kernel.linear(*args)
    return dataclasses.replace(kernel, linear=linear), calls


@needs_kernels
def test_prompt_passes_and_decode_steps_run_every_linear_layer_on_the_kernel(kernel, monkeypatch):
    model = make_model("gpt2")
    library, calls = counting(kernel)
    monkeypatch.setattr(runner_module, "kernels_for", lambda dtype, device: (library, None))
    runner = ModelRunner(model, max_batch_size=2, max_seq_len=32)
    runner.cpu_decode = None  # decode steps through the model's forward pass on the kernel layers, not the C step
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    seq = ScheduledSequence("a", prompt_len=5, max_new_tokens=4, row=0)
    runner.prefill([PrefillChunk(seq, 0, 5)], {"a": [1, 2, 3, 4, 5]})
    # per layer: q, k and v fused, the attention output, the two FFN matrices; past the last layer's keys and
    # values only the last position goes on
    assert [rows for rows, out in calls if out != vocab] == [5] * (4 * layers - 3) + [1] * 3
    assert [rows for rows, out in calls if out == vocab] == [1]  # only the last position is projected
    calls.clear()
    runner.decode([DecodeInput(row=0, token=6, position=5)])
    assert calls.count((1, vocab)) == 1 and len(calls) == 4 * layers + 1
    calls.clear()
    runner.last_token_logits([[1, 2, 3], [4]])  # next-token distributions: a padded prompt pass
    assert [rows for rows, out in calls if out != vocab] == [6] * (4 * layers - 3) + [2] * 3
    assert calls[-1] == (2, vocab)
    calls.clear()  # prompts of different lengths: one pass over exactly their tokens, no padding
    long, short = ScheduledSequence("b", prompt_len=20, max_new_tokens=4, row=1), ScheduledSequence("c", 2, 4, row=0)
    runner.prefill([PrefillChunk(long, 0, 20), PrefillChunk(short, 0, 2)], {"b": list(range(20)), "c": [7, 8]})
    assert [rows for rows, out in calls if out != vocab] == [22] * (4 * layers - 3) + [2] * 3
    assert calls[-1] == (2, vocab)


@needs_kernels
def test_a_prompt_fills_the_cache_identically_alone_or_with_others(kernel):
    torch.manual_seed(0)
    model = make_model("llama-gqa")
    prompts = {"a": list(range(3, 40)), "b": [7], "c": list(range(5, 20)), "d": list(range(9, 45))}

    def prefill(names: list[str]) -> tuple[ModelRunner, dict[str, torch.Tensor], dict[str, int]]:
        runner = ModelRunner(model, max_batch_size=4, max_seq_len=64)
        rows = {name: row for row, name in enumerate(names)}
        chunks = [PrefillChunk(ScheduledSequence(n, len(prompts[n]), 1, row=rows[n]), 0, len(prompts[n]))
                  for n in names]
        return runner, runner.prefill(chunks, prompts), rows

    together, logits, rows = prefill(list(prompts))
    assert together.cpu_kernels
    for name, prompt in prompts.items():
        alone, alone_logits, _ = prefill([name])
        n, row = len(prompt), rows[name]
        assert torch.equal(alone.cache.k[:, 0, :, :n], together.cache.k[:, row, :, :n])
        assert torch.equal(alone.cache.v[:, 0, :, :n], together.cache.v[:, row, :, :n])
        assert torch.equal(alone_logits[name], logits[name])


@needs_kernels
@torch.no_grad()
def test_a_ragged_pass_on_the_kernels_equals_each_sequence_alone(kernel, variant):
    check_ragged_pass(on_kernels(make_model(variant), kernel))


@needs_kernels
def test_kernel_model_matches_the_plain_model_with_a_kv_cache(kernel, variant):
    plain = make_model(variant)
    before = {name: t.clone() for name, t in plain.state_dict().items()}
    fast = on_kernels(plain, kernel)
    fused = [m for m in fast.modules() if isinstance(m, KernelAttention) and not m.cross]
    assert len(fused) == plain.config.num_hidden_layers + plain.config.num_encoder_layers  # every self-attention
    linears = sum(isinstance(m, nn.Linear) for m in plain.modules())
    assert sum(isinstance(m, KernelLinear) for m in fast.modules()) == linears - 2 * len(fused) > 0
    assert not any(type(m) is nn.Linear for m in fast.modules()) and not fast.training
    # the model it came from is as it was: its own layers, weights and buffers
    assert not any(isinstance(m, (KernelLinear, KernelAttention)) for m in plain.modules())
    assert plain.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[name]) for name, t in plain.state_dict().items())
    # each weight matrix is packed once; embeddings, norms and biases are the model's own tensors
    linear_weights = sum(m.weight.numel() for m in plain.modules() if isinstance(m, nn.Linear))
    packed = sum(m.packed.numel() for m in fast.modules() if isinstance(m, KernelLinear))
    assert linear_weights <= packed < linear_weights * 1.1  # panels of 16 outputs: a few zeros of padding
    assert fast.embed_tokens.weight is plain.embed_tokens.weight
    for name, module in fast.named_modules():
        if name.endswith("qkv_proj"):
            attention = plain.get_submodule(name.removesuffix(".qkv_proj"))
            original = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
            assert torch.equal(module.weight, original), name
            assert not hasattr(fast.get_submodule(name.removesuffix(".qkv_proj")), "q_proj")
        elif isinstance(module, KernelLinear):
            assert torch.equal(module.weight, plain.get_submodule(name).weight), name
            assert module.bias is plain.get_submodule(name).bias, name
    for name, module in fast.named_modules():  # the decoder's attention on the decode kernel, the encoder's on SDPA
        if isinstance(module, KernelAttention):
            assert isinstance(module.decode_attention, DecodeAttention) != name.startswith("encoder_layers."), name
    on_kernel = plain.config.activation in ACTIVATIONS
    assert all(isinstance(m.act, Activation) == on_kernel for m in fast.modules() if isinstance(m, FeedForward))
    assert not any(isinstance(m.act, Activation) for m in plain.modules() if isinstance(m, FeedForward))
    twin = copy.deepcopy(fast)  # copies share the loaded library
    assert twin.lm_head.kernels is fast.lm_head.kernels and twin.lm_head.packed is not fast.lm_head.packed

    config = plain.config
    ids = torch.randint(0, config.vocab_size, (3, 12))
    positions = torch.arange(12).expand(3, 12)
    source = None
    if config.is_encoder_decoder:
        source = Source(torch.randint(0, config.vocab_size, (3, 9)), torch.tensor([9, 5, 7]))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids, positions, source=source), plain(ids, positions, source=source),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(twin(ids, positions, source=source), fast(ids, positions, source=source))
        if not config.is_encoder_decoder:  # and step by step through the KV cache
            caches = [KVCache(config, 3, 16) for _ in range(2)]
            for t in range(12):
                step = [m(ids[:, t:t + 1], positions[:, t:t + 1], CacheRows(c), logits_at=torch.zeros(3).long())
                        for m, c in zip((fast, plain), caches)]
                torch.testing.assert_close(step[0], step[1], rtol=1e-5, atol=1e-5)


@needs_kernels
def test_once_the_model_is_let_go_the_packed_panels_are_the_only_copy_of_its_weights(kernel):
    model = make_model("gpt2", tie_word_embeddings=False)
    runner = ModelRunner(model, max_batch_size=2, max_seq_len=32)
    weights = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, nn.Linear)]
    embedding = model.embed_tokens.weight
    del model
    gc.collect()
    assert weights and all(w() is None for w in weights)  # no row-major weight matrix outlives the model
    assert runner.model.embed_tokens.weight is embedding  # the embedding is shared, not copied


@needs_kernels
def test_runner_uses_the_kernel_on_cpu_unless_told_not_to(kernel):
    model = make_model("gpt2")
    expected = model.num_parameters()
    runner = ModelRunner(model, max_batch_size=8, max_seq_len=32)
    assert runner.num_parameters == expected and model.num_parameters() == expected
    assert any(isinstance(m, KernelLinear) for m in runner.model.modules())
    assert not any(isinstance(m, KernelLinear) for m in model.modules())  # the model given is left alone
    assert runner.cpu_kernels and isinstance(runner.cache, KernelKVCache)
    assert runner.backend_info == {"prefill": "cpu-kernels", "decode": "cpu-decode-step",
                                   "decode_fallback_reason": None}
    assert ModelRunner(model, max_batch_size=1, max_seq_len=32).cpu_kernels  # a second engine on the same model

    runner = ModelRunner(model, max_batch_size=8, max_seq_len=32, cpu_kernels=False)
    assert not any(isinstance(m, KernelLinear) for m in runner.model.modules())
    assert not runner.cpu_kernels and type(runner.cache) is KVCache
    assert runner.backend_info == {"prefill": "pytorch", "decode": "pytorch",
                                   "decode_fallback_reason": "CPU kernels switched off"}


@needs_kernels
def test_bfloat16_weights_run_on_pytorch(kernel):
    model = make_model("llama-gqa").to(torch.bfloat16)
    runner = ModelRunner(model, max_batch_size=2, max_seq_len=32)
    assert not runner.cpu_kernels and not any(isinstance(m, KernelLinear) for m in runner.model.modules())
    assert runner.backend_info["decode"] == "pytorch"
    assert "float32" in runner.backend_info["decode_fallback_reason"]
    layer = KernelLinear(nn.Linear(16, 8), kernel).to(torch.bfloat16)  # cast after packing: PyTorch computes it
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_kernels
def test_a_library_that_disagrees_with_pythons_mirror_is_refused(kernel, monkeypatch, caplog):
    assert cpu_library.load(cpu_library.kernel_dir()) is not None  # the real one agrees
    monkeypatch.setattr(abi, "PANEL", abi.PANEL * 2)  # as if cpu.h had changed and abi.py not
    with caplog.at_level(logging.WARNING, logger=cpu_library.__name__):
        assert cpu_library.load(cpu_library.kernel_dir()) is None
    assert "PANEL is 16" in caplog.text and "abi.py" in caplog.text and "using PyTorch" in caplog.text
    monkeypatch.undo()
    mirror = abi.expected()  # a struct changed on one side only: the engine then runs on PyTorch
    monkeypatch.setattr(abi, "expected", lambda: mirror | {"sizeof(StepModel)": mirror["sizeof(StepModel)"] + 8})
    cpu_library.loaded.cache_clear()
    try:
        runner = ModelRunner(make_model("gpt2"), max_batch_size=2, max_seq_len=16)
        assert not runner.cpu_kernels and runner.backend_info["decode"] == "pytorch"
        assert "sizeof(StepModel)" in runner.backend_info["decode_fallback_reason"]
    finally:
        monkeypatch.undo()
        cpu_library.loaded.cache_clear()


def test_without_a_compiler_the_model_keeps_pytorch_layers(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_library, "cpu_supported", lambda: True)
    assert cpu_library.load(tmp_path, compiler="/nonexistent/cc") is None
    assert list(tmp_path.iterdir()) == []  # no half-built library left behind


@needs_kernels
def test_a_built_library_is_reused_without_compiling_again(kernel, tmp_path):
    cpu_library.load(tmp_path)
    built = tmp_path / cpu_library.library_name()
    stamp = built.stat().st_mtime_ns
    library = cpu_library.load(tmp_path, compiler="/nonexistent/cc")  # would fail if it tried to build
    assert library is not None and built.stat().st_mtime_ns == stamp
    layer = KernelLinear(nn.Linear(16, 8), library)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def cache_views(batch: int, kv_heads: int, slots: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as the engine passes them: the first rows and slots of a bigger cache layer (strided)."""
    k = torch.randn(batch + 2, kv_heads, slots + 5, head_dim)
    v = torch.randn(batch + 2, kv_heads, slots + 5, head_dim)
    return k[:batch, :, :slots], v[:batch, :, :slots]


@needs_kernels
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (4, 2, 8), (6, 1, 13), (12, 12, 64), (7, 1, 8),
                                                      (5, 5, 24)])
def test_decode_attention_computes_what_sdpa_computes(kernel, heads, kv_heads, head_dim):
    torch.manual_seed(0)
    batch, slots = 5, 37
    q = torch.randn(batch, heads, 1, head_dim)
    k, v = cache_views(batch, kv_heads, slots, head_dim)
    lengths = torch.tensor([1, 37, 20, 8, 33])  # each sequence attends to its first `length` slots
    mask = (torch.arange(slots) < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
    mask[3, 0, 0, 2] = False  # any pattern, not only prefixes
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    attend = DecodeAttention(kernel)
    torch.testing.assert_close(attend(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)
    alone = torch.cat([attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1]) for i in range(batch)])
    assert torch.equal(attend(q, k, v, mask), alone)  # bit-identical whatever else is in the batch
    group = heads // kv_heads  # heads are attended several at a time: each one's numbers are as if alone
    one_by_one = torch.cat([attend(q[:, h:h + 1], k[:, h // group:h // group + 1], v[:, h // group:h // group + 1],
                                   mask) for h in range(heads)], dim=1)
    assert torch.equal(attend(q, k, v, mask), one_by_one)


@needs_kernels
def test_decode_attention_leaves_other_shapes_to_sdpa(kernel):
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask = torch.ones(2, 1, 3, 6, dtype=torch.bool)
    torch.testing.assert_close(DecodeAttention(kernel)(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@needs_kernels
def test_kernel_cache_writes_rows_where_index_put_does(kernel):
    torch.manual_seed(0)
    config = make_config("llama-gqa")  # 2 KV heads of 16 dims
    B, H, T, D = 3, config.num_key_value_heads, 5, config.head_dim
    caches = [KernelKVCache(kernel, config, 4, 15), KVCache(config, 4, 15)]
    index = torch.randperm(4 * H * 16)[:B * H * T]
    layouts = [
        (torch.randn(B, T, H, D).transpose(1, 2), torch.randn(B, H, T, D)),  # as attention makes them: on the kernel
        (torch.randn(B, H, D, T).transpose(2, 3), torch.randn(B, H, T, D)),  # rows not contiguous: index_put_
    ]
    for layer, (k, v) in enumerate(layouts):
        for cache in caches:
            cache.write(layer, index, k, v)
        assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    half = KernelKVCache(kernel, config, 4, 15, dtype=torch.bfloat16)  # other dtypes: index_put_
    half.write(0, index, *(t.bfloat16() for t in layouts[0]))
    assert torch.equal(half.k[0], caches[1].k[0].bfloat16())


@needs_kernels
@pytest.mark.parametrize("width", [1, 7, 8, 9, 50257])
def test_argmax_picks_what_torch_argmax_picks(kernel, width):
    g = torch.Generator().manual_seed(width)
    rows = torch.randn(12, width, generator=g)
    rows[1] = torch.randint(0, 3, (width,), generator=g).float()  # ties: the first largest wins
    rows[2] = float("-inf")
    rows[3, width // 2] = float("nan")  # a NaN counts as the largest, the first of them
    rows[3, -1] = float("nan")
    rows[4, -1] = 100.0  # the largest in the tail past the last full vector
    rows[5, 0] = 100.0
    rows[6] = rows[6].clamp(max=0.5)  # many equal maxima spread over every lane
    rows[7, :] = float("nan")
    got = argmax(rows)
    assert got.dtype == torch.long and torch.equal(got, rows.argmax(dim=-1))
    assert torch.equal(argmax(rows[3:4]), rows[3:4].argmax(dim=-1))  # one row: no threads
    assert torch.equal(argmax(rows.double()), rows.double().argmax(dim=-1))  # other dtypes: PyTorch's


def test_argmax_never_builds_the_kernels_itself(tmp_path):
    """A process that never loaded the kernels (an engine started without them) samples on PyTorch's argmax and
    compiles nothing: run in a fresh interpreter with an empty kernel directory."""
    script = ("import torch; from service.backends.cpu.layers import argmax; x = torch.randn(3, 50); "
              "assert torch.equal(argmax(x), x.argmax(dim=-1))")
    env = {**os.environ, "LMSERVE_KERNEL_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=Path(__file__).parents[1], timeout=120)
    assert list(tmp_path.iterdir()) == []
