"""Held-out evaluation: loss, perplexity, bits per byte, exact match, beside gzip and xz.

    python -m model.training.evaluate --checkpoint checkpoints/default --data python-stdlib [--limit-bytes 200000]
    python -m model.training.evaluate --checkpoint checkpoints/seq2seq-numbers --data numbers-to-words

The last line printed is machine-readable, e.g. `RESULT bits_per_byte=1.13 xz_bits_per_byte=1.66 ...`.
The trainer calls the same functions, so the model card's figures and the training log agree.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint
from model.kv_cache import CacheRows, KVCache
from model.model import Source, Transformer
from model.tokenizer import Tokenizer
from model.training.data import NUMBERS_PRESET, Document, load_text_corpus, number_pairs, numbers_heldout

LN2 = math.log(2)
MAX_WORDS_TOKENS = 48  # longest number in words is 15 words; a fixed cap, never the reference length


@dataclass
class EvalResult:
    nats: float  # summed negative log-likelihood
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the text those tokens spell
    exact_match: float | None = None

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nats / LN2 / max(self.bytes, 1)


def text_prefix(documents: list[Document], limit_bytes: int | None) -> list[Document]:
    """The held-out documents in order, cut after `limit_bytes` UTF-8 bytes (on a character boundary); 0 = all."""
    if not limit_bytes:
        return documents
    out, left = [], limit_bytes
    for name, text in documents:
        data = text.encode()
        if len(data) >= left:
            out.append((name, data[:left].decode(errors="ignore")))
            break
        out.append((name, text))
        left -= len(data)
    return out


def tokenize_stream(documents: list[Document], tokenizer: Tokenizer) -> np.ndarray:
    """Documents -> one token stream with EOS after each, as the trainer sees them."""
    ids: list[int] = []
    for encoded in tokenizer.encode_batch([text for _, text in documents]):
        ids.extend(encoded)
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


@torch.no_grad()
def lm_loss(model: Transformer, tokens: np.ndarray, seq_len: int, batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token NLL over a token stream, each token predicted exactly once.

    Windows of seq_len overlap by half, and only a window's second half is scored (the first window scores
    everything), so every prediction sees at least seq_len / 2 tokens of context."""
    stride, n = max(seq_len // 2, 1), len(tokens)
    spans: list[tuple[int, int, int]] = []  # (start, end, scored_until): inputs tokens[start:end]
    scored_until, start = 0, 0
    while scored_until < n - 1:
        end = min(start + seq_len, n - 1)
        spans.append((start, end, scored_until))  # scores targets tokens[scored_until + 1 : end + 1]
        scored_until, start = end, start + stride
    data = torch.from_numpy(tokens)
    total, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        group = spans[i:i + batch_size]
        width = max(end - start for start, end, _ in group)
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (start, end, done) in enumerate(group):
            inputs[row, :end - start] = data[start:end]
            targets[row, done - start:end - start] = data[done + 1:end + 1]
        logits = model(inputs.to(model.device))  # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(model.device), reduction="sum")
        total += float(nll)
        count += int((targets != -100).sum())
    return total, count


def evaluate_text(model: Transformer, tokenizer: Tokenizer, documents: list[Document], seq_len: int,
                  limit_bytes: int | None = None) -> EvalResult:
    documents = text_prefix(documents, limit_bytes)
    nats, count = lm_loss(model, tokenize_stream(documents, tokenizer), seq_len)
    return EvalResult(nats=nats, tokens=count, bytes=sum(len(t.encode()) for _, t in documents))


@torch.no_grad()
def greedy_decode_batch(model: Transformer, sources: list[list[int]], start_id: int, eos_id: int,
                        max_new_tokens: int) -> list[list[int]]:
    """Encoder-decoder greedy decoding for a batch of sources, from the start token until EOS."""
    device, B = model.device, len(sources)
    src_len = max(len(s) for s in sources)
    source = torch.zeros(B, src_len, dtype=torch.long)
    for i, s in enumerate(sources):
        source[i, :len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in sources], device=device)
    cache = KVCache(model.config, B, max_new_tokens + 1, device=device, dtype=model.embed_tokens.weight.dtype,
                    max_source_len=src_len)
    rows = torch.arange(B, device=device)
    model.write_cross_cache(cache, rows, model.encode(source.to(device), lengths), lengths)
    tokens = torch.full((B, 1), start_id, device=device)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    zero = torch.zeros(B, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        positions = torch.full((B, 1), step, device=device)
        tokens = model(tokens, positions, CacheRows(cache, kv_len=step + 1), logits_at=zero).argmax(-1)[:, None]
        for i in (~done).nonzero().flatten().tolist():
            if int(tokens[i]) == eos_id:
                done[i] = True
            else:
                outputs[i].append(int(tokens[i]))
        if bool(done.all()):
            break
    return outputs


def seq2seq_batch(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
    """Teacher forcing: sources + EOS; decoder input BOS + target, labels target + EOS; -1 positions pad."""
    src = [tokenizer.encode(s, add_eos=True) for s, _ in pairs]
    tgt = [tokenizer.encode(t) for _, t in pairs]
    B, S, T = len(pairs), max(map(len, src)), max(map(len, tgt)) + 1
    source = torch.zeros(B, S, dtype=torch.long)
    decoder_in = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src, tgt)):
        source[i, :len(s)] = torch.tensor(s)
        decoder_in[i, :len(t) + 1] = torch.tensor([tokenizer.bos_id, *t])
        labels[i, :len(t) + 1] = torch.tensor([*t, tokenizer.eos_id])
        positions[i, :len(t) + 1] = torch.arange(len(t) + 1)
    return source, torch.tensor([len(s) for s in src]), decoder_in, positions, labels


