"""The Transformer's contracts: causality, probabilities, KV cache == recompute, batch independence,
cross-attention wiring, and agreement with Hugging Face's Llama."""

from __future__ import annotations

import gc

import pytest
import torch

from model.config import ConfigError, ModelConfig
from model.kv_cache import CacheRows, KVCache, bytes_per_token
from model.model import Source, entropy, log_probs, probs
from service.backends.cpu import pages
from tests.support.models import (
    DECODER_ONLY,
    ENCODER_DECODER,
    VOCAB,
    check_ragged_pass,
    make_config,
    make_model,
    source_for,
    source_row,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@torch.no_grad()
def test_changing_a_future_token_never_changes_earlier_logits(variant):
    model = make_model(variant)
    source = source_for(model, 2)
    ids = torch.randint(0, VOCAB, (2, 24))
    before = model(ids, source=source)
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % VOCAB
    after = model(changed, source=source)
    assert torch.equal(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15:], after[:, 15:])  # the change is visible where it should be


@torch.no_grad()
def test_output_probabilities_sum_to_one_and_match_float64_softmax(variant):
    model = make_model(variant)
    logits = model(torch.randint(0, VOCAB, (3, 10)), source=source_for(model, 3))  # (B, T, V)
    for temperature in (1.0, 0.7, 2.0):
        p = probs(logits, temperature)
        assert p.dtype == torch.float32
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-6, rtol=0)
        reference = torch.softmax(logits.double() / temperature, dim=-1)
        assert torch.allclose(p.double(), reference, atol=1e-7, rtol=0)
        assert torch.allclose(log_probs(logits, temperature).double(), reference.log(), atol=1e-5, rtol=0)
    reference = torch.softmax(logits.double(), -1)
    assert torch.allclose(entropy(logits).double(), -(reference * reference.log()).sum(-1), atol=1e-5)


def test_softmax_is_stable_for_huge_logits_and_half_precision():
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4, 0.0]], dtype=torch.bfloat16)
    p = probs(logits)
    assert p.dtype == torch.float32 and torch.isfinite(p).all()
    assert torch.allclose(p.sum(-1), torch.ones(1), atol=1e-6)
    assert torch.isfinite(log_probs(logits)[0, :2]).all()
    assert torch.isfinite(entropy(torch.tensor([[0.0, -float("inf"), 3.0]]))).all()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_give_fp32_probabilities_close_to_fp32(dtype):
    model = make_model("llama-gqa")
    ids = torch.randint(0, VOCAB, (2, 12))
    reference = probs(model(ids))
    half = probs(model.to(dtype)(ids))
    assert half.dtype == torch.float32
    assert torch.allclose(half.sum(-1), torch.ones(2, 12), atol=1e-6)
    assert (half - reference).abs().max() < 0.02


@torch.no_grad()
def test_kv_cached_decoding_equals_full_recompute_for_64_steps_with_rows_of_different_lengths(variant):
    model = make_model(variant)
    prompt_lengths, steps = [5, 17, 30], 64
    batch = len(prompt_lengths)
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, VOCAB, (n + steps,), generator=g) for n in prompt_lengths]
    source = source_for(model, batch)
    cache = KVCache(model.config, batch_size=batch, max_seq_len=max(prompt_lengths) + steps + 1,
                    max_source_len=9)
    if source is not None:
        model.write_cross_cache(cache, torch.arange(batch), source.memory, source.lengths)

    def full_logits(row: int, length: int) -> torch.Tensor:
        seq = sequences[row][:length][None]
        return model(seq, logits_at=torch.tensor([length - 1]), source=source_row(source, row))[0]

    # prefill: one right-padded batch, in two chunks so a chunk continues a cached prefix
    longest, split = max(prompt_lengths), 12
    ids = torch.zeros(batch, longest, dtype=torch.long)
    positions = torch.full((batch, longest), -1)
    for row, n in enumerate(prompt_lengths):
        ids[row, :n] = sequences[row][:n]
        positions[row, :n] = torch.arange(n)
    model(ids[:, :split], positions[:, :split], CacheRows(cache), logits_at=torch.zeros(batch, dtype=torch.long))
    last = torch.tensor([n - 1 - split if n > split else 0 for n in prompt_lengths])
    chunk_pos = positions[:, split:].clone()
    for row, n in enumerate(prompt_lengths):
        if n <= split:  # the row's prompt ended in the first chunk: ask again for its last position
            chunk_pos[row, 0] = n - 1
            ids[row, split] = sequences[row][n - 1]
    logits = model(ids[:, split:], chunk_pos, CacheRows(cache), logits_at=last)
    for row, n in enumerate(prompt_lengths):
        assert (logits[row] - full_logits(row, n)).abs().max() <= 1e-5

    worst = 0.0
    for step in range(steps):
        pos = torch.tensor([[n + step] for n in prompt_lengths])
        tokens = torch.stack([sequences[row][n + step] for row, n in enumerate(prompt_lengths)])[:, None]
        logits = model(tokens, pos, CacheRows(cache), logits_at=torch.zeros(batch, dtype=torch.long))
        for row, n in enumerate(prompt_lengths):
            worst = max(worst, float((logits[row] - full_logits(row, n + step + 1)).abs().max()))
    assert worst <= 1e-5, worst


