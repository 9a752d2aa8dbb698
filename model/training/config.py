"""What a training run is told: `TrainConfig` (every field is a `--flag` of `python -m model.training.train`) and
the named presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = _opt("python-stdlib", "'python-stdlib', 'numbers-to-words', or comma-separated text/JSONL files or "
                                      "globs (every 20th document is held out)")
    text_field: str = _opt("text", "field holding the text in JSONL files")
    tokenizer: str | None = _opt(None, "reuse this tokenizer.json instead of training a byte-level BPE")
    vocab_size: int = _opt(6144, "BPE vocabulary size when training a tokenizer (includes 3 special tokens)")
    split_digits: bool = _opt(False, "make every digit its own token")
    # model architecture (see model/config.py)
    hidden_size: int = _opt(256, "model width")
    num_hidden_layers: int = _opt(6, "decoder layers")
    num_encoder_layers: int = _opt(0, "encoder layers (> 0 trains an encoder-decoder)")
    num_attention_heads: int = _opt(4, "attention heads")
    num_key_value_heads: int | None = _opt(None, "key/value heads (grouped-query attention); default = heads")
    intermediate_size: int = _opt(704, "FFN hidden width")
    position_embedding: str = _opt("rope", "rope | learned | sinusoidal")
    rope_theta: float = _opt(10000.0, "RoPE base")
    norm_type: str = _opt("rmsnorm", "rmsnorm | layernorm")
    norm_position: str = _opt("pre", "pre (modern) | post (the original Add & Norm)")
    activation: str = _opt("swiglu", "relu | gelu | gelu_tanh | swiglu")
    tie_word_embeddings: bool = _opt(True, "share the token embedding with the output Linear")
    bias: bool = _opt(False, "biases in linear layers and LayerNorm")
    scale_embedding: bool = _opt(False, "multiply token embeddings by sqrt(hidden_size)")
    dropout: float = _opt(0.0, "dropout on embeddings, attention and residual branches")
    # optimisation
    seq_len: int = _opt(256, "training context (also the checkpoint's max_position_embeddings for text data)")
    batch_size: int = _opt(16, "sequences (or number pairs) per micro-batch, summed over all processes")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_steps: int = _opt(3000, "optimizer steps")
    lr: float = _opt(2e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = _opt(200, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = _opt(1337, "seed for weights, data order and dropout")
    # bookkeeping
    eval_every: int = _opt(250, "evaluate on held-out data every N steps (and at the end)")
    eval_bytes: int = _opt(100_000, "held-out bytes (text), or 10 x held-out numbers, for periodic evaluation "
                                    "(0 = all)")
    checkpoint_every: int = _opt(500, "write a resumable checkpoint every N steps")
    keep_checkpoints: int = _opt(2, "periodic checkpoints to keep")
    device: str = _opt("auto", "auto | cpu | cuda")
    compile: bool = _opt(False, "torch.compile the model (faster steps after a one-off compile)")
    max_minutes: float = _opt(0.0, "stop early after this many minutes, still writing the final checkpoint (0 = off)")
    stop_at_step: int = _opt(0, "stop at this step with a resumable checkpoint, keeping the max_steps schedule "
                                "(0 = run to max_steps); --resume continues")
    cache_dir: str = _opt(".runs/token-cache", "where tokenised data is cached between runs")


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
