"""Hugging Face model families as configurations of our one Transformer: each family's config.json fields read into
a `ModelConfig`, and its tensor names (fused, transposed or renamed) mapped onto our parameters at load time, and
back at save time. Anything a family's config asks for that the Transformer does not compute is refused here, with
the field and its value, so a model is never served wrongly.

    family        what it adds to the Llama layout
    llama         (RMSNorm, RoPE with rope_theta and scaling, SwiGLU, grouped-query attention, optional biases)
    mistral       sliding_window (the engine serves at most that much context)
    qwen2         biases on q, k and v only
    qwen3         RMSNorm on each head of q and k, explicit head_dim
    phi3          q, k, v stored as one qkv_proj, gate and up as one gate_up_proj
    gemma         RMSNorm scaled by (1 + weight), embeddings times sqrt(hidden_size), tanh-GELU gated FFN, head_dim
    gpt2          learned positions, pre-norm LayerNorm with biases, tanh-GELU, fused c_attn, Conv1D weights (in, out)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.config import DTYPES, ConfigError, ModelConfig

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
FAMILIES = (*LLAMA_LIKE, "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
# what transformers' config classes assume for a field config.json leaves out, where it is not the Llama default
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {"sliding_window": 4096}, "qwen2": {}, "phi3": {},
    "qwen3": {"head_dim": 128}, "gemma": {"head_dim": 256, "tie_word_embeddings": True},
}
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh")
STORED_BUFFERS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")  # old checkpoints' buffers: skipped


def _first(value: Any) -> int | None:
    """An eos/bos id that may be a list (several EOS ids): the first; generation_config keeps them all."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the rotary scaling, from transformers 5's `rope_parameters` or the older `rope_theta` and
    `rope_scaling` (whose `type` was later spelled `rope_type`)."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    if params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"config field 'partial_rotary_factor' is "
                          f"{params.get('partial_rotary_factor', d.get('partial_rotary_factor'))}; lmserve rotates "
                          "whole heads only")
    params.pop("partial_rotary_factor", None)
    return float(theta), params if params.get("rope_type", "default") != "default" else None


def _refuse_unsupported(d: dict[str, Any], family: str) -> None:
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"config field 'quantization_config' asks for {method!r} weights; lmserve serves "
                          "unquantized float32/bfloat16/float16 checkpoints")
    if family == "qwen2" and d.get("use_sliding_window"):
        raise ConfigError(f"config field 'use_sliding_window' is true (window {d.get('sliding_window')}, from "
                          f"layer {d.get('max_window_layers')}); lmserve has no per-layer sliding windows")
    if family == "gpt2":
        for name, expected in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                               ("add_cross_attention", False)):
            if d.get(name, expected) != expected:
                raise ConfigError(f"config field '{name}' is {d[name]!r}; lmserve computes GPT-2 with {expected}")


def _activation(d: dict[str, Any], family: str) -> str:
    if family == "gpt2":
        act = d.get("activation_function", "gelu_new")
        known = {**dict.fromkeys(GELU_TANH, "gelu_tanh"), "gelu": "gelu", "relu": "relu"}
    elif family == "gemma":
        act = d.get("hidden_activation") or "gelu_pytorch_tanh"  # as transformers: Gemma's old hidden_act ignored
        known = dict.fromkeys(GELU_TANH, "geglu")
    else:
        act = d.get("hidden_act", "silu")
        known = {"silu": "swiglu"}
    if act not in known:
        field = {"gpt2": "activation_function", "gemma": "hidden_activation"}.get(family, "hidden_act")
        raise ConfigError(f"config field '{field}' is {act!r}; lmserve computes {family} with {sorted(known)}")
    return known[act]


