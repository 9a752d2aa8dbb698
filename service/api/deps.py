"""Helpers the routers share: the `Serving` dependency (503 until the model is ready), Server-Sent Events and
the streaming response that aborts its engine requests however it ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.errors import APIError, unavailable
from service.api.generation import Serving

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def get_serving(request: Request) -> Serving:
    """The loaded model, or 503 (with Retry-After) while it loads, after it failed or once the engine died."""
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


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends: finished, client gone (Starlette cancels the
    stream) or never started at all, so the engine requests behind it are always aborted."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:  # a generator left suspended (client gone mid-send) runs its cleanup now
                await aclose()
