"""Tests for model.tokenizer: lossless byte-level round trips, special tokens, persistence and
streaming detokenization that never splits a multi-byte character."""

from __future__ import annotations

import random
import time

import pytest
import tokenizers
from tokenizers import decoders, models

from model.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IncrementalDetokenizer,
    Tokenizer,
)

VOCAB_SIZE = 600

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the previous ones.",
    "Streaming responses send text to the client as soon as it is ready.",
    "Hello, world! How are you doing today?",
]
CODE = [
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "for i in range(10):\n\tprint(i, end=' ')\n",
    "class Cache:\n    def __init__(self) -> None:\n        self.items = {}\n",
    "if __name__ == '__main__':\n    main()\n",
]
CHINESE = [
    "你好，世界！今天天气很好。",
    "语言模型根据前面的词预测下一个词。",
    "我们正在测试分词器的流式解码。",
    "中文字符在UTF-8中占三个字节。",
]
EMOJI = ["😀", "🎉", "🚀", "👍", "❤️", "👨‍👩‍👧"]


def make_corpus(n_lines: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sources = ENGLISH + CODE + CHINESE
    lines = []
    for _ in range(n_lines):
        line = rng.choice(sources)
        if rng.random() < 0.5:
            line = f"{line} {rng.choice(EMOJI)}"
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def trained() -> tuple[Tokenizer, float]:
    start = time.perf_counter()
    tok = Tokenizer.train(make_corpus(), vocab_size=VOCAB_SIZE)
    return tok, time.perf_counter() - start


@pytest.fixture(scope="module")
def tok(trained: tuple[Tokenizer, float]) -> Tokenizer:
    return trained[0]


# Texts mixing seen and unseen material. Characters never seen in training (rare CJK, 🦄, combining
# marks, control characters) must still round-trip because every byte is in the base alphabet.
ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n",
    "nul\x00byte and \x7f del",
    "你好，世界！ The model says 你好 😀🎉",
    "罕见字：龘靐齉爩 𠀀𪚥",  # rare CJK, including astral-plane ideographs
    "unicorn 🦄 and family 👨‍👩‍👧 and flag 🇯🇵",
    "combining: e\u0301 n\u0303 a\u0308\u0304 Z\u0336",
    "def f(x):\n\treturn x ** 2  # 平方 🚀\n",
    "mixed：中文English混合😀text",
    "\ufeffBOM and zero\u200bwidth",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_lossless(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not set(ids) & tok.special_ids


def test_random_unicode_round_trips(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(200):
        # Any code point except surrogates, which cannot appear in valid UTF-8.
        chars = []
        while len(chars) < rng.randint(1, 20):
            cp = rng.randint(0, 0x10FFFF)
            if not 0xD800 <= cp <= 0xDFFF:
                chars.append(chr(cp))
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text


def test_vocab_size_and_training_learns_merges(tok: Tokenizer) -> None:
    assert tok.vocab_size == VOCAB_SIZE  # the corpus is rich enough to fill the vocab
    assert tok.vocab_size == len(tok.backend.get_vocab())
    # Frequent words became single tokens, so encoding compresses well below one token per byte.
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(text)) < len(text.encode()) / 2
    # Frequent Chinese lines need fewer tokens than characters (tokens hold whole characters and
    # words), while the unseen emoji 🦄 is split into several partial-character tokens.
    for line in CHINESE:
        assert len(tok.encode(line)) < len(line)
    assert len(tok.encode("🦄")) > 1


def test_train_rejects_vocab_smaller_than_alphabet() -> None:
    with pytest.raises(ValueError):
        Tokenizer.train(["abc"], vocab_size=100)


def test_training_is_fast(trained: tuple[Tokenizer, float]) -> None:
    assert trained[1] < 5.0


def test_special_token_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.special_ids == frozenset({0, 1, 2})
    assert tok.token_text(0) == PAD_TOKEN
    assert tok.token_text(1) == BOS_TOKEN
    assert tok.token_text(2) == EOS_TOKEN


def test_encode_adds_specials_only_on_request(tok: Tokenizer) -> None:
    plain = tok.encode("你好 world")
    assert tok.encode("你好 world", add_bos=True) == [1, *plain]
    assert tok.encode("你好 world", add_eos=True) == [*plain, 2]
    both = tok.encode("你好 world", add_bos=True, add_eos=True)
    assert both == [1, *plain, 2]
    assert tok.decode(both) == "你好 world"
    assert tok.decode(both, skip_special_tokens=False) == f"{BOS_TOKEN}你好 world{EOS_TOKEN}"
    assert tok.decode([0, 0, *plain, 0]) == "你好 world"


def test_literal_special_string_in_text_becomes_special_token(tok: Tokenizer) -> None:
    # tokenizers matches added tokens in raw text, so user text containing "<|eos|>" is encoded as
    # the real EOS id. It round-trips only when special tokens are kept on decode.
    text = f"before{EOS_TOKEN}after"
    ids = tok.encode(text)
    assert tok.eos_id in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "beforeafter"


def test_allow_special_false_encodes_special_strings_as_plain_text(tok: Tokenizer) -> None:
    # what the server does with prompts: a user cannot forge EOS/BOS by typing their names
    text = f"{BOS_TOKEN}before{EOS_TOKEN}after{PAD_TOKEN}"
    ids = tok.encode(text, allow_special=False)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text  # plain characters: they survive skip_special_tokens
    assert tok.encode_batch([text, "x"], allow_special=False) == [ids, tok.encode("x")]
    assert tok.encode(text, add_eos=True, allow_special=False)[-1] == tok.eos_id  # explicit specials still work
    assert tok.eos_id in tok.encode(text)  # the default is unchanged


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = ROUND_TRIP_TEXTS
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=True, add_eos=True) == [
        tok.encode(t, add_bos=True, add_eos=True) for t in texts
    ]


def test_token_text(tok: Tokenizer) -> None:
    (hello,) = tok.encode("Hello")[:1]
    assert tok.token_text(hello) == tok.decode([hello])
    # A token holding part of a character is shown with a replacement character.
    first_byte_of_unicorn = tok.encode("🦄")[0]
    assert tok.token_text(first_byte_of_unicorn) == "\ufffd"


def test_save_and_load(tok: Tokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
    assert loaded.special_ids == tok.special_ids
    texts = [*ROUND_TRIP_TEXTS, *make_corpus(50, seed=3)]
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)
    for text in texts:
        assert loaded.decode(loaded.encode(text)) == text
    Tokenizer.from_file(str(path))  # plain strings work too


def _backend_with(tokens: list[str]) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(["hello", *tokens])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="hello"))
    backend.add_special_tokens(tokens)
    return backend


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["<pad>", "<s>", "</s>"], (1, 2, 3)),
        (["<|endoftext|>"], (None, 1, 1)),  # GPT-2: one token is both BOS and EOS
        (["<|begin_of_text|>", "<|end_of_text|>"], (None, 1, 2)),  # Llama 3
        (["<|endoftext|>", "</s>"], (None, 1, 2)),  # a dedicated EOS wins over <|endoftext|>
        ([], (None, None, None)),
    ],
)
def test_special_ids_of_foreign_tokenizers(tokens: list[str], expected: tuple) -> None:
    tok = Tokenizer(_backend_with(tokens))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == expected


