"""The trainer: it learns, resumes exactly, runs data-parallel, and keeps held-out data out of training."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.generate import greedy_generate
from model.training.data import numbers_heldout
from model.training.evaluate import greedy_decode_batch
from model.training.tasks import NumbersTask, TextTask
from model.training.train import PRESETS, TrainConfig, lr_at, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "value", "count", "total", "index", "items", "result"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """40 small Python-like files with learnable structure."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        lines = []
        for _ in range(12):
            a, b = rng.sample(WORDS, 2)
            lines.append(f"def get_{a}(self, {b}):\n    return self.{a} + {b}\n")
        (folder / f"mod{i:02d}.py").write_text("\n".join(lines))
    return str(folder / "*.py")


def tiny_config(corpus: str, tmp_path: Path, **overrides) -> TrainConfig:
    values = PRESETS["tiny"] | dict(data=corpus, vocab_size=300, eval_bytes=0, cache_dir=str(tmp_path / "cache"))
    return TrainConfig(**values | overrides)


def read_metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def test_a_tiny_model_learns_and_writes_a_checkpoint_that_generates(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path, max_steps=200, eval_every=50, checkpoint_every=100)
    final = train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    held = [float(r["heldout_loss"]) for r in rows if r["heldout_loss"]]
    assert len(held) == 4
    untrained = math.log(load_checkpoint(final).config.vocab_size)  # a random model's loss is about ln(vocab)
    assert held[-1] < held[0] and held[-1] < 0.2 * untrained
    assert float(rows[-1]["heldout_bits_per_byte"]) < float(rows[49]["heldout_bits_per_byte"])
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "checkpoint-200" / "train_state.safetensors").exists()

    ckpt = load_checkpoint(final)
    prompt = ckpt.tokenizer.encode("def get_alpha(self, beta):\n    return self.")
    text = ckpt.tokenizer.decode(greedy_generate(ckpt.model, prompt, 6))
    assert " + beta" in text  # it learned the pattern of its corpus (copying the argument)


def test_resuming_equals_training_straight_through(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path, max_steps=40, eval_every=20, checkpoint_every=20, dropout=0.1)
    train(cfg, tmp_path / "straight")
    train(dataclasses.replace(cfg, stop_at_step=20), tmp_path / "halves")  # interrupted halfway...
    assert read_metrics(tmp_path / "halves")[-1]["step"] == "20"
    train(cfg, tmp_path / "halves", resume=True)  # ...and resumed
    straight, halves = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "halves")
    assert [r["step"] for r in halves] == [str(s) for s in range(1, 41)]  # the curve continues
    assert abs(float(straight[-1]["train_loss"]) - float(halves[-1]["train_loss"])) <= 1e-6
    assert abs(float(straight[-1]["heldout_loss"]) - float(halves[-1]["heldout_loss"])) <= 1e-6
    a = load_checkpoint(tmp_path / "straight" / "final").model.state_dict()
    b = load_checkpoint(tmp_path / "halves" / "final").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_process_data_parallel_matches_one_process(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path, max_steps=12, eval_every=12, checkpoint_every=12)
    train(cfg, tmp_path / "single")
    args = ["--preset", "tiny", "--data", corpus, "--vocab-size", "300", "--eval-bytes", "0", "--max-steps", "12",
            "--eval-every", "12", "--checkpoint-every", "12", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "ddp"), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    "--master_addr=127.0.0.1",
                    "-m", "model.training.train", *args], check=True, cwd=ROOT, env=env, timeout=120,
                   capture_output=True)
    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert len(ddp) == 12
    for a, b in zip(single, ddp):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-4
    assert abs(float(single[-1]["heldout_loss"]) - float(ddp[-1]["heldout_loss"])) < 1e-4


def test_heldout_documents_are_never_trained_on(corpus, tmp_path):
    task = TextTask(tiny_config(corpus, tmp_path), tmp_path, None, True, False)
    train_names = {name for name, _ in task.corpus.train}
    held_names = {name for name, _ in task.corpus.heldout}
    assert held_names and not train_names & held_names
    assert len(train_names) + len(held_names) == 40
    held_text = task.corpus.heldout[0][1]
    stream = task.tokenizer.decode(task.tokens.tolist(), skip_special_tokens=False)
    assert held_text not in stream  # the tokenised training data holds no held-out file


def test_numbers_task_never_samples_heldout_numbers(tmp_path):
    cfg = TrainConfig(**PRESETS["seq2seq-numbers"] | dict(batch_size=64))
    task = NumbersTask(cfg, tmp_path, None, True, False)
    heldout = set(numbers_heldout())
    words = {task.tokenizer.decode(row[row != -100].tolist()) for row in task.global_batch().labels}
    assert len(heldout) == 2000
    for _ in range(20):
        batch = task.global_batch()
        for source, length in zip(batch.kwargs["source_ids"], batch.kwargs["source_lengths"]):
            digits = task.tokenizer.decode(source[:length].tolist())
            assert int(digits) not in heldout
    assert words  # labels decode to number words


def test_batched_greedy_decoding_matches_one_at_a_time(tmp_path):
    cfg = TrainConfig(**PRESETS["seq2seq-numbers"] | dict(hidden_size=64, intermediate_size=128))
    task = NumbersTask(cfg, tmp_path, None, True, False)
    from model.model import Transformer
    from model.training.train import model_config

    torch.manual_seed(0)
    model = Transformer(model_config(cfg, task)).eval()
    sources = [task.tokenizer.encode(str(n), add_eos=True) for n in (7, 40213, 999999999, 1000)]
    tok = task.tokenizer
    batched = greedy_decode_batch(model, sources, tok.bos_id, tok.eos_id, max_new_tokens=12)
    for source, out in zip(sources, batched):
        assert out == greedy_generate(model, [tok.bos_id], 12, eos_id=tok.eos_id, source_ids=source)


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_help_explains_every_option_and_overrides_apply(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in help_text
    cfg, out, resume = parse_args(["--preset", "seq2seq-numbers", "--out", "x", "--lr", "5e-4", "--no-bias"])
    assert cfg.lr == 5e-4 and cfg.bias is False and cfg.num_encoder_layers == 3 and not resume
