"""uvicorn as lmserve runs it: a cap on open connections, deadlines for reading a request's headers and for a
client that stops reading, and a shutdown that ends the streams still open at the grace deadline with
`finish_reason: "abort"` and `[DONE]` instead of cutting them.

uvicorn alone would keep a connection that never finishes its headers (slowloris) or never reads its response
for ever, and, at the file-descriptor limit, log a traceback for every accept that fails. Here:

- `GuardedH11Protocol`: beyond `max_connections` a new connection gets a 503 (JSON, Retry-After) and is closed,
  so the process stays below its descriptor limit and /health keeps answering; a request whose headers are not
  complete `header_timeout` seconds after its first byte (or after the connection opened) gets a 408; a
  response the client accepts nothing of for `write_timeout` seconds is dropped (the transport is aborted,
  which frees what it buffers and, through the disconnect, aborts the engine requests behind it). The body
  deadline (`body_timeout`) is the BodyLimit middleware's, which reads the body.
- `Server.shutdown` marks the server stopping (/ready 503), and at `shutdown_grace` seconds aborts every
  generation still running; uvicorn's own hard deadline comes a little later, for those final events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.errors import APIError
from service.settings import Settings

log = logging.getLogger(__name__)
RESERVED_DESCRIPTORS = 64  # kept free for the checkpoint's files, logs and the engine beside the connections
FINAL_EVENTS_SECONDS = 5.0  # after the grace deadline: time for aborted streams to send their last event


def _raw_error(status: int, reason: str, error: APIError) -> bytes:
    """A whole HTTP/1.1 error response, for a connection that has no request (h11 cannot answer those)."""
    body = json.dumps(error.body()).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close"),
               *error.headers.items()]
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


TOO_MANY_CONNECTIONS = _raw_error(503, "Service Unavailable", APIError(
    503, "too many open connections; retry shortly", code="too_many_connections", headers={"Retry-After": "1"}))
HEADER_TIMEOUT = _raw_error(408, "Request Timeout", APIError(
    408, "the request headers did not arrive in time", code="request_timeout"))


class _Counted:
    """Counts an event that can come by the thousand (a flood of connections) and logs it at most once per
    `interval` seconds, with the count since the last line."""

    def __init__(self, message: str, interval: float = 10.0) -> None:
        self.message, self.interval = message, interval
        self.count, self.total, self.last = 0, 0, float("-inf")

    def note(self) -> None:
        self.count += 1
        self.total += 1
        now = asyncio.get_running_loop().time()
        if now - self.last >= self.interval:
            log.warning("%s (%d since the last such line)", self.message, self.count)
            self.count, self.last = 0, now




class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection cap and the header and write deadlines (see the module doc).
    The limits are class attributes, set by `guarded_protocol` for one server."""

    max_connections = 1024
    header_timeout = 10.0
    write_timeout = 30.0
    linger = 1.0  # seconds a refused connection is read (and ignored) after its answer, see _answer_and_close
    max_lingering = 64  # beyond this many lingering at once (a flood), refused connections are closed at once
    lingering = 0
    refusals: _Counted  # connections refused at the cap, and
    stalls: _Counted  # clients dropped for reading nothing: per server, see guarded_protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._closing = self._lingers = False
        if len(self.connections) > self.max_connections:
            self.refusals.note()
            self._answer_and_close(TOO_MANY_CONNECTIONS)
            return
        self._arm_header_timer()

    def _answer_and_close(self, response: bytes) -> None:
        """Writes `response` and closes our side, then reads and drops what the client still sends until it closes
        (or `linger` seconds): closing with its request unread would reset the connection, and a reset can
        destroy the answer before the client reads it."""
        self._closing = True
        self.transport.write(response)
        cls = type(self)
        if cls.lingering >= self.max_lingering or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        cls.lingering += 1
        self._lingers = True
        self.loop.call_later(self.linger, self.transport.close)

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (no request to route): the JSON error shape, not uvicorn's plain text."""
        self._answer_and_close(_raw_error(400, "Bad Request", APIError(400, f"{msg.rstrip('.')}: malformed HTTP",
                                                                       code="invalid_http")))

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # the request is in (its body has a deadline of its own) or the connection is going anyway
        if self.conn.our_state is h11.IDLE:  # no response under way (a kept-alive connection has none)
            self._answer_and_close(HEADER_TIMEOUT)
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # answered already; see _answer_and_close
        if self._header_timer is None and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def eof_received(self) -> bool | None:
        if self._closing:
            self.transport.close()
        return super().eof_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel_write_timer()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self._on_write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_timer()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _on_write_timeout(self) -> None:
        """The client has read nothing for write_timeout seconds: drop it, and what is buffered for it."""
        self._write_timer = None
        self.stalls.note()
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingers:
            self._lingers = False
            type(self).lingering -= 1
        self._cancel_header_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)


def descriptor_limit() -> int:
    """Raises this process's soft limit on open files to the hard one (as servers do) and returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class for one server, its connection cap kept below the descriptor limit."""
    cap = min(settings.max_connections, max(1, descriptor_limit() - RESERVED_DESCRIPTORS))
    if cap < settings.max_connections:
        log.warning("--max-connections %d is above what the open-file limit allows; using %d",
                    settings.max_connections, cap)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "max_connections": cap, "header_timeout": settings.header_timeout, "write_timeout": settings.write_timeout,
        "refusals": _Counted("refused a connection: the open-connection cap is reached"),
        "stalls": _Counted("dropped a client that read nothing of its response within the write timeout")})


class Server(uvicorn.Server):
    """uvicorn.Server whose shutdown first calls `on_shutdown(grace)`: the app marks itself stopping and aborts
    what still runs at the grace deadline (see ServerState.begin_shutdown)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[float], None], grace: float) -> None:
        super().__init__(config)
        self.on_shutdown, self.grace = on_shutdown, grace

    async def shutdown(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self.on_shutdown(self.grace)
        await super().shutdown(sockets)


def server(app, settings: Settings, **overrides) -> Server:  # type: ignore[no-untyped-def]
    """The uvicorn server for `app` under `settings` (`overrides`: uvicorn.Config arguments, e.g. port=0)."""
    options = dict(host=settings.host, port=settings.port, log_config=None, access_log=False,
                   log_level=settings.log_level, http=guarded_protocol(settings),
                   timeout_keep_alive=settings.keep_alive_timeout,
                   timeout_graceful_shutdown=settings.shutdown_grace + FINAL_EVENTS_SECONDS)
    config = uvicorn.Config(app, **(options | overrides))
    return Server(config, app.state.lmserve.begin_shutdown, settings.shutdown_grace)
