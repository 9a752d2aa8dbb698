"""What goes into the engine and what comes out: generation parameters, requests, outputs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum

from service.engine.limits import Limits, setting
from service.engine.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 256  # more would make every token's stop check of the whole batch slow


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # cancelled: client gone, timeout, shutdown
    ERROR = "error"  # the engine failed this request (others go on)


@dataclass(frozen=True, kw_only=True)
class GenerationParams(SamplingParams):
    """Per-request settings: how to choose each token (SamplingParams), how many tokens, and when to stop."""

    max_new_tokens: int = setting(128, Limits(ge=1))
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the offending field; stop_token_ids are checked once vocab_size is known."""
        super().validate()
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} chars")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} token ids")
        bad = [] if vocab_size is None else [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
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


@dataclass(kw_only=True)
class RequestOutput:
    """One streamed update: the text and tokens new since the previous update."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # None unless the request asked for logprobs
    prompt_tokens: int
    completion_tokens: int  # total so far
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None

    @classmethod
    def ended(cls, request: GenerationRequest, reason: FinishReason, error: str | None = None,
              completion_tokens: int = 0) -> RequestOutput:
        """The last output of a request that ends without another token (refused, failed, engine gone)."""
        return cls(request_id=request.request_id, logprobs=[] if request.params.logprobs is not None else None,
                   prompt_tokens=len(request.prompt_ids), completion_tokens=completion_tokens, finished=True,
                   finish_reason=reason, error=error)
