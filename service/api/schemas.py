"""Request and response bodies of the HTTP API, with their limits and the examples `/docs` shows.

The sampling fields, their limits, defaults and descriptions come from the engine's own declarations
(SamplingParams and GenerationParams, see service/engine/limits.py), so the API and the engine always accept the
same ranges. The native endpoints reject unknown fields (a typo such as `max_tokens` on /generate is a 400, not
silently ignored); the OpenAI endpoint ignores them, as clients send vendor extensions freely. Responses are built
as plain dicts (cheaper than validating every token); the response models here document them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from service.engine.limits import default_of, doc_of, limits_of, type_hints
from service.engine.request import MAX_STOP_STRINGS, GenerationParams
from service.engine.sampling import MIN_TEMPERATURE, SamplingParams

Stop = str | list[str] | None
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for max_tokens


class RequestBody(BaseModel):
    """What every request body shares: its text is valid Unicode. JSON can carry a lone surrogate ("\\ud800"),
    which no tokenizer or UTF-8 encoder takes: a 400 naming the field, not an error deep inside."""

    @field_validator("*")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        pending = [value]
        while pending:
            item = pending.pop()
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
            elif isinstance(item, (list, tuple)):
                pending.extend(item)
            elif isinstance(item, dict):
                pending.extend((*item.keys(), *item.values()))
        return value


class Strict(RequestBody):
    model_config = ConfigDict(extra="forbid")


class Lenient(RequestBody):
    model_config = ConfigDict(extra="ignore")


def engine_field(name: str, *, default: Any = dataclasses.MISSING, description: str | None = None) -> Any:
    """A pydantic Field for the engine setting `name`: the limits, default and meaning GenerationParams declares,
    unless this endpoint gives its own default or description."""
    limits = limits_of(GenerationParams, name)
    return Field(default_of(GenerationParams, name) if default is dataclasses.MISSING else default,
                 description=description or doc_of(GenerationParams, name),
                 **(limits.constraints() if limits is not None else {}))


def sampling_fields(nullable: Collection[str] = (), descriptions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`create_model` definitions of every SamplingParams field. A `nullable` one also takes null, and defaults to
    it: the server's default then applies (the checkpoint's, for temperature, top_k and top_p)."""
    hints = type_hints(SamplingParams)
    definitions = {}
    for f in dataclasses.fields(SamplingParams):
        description = (descriptions or {}).get(f.name)
        if f.name in nullable:
            definitions[f.name] = (hints[f.name] | None, engine_field(f.name, default=None, description=description))
        else:
            definitions[f.name] = (hints[f.name], engine_field(f.name, description=description))
    return definitions


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# ---- /generate ---------------------------------------------------------------------------------------------------

SamplingFields = create_model("SamplingFields", __base__=Strict, **sampling_fields())


class GenerateRequest(SamplingFields):  # type: ignore[misc, valid-type]
    prompt: str | list[str] = Field(description="text to continue, or a list of them (a batch); for an "
                                                "encoder-decoder model, the source text")
    max_new_tokens: int = engine_field("max_new_tokens", description="left out: the default, cut to the context left")
    stop: Stop = Field(None, description=f"up to {MAX_STOP_STRINGS} strings; the output ends before the first one")
    stop_token_ids: list[int] = Field(default_factory=list, description="token ids that end the output")
    ignore_eos: bool = Field(False, description="keep going past the end-of-sequence token")
    stream: bool = Field(False, description="Server-Sent Events, one per new piece of text")


GENERATE_EXAMPLES = {
    "simple": {"summary": "Greedy continuation", "value": {"prompt": "def fib(n):", "max_new_tokens": 32,
                                                            "temperature": 0}},
    "batch": {"summary": "A batch of prompts, sampled", "value": {
        "prompt": ["def add(a, b):", "class Point:"], "max_new_tokens": 48, "temperature": 0.8, "top_p": 0.95,
        "seed": 1234, "stop": ["\n\n"]}},
    "stream": {"summary": "Streaming with logprobs", "value": {"prompt": "import os\n", "max_new_tokens": 16,
                                                                "stream": True, "logprobs": 2}},
}


class TokenLogprobOut(BaseModel):
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[dict[str, Any]] | None = None


class GenerateOutput(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "abort", "error"]
    logprobs: list[TokenLogprobOut] | None = None


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "4f1c0e5b9a0d4c2e8b7a6f5e4d3c2b1a", "model": "default",
        "outputs": [{"index": 0, "text": "\n    if n < 2:\n        return n", "token_ids": [198, 284, 611],
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 32, "total_tokens": 37}}]})
    id: str
    model: str
    outputs: list[GenerateOutput]
    usage: Usage


# ---- /next-token-probs -------------------------------------------------------------------------------------------

