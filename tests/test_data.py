"""Corpora and token pipeline: stdlib split, numbers-to-words, text sources, cached token files, batch windows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import model.training.data as data
from model.tokenizer import EOS_TOKEN, Tokenizer
from model.training.data import (
    NUMBERS_MAX,
    NumberSampler,
    cached_token_file,
    heldout_bytes,
    load_text_corpus,
    number_pairs,
    number_to_words,
    numbers_heldout,
    read_text_sources,
    sample_windows,
    sequential_windows,
    split_every_nth,
    stdlib_files,
    stdlib_root,
    token_dtype,
    tokenize_documents,
)

DOCS = [
    ("a.py", "def add(a, b):\n    return a + b\n"),
    ("b.txt", "print('hello, world')\n"),
    ("c.txt", "数字 1234 🚀 and some more words"),
    ("d.txt", ""),
    ("e.txt", "the quick brown fox jumps over the lazy dog\n" * 3),
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([text for _, text in DOCS] * 20, vocab_size=300)


# --- python-stdlib ---------------------------------------------------------------------------------------------------


def test_stdlib_files_are_filtered_sorted_and_non_empty():
    root = stdlib_root()
    files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100
    assert rel == sorted(rel)
    assert len(set(rel)) == len(rel)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    for r in rel:
        assert not {"test", "tests", "idlelib", "site-packages"} & set(r.split("/")[:-1]), r
    assert "os.py" in rel and "json/__init__.py" in rel


def test_stdlib_files_exclusions_on_a_fake_tree(tmp_path):
    for rel in ["b.py", "a.py", "pkg/z.py", "pkg/tests/t.py", "test/x.py", "idlelib/i.py", "site-packages/s.py",
                "pkg/test/deep/y.py", "pkg/notes.txt", "testing.py", "pkg/test_helpers.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    rel = [f.relative_to(tmp_path).as_posix() for f in stdlib_files(tmp_path)]
    assert rel == ["a.py", "b.py", "pkg/test_helpers.py", "pkg/z.py", "testing.py"]


def test_split_every_nth_holds_out_every_20th():
    files = stdlib_files()
    train, heldout = split_every_nth(files)
    assert heldout == [f for i, f in enumerate(files) if i % 20 == 19]
    assert heldout == files[19::20]
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(files) and len(train) + len(heldout) == len(files)
    assert split_every_nth(list(range(10)), n=3) == ([0, 1, 3, 4, 6, 7, 9], [2, 5, 8])


def test_load_stdlib_corpus():
    corpus = load_text_corpus("python-stdlib")
    names = [n for n, _ in corpus.train + corpus.heldout]
    assert corpus.name == "python-stdlib"
    assert len(corpus.heldout) == len(stdlib_files()) // 20
    assert not {n for n, _ in corpus.train} & {n for n, _ in corpus.heldout}
    assert "os.py" in names and not any(n.startswith("/") for n in names)
    assert heldout_bytes(corpus) == sum(len(t.encode()) for _, t in corpus.heldout) > 0


# --- numbers-to-words ------------------------------------------------------------------------------------------------

WORDS = {
    0: "zero", 5: "five", 13: "thirteen", 19: "nineteen", 20: "twenty", 21: "twenty one", 99: "ninety nine",
    100: "one hundred", 101: "one hundred one", 110: "one hundred ten", 999: "nine hundred ninety nine",
    1000: "one thousand", 1001: "one thousand one", 40213: "forty thousand two hundred thirteen",
    1_000_000: "one million", 1_000_010: "one million ten",
    12_345_678: "twelve million three hundred forty five thousand six hundred seventy eight",
    999_999_999: "nine hundred ninety nine million nine hundred ninety nine thousand nine hundred ninety nine",
}


@pytest.mark.parametrize("n", list(WORDS))
def test_number_to_words_examples(n):
    assert number_to_words(n) == WORDS[n]


@pytest.mark.parametrize("n", [-1, NUMBERS_MAX + 1])
def test_number_to_words_rejects_out_of_range(n):
    with pytest.raises(ValueError):
        number_to_words(n)


def _words_to_number(text: str) -> int:
    small = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
    small |= {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
    total = group = 0
    for word in text.split():
        if word in small:
            group += small[word]
        elif word == "hundred":
            group *= 100
        else:
            total += group * {"thousand": 1000, "million": 1_000_000}[word]
            group = 0
    return total + group


def test_number_to_words_round_trips():
    rng = random.Random(0)
    numbers = [rng.randint(0, NUMBERS_MAX) for _ in range(300)] + [rng.randint(0, 10 ** rng.randint(1, 9))
                                                                    for _ in range(300)]
    for n in numbers:
        words = number_to_words(n)
        assert "-" not in words and "," not in words and " and " not in words
        assert _words_to_number(words) == n, (n, words)
    assert number_pairs([40213, 7]) == [("40213", "forty thousand two hundred thirteen"), ("7", "seven")]


def test_numbers_heldout_is_fixed():
    heldout = numbers_heldout()
    assert heldout == numbers_heldout()
    assert len(heldout) == len(set(heldout)) == 2000
    assert heldout == sorted(heldout)
    assert all(0 <= n <= NUMBERS_MAX for n in heldout)
    assert max(heldout) > NUMBERS_MAX // 2  # uniform over the range, not clustered
    assert numbers_heldout(seed=1) != heldout


def test_number_sampler_never_yields_heldout_and_is_deterministic():
    heldout = set(range(500)) | set(numbers_heldout())
    sampler = NumberSampler(heldout, seed=3)
    samples = [sampler.sample() for _ in range(20_000)]
    assert not set(samples) & heldout
    assert all(0 <= n <= NUMBERS_MAX for n in samples)
    assert {len(str(n)) for n in samples} == set(range(1, 10)) - {1, 2}  # all 1- and 2-digit numbers are held out
    counts = np.bincount([len(str(n)) for n in samples])
    assert counts[9] > 20_000 / 9 * 0.8  # digit count uniform, redraws spread over the survivors
    again = NumberSampler(heldout, seed=3)
    assert [again.sample() for _ in range(20_000)] == samples
    other = NumberSampler(heldout, seed=4)
    assert [other.sample() for _ in range(100)] != samples[:100]


def test_number_sampler_small_numbers_appear_without_heldout():
    sampler = NumberSampler([], seed=0)
    samples = [sampler.sample() for _ in range(2000)]
    assert {n for n in samples if n < 10} == set(range(10))


def test_number_sampler_state_round_trip():
    sampler = NumberSampler(numbers_heldout(), seed=11)
    for _ in range(123):
        sampler.sample()
    state = sampler.state()
    expected = [sampler.sample() for _ in range(500)]
    resumed = NumberSampler(numbers_heldout(), seed=999)
    resumed.set_state(state)
    assert [resumed.sample() for _ in range(500)] == expected


# --- text sources ----------------------------------------------------------------------------------------------------


def test_read_text_sources_globs_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.txt").write_bytes(b"see \xff")
    lines = [json.dumps({"text": f"line {i}", "id": i}) for i in range(1, 12)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    docs = read_text_sources(f"{tmp_path}/**/*.txt, {tmp_path}/d.jsonl,{tmp_path}/b.txt")
    names = [n.removeprefix(f"{tmp_path}/") for n, _ in docs]
    assert names[:3] == ["a.txt", "b.txt", "d.jsonl:1"]  # b.txt matched twice, listed once
    assert names[-1] == "sub/c.txt"
    texts = dict(zip(names, (t for _, t in docs), strict=True))
    assert texts["b.txt"] == "bee" and texts["sub/c.txt"] == "see \ufffd"
    assert texts["d.jsonl:5"] == "line 5" and texts["d.jsonl:7"] == "line 6"  # line 6 is blank and skipped
    assert sum(n.startswith("d.jsonl:") for n in names) == 11
    assert texts["d.jsonl:12"] == "line 11"

    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "custom field"}) + "\n")
    assert [t for _, t in read_text_sources(str(tmp_path / "e.jsonl"), text_field="body")] == ["custom field"]
    with pytest.raises(ValueError, match="nothing-here"):
        read_text_sources(f"{tmp_path}/b.txt,{tmp_path}/nothing-here/*.txt")
    with pytest.raises(ValueError, match="body"):
        read_text_sources(str(tmp_path / "d.jsonl"), text_field="body")


def test_load_text_corpus_from_files(tmp_path):
    for i in range(45):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} é")
    corpus = load_text_corpus(f"{tmp_path}/*.txt")
    assert [n.rsplit("/", 1)[1] for n, _ in corpus.heldout] == ["doc19.txt", "doc39.txt"]
    assert len(corpus.train) == 43
    assert heldout_bytes(corpus) == 2 * len("document 19 é".encode())
    assert load_text_corpus(f"{tmp_path}/*.txt", heldout_every=5).heldout[0][1] == "document 4 é"


# --- token files -----------------------------------------------------------------------------------------------------


def test_token_dtype():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128_256) == np.uint32


def test_tokenize_documents_round_trips(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "_ENCODE_CHUNK", 2)  # exercise several chunks
    tokens = tokenize_documents(DOCS, tokenizer, tmp_path / "out" / "t.bin")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokenizer.decode(tokens, skip_special_tokens=False) == "".join(t + EOS_TOKEN for _, t in DOCS)
    assert int((tokens == tokenizer.eos_id).sum()) == len(DOCS) and tokens[-1] == tokenizer.eos_id
    pieces = np.split(np.asarray(tokens), np.flatnonzero(tokens == tokenizer.eos_id) + 1)[:-1]
    assert [tokenizer.decode(p) for p in pieces] == [t for _, t in DOCS]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["t.bin"]  # no temp file left behind


def test_tokenize_no_documents(tmp_path, tokenizer):
    assert len(tokenize_documents([], tokenizer, tmp_path / "empty.bin")) == 0
    assert len(cached_token_file([], tokenizer, tmp_path, "heldout")) == 0


def test_cached_token_file_reuses_and_invalidates(tmp_path, tokenizer, monkeypatch):
    calls = []
    real = data.tokenize_documents
    monkeypatch.setattr(data, "tokenize_documents", lambda *a: calls.append(a[2]) or real(*a))

    first = cached_token_file(DOCS, tokenizer, tmp_path, "train")
    assert len(calls) == 1 and calls[0].name.startswith("train-") and calls[0].name.endswith(".uint16.bin")
    second = cached_token_file(DOCS, tokenizer, tmp_path, "train")
    assert len(calls) == 1  # reused, not re-tokenised
    assert np.array_equal(first, second)

    changed_text = [*DOCS[:-1], (DOCS[-1][0], DOCS[-1][1] + "!")]
    renamed = [*DOCS[:-1], ("f.txt", DOCS[-1][1])]
    other_tokenizer = Tokenizer.train([text for _, text in DOCS] * 20, vocab_size=280)
    cached_token_file(changed_text, tokenizer, tmp_path, "train")
    cached_token_file(renamed, tokenizer, tmp_path, "train")
    cached_token_file(DOCS, other_tokenizer, tmp_path, "train")
    cached_token_file(DOCS, tokenizer, tmp_path, "heldout")
    assert len(calls) == 5 and len({p.name for p in calls}) == 5
    assert len(list(tmp_path.glob("*.bin"))) == 5


# --- windows ---------------------------------------------------------------------------------------------------------


def test_sample_windows_targets_are_shifted_inputs():
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 65521
    x, y = sample_windows(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        start = int(np.flatnonzero(tokens == row_x[0].item())[0])
        assert torch.equal(row_x, torch.from_numpy(tokens[start : start + 16].astype(np.int64)))
        assert torch.equal(row_y, torch.from_numpy(tokens[start + 1 : start + 17].astype(np.int64)))
    x2, _ = sample_windows(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    exact = sample_windows(tokens[:17], 4, 16, torch.Generator().manual_seed(1))[1]
    assert torch.equal(exact, torch.arange(1, 17).mul(7).expand(4, 16))  # only one window fits
    with pytest.raises(ValueError):
        sample_windows(tokens[:16], 1, 16, torch.Generator())


@pytest.mark.parametrize("n, seq_len", [(100, 16), (17, 16), (33, 16), (5, 1), (1, 4), (0, 4)])
def test_sequential_windows_predict_every_token_once(n, seq_len):
    tokens = np.arange(n, dtype=np.uint32) + 10
    windows = list(sequential_windows(tokens, seq_len))
    targets = [t for _, y in windows for t in y[0].tolist()]
    assert targets == (tokens[1:] + 0).tolist()
    for i, (x, y) in enumerate(windows):
        assert x.shape == y.shape and x.shape[0] == 1 and 1 <= x.shape[1] <= seq_len
        assert torch.equal(x[0, 1:], y[0, :-1]) and x.dtype == torch.int64
        if i:
            assert x[0, 0] == windows[i - 1][1][0, -1]  # input starts where the previous targets ended
    assert all(x.shape[1] == seq_len for x, _ in windows[:-1])
