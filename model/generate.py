"""Greedy generation from a checkpoint directory, streamed to the terminal.

    python -m model.generate --checkpoint DIR --prompt "def fib(n):" --max-new-tokens 64

This is the plain single-sequence loop (prefill once, then one token per step with the KV cache); the
service's engine does the same for many sequences at once. Encoder-decoder checkpoints take the prompt
as the source text and decode from BOS until EOS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Collection

import torch

from model.checkpoint import load_checkpoint
from model.config import DTYPES
from model.kv_cache import CacheRows, KVCache
from model.model import Transformer
from model.tokenizer import IncrementalDetokenizer


@torch.inference_mode()
def greedy_generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_id: int | Collection[int] | None = None,
    source_ids: list[int] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Greedy decoding with a KV cache: the new token ids (stopping after EOS, which is not returned; `eos_id` may
    be several ids).

    For encoder-decoder models `source_ids` is the encoder input and `prompt_ids` the decoder prefix
    (usually just [BOS])."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    stop_ids = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    device = model.device
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings)
    cache_kwargs = {}
    if model.config.is_encoder_decoder:
        if not source_ids:
            raise ValueError("an encoder-decoder model needs source_ids")
        cache_kwargs["max_source_len"] = len(source_ids)
    cache = KVCache(model.config, 1, max_len, device=device, dtype=model.embed_tokens.weight.dtype, **cache_kwargs)
    if model.config.is_encoder_decoder:
        source = torch.tensor([source_ids], device=device)
        lengths = torch.tensor([len(source_ids)], device=device)
        model.write_cross_cache(cache, torch.tensor([0], device=device), model.encode(source, lengths), lengths)

    if len(prompt_ids) >= model.config.max_position_embeddings:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the model's context "
                         f"of {model.config.max_position_embeddings}")
    tokens = torch.tensor([prompt_ids], device=device)  # (1, T)
    positions = torch.arange(len(prompt_ids), device=device)[None]  # (1, T)
    out: list[int] = []
    for _ in range(max_new_tokens):
        last = torch.tensor([tokens.shape[1] - 1], device=device)
        next_id = int(model(tokens, positions, CacheRows(cache), logits_at=last).argmax(-1))
        if next_id in stop_ids:
            break
        out.append(next_id)
        if on_token is not None:
            on_token(next_id)
        next_position = int(positions[0, -1]) + 1
        if next_position >= max_len:  # the context is full
            break
        tokens = torch.tensor([[next_id]], device=device)
        positions = torch.tensor([[next_position]], device=device)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, ...)")
    parser.add_argument("--prompt", required=True, help="text to continue (the source text for encoder-decoder models)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="convert the weights at load (default: as stored)")
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    tok, gen = ckpt.tokenizer, ckpt.generation
    detok = IncrementalDetokenizer(tok)
    if ckpt.config.is_encoder_decoder:
        start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else gen.bos_token_id
        prompt_ids, source_ids = [start], tok.encode(args.prompt, add_eos=tok.eos_id is not None)
    else:
        prompt_ids, source_ids = tok.encode(args.prompt), None
        if not prompt_ids and gen.bos_token_id is not None:
            prompt_ids = [gen.bos_token_id]
        sys.stdout.write(args.prompt)
    greedy_generate(ckpt.model, prompt_ids, args.max_new_tokens, eos_id=gen.eos_token_ids, source_ids=source_ids,
                    on_token=lambda t: sys.stdout.write(detok.push(t)) and sys.stdout.flush())
    sys.stdout.write(detok.flush() + "\n")


if __name__ == "__main__":
    main()