class NextTokenProbsRequest(Strict):
    prompt: str | list[str] = Field(description="text, or a list of texts; for an encoder-decoder model, the "
                                                "source text")
    top_k: int = Field(10, ge=1, description="how many tokens to return, 1..vocab size")
    temperature: float = Field(1.0, gt=0, le=100, description=f"softmax temperature, > 0; below {MIN_TEMPERATURE} "
                               f"computed at {MIN_TEMPERATURE} (the greedy, one-hot distribution)")
    decoder_prefix: str | list[str] | None = Field(None, description="encoder-decoder models only: the output "
                                                                     "so far (one, or one per prompt)")


NEXT_TOKEN_EXAMPLES = {
    "decoder": {"summary": "Most likely next tokens", "value": {"prompt": "def fib(n):\n    return", "top_k": 5}},
    "encoder_decoder": {"summary": "Encoder-decoder: source and decoder prefix", "value": {
        "prompt": "12 + 30", "decoder_prefix": "4", "top_k": 3, "temperature": 1.0}},
}


class TokenProb(BaseModel):
    id: int
    text: str
    prob: float
    logprob: float


class NextTokenResult(BaseModel):
    prompt_tokens: int
    tokens: list[TokenProb]
    entropy: float = Field(description="of the full distribution, in nats")


class NextTokenProbsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "default", "results": [{
        "prompt_tokens": 7, "entropy": 2.31, "tokens": [
            {"id": 220, "text": " ", "prob": 0.41, "logprob": -0.89},
            {"id": 299, "text": " n", "prob": 0.22, "logprob": -1.51}]}]}]})
    model: str
    results: list[NextTokenResult]


# ---- /tokenize, /detokenize --------------------------------------------------------------------------------------

class TokenizeRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"prompt": "def fib(n):"}]})
    prompt: str = Field(description="text, tokenized exactly as a prompt would be")


class TokenizeResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tokens": [318, 1090, 7, 77, 2599], "count": 5,
                                                               "max_model_len": 1024}]})
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tokens": [318, 1090, 7]}]})
    tokens: list[int] = Field(description="token ids")


class DetokenizeResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"text": "def fib("}]})
    text: str


# ---- OpenAI /v1/completions --------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


# null is a valid value for these, as in OpenAI's API: the server's default then applies
OpenAISamplingFields = create_model(
    "OpenAISamplingFields", __base__=Lenient,
    **sampling_fields(nullable=("temperature", "top_k", "top_p", "min_p", "repetition_penalty"),
                      descriptions={"seed": "choice i of a prompt uses seed + i"}))


class CompletionRequest(OpenAISamplingFields):  # type: ignore[misc, valid-type]
    """OpenAI's completions API. Also takes top_k, min_p, repetition_penalty, stop_token_ids and ignore_eos
    (as vLLM does); best_of (other than n), logit_bias and suffix are refused."""

    model: str | None = Field(None, description="the served model's name (see /v1/models)")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text(s) or token ids")
    max_tokens: int | None = engine_field("max_new_tokens", default=DEFAULT_MAX_TOKENS,
                                          description=f"default {DEFAULT_MAX_TOKENS}")
    n: int = Field(1, ge=1, le=64, description="completions per prompt")
    stop: Stop = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


COMPLETION_EXAMPLES = {
    "simple": {"summary": "A completion", "value": {"model": "default", "prompt": "def fib(n):", "max_tokens": 32,
                                                     "temperature": 0}},
    "logprobs": {"summary": "Two choices with logprobs", "value": {
        "model": "default", "prompt": "import", "max_tokens": 8, "n": 2, "seed": 7, "logprobs": 3}},
    "stream": {"summary": "Streaming with usage", "value": {
        "model": "default", "prompt": "class Point:", "max_tokens": 32, "stream": True,
        "stream_options": {"include_usage": True}}},
}


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class CompletionResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "cmpl-4f1c0e5b9a0d4c2e8b7a6f5e4d3c2b1a", "object": "text_completion", "created": 1767225600,
        "model": "default", "choices": [{"index": 0, "text": "\n    if n < 2:", "logprobs": None,
                                          "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}}]})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmserve"
    max_model_len: int


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [{
        "id": "default", "object": "model", "created": 1767225600, "owned_by": "lmserve", "max_model_len": 1024}]}]})
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- errors --------------------------------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "message": "max_new_tokens: the prompt has 1000 tokens and max_new_tokens is 128: 1128 tokens, more than "
                   "the context length 1024", "type": "invalid_request_error", "param": "max_new_tokens",
        "code": "context_length_exceeded"}}]})
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "an invalid field (named in error.param)"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when one is configured)"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    503: {"model": ErrorResponse, "description": "queue full or model not ready; see Retry-After"},
}
