"""Corpora and the tokenised-data pipeline for ``python -m model.training.train``.

Three kinds of data feed the trainer:

* ``python-stdlib``: the running interpreter's standard library, split by file so that held-out
  files are never trained on (a fair test of generalisation to unseen code);
* ``numbers-to-words``: an endless supply of (digits, words) pairs for encoder-decoder models, with
  a fixed held-out set that the training sampler provably never yields;
* any other text files / JSONL given by path or glob.

Text is tokenised once into a flat array of token ids (documents separated by EOS) stored on disk
and memory-mapped, keyed by a hash of the tokenizer and the corpus so re-runs skip tokenisation.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import sysconfig
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Document = tuple[str, str]  # (name, text)

STDLIB_PRESET = "python-stdlib"
NUMBERS_PRESET = "numbers-to-words"
_EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
_ENCODE_CHUNK = 256

# ---------------------------------------------------------------------------------------------------------------------
# Python standard library preset


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib's ``.py`` files, sorted by relative path; test suites, IDLE and third-party packages are skipped
    because they would dominate the corpus with code that is not representative of the library itself."""
    root = stdlib_root() if root is None else Path(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]  # prune: site-packages can be huge
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and os.path.isfile(os.path.join(dirpath, f))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_every_nth(items: Sequence, n: int = 20) -> tuple[list, list]:
    """Split into (train, heldout), holding out items ``n-1, 2n-1, ...``: deterministic and spread over the corpus."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    train = [x for i, x in enumerate(items) if i % n != n - 1]
    heldout = [x for i, x in enumerate(items) if i % n == n - 1]
    return train, heldout


# ---------------------------------------------------------------------------------------------------------------------
# numbers-to-words preset

NUMBERS_MAX = 999_999_999
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000, "million"), (1_000, "thousand"))


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        words.append(_TENS[rest // 10])
        if rest % 10:
            words.append(_ONES[rest % 10])
    elif rest:
        words.append(_ONES[rest])
    return words


def number_to_words(n: int) -> str:
    """American English words for ``0 <= n <= NUMBERS_MAX``, without "and", hyphens or commas (a plain target)."""
    if not 0 <= n <= NUMBERS_MAX:
        raise ValueError(f"number must be in 0..{NUMBERS_MAX}, got {n}")
    if n == 0:
        return "zero"
    words: list[str] = []
    for scale, name in _SCALES:
        group, n = divmod(n, scale)
        if group:
            words += [*_below_thousand(group), name]
    words += _below_thousand(n)
    return " ".join(words)


def numbers_heldout(seed: int = 20240613, size: int = 2000) -> list[int]:
    """A fixed, sorted set of distinct numbers drawn uniformly from the whole range, for evaluation only."""
    return sorted(random.Random(seed).sample(range(NUMBERS_MAX + 1), size))


class NumberSampler:
    """Draws training numbers: a digit count uniform in 1..9, then a uniform number of that length.

    Uniform over digit counts (not over values) so short numbers are not vanishingly rare. Held-out
    numbers are redrawn, so they are never seen in training. Deterministic for a seed; ``state()`` /
    ``set_state()`` let a resumed run continue the exact same stream.
    """

    def __init__(self, heldout: Collection[int], seed: int) -> None:
        self.heldout = frozenset(heldout)
        self._rng = random.Random(seed)

    def sample(self) -> int:
        while True:
            digits = self._rng.randint(1, 9)
            low = 0 if digits == 1 else 10 ** (digits - 1)
            n = self._rng.randint(low, 10**digits - 1)
            if n not in self.heldout:
                return n

    def state(self) -> object:
        return self._rng.getstate()

    def set_state(self, state: object) -> None:
        self._rng.setstate(state)  # type: ignore[arg-type]


def number_pairs(numbers: Iterable[int]) -> list[tuple[str, str]]:
    """(digits, words) source/target pairs, e.g. ``("40213", "forty thousand two hundred thirteen")``."""
    return [(str(n), number_to_words(n)) for n in numbers]


# ---------------------------------------------------------------------------------------------------------------------
# Generic text corpora


def _read_jsonl(path: str, text_field: str) -> list[tuple[tuple[str, int], str]]:
    docs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{lineno}: no string field {text_field!r}")
            docs.append(((path, lineno), record[text_field]))
    return docs


def read_text_sources(spec: str, text_field: str = "text") -> list[Document]:
    """Documents from a comma-separated list of paths/globs; ``.jsonl`` gives one document per line.

    Ordered by file path, then line number (so ``x.jsonl:2`` precedes ``x.jsonl:10``); the order fixes the split.
    """
    paths: set[str] = set()
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"text source pattern {pattern!r} matches no files")
        paths.update(matches)
    if not paths:
        raise ValueError(f"no text sources in {spec!r}")
    keyed: list[tuple[tuple[str, int], str]] = []
    for path in paths:
        if path.endswith(".jsonl"):
            keyed += _read_jsonl(path, text_field)
        else:
            keyed.append(((path, 0), Path(path).read_text(encoding="utf-8", errors="replace")))
    keyed.sort(key=lambda kv: kv[0])
    return [(f"{path}:{lineno}" if lineno else path, text) for (path, lineno), text in keyed]


@dataclass
class TextCorpus:
    name: str
    train: list[Document]
    heldout: list[Document]


def load_text_corpus(spec: str, heldout_every: int = 20, text_field: str = "text") -> TextCorpus:
    """The ``python-stdlib`` preset or the files named by ``spec``, split into train / held-out documents."""
    if spec == STDLIB_PRESET:
        root = stdlib_root()
        documents = [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
                     for p in stdlib_files(root)]
    else:
        documents = read_text_sources(spec, text_field)
    train, heldout = split_every_nth(documents, heldout_every)
    return TextCorpus(name=spec, train=train, heldout=heldout)


def heldout_bytes(corpus: TextCorpus) -> int:
    """UTF-8 size of the held-out text: the denominator of bits per byte, which is comparable across tokenizers."""
    return sum(len(text.encode("utf-8")) for _, text in corpus.heldout)


# ---------------------------------------------------------------------------------------------------------------------
# Token files


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for the ids: halves disk and page-cache use for vocabularies up to 65536."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap cannot map an empty file (e.g. a tiny corpus has no held-out docs)
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def tokenize_documents(documents: Sequence[Document], tokenizer: Tokenizer, path: Path) -> np.ndarray:
    """Write the documents' ids, each followed by EOS, as one flat array to ``path`` and memory-map it.

    Written to a temporary file and renamed, so an interrupted run never leaves a truncated file that a
    later run would take for a valid cache entry.
    """
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for start in range(0, len(documents), _ENCODE_CHUNK):
                texts = [text for _, text in documents[start : start + _ENCODE_CHUNK]]
                for ids in tokenizer.encode_batch(texts):
                    ids.append(eos)
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return _open_tokens(path, dtype)


def token_cache_key(documents: Iterable[Document], tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer JSON and every document's name and text (length-prefixed, so it is unambiguous)."""
    h = hashlib.sha256(b"lmserve-tokens-v1\0")
    for part in (tokenizer.backend.to_str(), *(s for doc in documents for s in doc)):
        data = part.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def token_cache_path(documents: Iterable[Document], tokenizer: Tokenizer, cache_dir: Path, split: str) -> Path:
    """Where :func:`cached_token_file` keeps the ids of ``documents`` for ``split``."""
    key = token_cache_key(documents, tokenizer)
    return Path(cache_dir) / f"{split}-{key[:16]}.{token_dtype(tokenizer.vocab_size).name}.bin"


def cached_token_file(documents: Sequence[Document], tokenizer: Tokenizer, cache_dir: Path, split: str) -> np.ndarray:
    """Token ids of ``documents``, read from the cache when the same tokenizer already tokenised the same corpus."""
    path = token_cache_path(documents, tokenizer, cache_dir, split)
    if path.exists():
        log.info("reusing token file %s", path)
        return _open_tokens(path, token_dtype(tokenizer.vocab_size))
    log.info("tokenising %d documents into %s", len(documents), path)
    return tokenize_documents(documents, tokenizer, path)


# ---------------------------------------------------------------------------------------------------------------------
# Batches


def sample_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, seq_len) int64 input windows and their next-token targets (inputs shifted by one)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator).numpy()
    index = starts[:, None] + np.arange(seq_len + 1)
    chunk = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def sequential_windows(tokens: np.ndarray, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (1, <=seq_len) windows in which every token but the first is a target exactly once.

    Each window's input starts at the last target of the previous one, so held-out loss is summed over
    every token once, deterministically.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    start = 0
    while start < len(tokens) - 1:
        end = min(start + seq_len, len(tokens) - 1)
        chunk = torch.from_numpy(np.asarray(tokens[start : end + 1], dtype=np.int64))
        yield chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
        start = end
