"""Checkpoint directories in Hugging Face's layout: config.json, model.safetensors, tokenizer.json,
generation_config.json.

Loading memory-maps the safetensors file, checks every tensor's name, shape and dtype against the config
before building anything, and fails with a `CheckpointError` that names the offending file, tensor or field.
Tensor names follow Hugging Face's Llama layout (`model.layers.0.self_attn.q_proj.weight`, ...), so a
Llama-compatible checkpoint of ours loads in `transformers` and theirs load here. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import DTYPES, ConfigError, ModelConfig
from model.model import Transformer
from model.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

# our module names -> Hugging Face's (the reverse map is built from the model's real keys)
_PREFIX_RENAMES = (("encoder_layers.", "encoder.layers."), ("encoder_norm.", "encoder.norm."))
_NORM_RENAMES = (
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".cross_attn_norm.", ".cross_attention_layernorm."),
)


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be loaded; the message says which file, tensor or field and why."""


@dataclass
class GenerationConfig:
    """Defaults for generation stored beside the model (generation_config.json)."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else None
        return cls(**values)


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer
    generation: GenerationConfig
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def file_name(name: str) -> str:
    """Our parameter name -> its name in model.safetensors."""
    if name.startswith("lm_head."):
        return name
    for ours, theirs in _PREFIX_RENAMES:
        if name.startswith(ours):
            name = theirs + name[len(ours):]
    for ours, theirs in _NORM_RENAMES:
        name = name.replace(ours, theirs)
    return "model." + name


def _stored_names(model: Transformer) -> dict[str, str]:
    """file name -> parameter name, for every tensor a checkpoint of this model stores (tied head stored once)."""
    names = [k for k in model.state_dict() if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    return {file_name(k): k for k in names}


def save_checkpoint(
    directory: str | os.PathLike,
    model: Transformer,
    tokenizer: Tokenizer,
    generation: GenerationConfig | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype_name = next(k for k, v in DTYPES.items() if v == model.embed_tokens.weight.dtype)
    config_dict = config.to_dict() | {"torch_dtype": dtype_name, "dtype": dtype_name}
    state = model.state_dict()
    tensors = {f: state[k].detach().contiguous().cpu() for f, k in _stored_names(model).items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; a server running as another user (Docker) must read it
    os.replace(tmp, directory / WEIGHTS_FILE)  # a crash mid-write never leaves a half-written checkpoint
    (directory / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2) + "\n")
    tokenizer.save(directory / TOKENIZER_FILE)
    generation = generation or GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        decoder_start_token_id=tokenizer.bos_id if config.is_encoder_decoder else None)
    (directory / GENERATION_FILE).write_text(json.dumps(asdict(generation), indent=2) + "\n")
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(_read_json(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _load_weights(path: Path, model: Transformer, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Reads and checks every tensor of model.safetensors against the (meta-device) model."""
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    expected = _stored_names(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config_dtype = model.config.torch_dtype
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # memory-mapped
            stored = set(f.keys())
            missing = sorted(set(expected) - stored)
            if missing:
                raise CheckpointError(f"{path}: missing tensor '{missing[0]}'" +
                                      (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            unexpected = sorted(stored - set(expected))
            if unexpected:
                raise CheckpointError(f"{path}: unexpected tensor '{unexpected[0]}' (not in this config)")
            for fname, name in expected.items():
                sl = f.get_slice(fname)
                shape, stored_dtype = tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                if shape != shapes[name]:
                    raise CheckpointError(
                        f"{path}: tensor '{fname}' has shape {list(shape)}, config.json implies {list(shapes[name])}")
                if stored_dtype != config_dtype:
                    raise CheckpointError(
                        f"{path}: tensor '{fname}' is {stored_dtype}, config.json says torch_dtype={config_dtype}")
                state[name] = f.get_tensor(fname).to(device=device, dtype=dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {e}") from e
    return state


def load_checkpoint(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Checkpoint:
    """Loads a checkpoint directory; `dtype` converts the weights (default: the stored dtype)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    config = load_config(directory)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or DTYPES[config.torch_dtype]
    device = torch.device(device)

    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"missing file: {tokenizer_path}")
    try:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    except Exception as e:  # tokenizers raises plain Exceptions with its parse errors
        raise CheckpointError(f"{tokenizer_path} cannot be read: {e}") from e
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but config field "
                              f"'vocab_size' is {config.vocab_size}")

    with torch.device("meta"):
        model = Transformer(config)
    state = _load_weights(directory / WEIGHTS_FILE, model, dtype, device)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.reset_buffers(device)
    model.eval()

    gen_path = directory / GENERATION_FILE
    generation = GenerationConfig.from_dict(_read_json(gen_path)) if gen_path.is_file() else GenerationConfig()
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, field) is None:
            setattr(generation, field, getattr(config, field))
    return Checkpoint(model=model, tokenizer=tokenizer, generation=generation, path=directory)
