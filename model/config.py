"""ModelConfig: one dataclass for every Transformer variant lmserve runs, and lmserve's own `config.json` form.

The fields follow Hugging Face naming. Checkpoints of a Hugging Face family (Llama, Mistral, Qwen2/3, Phi-3, Gemma,
GPT-2) are read into a ModelConfig, and ours written as one where they are one, by `model/families.py`; every other
variant is written as `model_type: "lmserve"`, the fields below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Positions = Literal["rope", "learned", "sinusoidal"]
NormType = Literal["rmsnorm", "layernorm"]
NormPosition = Literal["pre", "post"]
Activation = Literal["relu", "gelu", "gelu_tanh", "swiglu", "geglu"]  # swiglu, geglu: gated (SiLU, tanh-GELU)
RopeType = Literal["default", "linear", "dynamic", "llama3", "yarn"]
GATED_ACTIVATIONS = ("swiglu", "geglu")
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
    activation: Activation = option("swiglu", "relu | gelu | gelu_tanh | swiglu | geglu")
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
    # what some Hugging Face families need beyond `Architecture` (None: follow `bias`, or hidden_size / heads)
    head_dim: int | None = None  # per-head size; Gemma's and Qwen3's differ from hidden_size / heads
    attention_bias: bool | None = None  # biases on q, k, v and o
    qkv_bias: bool | None = None  # biases on q, k and v only (Qwen2); None: as attention_bias
    mlp_bias: bool | None = None
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotation (Qwen3)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight) (Gemma)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": linear|dynamic|llama3|yarn, "factor": ..., ...}
    sliding_window: int | None = None  # attention window; the engine serves at most this much context

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                                  f"'num_attention_heads' ({self.num_attention_heads}), or 'head_dim' given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.bias
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        if self.mlp_bias is None:
            self.mlp_bias = self.bias
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") == "default":
            self.rope_scaling = None
        self.validate()

    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_encoder_layers > 0

    @property
    def gated(self) -> bool:
        """The feed-forward is down(act(gate(x)) * up(x))."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

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
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head dim, got {self.head_dim}")
        if self.rope_type not in RopeType.__args__:
            raise ConfigError(f"config field 'rope_type' is {self.rope_type!r}; lmserve supports {RopeType.__args__}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"config field 'sliding_window' must be a positive integer or null, "
                              f"got {self.sliding_window!r}")

    # ---- lmserve's config.json ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field, as `model_type: "lmserve"` writes them (families.config_json writes a family's form)."""
        d = {"model_type": "lmserve", "architectures": ["LMServeTransformer"]}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        d.update(dtype=self.torch_dtype, is_encoder_decoder=self.is_encoder_decoder,
                 decoder_start_token_id=self.bos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads `model_type: "lmserve"` config.json contents (older ones spelled norm_eps rms_norm_eps)."""
        if d.get("model_type") != "lmserve":
            raise ConfigError(f"config field 'model_type' is {d.get('model_type')!r}, not 'lmserve'")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                raise ConfigError(f"config.json is missing the required field '{name}'")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: d[k] for k in known if k in d}
        if "rms_norm_eps" in d and "norm_eps" not in d:
            values["norm_eps"] = d["rms_norm_eps"]
        if "rope_parameters" in d and "rope_theta" in d["rope_parameters"]:
            values["rope_theta"] = d["rope_parameters"]["rope_theta"]
        if "torch_dtype" not in d and "dtype" in d:
            values["torch_dtype"] = d["dtype"]
        if values.get("torch_dtype") not in DTYPES:
            values["torch_dtype"] = "float32"
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else None
        try:
            return cls(**values)
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
