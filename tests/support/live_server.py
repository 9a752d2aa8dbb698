"""Helpers for the HTTP tests: tiny checkpoints on disk, a real uvicorn server on 127.0.0.1 in a thread, SSE and
Prometheus parsing, bounded waiting."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from model.checkpoint import save_checkpoint
from model.tokenizer import Tokenizer
from service.api import http_server
from service.app import create_app
from service.settings import Settings
from tests.support.models import make_model

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ["def add(a, b):\n    return a + b\n", "print('hello, world')", "你好，世界！数字和文字。", "🚀🌍 emoji 😀",
          "class Point:\n    x: int\n    y: int\n"] * 20

_tokenizer: Tokenizer | None = None


def tokenizer() -> Tokenizer:
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = Tokenizer.train(CORPUS, vocab_size=420)
    return _tokenizer


def make_checkpoint(directory: Path, variant: str = "llama-gqa", max_positions: int = 1024) -> Path:
    """A tiny random checkpoint: small enough that the tests' long generations stay quick on one CPU thread."""
    tok = tokenizer()
    model = make_model(variant, vocab_size=tok.vocab_size, max_position_embeddings=max_positions)
    return save_checkpoint(directory, model, tok)


class LiveServer:
    """create_app(settings) served by uvicorn as `lmserve serve` runs it, on a free loopback port, in a thread of
    this process."""

    def __init__(self, settings: Settings, **app_kwargs) -> None:
        if "shutdown_grace" not in settings.model_fields_set:
            settings = settings.model_copy(update={"shutdown_grace": 2.0})  # a test's stop need not wait 30 s
        self.settings = settings
        self.app = create_app(settings, **app_kwargs)
        self.state = self.app.state.lmserve
        self.server = http_server.server(self.app, settings, host="127.0.0.1", port=0)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=20, what="uvicorn to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self, timeout: float = 30) -> LiveServer:
        wait_until(lambda: self.client.get("/ready").status_code == 200, timeout=timeout, what="/ready")
        return self

    @property
    def engine(self):
        return self.state.serving.engine

    def slow_down(self, runner_method: str, seconds: float) -> None:
        """Makes every call of one ModelRunner method take `seconds` longer: a stand-in for a big model on a slow
        machine, so that requests overlap (or outlast a deadline) however fast this tiny one runs."""
        runner = self.engine.runner
        real = getattr(runner, runner_method)

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)
        setattr(runner, runner_method, slow)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.client.get("/metrics").text)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the server did not stop"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (samples only)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The `data:` payloads of an SSE stream: parsed JSON, or the string '[DONE]'."""
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def wait_idle(server: LiveServer) -> dict[str, float]:
    """Waits until no request holds a cache row; returns the metrics then."""
    wait_until(lambda: server.metrics()["lmserve_requests_running"] == 0, timeout=5, what="0 running")
    metrics = server.metrics()
    assert metrics["lmserve_kv_cache_usage_ratio"] == 0
    assert metrics["lmserve_kv_cache_free_rows"] == metrics["lmserve_kv_cache_rows"]
    return metrics


def serve_process(checkpoint: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """A real `python -m service serve` of `checkpoint` on a free loopback port (LMSERVE_* settings in `env`), its
    output piped; returns once /ready is 200 (the caller stops it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "service", "serve", "--model", str(checkpoint), "--host",
                                "127.0.0.1", "--port", str(port)], cwd=ROOT,
                               env=os.environ | {"OMP_NUM_THREADS": "1", **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stdout.read().decode()}")
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_until(ready, timeout=60, interval=0.1, what="the server process")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, url
