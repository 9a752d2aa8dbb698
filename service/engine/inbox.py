"""The messages other threads put in the engine's inbox, and where a request's outputs go.

The engine thread alone touches the scheduler, the runner and the requests' state; every call from the event loop
(`submit`, `abort`, `next_token_probs`, `shutdown`) only enqueues one of these.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.engine.request import GenerationRequest, RequestOutput

ProbeResult = list[dict[str, Any]]


@dataclass(frozen=True)
class Sink:
    """Where a request's outputs go: its queue, on the event loop of the coroutine that submitted it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


@dataclass(frozen=True)
class Submit:
    """A new request, already checked (Engine.check)."""

    request: GenerationRequest
    sink: Sink


@dataclass(frozen=True)
class Abort:
    """Stop a request or a probe (if it still runs or waits); a request ends with finish_reason abort, a probe
    is dropped (its caller has gone)."""

    request_id: str


@dataclass(frozen=True)
class Probe:
    """A next-token distribution for each prompt; `reply` gets the results or the exception, on any thread."""

    probe_id: str
    prompts: list[list[int]]
    sources: list[list[int]] | None
    top_k: int
    temperature: float
    reply: Callable[[ProbeResult | Exception], None]


@dataclass(frozen=True)
class Wake:
    """Nothing to do: lets a thread blocked on the inbox see that the engine is stopping."""


Message = Submit | Abort | Probe | Wake
