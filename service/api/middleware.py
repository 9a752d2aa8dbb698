"""Plain ASGI middleware (not BaseHTTPMiddleware, which would buffer streams and hide client disconnects).

Outermost first: `AccessLog` (request id, one JSON log line and the status counter per request, and a JSON 500
for bugs), `ApiKey` (401 unless the configured key comes with the request), `BodyLimit` (413 for large bodies).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import APIError
from service.api.metrics import Metrics

access_log = logging.getLogger("lmserve.access")
log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/", "/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others: label "other"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _timestamp() -> str:
    """Now, as ISO 8601 UTC to the millisecond: the access log's lines stand alone (no logging prefix)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _send_error(send: Send, error: APIError, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in error.headers.items()), *extra_headers]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """Gives each request an id (the client's `x-request-id` if it sent a sane one), echoes it in the response,
    and logs one JSON line when the request ends: id, method, path, status, latency and whatever the route put
    in `request.state.log` (token counts, finish reasons)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # a bug: log it once, answer a JSON 500 if nothing was sent yet; the server goes on
            log.exception("unhandled error in request %s", request_id)
            state.setdefault("log", {})["error"] = "internal_error"
            if status == 0:
                await _send_error(send_with_id, APIError(500, "internal server error", code="internal_error"))
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"  # clients make methods up
            self.metrics.http_requests.labels(method, route_path, str(status or 499)).inc()
            record: dict[str, Any] = {"time": _timestamp(), "event": "request", "id": request_id,
                                      "method": scope["method"],
                                      "path": scope["path"], "status": status or 499,
                                      "latency_ms": round((time.monotonic() - start) * 1000, 1)}
            client = scope.get("client")
            if client:
                record["client"] = client[0]
            record.update(state.get("log") or {})
            access_log.info(json.dumps(record, ensure_ascii=False))


class ApiKey:
    """401 unless `Authorization: Bearer KEY` or `x-api-key: KEY` matches; probes, metrics and docs stay open."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"")
        given = authorization[7:].strip() if authorization[:7].lower() == b"bearer " else headers.get(b"x-api-key")
        if given is None:
            await _send_error(send, APIError(401, "an API key is required: send 'Authorization: Bearer KEY' or "
                                                  "'x-api-key: KEY'", code="missing_api_key",
                                             headers={"WWW-Authenticate": "Bearer"}))
        elif not secrets.compare_digest(given, self.key):
            await _send_error(send, APIError(401, "invalid API key", code="invalid_api_key",
                                             headers={"WWW-Authenticate": "Bearer"}))
        else:
            await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over `max_bytes`: at once from Content-Length, else while reading a chunked body; 408 for a
    body not complete `timeout` seconds after its headers (a client trickling it in holds a connection and a
    buffer). The body is read here and replayed to the app; after it, `receive` reaches the server again, so the
    routes can still wait for the client's disconnect."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                             code="request_too_large")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(send, too_large, [(b"connection", b"close")])
            return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                await _send_error(send, APIError(408, f"the request body did not arrive within {self.timeout:g} "
                                                      "seconds", code="request_timeout"), [(b"connection", b"close")])
                return
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _send_error(send, too_large, [(b"connection", b"close")])
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
