"""Writes a randomly initialised checkpoint directory: for trying the tools before any training.

    python -m model.training.init --preset tiny-llama --out runs/random
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.config import ARCHITECTURES, ModelConfig
from model.model import Transformer
from model.tokenizer import Tokenizer


def stdlib_sample(max_files: int = 40) -> list[str]:
    """A few standard-library sources: text to train a tokenizer on with nothing downloaded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:max_files]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-llama", choices=sorted(ARCHITECTURES), help="architecture")
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (default 1024)")
    parser.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one on stdlib text")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    args = parser.parse_args(argv)

    tokenizer = (Tokenizer.from_file(args.tokenizer) if args.tokenizer
                 else Tokenizer.train(stdlib_sample(), vocab_size=args.vocab_size))
    torch.manual_seed(args.seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **ARCHITECTURES[args.preset])
    model = Transformer(config)
    save_checkpoint(args.out, model, tokenizer)
    print(f"wrote {args.out}: {args.preset}, {model.num_parameters():,} parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