def _dtype(d: dict[str, Any]) -> str:
    dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def read_config(d: dict[str, Any]) -> ModelConfig:
    """config.json contents -> ModelConfig, for lmserve's own model_type and every family above."""
    family = d.get("model_type")
    if family == "lmserve":
        return ModelConfig.from_dict(d)
    if family not in FAMILIES:
        raise ConfigError(f"config field 'model_type' is {family!r}; lmserve reads {['lmserve', *FAMILIES]}")
    _refuse_unsupported(d, family)
    d = FAMILY_DEFAULTS.get(family, {}) | d
    if family == "gpt2":
        return _read_gpt2(d)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if name not in d:
            raise ConfigError(f"config.json is missing the required field '{name}'")
    theta, scaling = _rope(d)
    attention_bias = bool(d.get("attention_bias", False))
    values = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"], num_key_value_heads=d.get("num_key_value_heads"),
        intermediate_size=d["intermediate_size"], max_position_embeddings=d.get("max_position_embeddings", 2048),
        head_dim=d.get("head_dim"), rope_theta=theta, rope_scaling=scaling, norm_type="rmsnorm", norm_position="pre",
        norm_eps=d.get("rms_norm_eps", 1e-6), activation=_activation(d, family), position_embedding="rope",
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), bias=False,
        attention_bias=attention_bias, qkv_bias=True if family == "qwen2" else attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=family == "qwen3", norm_unit_offset=family == "gemma",
        scale_embedding=family == "gemma", sliding_window=d.get("sliding_window"),
        bos_token_id=_first(d.get("bos_token_id")),
        eos_token_id=_first(d.get("eos_token_id")), pad_token_id=_first(d.get("pad_token_id")),
        torch_dtype=_dtype(d))
    return ModelConfig(**values)


def _read_gpt2(d: dict[str, Any]) -> ModelConfig:
    width = d.get("n_embd", 768)
    return ModelConfig(
        vocab_size=d.get("vocab_size", 50257), hidden_size=width, num_hidden_layers=d.get("n_layer", 12),
        num_attention_heads=d.get("n_head", 12), intermediate_size=d.get("n_inner") or 4 * width,
        max_position_embeddings=d.get("n_positions", 1024), position_embedding="learned", norm_type="layernorm",
        norm_position="pre", norm_eps=d.get("layer_norm_epsilon", 1e-5), activation=_activation(d, "gpt2"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), bias=True,
        bos_token_id=_first(d.get("bos_token_id", 50256)), eos_token_id=_first(d.get("eos_token_id", 50256)),
        pad_token_id=_first(d.get("pad_token_id")), torch_dtype=_dtype(d))


# ---- which family a config of ours is, and its config.json -----------------------------------------------


def family_of(config: ModelConfig) -> str:
    """The family whose transformers class computes exactly this config, or "lmserve" if none does."""
    c = config
    if c.is_encoder_decoder or c.norm_position != "pre" or c.dropout:
        return "lmserve"
    if (c.position_embedding == "learned" and c.norm_type == "layernorm" and c.bias and c.activation in
            ("gelu_tanh", "gelu", "relu") and c.tie_word_embeddings and not c.scale_embedding and not c.qk_norm
            and c.num_key_value_heads == c.num_attention_heads and c.head_dim * c.num_attention_heads == c.hidden_size
            and c.attention_bias and c.qkv_bias and c.mlp_bias):
        return "gpt2"
    if c.position_embedding != "rope" or c.norm_type != "rmsnorm" or c.bias:
        return "lmserve"
    if c.activation == "geglu" and c.norm_unit_offset and c.scale_embedding and not c.qk_norm and not (
            c.attention_bias or c.qkv_bias or c.mlp_bias):
        return "gemma"
    if c.activation != "swiglu" or c.norm_unit_offset or c.scale_embedding:
        return "lmserve"
    if c.qk_norm:
        return "qwen3" if c.qkv_bias == c.attention_bias and not c.mlp_bias else "lmserve"
    if c.qkv_bias and not c.attention_bias:
        return "qwen2" if not c.mlp_bias else "lmserve"
    if c.qkv_bias != c.attention_bias:
        return "lmserve"
    return "mistral" if c.sliding_window else "llama"


