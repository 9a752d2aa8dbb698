"""Offline training: makes the checkpoint directories the service loads.

    python -m model.training.train --preset default-code --out runs/default
    python -m model.training.train --preset seq2seq-numbers --out runs/numbers
    python -m model.training.train --preset default-code --out runs/default --resume      # continue the latest
    torchrun --nproc_per_node=2 -m model.training.train --preset default-code --out runs/ddp   # data parallel

Every option of a preset can be overridden on the command line (`--help` lists them). The run directory
gets `checkpoint-STEP/` directories (periodic, resumable), `final/` (what to ship), `metrics.csv` and
`loss_curve.png`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import Architecture, ModelConfig
from model.model import Transformer
from model.training.config import PRESETS, TrainConfig
from model.training.tasks import Task, make_task

try:
    from tqdm import tqdm
except ImportError as e:  # the server's install leaves out what only training needs
    raise ImportError("training needs the 'train' extra: pip install 'lmserve[train]'") from e


def model_config(cfg: TrainConfig, task: Task) -> ModelConfig:
    arch = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Architecture)}
    tok = task.tokenizer
    return ModelConfig(**arch | dict(vocab_size=tok.vocab_size, max_position_embeddings=task.max_positions,
                                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included) but not on norms and biases."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())  # tied weights once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio x lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- resumable state: safetensors + JSON, never pickle ----------------------------------------------------


def save_train_state(directory: Path, optimizer: torch.optim.Optimizer, step: int, task: Task,
                     cfg: TrainConfig) -> None:
    state = optimizer.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, s in state["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = task.generator.get_state()
    save_file(tensors, str(directory / "train_state.safetensors"))
    meta = {"step": step, "param_groups": state["param_groups"], "config": dataclasses.asdict(cfg),
            "task": task.state()}
    (directory / "train_state.json").write_text(json.dumps(meta))


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer, task: Task) -> int:
    tensors = load_file(str(directory / "train_state.safetensors"))
    meta = json.loads((directory / "train_state.json").read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("rng."):
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    task.generator.set_state(tensors["rng.data"])
    task.set_state(meta["task"])
    return int(meta["step"])


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


# ---- the loop ----------------------------------------------------------------------------------------------


class Metrics:
    """metrics.csv (appended, so a resumed run continues the curve) and the loss-curve PNG."""

    COLUMNS = ["step", "tokens", "elapsed_s", "lr", "train_loss", "heldout_loss", "heldout_perplexity",
               "heldout_bits_per_byte", "exact_match"]

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.COLUMNS)

    def truncate_after(self, step: int) -> None:
        """Drops rows an interrupted run logged after its last checkpoint, so the resumed curve continues it."""
        rows = [r for r in csv.DictReader(self.path.open()) if int(r["step"]) <= step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def last(self, column: str) -> float:
        rows = list(csv.DictReader(self.path.open()))
        return float(rows[-1][column]) if rows else 0.0

    def write(self, **row: Any) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.COLUMNS])

    def plot(self, png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(csv.DictReader(self.path.open()))
        train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
        held = [(int(r["step"]), float(r["heldout_loss"])) for r in rows if r["heldout_loss"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if held:
            ax.plot(*zip(*held), "o-", label="held-out", linewidth=1.5)
        ax.set(xlabel="step", ylabel="loss (nats/token)", title=self.path.parent.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(cfg: TrainConfig, out: Path, resume: bool = False) -> Path:
    """Runs training; returns the final checkpoint directory."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    device = pick_device(cfg.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    main_process = rank == 0
    out.mkdir(parents=True, exist_ok=True)

    resume_from = latest_checkpoint(out) if resume else None
    torch.manual_seed(cfg.seed)
    task = make_task(cfg, out, resume_from, main_process, distributed)
    if resume_from is not None:
        model = load_checkpoint(resume_from, device=device, dtype=torch.float32).model
    else:
        model = Transformer(model_config(cfg, task)).to(device)
    model.train()
    optimizer = make_optimizer(model, cfg)
    step = load_train_state(resume_from, optimizer, task) if resume_from is not None else 0

    forward = model
    if distributed:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    if cfg.compile:
        forward = torch.compile(forward)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    metrics = Metrics(out / "metrics.csv") if main_process else None
    if main_process:
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        print(f"{model.num_parameters():,} parameters, {cfg.max_steps} steps from step {step}, device {device}, "
              f"{world} process(es)", file=sys.stderr)

    start_time, tokens_seen = time.time(), 0
    if metrics is not None and resume_from is not None:
        metrics.truncate_after(step)
        start_time -= metrics.last("elapsed_s")
        tokens_seen = int(metrics.last("tokens"))
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not main_process, dynamic_ncols=True, smoothing=0.1,
                    mininterval=0.1 if sys.stderr.isatty() else 10)
    stop_at = min(cfg.stop_at_step or cfg.max_steps, cfg.max_steps)
    while step < stop_at:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = task.train_batch(rank, world)
            sync = not distributed or micro == cfg.grad_accum - 1
            args, kwargs = batch.inputs(device)
            with autocast, (forward.no_sync() if distributed and not sync and not cfg.compile else nullcontext()):
                logits = forward(*args, **kwargs)
                loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.to(device).flatten(), ignore_index=-100)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
            tokens_seen += batch.num_tokens * world
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        train_loss = float(loss_sum)
        elapsed = time.time() - start_time
        out_of_time = cfg.max_minutes > 0 and elapsed > cfg.max_minutes * 60
        last = out_of_time or step == stop_at
        progress.update(1)
        progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_seen / elapsed:,.0f}", lr=f"{lr:.2e}",
                             refresh=False)
        if main_process:
            row = dict(step=step, tokens=tokens_seen, elapsed_s=f"{elapsed:.1f}", lr=f"{lr:.3e}",
                       train_loss=f"{train_loss:.5f}")
            if step % cfg.eval_every == 0 or last:
                model.eval()
                result = task.evaluate(model, limit=cfg.eval_bytes)
                model.train()
                row.update(heldout_loss=f"{result.loss:.5f}", heldout_perplexity=f"{result.perplexity:.4f}",
                           heldout_bits_per_byte=f"{result.bits_per_byte:.5f}",
                           exact_match="" if result.exact_match is None else f"{result.exact_match:.4f}")
                progress.write(f"step {step}: held-out loss {result.loss:.4f}, bits/byte {result.bits_per_byte:.4f}"
                               + (f", exact match {result.exact_match:.4f}" if result.exact_match is not None else ""),
                               file=sys.stderr)
            metrics.write(**row)
            if step % cfg.checkpoint_every == 0 or last:
                directory = out / f"checkpoint-{step}"
                save_checkpoint(directory, model, task.tokenizer)
                save_train_state(directory, optimizer, step, task, cfg)
                for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[
                        :-cfg.keep_checkpoints]:
                    shutil.rmtree(old)
        if out_of_time:
            break
    progress.close()
    final = out / "final"
    if main_process:
        save_checkpoint(final, model, task.tokenizer)
        metrics.plot(out / "loss_curve.png")
        print(f"wrote {final} after {step} steps in {time.time() - start_time:.0f} s", file=sys.stderr)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return final


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default-code", choices=sorted(PRESETS),
                        help="named configuration; the options below override it (default: default-code)")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics.csv, loss_curve.png)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    groups = {True: parser.add_argument_group("model architecture (model/config.py)"),
              False: parser.add_argument_group("data and optimisation")}
    architecture, hints = {f.name for f in dataclasses.fields(Architecture)}, typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        group, flag, help_text = groups[f.name in architecture], "--" + f.name.replace("_", "-"), f.metadata["help"]
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
        kind = int if f.name == "num_key_value_heads" else type(f.default) if f.default is not None else str
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=choices, default=None,
                               help=f"{help_text} (default {f.default})")
    args = parser.parse_args(argv)
    values = PRESETS[args.preset] | {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                                     if getattr(args, f.name) is not None}
    return TrainConfig(**values), Path(args.out), args.resume


def main(argv: list[str] | None = None) -> None:
    cfg, out, resume = parse_args(argv)
    train(cfg, out, resume)


if __name__ == "__main__":
    main()
