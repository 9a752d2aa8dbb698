"""Peak resident memory while loading a checkpoint of at least 400M parameters, against the size of the model as
served: ours (`load_checkpoint`) and transformers' `from_pretrained` side by side, each in a fresh process.

    python bench/load_memory.py                      # a 419M-parameter Llama-layout checkpoint, stored in bfloat16
    python bench/load_memory.py --stored float32 --layers 30

The checkpoint (random weights) is written once under --dir and reused. Each load runs in its own Python process;
the figure is the growth of its peak resident set (VmHWM) over what the process held before loading (Python, torch,
transformers imported), divided by the served model's bytes (parameters x the served dtype's size). Goal: <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEASURE = r"""
import json, sys, torch
import transformers  # imported before the baseline for both loaders, so neither is charged for it
from model.checkpoint import load_checkpoint

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0][:-1], int(line.split()[1]) * 1024

def rss():
    return dict(hwm())["VmRSS"]

directory, loader, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
before = rss()
if loader == "lmserve":
    model = load_checkpoint(directory, dtype=dtype).model
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
served = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": dict(hwm())["VmHWM"], "after": rss(), "served": served,
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""


def make_checkpoint(directory: Path, layers: int, stored: str) -> None:
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.model import Transformer
    from model.tokenizer import Tokenizer

    config = ModelConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                         intermediate_size=2816, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(config).to(getattr(torch, stored))
    tokenizer = Tokenizer.train(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    save_checkpoint(directory, model, tokenizer)


def measure(directory: Path, loader: str, dtype: str) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(directory), loader, dtype], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    if result.returncode:
        raise SystemExit(f"{loader} failed to load:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lmserve-bench-load-memory")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30: 419M parameters)")
    parser.add_argument("--stored", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--served", nargs="+", default=["float32", "bfloat16"], help="dtypes to load into")
    args = parser.parse_args()
    directory = args.dir / f"{args.layers}-layers-{args.stored}"
    if not (directory / "model.safetensors").is_file():
        print(f"writing the checkpoint to {directory} ...", flush=True)
        make_checkpoint(directory, args.layers, args.stored)
    size = (directory / "model.safetensors").stat().st_size
    print(f"checkpoint: {directory} ({size / 2**20:,.0f} MiB of {args.stored} weights)")
    print("| loader | served as | parameters | served MiB | peak growth MiB | peak / served |")
    print("|---|---|---|---|---|---|")
    for dtype in args.served:
        for loader in ("lmserve", "transformers"):
            m = measure(directory, loader, dtype)
            growth = m["peak"] - m["before"]
            print(f"| {loader} | {dtype} | {m['parameters'] / 1e6:,.0f}M | {m['served'] / 2**20:,.0f} | "
                  f"{growth / 2**20:,.0f} | {growth / m['served']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