@torch.no_grad()
def test_a_ragged_pass_equals_each_sequence_alone(variant):
    check_ragged_pass(make_model(variant))


@torch.no_grad()
def test_cache_rows_can_be_any_subset_of_the_cache(variant):
    """A sequence keeps its cache row while others come and go (continuous batching)."""
    model = make_model(variant)
    source = source_for(model, 2)
    cache = KVCache(model.config, batch_size=5, max_seq_len=40, max_source_len=9)
    rows = torch.tensor([4, 1])
    if source is not None:
        model.write_cross_cache(cache, rows, source.memory, source.lengths)
    ids = torch.randint(0, VOCAB, (2, 20))
    expected = model(ids, source=source)
    model(ids[:, :8], cache=CacheRows(cache, rows), logits_at=torch.full((2,), 7))
    for t in range(8, 20):  # decode only row 1 for a while, then both again
        sel = rows[1:] if t < 12 else rows
        sub = slice(1, 2) if t < 12 else slice(0, 2)
        if t == 12:  # row 4 catches up on tokens 8..11 in one chunk
            model(ids[:1, 8:12], torch.arange(8, 12)[None], CacheRows(cache, rows[:1]), logits_at=torch.tensor([3]))
        out = model(ids[sub, t:t + 1], torch.full((sel.numel(), 1), t), CacheRows(cache, sel),
                    logits_at=torch.zeros(sel.numel(), dtype=torch.long))
        assert (out - expected[sub, t]).abs().max() <= 1e-5


@torch.no_grad()
def test_a_sequences_logits_do_not_depend_on_other_rows_in_its_batch(variant):
    model = make_model(variant)
    lengths = [3, 11, 7, 16]
    rows = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    source = source_for(model, len(rows))
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    positions = torch.full(ids.shape, -1)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        positions[i, :len(r)] = torch.arange(len(r))
    batched = model(ids, positions, source=source)
    for i, r in enumerate(rows):
        alone = model(r[None], source=source_row(source, i))
        assert (batched[i, :len(r)] - alone[0]).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("variant", ENCODER_DECODER)
def test_cross_attention_sees_the_source_but_not_its_padding(variant):
    model = make_model(variant)
    src = torch.randint(3, VOCAB, (1, 8))
    tgt = torch.randint(3, VOCAB, (1, 6))
    base = model(tgt, source=Source(memory=model.encode(src)))
    other = src.clone()
    other[0, 2] = (other[0, 2] + 5) % VOCAB
    assert (model(tgt, source=Source(other)) - base).abs().max() > 1e-4  # cross-attention is wired

    padded = torch.cat([src, torch.randint(0, VOCAB, (1, 5))], dim=1)  # 5 junk padding tokens
    lengths = torch.tensor([8])
    out = model(tgt, source=Source(memory=model.encode(padded, lengths), lengths=lengths))
    assert (out - base).abs().max() <= 1e-5
    assert torch.equal(model(tgt, source=Source(padded, lengths)), out)  # encoded in the pass: the same


