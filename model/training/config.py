"""What a training run is told: `TrainConfig` (every field is a `--flag` of `python -m model.training.train`) and
the named presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.config import Architecture, option


@dataclass
class TrainConfig(Architecture):
    """A run: the model's architecture (inherited from model.config.Architecture), its data and optimisation."""

    data: str = option("python-stdlib", "'python-stdlib', 'numbers-to-words', or comma-separated text/JSONL files "
                                        "or globs (every 20th document is held out)")
    text_field: str = option("text", "field holding the text in JSONL files")
    tokenizer: str | None = option(None, "reuse this tokenizer.json instead of training a byte-level BPE")
    vocab_size: int = option(6144, "BPE vocabulary size when training a tokenizer (includes 3 special tokens)")
    split_digits: bool = option(False, "make every digit its own token")
    # optimisation
    seq_len: int = option(256, "training context (also the checkpoint's max_position_embeddings for text data)")
    batch_size: int = option(16, "sequences (or number pairs) per micro-batch, summed over all processes")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(3000, "optimizer steps")
    lr: float = option(2e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = option(200, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = option(1337, "seed for weights, data order and dropout")
    # bookkeeping
    eval_every: int = option(250, "evaluate on held-out data every N steps (and at the end)")
    eval_bytes: int = option(100_000, "held-out bytes (text), or 10 x held-out numbers, for periodic evaluation "
                                      "(0 = all)")
    checkpoint_every: int = option(500, "write a resumable checkpoint every N steps")
    keep_checkpoints: int = option(2, "periodic checkpoints to keep")
    device: str = option("auto", "auto | cpu | cuda")
    compile: bool = option(False, "torch.compile the model (faster steps after a one-off compile)")
    max_minutes: float = option(0.0, "stop early after this many minutes, still writing the final checkpoint (0 = off)")
    stop_at_step: int = option(0, "stop at this step with a resumable checkpoint, keeping the max_steps schedule "
                                  "(0 = run to max_steps); --resume continues")
    cache_dir: str = option(".runs/token-cache", "where tokenised data is cached between runs")


PRESETS: dict[str, dict[str, Any]] = {
    # the bundled default model: modern decoder-only layout, trained on the standard library's Python
    "default-code": dict(data="python-stdlib", vocab_size=6144, hidden_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=704, seq_len=256,
                         batch_size=16, max_steps=2600, lr=2e-3, warmup_steps=200, compile=True, max_minutes=88),
    # the original Transformer (encoder-decoder, post-norm, sinusoidal, ReLU) learning numbers -> words
    "seq2seq-numbers": dict(data="numbers-to-words", vocab_size=512, split_digits=True, hidden_size=128,
                            num_hidden_layers=3, num_encoder_layers=3, num_attention_heads=4, intermediate_size=512,
                            position_embedding="sinusoidal", norm_type="layernorm", norm_position="post",
                            activation="relu", bias=True, scale_embedding=True, seq_len=64, batch_size=128,
                            max_steps=4000, lr=1e-3, warmup_steps=300, weight_decay=0.01, beta2=0.98,
                            eval_every=250, eval_bytes=5000, checkpoint_every=500),
    # seconds-long runs for tests
    "tiny": dict(data="python-stdlib", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, seq_len=64, batch_size=8, max_steps=60, lr=3e-3, warmup_steps=10,
                 eval_every=30, eval_bytes=20_000, checkpoint_every=30),
}
