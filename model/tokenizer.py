"""Tokenizer for lmserve: a thin wrapper over the Hugging Face ``tokenizers`` library.

We do not implement BPE ourselves: ``tokenizers`` is fast, battle-tested and its ``tokenizer.json``
format lets the server load tokenizers trained elsewhere. This module only adds what the rest of
lmserve needs on top of it:

* a training recipe (byte-level BPE) whose output can encode *any* UTF-8 text losslessly;
* stable special-token handling (no implicit BOS/EOS; ids looked up by name, with fallbacks for
  the names common in third-party ``tokenizer.json`` files);
* :class:`IncrementalDetokenizer`, which turns a stream of token ids into text pieces that never
  contain half of a multi-byte character, for streaming responses.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"

# Names tried, in order, when looking up a special id. Ours come first; the rest cover the
# conventions of common Hugging Face tokenizer.json files (SentencePiece/Llama-2, Llama-3, GPT-2).
# GPT-2 has a single "<|endoftext|>" serving as both BOS and EOS, so it is tried last.
_BOS_CANDIDATES = (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<|endoftext|>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>")

_REPLACEMENT_CHAR = "\ufffd"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _token_string(value: object) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or {"content": string, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids, backed by a ``tokenizers.Tokenizer``.

    Encoding never inserts special tokens implicitly (``add_special_tokens=False`` is always
    passed to the backend) so that callers decide explicitly where BOS/EOS go; a post-processor
    in a third-party tokenizer.json therefore has no effect here.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None) -> None:
        """`config`: the checkpoint's tokenizer_config.json, whose bos/eos/pad token strings (when given) name the
        special tokens, whose `add_bos_token` says whether prompts start with BOS, and whose `chat_template` is
        kept for chat formatting."""
        self.backend = backend
        self.config = dict(config or {})
        self._literal_backend: tokenizers.Tokenizer | None = None
        self.chat_template: str | None = self.config.get("chat_template")

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> Tokenizer:
        """tokenizer.json, with tokenizer_config.json when the directory has one."""
        directory = os.fspath(directory)
        config_path = os.path.join(directory, CONFIG_FILE)
        config = None
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError(f"{config_path} must hold a JSON object")
        return cls(tokenizers.Tokenizer.from_file(os.path.join(directory, TOKENIZER_FILE)), config)

    def save_directory(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        """tokenizer.json and the tokenizer_config.json transformers' AutoTokenizer reads (special tokens, BOS)."""
        directory = os.fspath(directory)
        self.save(os.path.join(directory, TOKENIZER_FILE))
        token = self.backend.id_to_token
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self.config,
                  "bos_token": None if self.bos_id is None else token(self.bos_id),
                  "eos_token": None if self.eos_id is None else token(self.eos_id),
                  "pad_token": None if self.pad_id is None else token(self.pad_id),
                  "add_bos_token": self.adds_bos}
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    @property
    def literal_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes special-token strings in the text as plain characters.

        A copy rather than toggling ``encode_special_tokens`` on the shared backend, so that encoding
        from several threads at once stays safe.
        """
        if self._literal_backend is None:
            literal = tokenizers.Tokenizer.from_str(self.backend.to_str())
            literal.encode_special_tokens = True
            self._literal_backend = literal
        return self._literal_backend

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``tokenizer.json`` (ours or any Hugging Face one)."""
        return cls(tokenizers.Tokenizer.from_file(os.fspath(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as a single ``tokenizer.json`` file."""
        self.backend.save(os.fspath(path))

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, split_digits: bool = False
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer on ``texts``.

        Byte-level (GPT-2 style) is chosen because, with all 256 byte symbols in the initial
        alphabet, every UTF-8 string is encodable and ``decode(encode(t)) == t`` holds even for
        characters never seen in training: there is no unknown token and no normalizer to alter
        the text. The price is that a token may hold only part of a multi-byte character, which is
        why streaming needs :class:`IncrementalDetokenizer`.

        ``vocab_size`` counts the three special tokens (pad=0, bos=1, eos=2) and the 256 byte
        symbols, so it must be at least 259. On a small corpus the result may be smaller than
        ``vocab_size`` when no more pairs reach ``min_frequency``. ``split_digits`` makes every digit
        its own token (as Llama does), which makes numbers far easier to learn.
        """
        specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(specials):
            raise ValueError(f"vocab_size must be >= {len(alphabet) + len(specials)}, got {vocab_size}")
        backend = tokenizers.Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,  # the trainer assigns ids in list order: 0, 1, 2
            initial_alphabet=alphabet,
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, including added/special tokens (size the embedding with this)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _first_id(self, candidates: Sequence[str], role: str) -> int | None:
        named = _token_string(self.config.get(f"{role}_token"))
        if named is not None:  # tokenizer_config.json names it
            return self.backend.token_to_id(named)
        for token in candidates:
            token_id = self.backend.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None if the vocabulary has none."""
        return self._first_id(_BOS_CANDIDATES, "bos")

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or None if the vocabulary has none."""
        return self._first_id(_EOS_CANDIDATES, "eos")

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, or None if the vocabulary has none."""
        return self._first_id(_PAD_CANDIDATES, "pad")

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether a prompt starts with BOS, as transformers' tokenizer(text) does it: tokenizer_config.json's
        `add_bos_token` when given, else whether tokenizer.json's post-processor puts one first."""
        if isinstance(self.config.get("add_bos_token"), bool):
            return self.config["add_bos_token"] and self.bos_id is not None
        if self.bos_id is None or self.backend.post_processor is None:
            return False
        return self.backend.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all tokens registered as special (those ``decode`` skips by default)."""
        return frozenset(i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True but this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, allow_special: bool = True) -> list[int]:
        """Encode ``text``; BOS/EOS are added only when asked for.

        With ``allow_special`` (the default) a literal special-token string inside ``text`` (e.g.
        ``"<|eos|>"``) is matched as that special token; with ``allow_special=False`` it is encoded as
        plain characters, which is what untrusted text (prompts from users) needs.
        """
        backend = self.backend if allow_special else self.literal_backend
        ids = backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: list[str], *, add_bos: bool = False, add_eos: bool = False, allow_special: bool = True
    ) -> list[list[int]]:
        """Encode several texts at once (the backend parallelises this across threads)."""
        backend = self.backend if allow_special else self.literal_backend
        encodings = backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(enc.ids, add_bos, add_eos) for enc in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text. Bytes that do not form valid UTF-8 become U+FFFD.

        Ids outside the vocabulary are silently dropped by ``tokenizers``.
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Text of one token for display (special tokens shown; partial characters show as U+FFFD)."""
        return self.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces for streaming, never emitting a broken multi-byte
    UTF-8 character (byte-level BPE tokens can split a Chinese character or emoji across tokens).

    Uses the prefix/read-offset method of vLLM and TGI: decode a small window of recent ids with
    and without the newest tokens and emit the difference once it no longer ends in U+FFFD (an
    incomplete character). Decoding a window rather than single tokens also keeps decoders that
    treat the first token specially (e.g. SentencePiece's leading-space strip) correct, and the
    window is reset after every emission, so the cost per token stays small.

    Invariant: ``"".join(pushes) + flush() == tokenizer.decode(all_ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._pieces: list[str] = []
        self._prefix_offset = 0  # start of the window already turned into text
        self._read_offset = 0  # end of the ids whose text has been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(_REPLACEMENT_CHAR)):
            return ""  # nothing new yet, or the last character is still incomplete
        piece = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(piece)
        return piece

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to emit (``""`` while waiting)."""
        self._ids.append(int(token_id))
        return self._new_text(final=False)

    def flush(self) -> str:
        """End of stream: return whatever is still held back (incomplete bytes become U+FFFD)."""
        return self._new_text(final=True)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        """A copy of all ids pushed so far."""
        return list(self._ids)