@torch.no_grad()
def evaluate_numbers(model: Transformer, tokenizer: Tokenizer, numbers: list[int], batch_size: int = 500,
                     exact_match: bool = True) -> EvalResult:
    """Held-out loss on the target words (teacher forcing) and greedy exact-match accuracy."""
    device = model.device
    nats, count, nbytes, correct = 0.0, 0, 0, 0
    for i in range(0, len(numbers), batch_size):
        pairs = number_pairs(numbers[i:i + batch_size])
        source, lengths, decoder_in, positions, labels = (t.to(device) for t in seq2seq_batch(tokenizer, pairs))
        logits = model(decoder_in, positions, source=Source(source, lengths))
        nats += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
        nbytes += sum(len(words.encode()) + 1 for _, words in pairs)  # +1: the end of the sequence
        if exact_match:
            decoded = greedy_decode_batch(model, [tokenizer.encode(s, add_eos=True) for s, _ in pairs],
                                          tokenizer.bos_id, tokenizer.eos_id, max_new_tokens=MAX_WORDS_TOKENS)
            correct += sum(tokenizer.decode(out) == words for out, (_, words) in zip(decoded, pairs))
    return EvalResult(nats=nats, tokens=count, bytes=nbytes,
                      exact_match=correct / len(numbers) if exact_match else None)


def compressed_bits_per_byte(documents: list[Document]) -> dict[str, float]:
    data = b"".join(text.encode() for _, text in documents)
    return {
        "gzip_bits_per_byte": 8 * len(gzip.compress(data, compresslevel=9)) / len(data),
        "xz_bits_per_byte": 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--data", required=True,
                        help="'python-stdlib', 'numbers-to-words', or text files/globs (the same split as training)")
    parser.add_argument("--limit-bytes", type=int, default=None,
                        help="evaluate only a deterministic prefix of this many held-out bytes (text data), "
                             "or the first N/10 held-out numbers (numbers-to-words)")
    parser.add_argument("--seq-len", type=int, default=None, help="context window (default: the model's maximum)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint, device=args.device)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    print(f"checkpoint {args.checkpoint}: {model.num_parameters():,} parameters")
    if args.data == NUMBERS_PRESET:
        numbers = numbers_heldout()
        if args.limit_bytes:
            numbers = numbers[:max(1, args.limit_bytes // 10)]
        result = evaluate_numbers(model, tokenizer, numbers)
        print(f"held-out numbers: {len(numbers)}")
        print(f"loss {result.loss:.4f} nats/token  perplexity {result.perplexity:.3f}  "
              f"bits/byte {result.bits_per_byte:.4f}  exact match {result.exact_match:.4f}")
        print(f"RESULT exact_match={result.exact_match:.4f} loss={result.loss:.4f} "
              f"bits_per_byte={result.bits_per_byte:.4f}")
        return
    documents = text_prefix(load_text_corpus(args.data).heldout, args.limit_bytes)
    seq_len = args.seq_len or model.config.max_position_embeddings
    result = evaluate_text(model, tokenizer, documents, seq_len)
    baselines = compressed_bits_per_byte(documents)
    print(f"held-out: {len(documents)} documents, {result.bytes:,} bytes, {result.tokens:,} tokens")
    print(f"loss {result.loss:.4f} nats/token  perplexity {result.perplexity:.3f}  bits/byte {result.bits_per_byte:.4f}"
          f"  (xz -9e {baselines['xz_bits_per_byte']:.4f}, gzip -9 {baselines['gzip_bits_per_byte']:.4f})")
    print(f"RESULT bits_per_byte={result.bits_per_byte:.4f} xz_bits_per_byte={baselines['xz_bits_per_byte']:.4f} "
          f"gzip_bits_per_byte={baselines['gzip_bits_per_byte']:.4f} loss={result.loss:.4f}")


if __name__ == "__main__":
    main()
