"""ModelConfig: one dataclass for every Transformer variant lmserve runs, and its `config.json` form.

The JSON side follows Hugging Face naming. A decoder-only model in the Llama layout (pre-norm RMSNorm,
RoPE, SwiGLU, no biases) is written as `model_type: "llama"` so other tools read our checkpoints; every
other variant is written as `model_type: "lmserve"` with the same field names plus a few of our own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Positions = Literal["rope", "learned", "sinusoidal"]
NormType = Literal["rmsnorm", "layernorm"]
NormPosition = Literal["pre", "post"]
Activation = Literal["relu", "gelu", "gelu_tanh", "swiglu"]

SUPPORTED_MODEL_TYPES = ("lmserve", "llama")
# the weight dtypes lmserve reads, stores and serves, by their config.json / --dtype names
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A config.json field is missing, unknown or inconsistent; the message names the field."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with its `--flag` help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Architecture:
    """The choices that shape a Transformer: what a training run picks (each is a `--flag` of the trainer) and a
    checkpoint's config.json records. `ModelConfig` adds what the data decides (vocabulary, context, token ids)."""

    hidden_size: int = option(256, "model width")
    num_hidden_layers: int = option(4, "decoder layers")
    num_encoder_layers: int = option(0, "encoder layers (> 0: an encoder-decoder, the original Transformer)")
    num_attention_heads: int = option(8, "attention heads")
    num_key_value_heads: int | None = option(None, "key/value heads (fewer: grouped-query attention); default = heads")
    intermediate_size: int = option(1024, "FFN hidden width")
    position_embedding: Positions = option("rope", "rope | learned | sinusoidal")
    rope_theta: float = option(10000.0, "RoPE base")
    norm_type: NormType = option("rmsnorm", "rmsnorm | layernorm")
    norm_position: NormPosition = option("pre", "pre (modern) | post (the original Add & Norm)")
    norm_eps: float = option(1e-5, "epsilon of every norm")
    activation: Activation = option("swiglu", "relu | gelu | gelu_tanh | swiglu")
    tie_word_embeddings: bool = option(True, "share the token embedding with the output Linear")
    bias: bool = option(False, "biases in linear layers and LayerNorm")
    scale_embedding: bool = option(False, "multiply token embeddings by sqrt(hidden_size), as the original did")
    dropout: float = option(0.0, "dropout on embeddings, attention and residual branches (training only)")


@dataclass
class ModelConfig(Architecture):
    vocab_size: int = 8192
    max_position_embeddings: int = 1024
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_encoder_layers > 0

    @property
    def is_llama_compatible(self) -> bool:
        """True when Hugging Face's LlamaForCausalLM computes exactly what our model computes."""
        return (
            not self.is_encoder_decoder
            and self.position_embedding == "rope"
            and self.norm_type == "rmsnorm"
            and self.norm_position == "pre"
            and self.activation == "swiglu"
            and not self.scale_embedding
        )

    def validate(self) -> None:
        choices = {
            "position_embedding": Positions.__args__,
            "norm_type": NormType.__args__,
            "norm_position": NormPosition.__args__,
            "activation": Activation.__args__,
            "torch_dtype": tuple(DTYPES),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field '{name}' is {getattr(self, name)!r}; expected one of {allowed}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head dim, got {self.head_dim}")

    # ---- config.json -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face-style config.json contents."""
        d: dict[str, Any] = {
            "model_type": "llama" if self.is_llama_compatible else "lmserve",
            "architectures": ["LlamaForCausalLM" if self.is_llama_compatible else "LMServeTransformer"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.bias,
            "mlp_bias": self.bias,
            "hidden_act": "silu" if self.activation == "swiglu" else self.activation,
            "rms_norm_eps": self.norm_eps,
            "attention_dropout": self.dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "dtype": self.torch_dtype,
            "is_encoder_decoder": self.is_encoder_decoder,
        }
        if not self.is_llama_compatible:
            d.update(
                num_encoder_layers=self.num_encoder_layers,
                position_embedding=self.position_embedding,
                norm_type=self.norm_type,
                norm_position=self.norm_position,
                activation=self.activation,
                bias=self.bias,
                scale_embedding=self.scale_embedding,
                dropout=self.dropout,
                decoder_start_token_id=self.bos_token_id,
            )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads a config.json written by lmserve or a Hugging Face Llama config."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config field 'model_type' is {model_type!r}; lmserve reads {list(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                raise ConfigError(f"config.json is missing the required field '{name}'")
        if model_type == "llama":
            if d.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"config field 'hidden_act' is {d['hidden_act']!r}; llama models use 'silu'")
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ConfigError(f"config field 'rope_parameters' asks for {rope.get('rope_type')!r} "
                                  "rotary scaling; lmserve supports only the default")
            if d.get("attention_bias", False) != d.get("mlp_bias", False):
                raise ConfigError("config fields 'attention_bias' and 'mlp_bias' must agree")
            extra = dict(position_embedding="rope", norm_type="rmsnorm", norm_position="pre",
                         activation="swiglu", bias=bool(d.get("attention_bias", False)),
                         dropout=float(d.get("attention_dropout", 0.0)))
        else:
            extra = {k: d[k] for k in ("num_encoder_layers", "position_embedding", "norm_type", "norm_position",
                                       "activation", "bias", "scale_embedding", "dropout") if k in d}
        if "head_dim" in d and d["head_dim"] * d["num_attention_heads"] != d["hidden_size"]:
            raise ConfigError("config field 'head_dim' must equal hidden_size / num_attention_heads")
        known = {f.name for f in dataclasses.fields(cls)}
        common = {k: d[k] for k in known if k in d and k not in extra}
        if "rope_theta" in (d.get("rope_parameters") or {}):  # transformers >= 5 nests it
            common["rope_theta"] = d["rope_parameters"]["rope_theta"]
        if "torch_dtype" not in d and "dtype" in d:
            common["torch_dtype"] = d["dtype"]
        if "rms_norm_eps" in d:
            common["norm_eps"] = d["rms_norm_eps"]
        if isinstance(common.get("eos_token_id"), list):  # HF allows several; the first is the main one
            common["eos_token_id"] = common["eos_token_id"][0]
        if common.get("torch_dtype") not in DTYPES:
            common["torch_dtype"] = "float32"
        try:
            return cls(**common, **extra)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from e


# Named architectures for `python -m model.training.init` and the tests: one per family the config expresses.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Llama layout: pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention, tied embeddings, no biases
    "tiny-llama": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=352),
    # GPT-2 layout: learned positions, pre-norm LayerNorm with biases, GELU (tanh approximation)
    "tiny-gpt2": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                      position_embedding="learned", norm_type="layernorm", activation="gelu_tanh", bias=True),
    # the original Transformer: encoder-decoder, post-norm Add & Norm, sinusoidal positions, ReLU FFN
    "tiny-original": dict(hidden_size=128, num_hidden_layers=3, num_encoder_layers=3, num_attention_heads=4,
                          intermediate_size=512, position_embedding="sinusoidal", norm_type="layernorm",
                          norm_position="post", activation="relu", bias=True, scale_embedding=True),
}