@torch.no_grad()
def test_logits_at_returns_only_the_requested_positions(variant):
    model = make_model(variant)
    source = source_for(model, 2)
    ids = torch.randint(0, VOCAB, (2, 9))
    full = model(ids, source=source)
    seen = []  # rows the last layer's feed-forward gets: only the positions asked for go past its attention
    hook = model.layers[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:2]))
    picked = model(ids, logits_at=torch.tensor([8, 3]), source=source)
    hook.remove()
    assert picked.shape == (2, VOCAB) and seen == [(2, 1)]
    assert torch.allclose(picked, torch.stack([full[0, 8], full[1, 3]]), atol=1e-6)

    positions = torch.arange(9).expand(2, 9).clone()
    positions[1, 4:] = -1  # row 1 is 4 tokens long, right-padded
    padded = model(ids, positions, logits_at=torch.tensor([8, 3]), source=source)
    assert torch.allclose(padded, torch.stack([full[0, 8], full[1, 3]]), atol=1e-5)


@pytest.mark.parametrize("variant", DECODER_ONLY)
def test_training_mode_runs_backward_with_dropout(variant):
    model = make_model(variant, dropout=0.1).train()
    ids = torch.randint(0, VOCAB, (2, 16))
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_tied_embeddings_share_one_parameter():
    model = make_model("llama-gqa")
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = make_model("rope-layernorm-gelu-mqa-untied")
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_kv_cache_memory_per_token_formula():
    config = make_config("llama-gqa")  # 2 layers, 2 KV heads of 16 dims
    assert bytes_per_token(config, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert bytes_per_token(config, torch.bfloat16) == 2 * 2 * 2 * 16 * 2
    cache = KVCache(config, batch_size=3, max_seq_len=50)
    assert cache.nbytes == 3 * 51 * bytes_per_token(config, torch.float32)  # 50 slots + 1 padding sink


def test_big_cpu_buffers_are_zeros_on_2mib_boundaries_and_outlive_their_mapping():
    big = pages.zeros((3, 1 << 18), torch.float32)  # 3 MiB
    assert big.shape == (3, 1 << 18) and big.dtype == torch.float32 and big.is_contiguous()
    assert big.data_ptr() % pages.HUGE_PAGE == 0 and not big.any()
    gc.collect()  # only the tensor refers to the mapping now
    big[2, -1] = 7.0
    assert big.sum().item() == 7.0
    small = pages.zeros((4, 5), torch.bfloat16)  # under 2 MiB: ordinary zeros
    assert small.shape == (4, 5) and small.dtype == torch.bfloat16 and not small.any()
    cache = KVCache(make_config("llama-gqa"), batch_size=256, max_seq_len=127, zeros=pages.zeros)  # 2 x 4 MiB
    assert cache.k.data_ptr() % pages.HUGE_PAGE == 0 and cache.v.data_ptr() % pages.HUGE_PAGE == 0
    assert not cache.k.any() and not cache.v.any()


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 63), ("num_key_value_heads", 3), ("activation", "tanh"), ("norm_position", "middle"),
    ("position_embedding", "alibi"), ("vocab_size", 0),
])
def test_invalid_configs_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{"hidden_size": 64, "num_attention_heads": 4, field: value})


@torch.no_grad()
def test_llama_checkpoints_agree_with_hugging_face_transformers(tmp_path):
    """Our Llama-layout checkpoint loads in transformers with identical logits, and theirs loads here."""
    transformers = pytest.importorskip("transformers")
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    vocab = tokenizer.vocab_size
    model = make_model("llama-gqa", vocab_size=vocab)
    save_checkpoint(tmp_path / "ours", model, tokenizer)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, vocab, (2, 20))
    assert (theirs(ids).logits - model(ids)).abs().max() <= 1e-5

    hf_config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                         max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "theirs")
    tokenizer.save(tmp_path / "theirs" / "tokenizer.json")
    loaded = load_checkpoint(tmp_path / "theirs").model
    assert loaded.config.num_key_value_heads == 1 and loaded.config.rope_theta == 500000.0
    assert (hf_model(ids).logits - loaded(ids)).abs().max() <= 1e-5
