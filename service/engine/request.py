"""What goes into the engine and what comes out: generation parameters, requests, outputs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from enum import Enum

from service.engine.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # cancelled: client gone, timeout, shutdown
    ERROR = "error"  # the engine failed this request (others go on)


@dataclass(frozen=True)
class GenerationParams:
    """Per-request settings: how many tokens, when to stop, and how to choose each token."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    @property
    def sampling(self) -> SamplingParams:
        names = {f.name for f in fields(SamplingParams)}
        return SamplingParams(**{n: getattr(self, n) for n in names})

    def validate(self, vocab_size: int) -> None:
        """Raises ValueError naming the offending field."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.sampling.validate()
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} chars")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids: {bad[0]} is not a token id (vocabulary size {vocab_size})")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]  # decoder prompt; for encoder-decoder models usually [BOS]
    params: GenerationParams = field(default_factory=GenerationParams)
    source_ids: list[int] | None = None  # encoder input of encoder-decoder models
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None  # top-N alternatives (token id, logprob), best first


@dataclass
class RequestOutput:
    """One streamed update: the text and tokens new since the previous update."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    completion_tokens: int  # total so far
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
