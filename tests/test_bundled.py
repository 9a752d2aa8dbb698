"""The checkpoints shipped in checkpoints/: they load, have the promised architecture and size, and a quick
held-out evaluation reproduces the figure their model card reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from model.families import family_of

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = {"default": "python-stdlib", "seq2seq-numbers": "numbers-to-words"}


def card(name: str) -> str:
    return (ROOT / "checkpoints" / name / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_checkpoint_loads_and_its_card_is_complete(name):
    directory = ROOT / "checkpoints" / name
    checkpoint = load_checkpoint(directory)
    text = card(name)
    assert f"{checkpoint.model.num_parameters():,}" in text  # the card states the real parameter count
    # how to reproduce it
    assert "python -m model.training.train" in text and "python -m model.training.evaluate" in text
    assert (directory / "loss_curve.png").stat().st_size > 10_000
    for path in directory.iterdir():
        assert path.suffix in {".json", ".safetensors", ".md", ".png"}, path  # no optimizer state, no pickle


def test_default_model_is_modern_decoder_only_and_small():
    config = load_checkpoint(ROOT / "checkpoints" / "default").config
    assert not config.is_encoder_decoder and family_of(config) == "llama" and config.tie_word_embeddings
    size = sum(p.stat().st_size for p in (ROOT / "checkpoints" / "default").iterdir() if p.suffix != ".png")
    assert size <= 25_000_000


def test_seq2seq_model_is_the_original_transformer():
    config = load_checkpoint(ROOT / "checkpoints" / "seq2seq-numbers").config
    assert config.is_encoder_decoder and config.norm_position == "post" and config.norm_type == "layernorm"
    assert config.position_embedding == "sinusoidal" and config.activation == "relu" and config.tie_word_embeddings


@pytest.mark.parametrize("name,metric", [("default", "bits_per_byte"), ("seq2seq-numbers", "exact_match")])
def test_quick_evaluation_reproduces_the_model_card(name, metric):
    command = r"quick check: `(python -m model\.training\.evaluate [^`]+)`"
    match = re.search(command + r".*?RESULT .*?" + metric + r"=([0-9.]+)", card(name), re.S)
    assert match, "the model card names a quick-check command and its RESULT"
    command, expected = match.group(1).split(), float(match.group(2))
    result = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, check=True)
    measured = float(re.search(metric + r"=([0-9.]+)", result.stdout.splitlines()[-1]).group(1))
    assert abs(measured - expected) <= 0.005
