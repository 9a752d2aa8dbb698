"""Checkpoint directories in Hugging Face's layout: config.json, model.safetensors (or shards with
model.safetensors.index.json), tokenizer.json with tokenizer_config.json, generation_config.json.

Loading memory-maps the safetensors files and reads them tensor by tensor straight into the target dtype and device
(no float32 copy of the whole model), checking every tensor's name, shape and dtype against the config, and fails
with a `CheckpointError` that names the offending file, tensor or field. The tensor names are the model family's
(`model/families.py`): a checkpoint of a family above loads here and ours load in `transformers`. No pickle
anywhere: `.bin`/`.pt` checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import families
from model.config import DTYPES, ConfigError, ModelConfig
from model.model import Transformer
from model.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded: model-0000x-of-0000y.safetensors
GENERATION_FILE = "generation_config.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt", "consolidated.00.pth")

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


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
    eos_token_ids: tuple[int, ...] = ()  # every id that ends generation (eos_token_id among them)

    def __post_init__(self) -> None:
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        self.eos_token_ids = tuple(i for i in dict.fromkeys([*ids, *self.eos_token_ids]) if i is not None)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        known = {f.name for f in fields(cls)} - {"eos_token_ids"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """generation_config.json's contents: eos_token_id is a list when several ids end generation."""
        d = {k: v for k, v in asdict(self).items() if k != "eos_token_ids"}
        if len(self.eos_token_ids) > 1:
            d["eos_token_id"] = list(self.eos_token_ids)
        return d


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer
    generation: GenerationConfig
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def _stored(model: Transformer, family: str, prefix: str = "transformer.") -> list[families.Stored]:
    return families.stored_tensors(model.config, list(model.state_dict()), family, prefix)


