"""Regression tests for what a red-team run against a real `lmserve serve` found (issue: reliability under
hostile input): each input here once gave a 500, or broke other requests in flight."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math

import httpx
import pytest

from service.engine import engine as engine_module
from service.engine.engine import Engine, EngineConfig
from service.engine.request import FinishReason, GenerationParams, GenerationRequest
from service.settings import Settings
from tests.support.live_server import (
    LiveServer,
    assert_error,
    make_checkpoint,
    tokenizer,
    wait_idle,
    wait_until,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(Settings(model=make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"), max_batch_size=8,
                               max_seq_len=256)).wait_ready()
    yield live
    live.stop()


def raw_post(server: LiveServer, path: str, body: str) -> httpx.Response:
    """A body sent as written (json.dumps would refuse nothing, but this keeps escapes exactly as given)."""
    return server.client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def greedy(server: LiveServer, prompt: str, n: int = 12) -> list[int]:
    response = server.client.post("/generate", json={"prompt": prompt, "max_new_tokens": n, "temperature": 0,
                                                     "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["token_ids"]


def test_a_huge_top_k_is_a_400_and_harms_no_stream_beside_it(server):
    alone = greedy(server, "def add(a, b):")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        neighbours = [pool.submit(greedy, server, "def add(a, b):") for _ in range(3)]
        bad = raw_post(server, "/generate", '{"prompt":"x","max_new_tokens":4,"top_k":9223372036854775808,'
                                            '"top_p":0.5,"temperature":1}')
        assert [f.result(timeout=60) for f in neighbours] == [alone] * 3
    assert_error(bad, 400, param="top_k")
    for top_k in (2**63 - 1, 10**6, tokenizer().vocab_size, tokenizer().vocab_size + 1):  # all: top-k off
        response = server.client.post("/generate", json={"prompt": "x", "max_new_tokens": 4, "top_k": top_k,
                                                         "top_p": 0.5, "seed": 3})
        assert response.status_code == 200, (top_k, response.text)
        assert response.json()["outputs"][0]["finish_reason"] in ("length", "stop")
    too_big = server.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "top_k": 2**64})
    assert_error(too_big, 400, param="top_k")
    wait_idle(server)


@pytest.mark.parametrize("path,body,param", [
    ("/generate", '{"prompt": "\\ud800"}', "prompt"),
    ("/generate", '{"prompt": ["ok", "a\\udfffb"]}', "prompt"),
    ("/generate", '{"prompt": "ok", "stop": ["\\ud83d"]}', "stop"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/next-token-probs", '{"prompt": "\\udc00x"}', "prompt"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', "model"),
    ("/v1/completions", '{"prompt": "x", "stop": "\\ud800"}', "stop"),
])
def test_lone_surrogates_are_a_400_naming_the_field(server, path, body, param):
    assert_error(raw_post(server, path, body), 400, param=param)
    assert server.client.get("/health").status_code == 200


def test_a_real_surrogate_pair_is_text_like_any_other(server):
    response = raw_post(server, "/tokenize", '{"prompt": "\\ud83d\\ude80"}')  # the escape of one emoji
    assert response.status_code == 200 and response.json()["tokens"] == tokenizer().encode("🚀", allow_special=False)


@pytest.mark.parametrize("temperature", ["1e-38", "1e-300", "5e-324", "1e-6", "1e-5"])
def test_tiny_temperatures_give_a_finite_one_hot_distribution(server, temperature):
    body = '{"prompt": "def add(a, b):", "top_k": 5, "temperature": ' + temperature + "}"
    response = raw_post(server, "/next-token-probs", body)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    numbers = [result["entropy"], *(t[k] for t in result["tokens"] for k in ("prob", "logprob"))]
    assert all(math.isfinite(x) for x in numbers)
    greedy_first = raw_post(server, "/next-token-probs", '{"prompt": "def add(a, b):", "top_k": 1, '
                                                         '"temperature": 0.0001}').json()["results"][0]["tokens"][0]
    assert result["tokens"][0]["id"] == greedy_first["id"] and result["tokens"][0]["prob"] == pytest.approx(1.0)
    assert result["entropy"] == pytest.approx(0.0, abs=1e-6)


def test_made_up_http_methods_add_no_metric_series(server):
    def series() -> list[str]:
        return [line for line in server.client.get("/metrics").text.splitlines()
                if line.startswith("lmserve_http_requests_total")]
    for i in range(20):
        server.client.request(f"BREW{i}", "/generate")
    before = series()
    for i in range(20, 60):
        assert server.client.request(f"BREW{i}", "/health").status_code == 405
    after = series()
    assert len(after) <= len(before) + 1  # at most the /health route under "other"
    assert not any("BREW" in line for line in after)
    assert any('method="other"' in line for line in after)


def test_when_one_requests_sampling_raises_only_that_request_fails(monkeypatch):
    """Fault isolation: a step whose batched sampling raises is sampled request by request; the one at fault
    ends with an error, the others go on with exactly the tokens they get alone."""
    from model.checkpoint import Checkpoint, GenerationConfig
    from tests.support.models import make_model

    tok = tokenizer()
    model = make_model("llama-gqa", vocab_size=tok.vocab_size, max_position_embeddings=128)
    checkpoint = Checkpoint(model=model, tokenizer=tok, generation=GenerationConfig(eos_token_id=tok.eos_id),
                            path=None)
    engine = Engine(checkpoint, EngineConfig(max_batch_size=4, max_seq_len=64))
    engine.start()
    real_sample = engine_module.sample
    poisoned = 666  # the seed that makes sampling raise (a stand-in for any input the sampler cannot take)

    def sample(logits, rows, generator=None):
        if any(row.params.seed == poisoned for row in rows):
            raise OverflowError("poisoned row")
        return real_sample(logits, rows, generator)

    def request(seed: int) -> GenerationRequest:
        return GenerationRequest(tok.encode("def add(a, b):"), GenerationParams(max_new_tokens=10, seed=seed,
                                                                                 ignore_eos=True))

    async def run(requests: list[GenerationRequest]) -> list[tuple[list[int], FinishReason]]:
        async def one(r: GenerationRequest) -> tuple[list[int], FinishReason]:
            tokens, reason = [], None
            async for out in engine.submit(r):
                tokens += out.token_ids
                reason = out.finish_reason
            return tokens, reason
        return list(await asyncio.gather(*(one(r) for r in requests)))

    try:
        alone = asyncio.run(run([request(1)]))[0] + asyncio.run(run([request(2)]))[0]
        monkeypatch.setattr(engine_module, "sample", sample)
        (a, ra), (bad, reason), (b, rb) = asyncio.run(run([request(1), request(poisoned), request(2)]))
        assert reason is FinishReason.ERROR and bad == []
        assert (a, ra, b, rb) == alone and ra is FinishReason.LENGTH
        wait_until(lambda: engine.stats.running == 0, timeout=5, what="0 running")
        assert engine.alive
        assert asyncio.run(run([request(1)]))[0] == alone[:2]  # and it keeps serving
    finally:
        engine.shutdown()


def test_the_payload_of_the_red_team_run_is_json(server):
    """The exact body from the report, as bytes: a 400, and the server healthy after it."""
    body = json.dumps({"prompt": "x", "max_new_tokens": 4, "top_k": 9223372036854775808, "top_p": 0.5,
                       "temperature": 1})
    assert_error(raw_post(server, "/generate", body), 400, param="top_k")
    assert server.client.get("/ready").status_code == 200
