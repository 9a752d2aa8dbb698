"""The HTTP API against a real uvicorn server on 127.0.0.1: every endpoint's happy path (streaming and batches
included), the official openai client, the error shapes, disconnects and timeouts."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math

import httpx
import openai
import pytest

from service.api.schemas import CompletionRequest, GenerateRequest
from service.engine.limits import limits_of
from service.engine.sampling import SamplingParams
from service.settings import Settings
from tests.support.live_server import (
    LiveServer,
    assert_error,
    make_checkpoint,
    sse_events,
    tokenizer,
    wait_idle,
    wait_until,
)

PROMPTS = ["def add(a, b):", "print('hello", "class Point:\n", "你好", "🚀 emoji", "x"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-dec")
    live = LiveServer(Settings(model=directory, max_batch_size=8, max_seq_len=512, seed=0)).wait_ready()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def encdec(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-encdec", "original-encoder-decoder", 128)
    live = LiveServer(Settings(model=directory, max_batch_size=4)).wait_ready()
    yield live
    live.stop()


def generate(server: LiveServer, **body) -> dict:
    response = server.client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(server: LiveServer, path: str, body: dict) -> list:
    with server.client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(response.iter_lines()))


# ---- /generate -------------------------------------------------------------------------------------------------------

def test_generate_one_prompt_and_a_batch(server):
    one = generate(server, prompt=PROMPTS[0], max_new_tokens=12, temperature=0, ignore_eos=True)
    assert one["model"] == "tiny-dec" and one["id"]
    [output] = one["outputs"]
    assert output["index"] == 0 and output["finish_reason"] == "length" and len(output["token_ids"]) == 12
    assert "logprobs" not in output
    assert server.client.post("/detokenize", json={"tokens": output["token_ids"]}).json()["text"] == output["text"]
    prompt_tokens = len(tokenizer().encode(PROMPTS[0]))
    assert one["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12}

    batch = generate(server, prompt=PROMPTS[:3], max_new_tokens=12, temperature=0, ignore_eos=True)
    assert [o["index"] for o in batch["outputs"]] == [0, 1, 2]
    assert batch["outputs"][0]["text"] == output["text"]  # a batch answers each prompt as if it were alone
    assert batch["usage"]["completion_tokens"] == 36
    assert batch["usage"]["prompt_tokens"] == sum(len(tokenizer().encode(p)) for p in PROMPTS[:3])


def test_generate_stream_matches_the_whole_answer(server):
    whole = generate(server, prompt=PROMPTS[1], max_new_tokens=20, temperature=0, ignore_eos=True, logprobs=2)
    events = stream(server, "/generate", dict(prompt=PROMPTS[1], max_new_tokens=20, temperature=0, ignore_eos=True,
                                              logprobs=2, stream=True))
    assert events[-1] == "[DONE]"
    events = events[:-1]
    assert all(e["index"] == 0 for e in events)
    assert "".join(e["text"] for e in events) == whole["outputs"][0]["text"]
    assert [e["token_id"] for e in events if e["token_id"] is not None] == whole["outputs"][0]["token_ids"]
    final = events[-1]
    assert final["finish_reason"] == "length" and final["usage"] == whole["usage"]
    assert all("finish_reason" not in e for e in events[:-1])
    logprobs = [lp for e in events for lp in e["logprobs"]]
    assert len(logprobs) == 20 and all(len(lp["top_logprobs"]) == 2 for lp in logprobs)
    for lp, top in zip(logprobs, whole["outputs"][0]["logprobs"]):
        assert lp["token_id"] == top["token_id"] and lp["logprob"] <= 0
        assert lp["top_logprobs"][0]["logprob"] >= lp["top_logprobs"][1]["logprob"]


def test_generate_stream_of_a_batch(server):
    events = stream(server, "/generate", dict(prompt=PROMPTS[:3], max_new_tokens=5, temperature=0, stream=True,
                                              ignore_eos=True))
    assert events.pop() == "[DONE]"
    finals = {e["index"]: e for e in events if "finish_reason" in e}
    assert sorted(finals) == [0, 1, 2]
    assert all(f["usage"]["completion_tokens"] == 5 for f in finals.values())
    batch = generate(server, prompt=PROMPTS[:3], max_new_tokens=5, temperature=0, ignore_eos=True)
    for output in batch["outputs"]:
        assert "".join(e["text"] for e in events if e["index"] == output["index"]) == output["text"]


def test_seeded_sampling_repeats_and_stop_strings_cut(server):
    body = dict(prompt=PROMPTS[2], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    first, second = generate(server, **body), generate(server, **body)
    assert first["outputs"][0]["text"] == second["outputs"][0]["text"]
    greedy = generate(server, prompt=PROMPTS[0], max_new_tokens=30, temperature=0, ignore_eos=True)["outputs"][0]
    text = greedy["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = generate(server, prompt=PROMPTS[0], max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    assert cut["outputs"][0]["finish_reason"] == "stop"
    assert cut["outputs"][0]["text"] == text[:text.find(stop)]


def test_special_token_strings_in_prompts_are_plain_text(server):
    eos = tokenizer().eos_id
    ids = server.client.post("/tokenize", json={"prompt": "a<|eos|>b"}).json()["tokens"]
    assert eos not in ids and len(ids) > 3
    assert server.client.post("/detokenize", json={"tokens": ids}).json()["text"] == "a<|eos|>b"
    out = generate(server, prompt="<|eos|>", max_new_tokens=2, temperature=0, ignore_eos=True)
    assert out["usage"]["prompt_tokens"] == len(ids) - 2


# ---- /next-token-probs, /tokenize, /detokenize, /info, /v1/models -------------------------------------------------

def test_next_token_probs(server):
    response = server.client.post("/next-token-probs", json={"prompt": PROMPTS[:2], "top_k": 5, "temperature": 0.7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-dec" and len(body["results"]) == 2
    for prompt, result in zip(PROMPTS[:2], body["results"]):
        assert result["prompt_tokens"] == len(tokenizer().encode(prompt))
        probs = [t["prob"] for t in result["tokens"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        for t in result["tokens"]:
            assert math.isclose(math.log(t["prob"]), t["logprob"], abs_tol=1e-4)
            assert t["text"] == tokenizer().token_text(t["id"])
        assert 0 < result["entropy"] <= math.log(server.engine.vocab_size) + 1e-4
    vocab = server.engine.vocab_size
    assert_error(server.client.post("/next-token-probs", json={"prompt": "x", "top_k": vocab + 1}), 400, "top_k")
    assert_error(server.client.post("/next-token-probs", json={"prompt": "x", "temperature": 0}), 400, "temperature")
    assert_error(server.client.post("/next-token-probs", json={"prompt": "x", "decoder_prefix": "y"}), 400,
                 "decoder_prefix")


def test_tokenize_detokenize_and_info(server):
    body = server.client.post("/tokenize", json={"prompt": "def add(a, b):"}).json()
    assert body["tokens"] == tokenizer().encode("def add(a, b):") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512
    assert server.client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"text": "def add(a, b):"}
    assert_error(server.client.post("/detokenize", json={"tokens": [1, 10**6]}), 400, "tokens[1]")

    info = server.client.get("/info").json()
    assert info["model"] == "tiny-dec" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["config"]["vocab_size"] == server.engine.vocab_size and info["parameters"] > 0
    assert info["cpu_kernels"] == server.engine.runner.cpu_kernels
    backend = info["backend"]  # which compute path runs, as the runner reports it
    assert set(backend) == {"prefill", "decode", "decode_fallback_reason"}
    assert backend == server.engine.runner.backend_info
    assert all(isinstance(backend[k], str) and backend[k] for k in ("prefill", "decode"))
    assert backend["decode_fallback_reason"] is None or isinstance(backend["decode_fallback_reason"], str)
    assert info["limits"]["max_seq_len"] == 512 and info["limits"]["max_batch_size"] == 8
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-dec"]
    assert server.client.get("/v1/models/tiny-dec").json()["max_model_len"] == 512
    assert_error(server.client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_docs_show_an_example_for_every_endpoint(server):
    assert server.client.get("/docs").status_code == 200
    spec = server.client.get("/openapi.json").json()
    for path in ("/generate", "/next-token-probs", "/v1/completions"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert content.get("examples"), path
    for path in ("/tokenize", "/detokenize"):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        name = schema["$ref"].rsplit("/", 1)[-1]
        assert spec["components"]["schemas"][name].get("examples"), path
    for path in ("/health", "/ready", "/metrics", "/info", "/v1/models"):
        assert spec["paths"][path]["get"]["responses"]["200"], path


# ---- OpenAI compatibility ------------------------------------------------------------------------------------------

def test_official_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0)
    reference = generate(server, prompt=PROMPTS[0], max_new_tokens=10, temperature=0, ignore_eos=True)["outputs"][0]

    completion = client.completions.create(model="tiny-dec", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                           logprobs=3, extra_body={"ignore_eos": True}, user="test")
    [choice] = completion.choices
    assert completion.object == "text_completion" and completion.model == "tiny-dec"
    assert choice.text == reference["text"] and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 10 and completion.usage.total_tokens == 10 + len(
        tokenizer().encode(PROMPTS[0]))
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    chunks = list(client.completions.create(model="tiny-dec", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                            stream=True, logprobs=1, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices) == 10

    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny-dec", prompt="x", max_tokens=100_000)
    assert error.value.status_code == 400 and "100000" in str(error.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_completions_n_echo_seed_and_token_prompts(server):
    body = dict(model="tiny-dec", prompt=["def", "class"], max_tokens=6, n=2, seed=3, echo=True, logprobs=0,
                ignore_eos=True)
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    choices = result["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"].startswith("def") and choices[2]["text"].startswith("class")
    assert choices[0]["text"] != choices[1]["text"]  # choice i uses seed + i
    assert server.client.post("/v1/completions", json=body).json()["choices"] == choices  # seeded: repeatable
    lp = choices[0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["tokens"][0] == "def"  # echo: prompt tokens, no logprobs
    assert len(lp["tokens"]) == 1 + 6 and all(len(top) == 1 for top in lp["top_logprobs"][1:])
    assert result["usage"]["prompt_tokens"] == 2 and result["usage"]["completion_tokens"] == 24

    ids = tokenizer().encode(PROMPTS[0])
    by_ids = server.client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0}).json()
    by_text = server.client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 5,
                                                          "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]

    events = stream(server, "/v1/completions", dict(prompt="def", max_tokens=4, echo=True, stream=True,
                                                    ignore_eos=True))
    assert events.pop() == "[DONE]"
    assert events[0]["choices"][0]["text"] == "def" and events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" and e["id"].startswith("cmpl-") for e in events)


# ---- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param, code", [
    ("/generate", {}, "prompt", "missing"),
    ("/generate", {"prompt": 3}, "prompt", None),
    ("/generate", {"prompt": []}, "prompt", "invalid_value"),
    ("/generate", {"prompt": ["x"] * 65}, "prompt", "too_many_prompts"),
    ("/generate", {"prompt": "x", "max_tokens": 3}, "max_tokens", "extra_forbidden"),
    ("/generate", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens", None),
    ("/generate", {"prompt": "x", "temperature": -0.5}, "temperature", None),
    ("/generate", {"prompt": "x", "top_p": 0}, "top_p", None),
    ("/generate", {"prompt": "x", "logprobs": 21}, "logprobs", None),
    ("/generate", {"prompt": "x", "seed": -1}, "seed", None),
    ("/generate", {"prompt": "x", "stop": ["a"] * 17}, "stop", "invalid_value"),
    ("/generate", {"prompt": "x", "stop": [""]}, "stop", "invalid_value"),
    ("/generate", {"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids", "invalid_value"),
    ("/generate", {"prompt": "x", "stream": "maybe"}, "stream", None),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", None),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "unsupported"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "unsupported"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "unsupported"),
    ("/v1/completions", {"prompt": [1, 10**6]}, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "x"}}, "stream_options.include_usage",
     None),
    ("/tokenize", {"text": "x"}, "prompt", "missing"),
])
def test_invalid_fields_are_400_naming_the_field(server, path, body, param, code):
    error = assert_error(server.client.post(path, json=body), 400, param, code)
    assert error["type"] == "invalid_request_error" and error["message"].startswith(param.split(".")[0])


def test_both_apis_take_each_sampling_limit_from_the_engine():
    for name in (f.name for f in dataclasses.fields(SamplingParams)):
        expected = limits_of(SamplingParams, name).constraints()
        for schema in (GenerateRequest, CompletionRequest):
            constraints = {k: v for m in schema.model_fields[name].metadata for k, v in dataclasses.asdict(m).items()}
            assert constraints == expected, (schema.__name__, name)


def test_context_overflow_is_400_naming_both_numbers_before_any_compute(server):
    before = server.metrics()
    prompt = "def add(a, b): " * 40
    n = len(tokenizer().encode(prompt))
    error = assert_error(server.client.post("/generate", json={"prompt": prompt, "max_new_tokens": 512 - n + 1}),
                         400, "max_new_tokens", "context_length_exceeded")
    assert str(n) in error["message"] and str(512 - n + 1) in error["message"] and "512" in error["message"]
    error = assert_error(server.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 512}), 400,
                         "max_tokens", "context_length_exceeded")
    assert_error(server.client.post("/generate", json={"prompt": "def add(a, b): " * 200}), 400, "prompt",
                 "context_length_exceeded")
    assert server.metrics()["lmserve_prompt_tokens_total"] == before["lmserve_prompt_tokens_total"]
    # without an explicit max_new_tokens the default is cut to the room left
    out = generate(server, prompt=prompt, temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == min(128, 512 - n)


def test_malformed_bodies_unknown_routes_and_methods(server):
    c = server.client
    assert_error(c.post("/generate", content=b'{"prompt": "x"', headers={"content-type": "application/json"}), 400,
                 code="invalid_json")
    assert_error(c.post("/generate", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}), 400,
                 code="invalid_body")
    assert_error(c.post("/generate"), 400, code="missing_body")
    assert_error(c.post("/generate", json=["x"]), 400, code="invalid_body")
    assert_error(c.get("/nope"), 404, code="not_found")
    assert_error(c.post("/v1/chat/completions", json={}), 404, code="not_found")
    response = c.get("/generate")
    assert_error(response, 405, code="method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert_error(c.delete("/health"), 405, code="method_not_allowed")


def test_a_bug_is_a_json_500_and_the_server_goes_on(server, monkeypatch):
    def broken(token_id):
        raise RuntimeError("bug")
    monkeypatch.setattr(server.state.serving, "token_text", broken)
    assert_error(server.client.post("/generate", json={"prompt": "x", "max_new_tokens": 2, "logprobs": 1}), 500,
                 code="internal_error")
    monkeypatch.undo()
    assert generate(server, prompt="x", max_new_tokens=2, logprobs=1)["outputs"][0]["logprobs"]
    wait_idle(server)


# ---- concurrency, disconnects, timeouts ------------------------------------------------------------------------------

def test_concurrent_requests_give_the_sequential_greedy_text(server):
    def one(prompt: str) -> str:
        body = {"prompt": prompt, "max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post("/generate", json=body).json()["outputs"][0]["text"]
    sequential = [one(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent_ = list(pool.map(one, PROMPTS))
    assert concurrent_ == sequential


def test_disconnect_mid_stream_aborts_and_frees_the_cache(server):
    aborts = server.metrics().get('lmserve_requests_total{finish_reason="abort"}', 0)
    body = {"prompt": "x", "max_new_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as client, client.stream("POST", "/generate",
                                                                                json=body) as response:
        lines = response.iter_lines()
        assert next(sse_events(lines))["index"] == 0
        wait_until(lambda: server.metrics()["lmserve_requests_running"] == 1, timeout=5, what="1 running")
    metrics = wait_idle(server)  # the client is gone: its request was aborted, not finished
    assert metrics['lmserve_requests_total{finish_reason="abort"}'] == aborts + 1


def test_disconnect_while_waiting_for_a_whole_answer_aborts(server):
    aborts = server.metrics().get('lmserve_requests_total{finish_reason="abort"}', 0)
    body = {"prompt": "x", "max_new_tokens": 500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.05) as client:
        client.post("/generate", json=body)
    metrics = wait_idle(server)
    assert metrics['lmserve_requests_total{finish_reason="abort"}'] == aborts + 1


def test_request_timeout_aborts_with_the_text_so_far(server, monkeypatch):
    monkeypatch.setattr(server.state.settings, "request_timeout", 0.05)
    body = {"prompt": "x", "max_new_tokens": 500, "temperature": 0, "ignore_eos": True}
    out = generate(server, **body)["outputs"][0]
    assert out["finish_reason"] == "abort" and 0 < len(out["token_ids"]) < 500
    events = stream(server, "/generate", body | {"stream": True})
    assert events[-1] == "[DONE]" and events[-2]["finish_reason"] == "abort"
    assert events[-2]["usage"]["completion_tokens"] < 500
    wait_idle(server)


# ---- logs, ids ------------------------------------------------------------------------------------------------------

def test_one_json_log_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="lmserve.access"):
        response = server.client.post("/generate", json={"prompt": "x", "max_new_tokens": 3, "ignore_eos": True},
                                      headers={"x-request-id": "req-123"})
        server.client.get("/nope")
        wait_until(lambda: len(caplog.records) >= 2, timeout=5, what="log lines")
    assert response.headers["x-request-id"] == "req-123" and response.json()["id"] == "req-123"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lmserve.access"]
    mine = next(line for line in lines if line["id"] == "req-123")
    assert mine["status"] == 200 and mine["path"] == "/generate" and mine["completion_tokens"] == 3
    assert mine["prompt_tokens"] == 1 and mine["finish_reason"] == ["length"] and mine["latency_ms"] >= 0
    assert any(line["status"] == 404 and line["path"] == "/nope" for line in lines)


# ---- encoder-decoder ----------------------------------------------------------------------------------------------

def test_encoder_decoder_generate_and_next_token_probs(encdec):
    source = "40213"
    out = generate(encdec, prompt=[source, "7"], max_new_tokens=8, temperature=0)
    assert [o["index"] for o in out["outputs"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(len(tokenizer().encode(s, add_eos=True)) for s in (source, "7"))
    events = stream(encdec, "/generate", dict(prompt=source, max_new_tokens=8, temperature=0, stream=True))
    assert "".join(e["text"] for e in events[:-1]) == out["outputs"][0]["text"]

    first = encdec.client.post("/next-token-probs", json={"prompt": source, "top_k": 3}).json()["results"][0]
    assert first["prompt_tokens"] == 1  # the decoder start token
    top = first["tokens"][0]
    after = encdec.client.post("/next-token-probs", json={"prompt": [source, source], "top_k": 3,
                                                          "decoder_prefix": ["", top["text"]]}).json()["results"]
    assert after[0] == first and after[1]["prompt_tokens"] == 1 + len(tokenizer().encode(top["text"]))
    assert_error(encdec.client.post("/next-token-probs", json={"prompt": [source], "decoder_prefix": ["a", "b"]}),
                 400, "decoder_prefix")
    assert_error(encdec.client.post("/generate", json={"prompt": ""}), 400, "prompt")
    assert_error(encdec.client.post("/v1/completions", json={"prompt": [5, 6]}), 400, "prompt")
    assert encdec.client.get("/info").json()["is_encoder_decoder"] is True