def test_encode_without_bos_raises() -> None:
    tok = Tokenizer(_backend_with([]))
    with pytest.raises(ValueError):
        tok.encode("hello", add_bos=True)
    with pytest.raises(ValueError):
        tok.encode("hello", add_eos=True)


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(i) for i in ids]
    tail = detok.flush()
    assert detok.token_ids == ids
    assert detok.text == "".join(pieces) + tail
    return pieces, tail


STREAM_TEXTS = [
    *ROUND_TRIP_TEXTS,
    "你好🦄世界👨‍👩‍👧🇯🇵龘靐",
    "🦄🦄🦄",
    "emoji at the end 🦄",
    "😀" * 10 + "好" * 10,
]


def _random_mixed_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = list("abc xyz\n\t") + list("你好世界龘靐齉爩") + ["🦄", "😀", "👍", "❤️", "👨‍👩‍👧", "e\u0301", "𠀀"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_equals_full_decode(tok: Tokenizer, skip_special_tokens: bool) -> None:
    for text in STREAM_TEXTS + _random_mixed_texts(300, seed=2):
        ids = tok.encode(text, add_bos=True, add_eos=True)
        pieces, tail = stream(tok, ids, skip_special_tokens)
        full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) + tail == full
        assert all("\ufffd" not in p for p in [*pieces, tail])  # these texts contain none


