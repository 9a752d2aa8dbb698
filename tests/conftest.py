"""Shared fixtures: one tiny config per architecture family the model supports."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig

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
    from model.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(make_config(variant, **overrides)).eval()
    with torch.no_grad():  # random non-trivial norm/bias values so every parameter matters in comparisons
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
