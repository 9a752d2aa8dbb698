"""Helpers the routers share: the `Serving` dependency (503 until the model is ready), Server-Sent Events and
the streaming response that aborts its engine requests however it ends."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.errors import APIError, error_body, unavailable
from service.api.generation import Serving

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def get_serving(request: Request) -> Serving:
    """The loaded model, or 503 (with Retry-After) while it loads, after it failed or once the engine died: the
    one readiness check, for the routes and /ready alike."""
    state = request.app.state.lmserve
    serving = state.serving
    if serving is None or not state.ready:
        if state.error:
            raise unavailable(f"the model failed to load: {state.error}", code="load_failed", retry_after=30)
        raise unavailable(f"the model is {state.status}; retry shortly", code="not_ready", retry_after=5)
    if not serving.engine.alive:
        raise unavailable(serving.engine.dead_reason or "the engine is not running", code="engine_dead",
                          retry_after=30)
    return serving


ServingDep = Annotated[Serving, Depends(get_serving)]


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def check_count(count: int, limit: int, param: str = "prompt") -> None:
    if count < 1:
        raise APIError(400, f"{param}: give at least one prompt", param=param, code="invalid_value")
    if count > limit:
        raise APIError(400, f"{param}: {count} prompts (x n) is more than the limit of {limit} per request",
                       param=param, code="too_many_prompts")


async def _reporting_failures(events: AsyncGenerator[bytes, None], request: Request) -> AsyncIterator[bytes]:
    """`events`, ended by an error event if the code producing them fails: the status line is gone by then, so the
    stream itself must say it."""
    try:
        async for event in events:
            yield event
    except Exception:
        log.exception("stream of request %s failed", request_id(request))
        yield sse(error_body("internal server error", "internal_error"))
    finally:
        await events.aclose()  # its own cleanup (the access-log fields) runs now, not whenever it is collected


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends: finished, failed, client gone (Starlette cancels the
    stream) or never started at all, so the engine requests behind it are always aborted."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], request: Request, on_close: Callable[[], None]) -> None:
        super().__init__(_reporting_failures(events, request), headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:  # a generator left suspended (client gone mid-send) runs its cleanup now
                await aclose()