def test_piece_emitted_as_soon_as_character_completes(tok: Tokenizer) -> None:
    for text in STREAM_TEXTS + _random_mixed_texts(100, seed=4):
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok)
        for k, token_id in enumerate(ids, start=1):
            detok.push(token_id)
            prefix_text = tok.decode(ids[:k])
            if not prefix_text.endswith("\ufffd"):
                # Every complete character has been emitted; nothing is held back needlessly.
                assert detok.text == prefix_text


def test_emoji_emitted_after_its_last_byte_token(tok: Tokenizer) -> None:
    head = tok.encode("ab")
    unicorn = tok.encode("🦄")
    assert len(unicorn) > 1  # unseen in training: split into partial-character tokens
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in head) == "ab"
    assert [detok.push(i) for i in unicorn] == [""] * (len(unicorn) - 1) + ["🦄"]
    assert detok.flush() == ""
    assert detok.text == "ab🦄"


def test_special_token_inside_a_split_character(tok: Tokenizer) -> None:
    unicorn = tok.encode("🦄")
    ids = [*unicorn[:2], tok.eos_id, *unicorn[2:]]
    # Skipping specials, the bytes rejoin into the emoji, exactly as full decode does.
    pieces, tail = stream(tok, ids, skip_special_tokens=True)
    assert "".join(pieces) + tail == tok.decode(ids) == "🦄"
    pieces, tail = stream(tok, ids, skip_special_tokens=False)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=False)


def test_flush_mid_character_matches_full_decode(tok: Tokenizer) -> None:
    unicorn = tok.encode("🦄")
    assert len(unicorn) > 1
    for cut in range(1, len(unicorn)):
        ids = tok.encode("你好") + unicorn[:cut]
        pieces, tail = stream(tok, ids)
        assert "".join(pieces) == "你好"  # the partial emoji was held back...
        assert tail == "\ufffd"  # ...and flush() renders it the way full decode does
        assert "".join(pieces) + tail == tok.decode(ids)


def test_text_containing_replacement_character(tok: Tokenizer) -> None:
    # A genuine U+FFFD at the end is held (it looks incomplete) and released by flush().
    text = "ok \ufffd"
    ids = tok.encode(text)
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == text
    assert tail.endswith("\ufffd")


def test_empty_stream(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    assert detok.flush() == ""
    assert detok.text == ""
    assert detok.token_ids == []


def test_incremental_with_sentencepiece_style_decoder() -> None:
    # Llama-2 style tokenizer.json: "▁" marks spaces, the first leading space is stripped, and
    # unknown characters fall back to <0xXX> byte tokens. Decoding single tokens in isolation would
    # lose every space; the windowed method must reproduce the full decode exactly.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁hello": 3, "▁world": 4, "!": 5, "▁": 6}
    vocab.update({f"<0x{b:02X}>": 7 + b for b in range(256)})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok = Tokenizer(backend)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)

    def byte_ids(s: str) -> list[int]:
        return [7 + b for b in s.encode()]

    ids = [1, 3, 4, 6, *byte_ids("🦄"), 5, 3, 6, *byte_ids("你好"), 4, 2]
    full = tok.decode(ids)
    assert full == "hello world 🦄! hello 你好 world"
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == full
    assert all("\ufffd" not in p for p in pieces)
    # Truncated mid-character: flush gives what full decode gives.
    cut = [3, *byte_ids("🦄")[:2]]
    pieces, tail = stream(tok, cut)
    assert "".join(pieces) + tail == tok.decode(cut)
