"""Checkpoint directories: bit-exact round trips, dtype conversion, and a clear error for every broken case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, GenerationConfig, load_checkpoint, save_checkpoint
from model.tokenizer import Tokenizer
from tests.support.models import make_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    corpus = ["def add(a, b):\n    return a + b\n", "print('hello, world')\n", "数字 1234 🚀"] * 30
    return Tokenizer.train(corpus, vocab_size=300)


@pytest.fixture
def saved(tmp_path, tokenizer) -> Path:
    model = make_model("llama-gqa", vocab_size=tokenizer.vocab_size)
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer)


def test_save_load_round_trip_is_bit_exact_and_keeps_ties(tmp_path, tokenizer, variant):
    model = make_model(variant, vocab_size=tokenizer.vocab_size)
    generation = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, temperature=0.7, top_p=0.9)
    save_checkpoint(tmp_path, model, tokenizer, generation)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by a server's own user

    loaded = load_checkpoint(tmp_path)
    original, restored = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    assert loaded.config == model.config
    assert loaded.generation == generation
    assert loaded.tokenizer.encode("def add(a, b): 数字 🚀") == tokenizer.encode("def add(a, b): 数字 🚀")
    if model.config.tie_word_embeddings:
        assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
        assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # stored once
    else:
        assert loaded.model.lm_head.weight is not loaded.model.embed_tokens.weight


def test_config_json_uses_hugging_face_names(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "llama"
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings"):
        assert field in config, field
    names = load_file(saved / "model.safetensors").keys()
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.norm.weight" in names


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_conversion_at_load(saved, dtype):
    reference = load_checkpoint(saved)
    converted = load_checkpoint(saved, dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in converted.model.parameters())
    assert converted.model.lm_head.weight is converted.model.embed_tokens.weight
    ids = torch.randint(0, reference.config.vocab_size, (1, 12))
    with torch.no_grad():
        diff = (converted.model(ids) - reference.model(ids)).abs().max()
    assert diff < 0.05


def test_a_bfloat16_checkpoint_round_trips(tmp_path, tokenizer):
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size).to(torch.bfloat16)
    save_checkpoint(tmp_path, model, tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_checkpoint(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name])


# ---- every broken checkpoint gets an error naming what is wrong --------------------------------------


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_directory():
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint("/nonexistent/lmserve-checkpoint")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(CheckpointError, match=f"missing file: .*{missing}"):
        load_checkpoint(saved)


def test_unknown_model_type(saved):
    _edit_config(saved, model_type="mamba")
    with pytest.raises(CheckpointError, match="model_type.*'mamba'"):
        load_checkpoint(saved)


def test_invalid_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_checkpoint(saved)


def test_missing_config_field(saved):
    config = json.loads((saved / "config.json").read_text())
    del config["hidden_size"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_checkpoint(saved)


def test_shape_mismatch_names_the_tensor(saved):
    _edit_config(saved, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\]"):
        load_checkpoint(saved)


def test_missing_tensor_is_named(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
        load_checkpoint(saved)


def test_unexpected_tensor_is_named(saved):
    _edit_tensors(saved, lambda t: t.update({"model.layers.9.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.9.extra'"):
        load_checkpoint(saved)


def test_float_tensors_of_another_dtype_are_converted_and_others_named(saved):
    _edit_tensors(saved, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}))
    model = load_checkpoint(saved).model  # float16 among float32: read into the dtype served
    assert model.norm.weight.dtype is torch.float32
    _edit_tensors(saved, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].double()}))
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' is F64; lmserve reads"):
        load_checkpoint(saved)


def test_truncated_weights_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        load_checkpoint(saved)


def test_corrupt_weights_header(saved):
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[8:24] = b"\xff" * 16  # garbage inside the JSON header
    (saved / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        load_checkpoint(saved)


def test_corrupt_tokenizer(saved):
    (saved / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(CheckpointError, match="tokenizer.json cannot be read"):
        load_checkpoint(saved)


def test_tokenizer_larger_than_vocab(saved):
    _edit_config(saved, vocab_size=100)
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_checkpoint(saved)


def test_no_pickle_in_the_product():
    """Checkpoints are safetensors only: nothing in model/ or service/ may unpickle."""
    for path in [*ROOT.glob("model/**/*.py"), *ROOT.glob("service/**/*.py")]:
        text = path.read_text()
        for forbidden in ("torch.load(", "import pickle", "pickle.load", "import dill"):
            assert forbidden not in text, (path, forbidden)


# ---- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,prompt", [("tiny-llama", "def hello("), ("tiny-original", "40213")])
def test_init_then_generate_from_the_command_line(tmp_path, preset, prompt):
    out = tmp_path / preset
    subprocess.run([sys.executable, "-m", "model.training.init", "--preset", preset, "--out", str(out),
                    "--vocab-size", "300"], check=True, cwd=ROOT)
    result = subprocess.run([sys.executable, "-m", "model.generate", "--checkpoint", str(out), "--prompt", prompt,
                             "--max-new-tokens", "8"], check=True, cwd=ROOT, capture_output=True, text=True)
    checkpoint = load_checkpoint(out)
    from model.generate import greedy_generate

    if checkpoint.config.is_encoder_decoder:
        tokens = greedy_generate(checkpoint.model, [checkpoint.generation.bos_token_id], 8,
                                 eos_id=checkpoint.generation.eos_token_id,
                                 source_ids=checkpoint.tokenizer.encode(prompt, add_eos=True))
        expected = checkpoint.tokenizer.decode(tokens)
    else:
        tokens = greedy_generate(checkpoint.model, checkpoint.tokenizer.encode(prompt), 8,
                                 eos_id=checkpoint.generation.eos_token_id)
        expected = prompt + checkpoint.tokenizer.decode(tokens)
    assert result.stdout == expected + "\n"
