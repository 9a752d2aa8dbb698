"""Slow, stalled and too many clients, and shutdown past its grace period, against a real server on loopback: the
red-team run held 300 slowloris connections open for 60 s, awaited a trickled body for over 30 s, hung /health at
the file-descriptor limit, buffered a non-reading client's stream without bound, and cut streams at the shutdown
deadline with no final event."""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from service.cli import RepeatLimit
from service.settings import Settings
from tests.support.live_server import (
    LiveServer,
    make_checkpoint,
    serve_process,
    sse_events,
    wait_idle,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", max_positions=1024)


def _connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (bounded by the socket's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_headers_and_bodies_that_do_not_arrive_in_time_get_408(checkpoint):
    server = LiveServer(Settings(model=checkpoint, header_timeout=1, body_timeout=1)).wait_ready()
    sockets: list[socket.socket] = []
    try:
        started = time.monotonic()
        for _ in range(30):  # slowloris: headers begun, never finished
            sock = _connect(server)
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            sockets.append(sock)
        idle = _connect(server)  # connected, sent nothing
        sockets.append(idle)
        assert server.client.get("/health").status_code == 200  # others are served meanwhile
        for sock in sockets:
            status, error = _error_of(_read_all(sock))
            assert (status, error["code"]) == (408, "request_timeout")
        assert time.monotonic() - started < 5

        trickle = _connect(server)  # a body trickled in, a byte at a time
        sockets.append(trickle)
        body = b'{"prompt": "def add(a, b):", "max_new_tokens": 4}'
        trickle.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body))
        started = time.monotonic()
        trickle.settimeout(0.3)
        response = b""
        for byte in body:
            try:
                trickle.sendall(bytes([byte]))
                response += trickle.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if response:
                break
        trickle.settimeout(5)
        response += _read_all(trickle)
        status, error = _error_of(response)
        assert (status, error["code"]) == (408, "request_timeout") and 0.9 < time.monotonic() - started < 4
        assert server.client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def test_connections_beyond_the_cap_get_503_and_health_answers_again_once_they_close(checkpoint):
    server = LiveServer(Settings(model=checkpoint, max_connections=8, header_timeout=30)).wait_ready()
    server.client.close()  # no keep-alive connection of our own in the count
    sockets: list[socket.socket] = []
    try:
        for _ in range(8):
            sockets.append(_connect(server))
        wait_until(lambda: len(server.server.server_state.connections) == 8, timeout=5, what="8 connections")
        refused = []
        for _ in range(20):  # a flood beyond the cap: each one answered at once and closed
            sock = _connect(server)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            refused.append(_error_of(_read_all(sock)))
            sock.close()
        assert all(status == 503 and error["code"] == "too_many_connections" for status, error in refused)
        assert server.server.config.http.refusals.total == 20
        with pytest.raises(httpx.HTTPStatusError):
            httpx.get(server.url + "/health", timeout=5).raise_for_status()
        for sock in sockets:
            sock.close()
        wait_until(lambda: httpx.get(server.url + "/health", timeout=5).status_code == 200, timeout=5,
                   what="/health once the connections closed")
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def test_a_client_that_stops_reading_is_dropped_and_its_requests_aborted(checkpoint):
    server = LiveServer(Settings(model=checkpoint, write_timeout=1, max_seq_len=256)).wait_ready()
    try:
        server.slow_down("decode", 0.02)  # 240 tokens: about 5 s, well past the write timeout
        server.client.close()  # only the stalled connection in the count
        connections = server.server.server_state.connections
        wait_until(lambda: not connections, timeout=10, what="no connection open")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's side holds little
        host, port = server.url.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        body = json.dumps({"prompt": ["def add(a, b):"] * 32, "max_new_tokens": 240, "logprobs": 20,
                           "ignore_eos": True, "stream": True}).encode()
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        # never read: the server must give up on the connection within its write timeout and free it
        wait_until(lambda: connections, timeout=5, what="the connection")
        wait_until(lambda: not connections, timeout=20, what="the stalled connection to be dropped")
        assert server.server.config.http.stalls.total == 1  # dropped for stalling, not closed for idling
        sock.close()
        server.client = httpx.Client(base_url=server.url, timeout=30)
        metrics = wait_idle(server)
        assert metrics["lmserve_requests_waiting"] == 0 and metrics['lmserve_requests_total{finish_reason="abort"}']
        assert server.client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200
    finally:
        server.stop()


def test_shutdown_past_the_grace_period_ends_streams_with_abort_and_done(checkpoint):
    """A real `lmserve serve`, SIGTERM with streams that cannot finish in a 1 s grace period."""
    process, url = serve_process(checkpoint, LMSERVE_SHUTDOWN_GRACE="1", LMSERVE_LOG_LEVEL="info")
    try:
        long = {"prompt": ["x"] * 16, "max_new_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as client, client.stream("POST", "/generate",
                                                                             json=long) as response:
            events = sse_events(response.iter_lines())
            next(events)
            process.send_signal(signal.SIGTERM)
            rest = list(events)
        finals = [e for e in rest if isinstance(e, dict) and "finish_reason" in e]
        assert rest[-1] == "[DONE]" and len(finals) == 16
        assert all(e["finish_reason"] == "abort" for e in finals)  # 16,000 tokens do not fit in 1 s here
        assert all(0 < e["usage"]["completion_tokens"] < 1000 for e in finals)
        assert process.wait(timeout=20) == 0
        log = process.stdout.read().decode()
        assert "Traceback" not in log and "Cancel" not in log, log
        access = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
        generate = [line for line in access if line["path"] == "/generate"]
        assert len(generate) == 1 and generate[0]["status"] == 200
        assert generate[0]["completion_tokens"] == sum(e["usage"]["completion_tokens"] for e in finals)
        assert generate[0]["finish_reason"] == ["abort"] * 16 and generate[0]["time"].endswith("Z")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_flood_of_one_log_message_is_held_to_a_few_lines_per_interval():
    """At the open-file limit the red-team run's log grew 76 MB in 10 s: one traceback per failed accept."""
    limit = RepeatLimit(burst=5, interval=10)

    def record(message: str, created: float) -> logging.LogRecord:
        r = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)
        r.created = created
        return r
    flood = [record("socket.accept() out of system resource", 100.0 + i / 1000) for i in range(1000)]
    assert sum(limit.filter(r) for r in flood) == 5
    later = record("socket.accept() out of system resource", 111.0)
    assert limit.filter(later) and "995 more like this" in later.getMessage()
    assert all(limit.filter(record(f'{{"event": "request", "id": "{i}"}}', 112.0)) for i in range(100))


def test_malformed_http_gets_the_json_error_shape(checkpoint):
    server = LiveServer(Settings(model=checkpoint)).wait_ready()
    try:
        for garbage in (b"GARBAGE\r\n\r\n", b"POST /generate HTTP/1.1\r\nno colon here\r\n\r\n",
                        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"):
            sock = _connect(server)
            sock.sendall(garbage)
            status, error = _error_of(_read_all(sock))
            sock.close()
            assert (status, error["code"]) == (400, "invalid_http") and error["message"], garbage
        assert server.client.get("/health").status_code == 200
    finally:
        server.stop()
