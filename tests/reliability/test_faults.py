"""Fault isolation over HTTP: a request whose sampling raises (a test hook standing in for any input the sampler
cannot take) fails alone, with a message that names its request id and no Python internals; the streams beside it
finish as they would alone, and the server goes on serving."""

from __future__ import annotations

import concurrent.futures
import logging

import pytest

from service.engine import engine as engine_module
from service.settings import Settings
from tests.support.live_server import LiveServer, make_checkpoint, sse_events, wait_idle

POISONED = 666  # the seed the hook makes sampling raise on


@pytest.fixture
def server(tmp_path, monkeypatch):
    real_sample = engine_module.sample

    def sample(logits, rows, generator=None):
        if any(row.params.seed == POISONED for row in rows):
            raise OverflowError("Python int too large to convert to C long")
        return real_sample(logits, rows, generator)
    monkeypatch.setattr(engine_module, "sample", sample)
    live = LiveServer(Settings(model=make_checkpoint(tmp_path / "tiny"), max_batch_size=8,
                               max_seq_len=256)).wait_ready()
    yield live
    live.stop()


def test_a_failing_request_fails_alone_with_a_generic_message_and_the_details_in_the_log(server, caplog):
    body = {"prompt": "def add(a, b):", "max_new_tokens": 24, "ignore_eos": True, "seed": 1}
    alone = server.client.post("/generate", json=body).json()["outputs"][0]["token_ids"]

    def stream(seed: int, request_id: str) -> list:
        with server.client.stream("POST", "/generate", json=body | {"seed": seed, "stream": True},
                                  headers={"x-request-id": request_id}) as response:
            return list(sse_events(response.iter_lines()))
    with caplog.at_level(logging.ERROR), concurrent.futures.ThreadPoolExecutor(4) as pool:
        neighbours = [pool.submit(stream, 1, f"neighbour-{i}") for i in range(3)]
        bad = server.client.post("/generate", json=body | {"seed": POISONED}, headers={"x-request-id": "bad-1"})
        bad_stream = stream(POISONED, "bad-2")
        streams = [f.result(timeout=60) for f in neighbours]
    for events in streams:
        assert events[-1] == "[DONE]" and events[-2]["finish_reason"] == "length"
        assert [e["token_id"] for e in events[:-2]] == alone[:-1]  # the last token comes with the final event

    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "engine_error" and "bad-1" in error["message"]
    assert "Overflow" not in error["message"] and "Python" not in error["message"]
    final = bad_stream[-2]
    assert bad_stream[-1] == "[DONE]" and final["finish_reason"] == "error"
    assert "bad-2" in final["error"]["message"] and "Overflow" not in final["error"]["message"]
    with caplog.at_level(logging.ERROR):
        openai_bad = server.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "seed": POISONED},
                                        headers={"x-request-id": "bad-3"})
    assert openai_bad.status_code == 500 and "bad-3" in openai_bad.json()["error"]["message"]
    logged = [r.getMessage() for r in caplog.records if any(f"bad-{i}" in r.getMessage() for i in (1, 2, 3))]
    assert len(logged) == 3 and all("OverflowError" in line for line in logged)

    wait_idle(server)
    assert server.client.post("/generate", json=body).json()["outputs"][0]["token_ids"] == alone