def config_json(config: ModelConfig) -> dict[str, Any]:
    """What config.json holds for `config`: its family's fields as transformers writes them, else lmserve's."""
    family = family_of(config)
    if family == "lmserve":
        return config.to_dict()
    c = config
    common = {"model_type": family, "architectures": [ARCHITECTURES[family]], "vocab_size": c.vocab_size,
              "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
              "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": c.torch_dtype, "dtype": c.torch_dtype}
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.activation]
        return common | {"n_embd": c.hidden_size, "n_layer": c.num_hidden_layers, "n_head": c.num_attention_heads,
                         "n_inner": c.intermediate_size, "n_positions": c.max_position_embeddings,
                         "n_ctx": c.max_position_embeddings, "layer_norm_epsilon": c.norm_eps,
                         "activation_function": act, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    d = common | {
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": rope, "attention_bias": c.attention_bias,
        "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh" if family == "gemma" else "silu"}
    if family == "llama":
        d["mlp_bias"] = c.mlp_bias
    if family == "gemma":
        d["hidden_activation"] = "gelu_pytorch_tanh"
    if family in ("mistral", "qwen2", "qwen3"):
        d["sliding_window"] = c.sliding_window
        d["use_sliding_window"] = False
    return d


# ---- tensor names ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One tensor in the checkpoint's files, made of our parameters `parts` stacked along their dim 0 (q, k, v of a
    fused projection; one part for most), and stored transposed when `transpose` (GPT-2's Conv1D, (in, out))."""

    name: str
    parts: tuple[str, ...]
    transpose: bool = False


_OUR_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def _llama_name(ours: str) -> str:
    if ours.startswith("lm_head."):
        return ours
    for mine, theirs in _OUR_NORMS.items():
        ours = ours.replace(f".{mine}.", f".{theirs}.")
    return "model." + ours


def stored_tensors(config: ModelConfig, parameters: list[str], family: str | None = None,
                   prefix: str = "transformer.") -> list[Stored]:
    """How a checkpoint of `family` (default: family_of(config)) stores our `parameters` (a tied lm_head once,
    as the embedding). `prefix`: GPT-2's module prefix, which older GPT-2 checkpoints lack."""
    family = family or family_of(config)
    names = [p for p in parameters if not (config.tie_word_embeddings and p == "lm_head.weight")]
    if family == "gpt2":
        return _gpt2_tensors(config, names, prefix)
    if family == "lmserve":
        return [Stored(_lmserve_name(p), (p,)) for p in names]
    if family == "phi3":
        return _phi3_tensors(names)
    return [Stored(_llama_name(p), (p,)) for p in names]


def _lmserve_name(ours: str) -> str:
    """Our encoder-decoder and other own layouts: the Llama names, the encoder under model.encoder."""
    for mine, theirs in (("encoder_layers.", "encoder.layers."), ("encoder_norm.", "encoder.norm.")):
        if ours.startswith(mine):
            ours = theirs + ours[len(mine):]
    return _llama_name(ours).replace(".cross_attn_norm.", ".cross_attention_layernorm.")


def _phi3_tensors(names: list[str]) -> list[Stored]:
    """The Llama names, with q, k, v stored as one qkv_proj and gate, up as one gate_up_proj."""
    fused = {".self_attn.q_proj.": (".self_attn.qkv_proj.", ".self_attn.q_proj.", ".self_attn.k_proj.",
                                    ".self_attn.v_proj."),
             ".mlp.gate_proj.": (".mlp.gate_up_proj.", ".mlp.gate_proj.", ".mlp.up_proj.")}
    inside = (".self_attn.k_proj.", ".self_attn.v_proj.", ".mlp.up_proj.")
    stored = []
    for name in names:
        first = next((k for k in fused if k in name), None)
        if first is not None:
            target, *parts = fused[first]
            stored.append(Stored(_llama_name(name.replace(first, target)),
                                 tuple(name.replace(first, part) for part in parts)))
        elif not any(part in name for part in inside):
            stored.append(Stored(_llama_name(name), (name,)))
    return stored


def _gpt2_tensors(config: ModelConfig, names: list[str], prefix: str) -> list[Stored]:
    renames = {"embed_tokens.weight": "wte.weight", "embed_positions.weight": "wpe.weight", "norm.weight":
               "ln_f.weight", "norm.bias": "ln_f.bias"}
    modules = {"attn_norm": ("ln_1", False), "mlp_norm": ("ln_2", False), "self_attn.o_proj": ("attn.c_proj", True),
               "mlp.up_proj": ("mlp.c_fc", True), "mlp.down_proj": ("mlp.c_proj", True)}
    stored = []
    for name in names:
        if name in renames:
            stored.append(Stored(prefix + renames[name], (name,)))
            continue
        if name == "lm_head.weight":
            stored.append(Stored(name, (name,)))
            continue
        _, layer, rest = name.split(".", 2)  # layers.{i}.{module}.{weight|bias}
        module, kind = rest.rsplit(".", 1)
        if module == "self_attn.q_proj":
            parts = tuple(f"layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkv")
            stored.append(Stored(f"{prefix}h.{layer}.attn.c_attn.{kind}", parts, transpose=kind == "weight"))
        elif module in ("self_attn.k_proj", "self_attn.v_proj"):
            continue  # in c_attn
        else:
            theirs, conv = modules[module]
            stored.append(Stored(f"{prefix}h.{layer}.{theirs}.{kind}", (name,), transpose=conv and kind == "weight"))
    return stored


def skipped(name: str, config: ModelConfig) -> bool:
    """Stored tensors a load ignores: old checkpoints' buffers, and a tied output layer saved anyway."""
    return name.endswith(STORED_BUFFERS) or (config.tie_word_embeddings and name == "lm_head.weight")
