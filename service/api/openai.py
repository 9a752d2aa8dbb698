"""OpenAI-compatible API: POST /v1/completions (n, echo, logprobs, stop, seed, streaming) and GET /v1/models, in
OpenAI's shapes, so the official `openai` client works unmodified."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import DONE, EventStream, ServingDep, check_count, request_id, sse
from service.api.errors import APIError, error_body
from service.api.generation import Generation, Prompt, Serving, collect, log_fields, unless_disconnected, usage
from service.api.schemas import (
    COMPLETION_EXAMPLES,
    COMPLETION_SSE,
    DEFAULT_MAX_TOKENS,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    error_responses,
)
from service.engine.request import FinishReason, TokenLogprob

router = APIRouter(prefix="/v1", tags=["openai"])
RENAMES = {"max_new_tokens": "max_tokens"}  # engine name -> OpenAI's
MAX_LOGGED_USER = 128  # characters of `user` the access log keeps: a client must not make each line a megabyte


def _logged_user(user: str | None) -> str | None:
    if user is None or len(user) <= MAX_LOGGED_USER:
        return user
    return f"{user[:MAX_LOGGED_USER]}... ({len(user)} characters)"


def _card(serving: Serving) -> dict[str, Any]:
    return {"id": serving.name, "object": "model", "created": serving.created, "owned_by": "lmserve",
            "max_model_len": serving.max_seq_len}


@router.get("/models", summary="The served model", response_model=ModelList, responses=error_responses(503))
async def list_models(serving: ServingDep) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_card(serving)]})


@router.get("/models/{model}", summary="One model", response_model=ModelCard,
            responses=error_responses(404, 503))
async def get_model(model: str, serving: ServingDep) -> JSONResponse:
    _check_model(serving, model)
    return JSONResponse(_card(serving))


def _check_model(serving: Serving, model: str | None) -> None:
    if model is not None and model != serving.name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{serving.name}'",
                       param="model", code="model_not_found")


class Logprobs:
    """OpenAI's logprobs object of one choice, built as tokens arrive; `take` returns what is new (streaming)."""

    def __init__(self, serving: Serving) -> None:
        self.text = serving.token_text
        self.offset = 0
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.taken = 0

    def _append(self, token_id: int, logprob: float | None, top: dict[str, float] | None) -> None:
        token = self.text(token_id)
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(token)

    def add_prompt(self, prompt: Prompt) -> None:
        """echo: the prompt's tokens, with null logprobs (the engine does not score prompts)."""
        for token_id in prompt.source_ids if prompt.source_ids is not None else prompt.prompt_ids:
            self._append(token_id, None, None)
        self.offset = len(prompt.text)

    def add(self, logprobs: list[TokenLogprob] | None) -> None:
        for lp in logprobs or []:
            top = {self.text(i): v for i, v in lp.top or []}
            top.setdefault(self.text(lp.token_id), lp.logprob)  # OpenAI's top_logprobs include the sampled token
            self._append(lp.token_id, lp.logprob, top)

    def take(self, start: int | None = None) -> dict[str, list]:
        start = self.taken if start is None else start
        self.taken = len(self.tokens)
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


@router.post("/completions", summary="OpenAI completions", responses={
    200: {"model": CompletionResponse, "content": COMPLETION_SSE}, **error_responses(400, 404, 503)})
