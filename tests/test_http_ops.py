"""Operating the HTTP server: overload (503 + Retry-After), API keys, body limits, readiness while loading, a failed
load, a dead engine, SIGTERM draining, and the command line."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from service import cli
from service.api.lifecycle import load_engine
from service.settings import Settings
from tests.support.live_server import (
    LiveServer,
    assert_error,
    make_checkpoint,
    serve_process,
    sse_events,
    wait_idle,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
LONG = {"prompt": "x", "max_new_tokens": 1000, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", max_positions=1024)


def test_a_full_queue_is_503_while_admitted_requests_complete(checkpoint):
    server = LiveServer(Settings(model=checkpoint, max_batch_size=1, max_queue=1)).wait_ready()
    try:
        results: dict[str, object] = {}

        def wait_for_whole(name: str) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                results[name] = client.post("/generate", json=LONG)

        with httpx.Client(base_url=server.url, timeout=60) as client, client.stream(
                "POST", "/generate", json=LONG | {"stream": True}) as running:
            events = sse_events(running.iter_lines())
            next(events)  # the first request holds the only cache row
            waiting = threading.Thread(target=wait_for_whole, args=("waiting",))
            waiting.start()
            wait_until(lambda: server.metrics()["lmserve_requests_waiting"] == 1, timeout=10, what="1 waiting")
            rejected = server.client.post("/generate", json=LONG)
            rejected_openai = server.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
            rest = list(events)
        error = assert_error(rejected, 503, code="queue_full")
        assert "queue" in error["message"] and int(rejected.headers["retry-after"]) >= 1
        assert_error(rejected_openai, 503, code="queue_full")
        assert rest[-1] == "[DONE]" and rest[-2]["finish_reason"] == "length"
        assert rest[-2]["usage"]["completion_tokens"] == 1000
        waiting.join(timeout=60)
        assert results["waiting"].status_code == 200
        assert results["waiting"].json()["outputs"][0]["finish_reason"] == "length"
        assert server.metrics()['lmserve_http_requests_total{method="POST",route="/generate",status="503"}'] == 1
        wait_idle(server)
    finally:
        server.stop()


def test_api_key_and_body_limit(checkpoint):
    server = LiveServer(Settings(model=checkpoint, api_key="sesame", max_body_bytes=2048)).wait_ready()
    try:
        c = server.client
        body = {"prompt": "x", "max_new_tokens": 2}
        error = assert_error(c.post("/generate", json=body), 401, code="missing_api_key")
        assert error["type"] == "authentication_error"
        assert_error(c.post("/generate", json=body, headers={"authorization": "Bearer nope"}), 401,
                     code="invalid_api_key")
        assert_error(c.post("/generate", json=body, headers={"x-api-key": "nope"}), 401, code="invalid_api_key")
        assert_error(c.get("/nope"), 401)  # unknown routes are not revealed without the key
        assert c.post("/generate", json=body, headers={"authorization": "Bearer sesame"}).status_code == 200
        assert c.post("/generate", json=body, headers={"x-api-key": "sesame"}).status_code == 200
        for path in ("/health", "/ready", "/metrics", "/docs", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()

        key = {"x-api-key": "sesame"}
        assert_error(c.post("/generate", json={"prompt": "x" * 3000}, headers=key), 413, code="request_too_large")

        def chunked():  # no Content-Length: the limit applies while reading
            for _ in range(10):
                yield b" " * 500
        assert_error(c.post("/generate", content=chunked(), headers=key | {"content-type": "application/json"}),
                     413, code="request_too_large")
        under_limit = {"prompt": "def add(a, b):\n    return a + b\n" * 40, "max_new_tokens": 1}
        assert c.post("/generate", json=under_limit, headers=key).status_code == 200
    finally:
        server.stop()


def test_ready_is_503_until_loaded_and_warmed_up_then_health_reports_a_dead_engine(checkpoint):
    release = threading.Event()
    fatal = threading.Event()

    def slow_loader(settings: Settings):
        release.wait(timeout=30)
        return load_engine(settings)

    server = LiveServer(Settings(model=checkpoint), loader=slow_loader, on_fatal=fatal.set)
    try:
        c = server.client
        assert c.get("/health").json() == {"status": "ok", "model_status": "loading"}
        response = c.get("/ready")
        assert_error(response, 503, code="not_ready")
        assert int(response.headers["retry-after"]) > 0
        response = c.post("/generate", json={"prompt": "x"})
        assert_error(response, 503, code="not_ready")
        assert "retry-after" in response.headers
        assert c.get("/metrics").status_code == 200
        release.set()
        server.wait_ready()
        assert c.get("/health").json() == {"status": "ok", "model_status": "ready"}

        # the engine thread dies with requests it will never answer: one streaming (its outputs lost from here
        # on), one still in its inbox; the server's watchdog ends both instead of letting them hang
        engine = server.engine
        emit, add, lost = engine._emit, engine._add, threading.Event()
        engine._emit = lambda active, output: None if lost.is_set() else emit(active, output)
        results: dict[str, httpx.Response] = {}

        def never_taken() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                results["queued"] = client.post("/generate", json={"prompt": "x"})
        with httpx.Client(base_url=server.url, timeout=30) as client, client.stream(
                "POST", "/generate", json=LONG | {"stream": True}) as response:
            events = sse_events(response.iter_lines())
            next(events)
            lost.set()
            engine._add = lambda request, sink: None
            queued = threading.Thread(target=never_taken)
            queued.start()
            time.sleep(0.2)
            engine._inbox.put(("add",))  # not an engine message (a bug): the engine thread dies of it
            rest = list(events)
        assert rest[-1] == "[DONE]" and rest[-2]["finish_reason"] == "error"
        assert "engine thread died" in rest[-2]["error"]["message"]
        queued.join(timeout=10)
        assert_error(results["queued"], 503, code="engine_dead")
        engine._emit, engine._add = emit, add

        error = assert_error(c.get("/health"), 503, code="engine_dead")
        assert "engine thread died" in error["message"]
        assert_error(c.get("/ready"), 503)
        assert_error(c.post("/generate", json={"prompt": "x"}), 503, code="engine_dead")
        assert not fatal.is_set()
    finally:
        server.stop()


def test_a_model_that_fails_to_load_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    fatal = threading.Event()
    server = LiveServer(Settings(model=tmp_path), on_fatal=fatal.set)
    try:
        wait_until(fatal.is_set, timeout=10, what="the load to fail")
        error = assert_error(server.client.get("/health"), 503, code="load_failed")
        assert "CheckpointError" in error["message"]
        assert_error(server.client.get("/ready"), 503, code="load_failed")
        assert_error(server.client.post("/generate", json={"prompt": "x"}), 503, code="load_failed")
    finally:
        server.stop()


def test_an_engine_given_to_create_app_is_started_and_shut_down_with_it(checkpoint):
    engine = load_engine(Settings(model=checkpoint, max_batch_size=2))
    server = LiveServer(Settings(model=checkpoint, model_name="mine"), engine=engine).wait_ready()
    try:
        assert server.engine is engine and engine.alive
        body = server.client.post("/generate", json={"prompt": "x", "max_new_tokens": 3}).json()
        assert body["model"] == "mine" and body["usage"]["completion_tokens"] <= 3
        assert server.client.get("/info").json()["limits"]["max_batch_size"] == 2
    finally:
        server.stop()
    assert not engine.alive


def test_sigterm_drains_in_flight_requests_then_exits_0(checkpoint):
    process, url = serve_process(checkpoint, LMSERVE_SHUTDOWN_GRACE="20", LMSERVE_LOG_LEVEL="warning")
    try:
        with httpx.Client(base_url=url, timeout=60) as client, client.stream(
                "POST", "/generate", json=LONG | {"stream": True}) as response:
            events = sse_events(response.iter_lines())
            next(events)
            process.send_signal(signal.SIGTERM)
            rest = list(events)
        assert rest[-1] == "[DONE]" and rest[-2]["finish_reason"] == "length"  # drained, not cut off
        assert rest[-2]["usage"]["completion_tokens"] == 1000
        assert process.wait(timeout=20) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_command_line_flags_override_env_and_help_lists_every_setting(monkeypatch, capsys):
    monkeypatch.setenv("LMSERVE_PORT", "9001")
    monkeypatch.setenv("LMSERVE_MAX_QUEUE", "7")
    settings = cli.parse_settings(["serve", "--max-batch-size", "4", "--max-queue", "3", "--no-cuda-graphs"])
    assert (settings.port, settings.max_batch_size, settings.max_queue, settings.cuda_graphs) == (9001, 4, 3, False)
    assert cli.parse_settings(["--port", "9002", "--model", "some/dir"]).served_name == "dir"
    assert cli.parse_settings([]).model == ROOT / "checkpoints" / "default"

    with pytest.raises(SystemExit) as exit_:
        cli.parse_settings(["serve", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text and f"LMSERVE_{name.upper()}" in help_text

    with pytest.raises(SystemExit) as exit_:
        cli.parse_settings(["serve", "--device", "tpu"])
    assert exit_.value.code == 2 and "--device" in capsys.readouterr().err
    assert cli.serve(Settings(model=Path("/nonexistent/model"))) == 1
    assert "cannot serve /nonexistent/model" in capsys.readouterr().err


def test_python_dash_m_service_help():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "service", "serve", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--max-batch-size" in result.stdout
    assert time.monotonic() - started < 30
