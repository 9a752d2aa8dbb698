"""Tiny models for the tests: one config per architecture family the model supports."""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.kv_cache import CacheRows, KVCache, Ragged
from model.model import Source, Transformer

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=128)

# name -> config overrides; together they cover every switch of ModelConfig
VARIANTS: dict[str, dict] = {
    "llama-gqa": dict(num_hidden_layers=2, num_key_value_heads=2),
    "gpt2": dict(num_hidden_layers=2, position_embedding="learned", norm_type="layernorm",
                 activation="gelu_tanh", bias=True),
    "original-decoder": dict(num_hidden_layers=2, position_embedding="sinusoidal", norm_type="layernorm",
                             norm_position="post", activation="relu", bias=True, scale_embedding=True),
    "rope-layernorm-gelu-mqa-untied": dict(num_hidden_layers=2, num_key_value_heads=1, norm_type="layernorm",
                                           activation="gelu", tie_word_embeddings=False),
    "original-encoder-decoder": dict(num_hidden_layers=2, num_encoder_layers=2, position_embedding="sinusoidal",
                                     norm_type="layernorm", norm_position="post", activation="relu", bias=True,
                                     scale_embedding=True),
    "modern-encoder-decoder": dict(num_hidden_layers=2, num_encoder_layers=2, num_key_value_heads=2),
}
DECODER_ONLY = [k for k, v in VARIANTS.items() if not v.get("num_encoder_layers")]
ENCODER_DECODER = [k for k, v in VARIANTS.items() if v.get("num_encoder_layers")]


def make_config(variant: str, **overrides) -> ModelConfig:
    return ModelConfig(**(_COMMON | VARIANTS[variant] | overrides))


def make_model(variant: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(make_config(variant, **overrides)).eval()
    with torch.no_grad():  # random non-trivial norm/bias values so every parameter matters in comparisons
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def source_for(model, batch: int, length: int = 9, seed: int = 1) -> Source | None:
    """An encoded random source (memory and lengths) for encoder-decoder models, None for the others."""
    if not model.config.is_encoder_decoder:
        return None
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (batch, length), generator=g)
    lengths = torch.full((batch,), length)
    return Source(lengths=lengths, memory=model.encode(src, lengths))


def source_row(source: Source | None, row: int) -> Source | None:
    """One row of a batch's source."""
    return None if source is None else Source(lengths=source.lengths[row:row + 1], memory=source.memory[row:row + 1])


def check_ragged_pass(model) -> None:
    """Sequences back to back without padding (an engine's prompt pass: fresh prompts, a one-token one, and
    some continuing a prefix already cached) fill their cache rows and give their last tokens' logits as each
    sequence's own padded pass does."""
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (7, 1, 12, 9)]
    rows, cached = [3, 0, 2, 1], [0, 0, 5, 8]  # cache row of each; tokens of it cached by an earlier pass
    source = source_for(model, len(seqs))

    def cache_with_prefixes() -> KVCache:
        cache = KVCache(model.config, batch_size=4, max_seq_len=16, max_source_len=9)
        if source is not None:
            model.write_cross_cache(cache, torch.tensor(rows), source.memory, source.lengths)
        for seq, row, c in zip(seqs, rows, cached):
            if c:
                model(seq[:c][None], torch.arange(c)[None], CacheRows(cache, torch.tensor([row])),
                      logits_at=torch.tensor([c - 1]))
        return cache

    together = cache_with_prefixes()
    ragged = Ragged(together, lengths=[len(s) - c for s, c in zip(seqs, cached)], rows=rows,
                    ends=[len(s) for s in seqs])
    ids = torch.cat([s[c:] for s, c in zip(seqs, cached)])[None]  # (1, 7 + 1 + 7 + 1)
    positions = torch.cat([torch.arange(c, len(s)) for s, c in zip(seqs, cached)])[None]
    logits = model(ids, positions, ragged)
    assert logits.shape == (len(seqs), VOCAB)
    alone = cache_with_prefixes()
    for i, (seq, row, c) in enumerate(zip(seqs, rows, cached)):
        expected = model(seq[c:][None], torch.arange(c, len(seq))[None], CacheRows(alone, torch.tensor([row])),
                         logits_at=torch.tensor([len(seq) - c - 1]))[0]
        assert (logits[i] - expected).abs().max() <= 1e-5
        n = len(seq)
        assert (together.k[:, row, :, :n] - alone.k[:, row, :, :n]).abs().max() <= 1e-5
        assert (together.v[:, row, :, :n] - alone.v[:, row, :, :n]).abs().max() <= 1e-5
