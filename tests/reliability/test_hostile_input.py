"""Regression tests for what a red-team run against a real `lmserve serve` found (issue: reliability under
hostile input): each input here once gave a 500, or broke other requests in flight."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import select
import socket
import time

import httpx
import pytest

from service.api.schemas import MAX_STOP_TOKEN_IDS
from service.engine import engine as engine_module
from service.engine.engine import Engine, EngineConfig
from service.engine.request import (
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    FinishReason,
    GenerationParams,
    GenerationRequest,
)
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
    error = assert_error(raw_post(server, path, body), 400, param=param)
    assert "valid Unicode" in error["message"]
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


# ---- bodies that are not JSON text, and JSON that is hostile ------------------------------------------------------

def raw_bytes(server: LiveServer, path: str, body: bytes) -> httpx.Response:
    return server.client.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("body", [
    b'{"prompt": "\xff\xfe"}',  # bytes no UTF-8 text has
    b'{"prompt": "ok\xc3"}',  # a multi-byte character cut short
    b'{"prompt": "\xc0\xaf"}',  # an overlong encoding of "/"
    b"[" * 100_000,  # nesting far past what the parser recurses into
    b'{"prompt": "x", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}",  # an integer of more digits than Python converts
    b'{"prompt": "a\x00b"}',  # a raw control character inside a string (JSON wants it escaped)
], ids=["invalid-utf8", "truncated-utf8", "overlong-utf8", "deep-array", "deep-field", "5000-digit-int", "raw-nul"])
@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_a_body_that_is_not_json_text_is_a_400_invalid_json(server, path, body):
    started = time.monotonic()
    error = assert_error(raw_bytes(server, path, body), 400, code="invalid_json")
    assert error["message"].startswith("the body is not valid JSON") and error["param"] is None
    assert time.monotonic() - started < 5
    assert server.client.get("/health").status_code == 200


def test_a_surrogate_encoded_as_utf8_bytes_is_a_400_naming_the_field(server):
    """json.loads lets UTF-8-encoded surrogates through (it decodes with surrogatepass): the same 400 as "\\ud800"."""
    assert_error(raw_bytes(server, "/generate", b'{"prompt": "\xed\xa0\x80"}'), 400, param="prompt")


def test_nesting_the_parser_takes_is_refused_by_field_or_ignored_where_extras_are(server):
    deep = "[" * 500 + "]" * 500
    assert_error(raw_post(server, "/generate", '{"prompt": ' + deep + "}"), 400, param="prompt")
    assert_error(raw_post(server, "/generate", '{"prompt": "x", "vendor": ' + deep + "}"), 400, param="vendor")
    response = raw_post(server, "/v1/completions", '{"prompt": "x", "max_tokens": 2, "vendor": ' + deep + "}")
    assert response.status_code == 200, response.text  # the OpenAI endpoint ignores fields it does not know


def test_nul_characters_are_text_like_any_other(server):
    text = "a\x00b\x00"
    tokens = server.client.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert server.client.post("/detokenize", json={"tokens": tokens}).json()["text"].endswith(text)
    for path, body in [("/generate", {"prompt": text, "max_new_tokens": 3, "stop": ["\x00"]}),
                       ("/generate", {"prompt": [text, "\x00"], "max_new_tokens": 3, "stream": True}),
                       ("/next-token-probs", {"prompt": text, "top_k": 3}),
                       ("/v1/completions", {"prompt": text, "max_tokens": 3, "stop": "\x00", "user": "\x00",
                                            "echo": True})]:
        response = server.client.post(path, json=body)
        assert response.status_code == 200, (path, response.text)
    completion = server.client.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "echo": True}).json()
    assert completion["choices"][0]["text"].startswith(text)
    wait_idle(server)


# ---- bodies over the limit --------------------------------------------------------------------------------------

def _connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _send_until_answered(sock: socket.socket, head: bytes, pieces, budget: int) -> tuple[int, bytes]:
    """Sends `head`, then `pieces` until the server answers (or `budget` body bytes went out); returns how many body
    bytes were sent and what the server answered before closing."""
    sock.sendall(head)
    sent = 0
    for piece in pieces:
        if select.select([sock], [], [], 0)[0] or sent >= budget:
            break  # it answered: the rest of the body is never needed
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    answer = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            answer += chunk
    return sent, answer


TEN_MB = 10 * 2**20


@contextlib.contextmanager
def body_bytes_read_by_the_app(server: LiveServer):
    """Counts the body bytes the app (its middleware included) takes from uvicorn, on connections opened inside
    the block: uvicorn itself holds at most 64 KiB unread before it stops reading the socket."""
    config = server.server.config
    app = config.loaded_app
    read = [0]

    async def counting(scope, receive, send):
        async def counted():
            message = await receive()
            read[0] += len(message.get("body", b""))
            return message
        await app(scope, counted, send)
    config.loaded_app = counting
    try:
        yield read
    finally:
        config.loaded_app = app


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_a_10_mb_body_with_content_length_is_a_413_before_any_of_it_is_read(server, path):
    started = time.monotonic()
    with body_bytes_read_by_the_app(server) as read, _connect(server) as sock:
        head = (f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                f"content-length: {TEN_MB}\r\n\r\n").encode()
        sent, answer = _send_until_answered(sock, head, [b" " * 65536] * (TEN_MB // 65536), budget=65536)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"
    assert sent <= 65536 and read[0] == 0 and time.monotonic() - started < 5
    assert server.client.get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_a_10_mb_chunked_body_is_a_413_once_past_the_limit_not_once_it_is_all_in(server, path):
    limit = server.settings.max_body_bytes
    piece = b'{"prompt": "' + b"x" * 65500
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    started = time.monotonic()
    with body_bytes_read_by_the_app(server) as read, _connect(server) as sock:
        head = (f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                "transfer-encoding: chunked\r\n\r\n").encode()
        _, answer = _send_until_answered(sock, head, [chunk] * (TEN_MB // len(piece)), budget=TEN_MB)
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"413", answer[:200]
    assert b'"request_too_large"' in answer
    # read up to the first message past the limit, no further: uvicorn's messages carry what it has buffered, at
    # most its 64 KiB high-water mark plus one socket read (256 KiB)
    assert limit < read[0] <= limit + 2**19
    assert time.monotonic() - started < 10
    assert server.client.get("/health").status_code == 200


# ---- limits: top_k, prompts per request, stop strings, token ids ------------------------------------------------

def test_top_k_equal_to_the_vocabulary_is_every_token_and_above_it_a_400_or_off(server):
    vocab = server.engine.vocab_size
    response = server.client.post("/next-token-probs", json={"prompt": "def", "top_k": vocab})
    assert response.status_code == 200, response.text
    tokens = response.json()["results"][0]["tokens"]
    assert len(tokens) == vocab and sorted({t["id"] for t in tokens}) == list(range(vocab))
    assert sum(t["prob"] for t in tokens) == pytest.approx(1.0, abs=1e-3)
    assert [t["prob"] for t in tokens] == sorted((t["prob"] for t in tokens), reverse=True)
    assert_error(server.client.post("/next-token-probs", json={"prompt": "def", "top_k": vocab + 1}), 400,
                 param="top_k")
    for top_k in (vocab, vocab + 1):  # generation: top_k at or above the vocabulary is top-k off
        response = server.client.post("/v1/completions", json={"prompt": "def", "max_tokens": 3, "top_k": top_k,
                                                               "seed": 1})
        assert response.status_code == 200, (top_k, response.text)
    wait_idle(server)


@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": ["x"] * 10_000, "max_new_tokens": 1}),
    ("/next-token-probs", {"prompt": ["x"] * 10_000}),
    ("/v1/completions", {"prompt": ["x"] * 10_000, "max_tokens": 1}),
    ("/v1/completions", {"prompt": [[5]] * 10_000, "max_tokens": 1}),
    ("/v1/completions", {"prompt": ["x", "y"], "n": 64, "max_tokens": 1}),  # prompts x n
], ids=["generate", "next-token-probs", "completions", "completions-ids", "completions-n"])
def test_a_batch_over_max_prompts_is_a_400_naming_prompt_before_any_work(server, path, body):
    started = time.monotonic()
    error = assert_error(server.client.post(path, json=body), 400, param="prompt", code="too_many_prompts")
    assert str(server.settings.max_prompts) in error["message"]
    assert time.monotonic() - started < 5
    assert server.metrics()["lmserve_requests_running"] == 0


@pytest.mark.parametrize("path,extra", [("/generate", {"max_new_tokens": 2}), ("/v1/completions", {"max_tokens": 2})])
def test_stop_strings_beyond_the_engine_limits_are_a_400_naming_stop(server, path, extra):
    def post(stop):
        return server.client.post(path, json={"prompt": "x", "stop": stop, **extra})
    started = time.monotonic()
    for stop in (["a"] * 1000, "a" * (MAX_STOP_LENGTH + 1), ["ok", "a" * (MAX_STOP_LENGTH + 1)], ["ok", ""], ""):
        error = assert_error(post(stop), 400, param="stop", code="invalid_value")
        assert f"at most {MAX_STOP_STRINGS}" in error["message"]
    assert time.monotonic() - started < 5
    full = post([chr(0x4E00 + i) * MAX_STOP_LENGTH for i in range(MAX_STOP_STRINGS)])  # exactly at the limits
    assert full.status_code == 200, full.text


@pytest.mark.parametrize("path,extra", [("/generate", {"max_new_tokens": 2}), ("/v1/completions", {"max_tokens": 2})])
def test_a_huge_list_of_stop_token_ids_is_a_400_not_a_slow_engine_step(server, path, extra):
    """Each new token is looked up in stop_token_ids: 100,000 of them held the engine thread (and every request in
    its batch) for about a second per hundred tokens."""
    response = server.client.post(path, json={"prompt": "x", "stop_token_ids": [1] * 100_000, **extra})
    assert_error(response, 400, param="stop_token_ids", code="too_long")
    ok = server.client.post(path, json={"prompt": "x", "stop_token_ids": [1] * MAX_STOP_TOKEN_IDS, **extra})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path,body,param", [
    ("/generate", {"prompt": "x", "max_new_tokens": "5"}, "max_new_tokens"),
    ("/generate", {"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),
    ("/generate", {"prompt": "x", "max_new_tokens": 2, "ignore_eos": "yes"}, "ignore_eos"),
    ("/generate", {"prompt": "x", "max_new_tokens": 2, "stream": 1}, "stream"),
    ("/generate", {"prompt": "x", "max_new_tokens": 2, "temperature": True}, "temperature"),
    ("/generate", {"prompt": "x", "max_new_tokens": 2, "stop_token_ids": ["1"]}, "stop_token_ids[0]"),
    ("/next-token-probs", {"prompt": "x", "top_k": "5"}, "top_k"),
    ("/detokenize", {"tokens": [True]}, "tokens[0]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "best_of": True}, "best_of"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stop_token_ids": [True]}, "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "echo": "false"}, "echo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
])
def test_json_types_are_taken_as_the_schema_says_not_coerced(server, path, body, param):
    """The OpenAPI document says integer, boolean: a string or a boolean there is a 400, as the schema fuzzing's
    negative cases expect (pydantic's lax mode took "5" for 5 and true for 1)."""
    assert_error(server.client.post(path, json=body), 400, param=param)


@pytest.mark.parametrize("stream", [False, True])
def test_a_huge_user_field_does_not_make_a_huge_access_log_line(server, caplog, stream):
    """`user` goes into the request's access-log line: a 200,000-character one would make every line of such a
    client's requests as long as its body."""
    request_id = f"huge-user-{stream}"
    with caplog.at_level(logging.INFO, logger="lmserve.access"):
        response = server.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "stream": stream,
                                                               "user": "u" * 200_000},
                                      headers={"x-request-id": request_id})
        assert response.status_code == 200
        response.read()
        wait_until(lambda: any(request_id in r.getMessage() for r in caplog.records), timeout=5, what="the line")
    [line] = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert len(line) < 2000 and json.loads(line)["user"].endswith("(200000 characters)")
