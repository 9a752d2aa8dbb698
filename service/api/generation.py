"""What the generation routes share: turning prompts into engine requests (with the limits checked before any
compute) and running one HTTP request's engine requests together until they finish, time out or lose their client.

Life of a generation request: `Serving.prompts` encodes the prompts, `Serving.requests` builds and checks the
engine requests from the request body, `Generation.start` submits them all and waits for each one's first output
(so a full queue is a 503 before any response starts), then `Generation.events` yields `(index, RequestOutput)` as
they come. A timer aborts whatever is unfinished at the request timeout (the engine then finishes those with
`abort`); a client that disconnects cancels the consumer, and `Generation.close` aborts the rest at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from service.api.errors import APIError, ClientDisconnected, from_value_error, unavailable
from service.api.metrics import Metrics, RequestTimer
from service.engine.admission import EngineError, QueueFull
from service.engine.engine import Engine
from service.engine.request import FinishReason, GenerationParams, GenerationRequest, RequestOutput, TokenLogprob
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
LONG_TEXT = 20_000  # characters; longer prompts are tokenized in a worker thread, off the event loop
ENGINE_FIELDS = tuple(f.name for f in fields(GenerationParams))


@dataclass
class Prompt:
    """One prompt, encoded: the decoder prompt, the encoder source (encoder-decoder models) and its text."""

    prompt_ids: list[int]
    source_ids: list[int] | None
    text: str

    @property
    def num_tokens(self) -> int:
        return len(self.source_ids if self.source_ids is not None else self.prompt_ids)


class Serving:
    """The loaded model as the routes see it: engine, tokenizer, limits, defaults and metrics."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.name = settings.served_name
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        self.live: set[Generation] = set()  # generations between start and close, for fail_all
        gen = engine.generation_config
        self.start_id = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else gen.bos_token_id
        # request fields left unset take the checkpoint's generation_config.json values, as vLLM does
        self.defaults = {"temperature": gen.temperature, "top_k": gen.top_k, "top_p": gen.top_p}

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    # ---- prompts ---------------------------------------------------------------------------------------------

    def _encode(self, text: str, param: str) -> Prompt:
        tok = self.tokenizer
        if self.engine.is_encoder_decoder:
            source = tok.encode(text, add_eos=tok.eos_id is not None, allow_special=False)
            if not text:
                raise APIError(400, f"{param}: an encoder-decoder model needs a non-empty source text", param=param,
                               code="invalid_value")
            if len(source) > self.max_seq_len:
                raise APIError(400, f"{param}: the source has {len(source)} tokens; the limit is {self.max_seq_len}",
                               param=param, code="context_length_exceeded")
            return Prompt([self.start_id], source, text)
        ids = tok.encode(text, add_bos=tok.adds_bos, allow_special=False)  # BOS first where transformers puts it
        if not ids:
            if tok.bos_id is None:
                raise APIError(400, f"{param}: the prompt is empty", param=param, code="invalid_value")
            ids = [tok.bos_id]  # continue from the start of a document
        return Prompt(ids, None, text)

    def _from_ids(self, ids: list[int], param: str) -> Prompt:
        if self.engine.is_encoder_decoder:
            raise APIError(400, f"{param}: token-id prompts are not supported for encoder-decoder models",
                           param=param, code="invalid_value")
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param, code="invalid_value")
        if len(ids) >= self.max_seq_len:  # before decoding it: a body can hold 200,000 ids
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, which leaves no room in the context "
                                f"length {self.max_seq_len}", param=param, code="context_length_exceeded")
        bad = next((t for t in ids if not 0 <= t < self.engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: {bad} is not a token id (vocabulary size {self.engine.vocab_size})",
                           param=param, code="invalid_value")
        return Prompt(list(ids), None, self.tokenizer.decode(ids))

    async def prompts(self, prompts: list[str] | list[list[int]], param: str = "prompt") -> list[Prompt]:
        """Encodes user text with special-token strings taken literally (a prompt cannot forge an EOS)."""
        def encode_all() -> list[Prompt]:
            return [self._from_ids(p, f"{param}[{i}]" if len(prompts) > 1 else param) if isinstance(p, list)
                    else self._encode(p, f"{param}[{i}]" if len(prompts) > 1 else param)
                    for i, p in enumerate(prompts)]
        if sum(len(p) for p in prompts if isinstance(p, str)) > LONG_TEXT:
            return await asyncio.to_thread(encode_all)
        return encode_all()

    # ---- engine requests -------------------------------------------------------------------------------------

    def requests(self, prompts: list[Prompt], body: BaseModel, *, names: Mapping[str, str] | None = None,
                 defaults: Mapping[str, Any] | None = None, choices: int = 1) -> list[GenerationRequest]:
        """The engine requests of one HTTP request, `choices` per prompt, each checked before any compute.

        `names` maps engine field names to this endpoint's (max_new_tokens -> max_tokens). A field the client gave
        wins; one left out or sent as null takes the endpoint's default (`defaults`), else the checkpoint's
        (temperature, top_k, top_p, as vLLM does), else GenerationParams' own. Choice c of a seeded request uses
        seed + c, so the choices differ and each one repeats."""
        names = names or {}
        given: dict[str, Any] = {}
        for name in ENGINE_FIELDS:
            api_name = names.get(name, name)
            if api_name in body.model_fields_set and getattr(body, api_name) is not None:
                given[name] = getattr(body, api_name)
        values = {**self.defaults, **(defaults or {}), **given}
        stop = values.get("stop", ())
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        values["stop_token_ids"] = tuple(values.get("stop_token_ids", ()))
        params = GenerationParams(**values)

        def choice(c: int) -> GenerationParams:
            return params if params.seed is None else replace(params, seed=(params.seed + c) % 2**63)
        return [self._checked_request(prompt, choice(c), explicit_max="max_new_tokens" in given, names=names,
                                      param=f"prompt[{i}]" if len(prompts) > 1 else "prompt")
                for i, prompt in enumerate(prompts) for c in range(choices)]

    def _checked_request(self, prompt: Prompt, params: GenerationParams, *, explicit_max: bool,
                         names: Mapping[str, str], param: str = "prompt") -> GenerationRequest:
        """An engine request, checked before any compute. Without an explicit max_new_tokens the default is cut
        to the context left; an explicit one that does not fit is a 400 naming both numbers."""
        max_name = names.get("max_new_tokens", "max_new_tokens")
        room = self.max_seq_len - len(prompt.prompt_ids)
        if room < 1:
            raise APIError(400, f"{param}: the prompt has {len(prompt.prompt_ids)} tokens, which leaves no room in "
                                f"the context length {self.max_seq_len}", param=param,
                           code="context_length_exceeded")
        if not explicit_max:
            params = replace(params, max_new_tokens=min(params.max_new_tokens, room))
        elif params.max_new_tokens > room:
            raise APIError(400, f"{max_name}: the prompt has {len(prompt.prompt_ids)} tokens and {max_name} is "
                                f"{params.max_new_tokens}: {len(prompt.prompt_ids) + params.max_new_tokens} tokens, "
                                f"more than the context length {self.max_seq_len}", param=max_name,
                           code="context_length_exceeded")
        request = GenerationRequest(prompt.prompt_ids, params, source_ids=prompt.source_ids)
        try:
            self.engine.check(request)
        except ValueError as e:
            raise from_value_error(e, names) from e
        return request

    def generation(self, requests: list[GenerationRequest], prompt_tokens: list[int],
                   request_id: str = "") -> Generation:
        return Generation(self.engine, requests, prompt_tokens, self.metrics, self.settings.request_timeout,
                          self.live, request_id)

    def abort_all(self) -> None:
        """Shutdown's grace deadline: every generation still running ends now, with finish_reason abort (streams
        get their final event and [DONE])."""
        for generation in list(self.live):
            generation.abort_unfinished()

    def fail_all(self, reason: str) -> None:
        """The engine died: every generation still waiting on it ends now, with an error."""
        for generation in list(self.live):
            generation.fail(reason)


def engine_error(error: Exception) -> APIError:
    if isinstance(error, QueueFull):
        return unavailable(f"the server is busy: {error}; retry later", code="queue_full")
    if isinstance(error, EngineError):
        return unavailable(str(error), code="engine_unavailable", retry_after=5)
    if isinstance(error, ValueError):
        return from_value_error(error)
    raise error


class Generation:
    """The engine requests of one HTTP request, run concurrently; outputs come back merged, tagged by index.

    Should the engine thread die with one of them still queued, nothing would ever answer it: `fail` (called by the
    server's watchdog, see lifecycle.py) wakes the consumer, which then ends every unfinished request with an
    error instead of waiting forever.
    """

    def __init__(self, engine: Engine, requests: list[GenerationRequest], prompt_tokens: list[int], metrics: Metrics,
                 timeout: float, live: set[Generation], request_id: str = "") -> None:
        self.engine, self.requests, self.timeout, self.live = engine, requests, timeout, live
        self.request_id = request_id  # the HTTP request's, as its client sees it (x-request-id)
        self.prompt_tokens = prompt_tokens  # per request, as clients count them (encoder-decoder: the source)
        self.timers: list[RequestTimer] = [metrics.timer(n) for n in prompt_tokens]
        self.finished = [False] * len(requests)
        self.timed_out = False
        self.failure: str | None = None
        self._buffer: deque[tuple[int, RequestOutput]] = deque()
        self._single: AsyncIterator[RequestOutput] | None = None  # one request: read it directly, no pump task
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._deadline: asyncio.TimerHandle | None = None
        self._consumer: asyncio.Task | None = None

    async def start(self) -> None:
        """Submits every request and returns once each has produced its first output; raises APIError (503 for a
        full queue) after aborting the others if any cannot be taken."""
        self._deadline = asyncio.get_running_loop().call_later(self.timeout, self._on_timeout)
        self._consumer = asyncio.current_task()
        self.live.add(self)
        try:
            if len(self.requests) == 1:
                self._single = self.engine.submit(self.requests[0])
                self._buffer.append((0, await anext(self._single)))
                return
            self._pumps = [asyncio.ensure_future(self._pump(i, r)) for i, r in enumerate(self.requests)]
            started: set[int] = set()
            while len(started) < len(self.requests):
                index, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                started.add(index)
                self._buffer.append((index, item))
        except (QueueFull, EngineError, ValueError) as e:
            for timer in self.timers:  # refused, not aborted: the 503 is counted by status
                timer.discard()
            self.close()
            raise engine_error(e) from e
        except asyncio.CancelledError:
            self.close()
            if self.failure is None:
                raise
            _uncancel()
            raise unavailable(self.failure, code="engine_dead", retry_after=30) from None
        except BaseException:
            self.close()
            raise

    async def _pump(self, index: int, request: GenerationRequest) -> None:
        try:
            async for out in self.engine.submit(request):
                self._queue.put_nowait((index, out))
        except Exception as e:
            self._queue.put_nowait((index, e))

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every request, in arrival order, until all have finished."""
        self._consumer = asyncio.current_task()
        remaining = self.finished.count(False)
        while remaining:
            try:
                if self._buffer:
                    index, item = self._buffer.popleft()
                elif self._single is not None:
                    index, item = 0, await anext(self._single)
                else:
                    index, item = await self._queue.get()
            except asyncio.CancelledError:
                if self.failure is None:
                    raise
                _uncancel()
                for index, out in self._failed_outputs():
                    yield index, out
                return
            if isinstance(item, BaseException):
                raise item
            if item.error is not None and item.finish_reason is FinishReason.ERROR:
                item = self._without_internals(item)
            self.timers[index].observe(item)
            if item.finished:
                self.finished[index] = True
                remaining -= 1
            yield index, item
        self.live.discard(self)

    def _without_internals(self, out: RequestOutput) -> RequestOutput:
        """An engine failure's details are for the log; the client gets a message it can quote to the operator."""
        log.error("request %s: engine request %s failed: %s", self.request_id or "-", out.request_id, out.error)
        where = f" (request id {self.request_id})" if self.request_id else ""
        return replace(out, error=f"the server failed this request{where}; its log has the details")

    def _failed_outputs(self) -> list[tuple[int, RequestOutput]]:
        outputs = []
        for index, request in enumerate(self.requests):
            if not self.finished[index]:
                self.finished[index] = True
                out = RequestOutput.ended(request, FinishReason.ERROR, self.failure,
                                          completion_tokens=self.timers[index].completion_tokens)
                self.timers[index].observe(out)
                outputs.append((index, out))
        return outputs

    def fail(self, reason: str) -> None:
        """The engine will not answer any more: end the unfinished requests with an error now."""
        self.failure = reason
        if self._consumer is not None and not self._consumer.done():
            self._consumer.cancel()

    def _on_timeout(self) -> None:
        self.timed_out = True
        self.abort_unfinished()

    def abort_unfinished(self) -> None:
        """Asks the engine to end what is unfinished; it answers each with finish_reason abort, read as usual."""
        for request, finished in zip(self.requests, self.finished):
            if not finished:
                self.engine.abort(request.request_id)

    def close(self) -> None:
        """Aborts every unfinished request at once (client gone, error or timeout); safe to call twice."""
        self.live.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
        for request, finished, timer in zip(self.requests, self.finished, self.timers):
            if not finished:
                self.engine.abort(request.request_id)
                timer.finish("abort")
        for pump in self._pumps:
            pump.cancel()


def _uncancel() -> None:
    """We cancelled our own task to wake it (Generation.fail) and handled that: clear the request (Python 3.11+)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


@dataclass
class Collected:
    """The whole result of one engine request (the non-streaming responses)."""

    text: str = ""
    token_ids: list[int] | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids = (self.token_ids or []) + out.token_ids
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.completion_tokens = out.completion_tokens
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error


async def collect(generation: Generation) -> list[Collected]:
    """Runs a started generation to the end; an engine failure of any request is a 500."""
    results = [Collected(prompt_tokens=n) for n in generation.prompt_tokens]
    try:
        async for index, out in generation.events():
            results[index].add(out)
    finally:
        generation.close()
    failed = next((r for r in results if r.finish_reason is FinishReason.ERROR), None)
    if failed is not None:
        raise APIError(500, failed.error or "the engine failed this request", code="engine_error")
    return results


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # let its cleanup (the aborts) run before answering


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def log_fields(request: Request, **fields: Any) -> None:
    """Adds fields to this request's access-log line (see middleware.AccessLog)."""
    state = request.scope.setdefault("state", {})
    state.setdefault("log", {}).update({k: v for k, v in fields.items() if v is not None})
