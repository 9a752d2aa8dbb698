"""Request and response bodies of the HTTP API, with their limits and the examples `/docs` shows.

The sampling fields, their limits, defaults and descriptions come from the engine's own declarations
(SamplingParams and GenerationParams, see service/engine/limits.py), so the API and the engine always accept the
same ranges. The native endpoints reject unknown fields (a typo such as `max_tokens` on /generate is a 400, not
silently ignored); the OpenAI endpoint ignores them, as clients send vendor extensions freely. JSON types are taken
as the OpenAPI document states them: "5" or true for an integer, or 1 for a boolean, is a 400 (pydantic's lax mode
would coerce them). Responses are built as plain dicts (cheaper than validating every token); the response models
here document them, and ERROR_RESPONSES and `error_responses` the errors each route answers itself (errors.py adds
those every route can answer: 401, 408, 413, 500).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError

from service.engine.limits import default_of, doc_of, limits_of, type_hints
from service.engine.request import MAX_STOP_LENGTH, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, GenerationParams
from service.engine.sampling import MIN_TEMPERATURE, SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for max_tokens
# stop_token_ids: at most MAX_STOP_TOKEN_IDS (service/engine/request.py), in the schema too so a huge list is refused
# before it is even built
# stop strings are checked against the engine's limits by the engine (GenerationParams.validate: a 400 naming stop)
Stop = str | list[str] | None
STOP_DESCRIPTION = (f"a string or up to {MAX_STOP_STRINGS} of them, each 1..{MAX_STOP_LENGTH} characters; the output "
                    "ends before the first one")
StopTokenIds = Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)]


class RequestBody(BaseModel):
    """What every request body shares: JSON types as the schema states them (strict: no "5" for 5, no 1 for true),
    finite numbers, and valid Unicode text. Python's JSON parser reads NaN, Infinity and 1e309 as floats, which no
    field takes: "should be a finite number" says so better than "should be <= 100". JSON can carry a lone surrogate
    ("\\ud800"), which no tokenizer or UTF-8 encoder takes: a 400 naming the field, not an error deep inside."""

    model_config = ConfigDict(strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise PydanticCustomError("finite_number", "Input should be a finite number")
        return value

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
    stop: Stop = Field(None, description=STOP_DESCRIPTION)
    stop_token_ids: StopTokenIds = Field(default_factory=list, description=f"up to {MAX_STOP_TOKEN_IDS} token ids "
                                                                           "that end the output")
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
    temperature: float = Field(1.0, gt=0, le=100,
                               description=f"softmax temperature, > 0; below {MIN_TEMPERATURE} computed at "
                                           f"{MIN_TEMPERATURE} (the greedy, one-hot distribution)")
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

class StreamOptions(Lenient):
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
    stop: Stop = Field(None, description=STOP_DESCRIPTION)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    stop_token_ids: StopTokenIds | None = Field(None, description=f"up to {MAX_STOP_TOKEN_IDS} token ids that end "
                                                                  "the output")
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


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
# what each error status means, and its codes: the OpenAPI document's descriptions (see `error_responses`)
ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "an invalid or unknown field (named in error.param; code: pydantic's error type, "
                         "invalid_value, too_many_prompts, context_length_exceeded, ...), or a body that is not "
                         "JSON text (invalid_json, missing_body, invalid_body)"},
    401: {"description": "an API key is configured and none came (missing_api_key) or a wrong one (invalid_api_key)",
          "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}},
    404: {"description": "no model of that name is served (model_not_found)"},
    408: {"description": "the body did not arrive within the server's body timeout (request_timeout)"},
    413: {"description": "a body over the server's --max-body-bytes (request_too_large)"},
    500: {"description": "a bug, logged (internal_error), or the engine failed the request (engine_error)"},
    503: {"description": "the waiting queue is full (queue_full), the model is loading or failed to load (not_ready, "
                         "load_failed), or the engine is down (engine_unavailable, engine_dead); see Retry-After",
          "headers": RETRY_AFTER},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` entries for these error statuses, each with the error body and its meaning."""
    return {status: {"model": ErrorResponse, **ERRORS[status]} for status in statuses}


# what the routes that take a body answer themselves; the errors any route can answer (401 with an API key, 408
# and 413 for a body, 500) come from the middleware and openapi.document_errors adds them to every operation
ERROR_RESPONSES = error_responses(400, 503)


# ---- streams (`stream: true`) --------------------------------------------------------------------------------------

class GenerateEvent(BaseModel):
    """One event of a streamed /generate: the new text of one prompt; its last event has finish_reason and usage
    (and error, when the engine failed it)."""

    index: int
    text: str
    token_id: int | None
    token_ids: list[int] | None = Field(None, description="when more than one token came at once")
    logprobs: list[TokenLogprobOut] | None = None
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    usage: Usage | None = None
    error: ErrorDetail | None = None


class CompletionChunk(CompletionResponse):
    """One event of a streamed completion: each choice carries its new text. With stream_options.include_usage,
    `usage` is null until a last event without choices."""

    model_config = ConfigDict(json_schema_extra=None)


def sse_content(example: str, *events: type[BaseModel]) -> dict[str, Any]:
    """The `text/event-stream` content of a streamed 200. Below OpenAPI 3.2 its `schema` describes one event (as
    schemathesis reads it too): `data` is `[DONE]` or JSON, one of `events` or, should the stream fail after its
    status was sent, an error body. The events' schemas go in `$defs` here; openapi.document_errors moves them to
    components."""
    defs: dict[str, Any] = {}
    for model in (*events, ErrorResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(schema.pop("$defs", {}), **{model.__name__: schema})
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (*events, ErrorResponse)]}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "$defs": defs,
        "description": "one Server-Sent Event, `data: {json}`; the last one is `data: [DONE]`",
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}},
        "example": example}}


GENERATE_SSE = sse_content(
    'data: {"index":0,"text":" n","token_id":299}\n\n'
    'data: {"index":0,"text":"","token_id":null,"finish_reason":"stop",'
    '"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n'
    "data: [DONE]\n\n", GenerateEvent)
COMPLETION_SSE = sse_content(
    'data: {"id":"cmpl-4f1c","object":"text_completion","created":1767225600,"model":"default","choices":[{"index":0,'
    '"text":" n","logprobs":null,"finish_reason":null}]}\n\n'
    'data: {"id":"cmpl-4f1c","object":"text_completion","created":1767225600,"model":"default","choices":[{"index":0,'
    '"text":"","logprobs":null,"finish_reason":"length"}]}\n\n'
    "data: [DONE]\n\n", CompletionChunk)
# an event stream documented without a schema (an example only) gets this one
SSE_EVENT = {"type": "object", "required": ["data"], "description": "one Server-Sent Event, `data: {json}`; the last "
                                                                    "one is `data: [DONE]`",
             "properties": {"data": {"type": "string"}}}