async def completions(request: Request,
                      body: Annotated[CompletionRequest, Body(openapi_examples=COMPLETION_EXAMPLES)],
                      serving: ServingDep) -> Response:
    """OpenAI's completions API. `logprobs` gives tokens, token_logprobs, top_logprobs (top N plus the sampled
    token) and text_offset; with `echo` the prompt's tokens come first with null logprobs. Choice i of a prompt
    with `seed` uses seed + i. A request still running at the server's request timeout ends with
    `finish_reason: "abort"`."""
    _check_model(serving, body.model)
    for name, ok in (("best_of", body.best_of in (None, body.n)), ("logit_bias", not body.logit_bias),
                     ("suffix", body.suffix is None)):
        if not ok:
            raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported")
    raw = body.prompt
    texts: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    check_count(len(texts) * body.n, serving.settings.max_prompts)
    prompts = await serving.prompts(texts)
    requests = serving.requests(prompts, body, names=RENAMES, defaults={"max_new_tokens": DEFAULT_MAX_TOKENS},
                                choices=body.n)
    generation = serving.generation(requests, [p.num_tokens for p in prompts for _ in range(body.n)],
                                    request_id(request))
    await unless_disconnected(request, generation.start())
    reply = _Reply(serving, body, prompts, "cmpl-" + request_id(request))
    if body.stream:
        return EventStream(reply.stream(generation, request), request, on_close=generation.close)
    results = await unless_disconnected(request, collect(generation))
    choices = []
    for index, r in enumerate(results):
        logprobs = reply.logprobs(index)
        if logprobs is not None:
            logprobs.add(r.logprobs)
        choices.append({"index": index, "text": reply.echo(index) + r.text,
                        "logprobs": logprobs.take(0) if logprobs else None,
                        "finish_reason": r.finish_reason.value if r.finish_reason else None})
    completion_tokens = sum(r.completion_tokens for r in results)
    log_fields(request, prompt_tokens=reply.prompt_tokens, completion_tokens=completion_tokens, n=body.n,
               finish_reason=[c["finish_reason"] for c in choices], user=_logged_user(body.user),
               timed_out=generation.timed_out or None)
    return JSONResponse({**reply.head, "choices": choices, "usage": usage(reply.prompt_tokens, completion_tokens)})


class _Reply:
    """What every choice of one completion request shares: the response head, echo and logprobs state."""

    def __init__(self, serving: Serving, body: CompletionRequest, prompts: list[Prompt], id: str) -> None:
        self.serving, self.body, self.prompts = serving, body, prompts
        self.head = {"id": id, "object": "text_completion", "created": int(time.time()), "model": serving.name}
        self.prompt_tokens = sum(p.num_tokens for p in prompts)
        self._logprobs: dict[int, Logprobs] = {}

    def prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.body.n]

    def echo(self, index: int) -> str:
        return self.prompt(index).text if self.body.echo else ""

    def logprobs(self, index: int) -> Logprobs | None:
        if self.body.logprobs is None:
            return None
        if index not in self._logprobs:
            self._logprobs[index] = lp = Logprobs(self.serving)
            if self.body.echo:
                lp.add_prompt(self.prompt(index))
        return self._logprobs[index]

    def chunk(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        logprobs = self.logprobs(index)
        choice = {"index": index, "text": text, "logprobs": logprobs.take() if logprobs else None,
                  "finish_reason": finish_reason}
        chunk = {**self.head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    @property
    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    async def stream(self, generation: Generation, request: Request) -> AsyncGenerator[bytes, None]:
        completion_tokens = 0
        reasons: list[str | None] = [None] * len(generation.requests)
        try:
            if self.body.echo:
                for index in range(len(generation.requests)):
                    yield sse(self.chunk(index, self.echo(index), None))
            async for index, out in generation.events():
                logprobs = self.logprobs(index)
                if logprobs is not None:
                    logprobs.add(out.logprobs)
                if out.finished:
                    completion_tokens += out.completion_tokens
                    reasons[index] = out.finish_reason.value if out.finish_reason else None
                    if out.finish_reason is FinishReason.ERROR:
                        yield sse(error_body(out.error or "the engine failed this request", "internal_error",
                                             code="engine_error"))
                        continue
                elif not out.text and logprobs is None:
                    continue  # nothing a client could see (e.g. half of a multi-byte character)
                yield sse(self.chunk(index, out.text, reasons[index]))
            if self.include_usage:
                yield sse({**self.head, "choices": [], "usage": usage(self.prompt_tokens, completion_tokens)})
            yield DONE
        finally:
            log_fields(request, prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens, n=self.body.n,
                       finish_reason=reasons, stream=True, user=_logged_user(self.body.user),
                       timed_out=generation.timed_out or None)