def save_checkpoint(
    directory: str | os.PathLike,
    model: Transformer,
    tokenizer: Tokenizer,
    generation: GenerationConfig | None = None,
) -> Path:
    """Writes `model` as its family's checkpoint (families.family_of: one transformers loads unchanged), or as
    lmserve's own when it is none."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype_name = next(k for k, v in DTYPES.items() if v == model.embed_tokens.weight.dtype)
    config_dict = families.config_json(config) | {"torch_dtype": dtype_name, "dtype": dtype_name}
    state = model.state_dict()
    tensors = {}
    for stored in _stored(model, families.family_of(config)):
        tensor = torch.cat([state[p].detach() for p in stored.parts])
        tensors[stored.name] = (tensor.T if stored.transpose else tensor).contiguous().cpu()
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; a server running as another user (Docker) must read it
    os.replace(tmp, directory / WEIGHTS_FILE)  # a crash mid-write never leaves a half-written checkpoint
    (directory / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2) + "\n")
    tokenizer.save_directory(directory, model_max_length=config.max_position_embeddings)
    generation = generation or GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        decoder_start_token_id=tokenizer.bos_id if config.is_encoder_decoder else None)
    (directory / GENERATION_FILE).write_text(json.dumps(generation.to_dict(), indent=2) + "\n")
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


def _read_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = directory / CONFIG_FILE
    raw = _read_json(path)
    try:
        return families.read_config(raw), raw
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_config(directory: str | os.PathLike) -> ModelConfig:
    return _read_config(Path(directory))[0]


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files: model.safetensors, or the shards model.safetensors.index.json lists."""
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
        shards = [directory / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if shard.parent != directory or not shard.is_file():
                raise CheckpointError(f"missing file: {shard} (listed in {index.name})")
        return shards
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    pickled = next((directory / n for n in PICKLE_FILES if (directory / n).exists()), None)
    if pickled is not None:
        raise CheckpointError(f"{pickled}: pickle checkpoints are never loaded (they can run code); convert it "
                              "to safetensors")
    raise CheckpointError(f"missing file: {directory / WEIGHTS_FILE}")


def _load_weights(files: list[Path], model: Transformer, family: str, dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Reads and checks every tensor against the (meta-device) model, one at a time from the memory map, each cast
    to `dtype` on `device` as it is read. A tensor that is copied (converted to another dtype, moved to another
    device, transposed) is read through a memory map of its own, closed once it is copied: the pages of a map left
    open stay resident, which would add the file's size to the load's peak memory."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles, where = {}, {}
        for path in files:
            try:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except SafetensorError as e:
                raise CheckpointError(f"{path} is truncated or corrupt: {e}") from e
            where.update(dict.fromkeys(handles[path].keys(), path))
        prefix = "transformer." if any(k.startswith("transformer.") for k in where) else ""  # GPT-2's, or none
        expected = _stored(model, family, prefix)
        missing = [s.name for s in expected if s.name not in where]
        if missing:
            raise CheckpointError(f"{files[0].parent}: missing tensor '{missing[0]}'" +
                                  (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        names = {s.name for s in expected}
        unexpected = sorted(k for k in where if k not in names and not families.skipped(k, model.config))
        if unexpected:
            raise CheckpointError(f"{where[unexpected[0]]}: unexpected tensor '{unexpected[0]}' (not in this "
                                  "config)")
        for stored in expected:
            path = where[stored.name]
            try:
                stored_dtype = _SAFETENSORS_DTYPES.get(handles[path].get_slice(stored.name).get_dtype())
                copied = (stored_dtype != str(dtype).removeprefix("torch.") or device.type != "cpu"
                          or stored.transpose or len(stored.parts) > 1)
                if copied:  # converted, moved, transposed or split
                    with safe_open(str(path), framework="pt", device="cpu") as own:
                        state.update(_read_tensor(own, stored, shapes, dtype, device, path))
                else:  # kept as stored: the tensors are views of the map, which stays open as long as they live
                    state.update(_read_tensor(handles[path], stored, shapes, dtype, device, path))
            except SafetensorError as e:
                raise CheckpointError(f"{path} is truncated or corrupt: {e}") from e
    return state


def _read_tensor(f: Any, stored: families.Stored, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device, path: Path) -> dict[str, torch.Tensor]:
    """Our parameters from one stored tensor: split along dim 0 (fused q/k/v, gate/up), transposed back first
    (Conv1D), each read from the memory map by itself."""
    sl = f.get_slice(stored.name)
    shape, stored_dtype = tuple(sl.get_shape()), sl.get_dtype()
    sizes = [shapes[p][0] for p in stored.parts]
    ours = (sum(sizes), *shapes[stored.parts[0]][1:])
    expected = tuple(reversed(ours)) if stored.transpose else ours
    if shape != expected:
        raise CheckpointError(f"{path}: tensor '{stored.name}' has shape {list(shape)}, config.json implies "
                              f"{list(expected)}")
    if stored_dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor '{stored.name}' is {stored_dtype}; lmserve reads "
                              f"{sorted(_SAFETENSORS_DTYPES.values())} weights")
    out, start = {}, 0
    for part, size in zip(stored.parts, sizes):
        if len(stored.parts) == 1:
            tensor = f.get_tensor(stored.name)
        else:
            tensor = sl[:, start:start + size] if stored.transpose else sl[start:start + size]
        start += size
        tensor = tensor.T if stored.transpose else tensor
        out[part] = tensor.to(device=device, dtype=dtype).contiguous()
    return out


def load_checkpoint(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Checkpoint:
    """Loads a checkpoint directory; `dtype` converts the weights (default: the config's torch_dtype)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    config, raw = _read_config(directory)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or DTYPES[config.torch_dtype]
    device = torch.device(device)

    tokenizer = _read_tokenizer(directory, config)
    files = _weight_files(directory)
    with torch.device("meta"):
        model = Transformer(config)
    state = _load_weights(files, model, raw.get("model_type", "lmserve"), dtype, device)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.reset_buffers(device)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, generation=_read_generation(directory, raw, tokenizer),
                      path=directory)


def _read_tokenizer(directory: Path, config: ModelConfig) -> Tokenizer:
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"missing file: {tokenizer_path}")
    try:
        tokenizer = Tokenizer.from_directory(directory)
    except Exception as e:  # tokenizers raises plain Exceptions with its parse errors
        raise CheckpointError(f"{tokenizer_path} cannot be read: {e}") from e
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but config field "
                              f"'vocab_size' is {config.vocab_size}")
    return tokenizer


def _read_generation(directory: Path, raw_config: dict[str, Any], tokenizer: Tokenizer) -> GenerationConfig:
    """generation_config.json, its unset special ids from config.json; every EOS id that config.json,
    generation_config.json and tokenizer_config.json name ends generation."""
    path = directory / GENERATION_FILE
    generation = GenerationConfig.from_dict(_read_json(path)) if path.is_file() else GenerationConfig()
    for field in ("bos_token_id", "pad_token_id"):
        if getattr(generation, field) is None and isinstance(raw_config.get(field), int):
            setattr(generation, field, raw_config[field])
    config_eos = raw_config.get("eos_token_id")
    listed = config_eos if isinstance(config_eos, list) else [config_eos]
    from_tokenizer = [tokenizer.eos_id] if "eos_token" in tokenizer.config else []
    more = tuple(i for i in (*generation.eos_token_ids, *listed, *from_tokenizer) if isinstance(i, int))
    return replace(generation, eos_token_ids=more)  # __post_init__ merges them with eos_token_id, once each
