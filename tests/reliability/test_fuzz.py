"""Schema fuzzing against a real server: every operation of the app's own OpenAPI document gets requests that
schemathesis generates from it, valid ones (positive) and ones that break the schema (negative). For each case: no
5xx, every 4xx has the error shape, a negative case is refused with a 4xx, and each response conforms to what the
document says (status, content type, headers, body schema). After each operation the server is healthy and idle.

Bounded and deterministic: EXAMPLES cases per operation and mode, derandomized (the same cases on every run), no
shrinking (a failure reports its case as generated, with a curl line to replay it), new-token counts capped.

Also here: the document itself lists what the server answers (no 422, the 404s, the event streams), and every
numeric field takes NaN, Infinity, 1e309, -1 and 2**64 as a 400 naming it (or a 200 where the value is valid).
"""

from __future__ import annotations

import collections
import json
import re

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from pydantic import TypeAdapter
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.schemas import CompletionChunk, GenerateEvent
from service.app import create_app
from service.settings import Settings
from tests.support.live_server import LiveServer, make_checkpoint, sse_events, wait_until

EXAMPLES = 40  # per operation and generation mode
MAX_NEW_TOKENS = 4  # generated max_new_tokens / max_tokens above this are cut to it: every case stays quick
MAX_SEQ_LEN = 48
MAX_STREAM_EVENTS = 64 * MAX_SEQ_LEN + 2  # a stream can have no more: max_prompts x tokens, then [DONE]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
SETTINGS = hypothesis.settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                               phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                               print_blob=False)
# every operation of the document (test_the_document_lists_these_operations keeps this list whole)
OPERATIONS = ["POST /generate", "POST /next-token-probs", "POST /tokenize", "POST /detokenize", "GET /v1/models",
              "GET /v1/models/{model}", "POST /v1/completions", "GET /health", "GET /ready", "GET /metrics",
              "GET /info"]
ERROR_FIELDS = {"message", "type", "param", "code"}
EVENTS = {"POST /generate": TypeAdapter(GenerateEvent), "POST /v1/completions": TypeAdapter(CompletionChunk)}
CASES: collections.Counter[tuple[str, str]] = collections.Counter()  # cases run, per operation and mode


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", max_positions=128)


@pytest.fixture(scope="module")
def server(checkpoint):
    # a short context bounds every case's work: a prompt and its new tokens fit in MAX_SEQ_LEN
    live = LiveServer(Settings(model=checkpoint, max_batch_size=8, max_seq_len=MAX_SEQ_LEN, request_timeout=20))
    live.wait_ready()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def document(server) -> dict:
    return server.client.get("/openapi.json").json()


@pytest.fixture(scope="module")
def schema(document):
    schema = schemathesis.openapi.from_dict(document)
    schema.config.max_stream_events = MAX_STREAM_EVENTS  # read streams whole, to their [DONE]
    return schema


def operations_of(document: dict) -> list[str]:
    return [f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item]


# ---- the document --------------------------------------------------------------------------------------------

def test_the_document_lists_these_operations(document):
    assert sorted(operations_of(document)) == sorted(OPERATIONS)


# what each operation answers: its own statuses, plus 408/413 where it takes a body and 500 everywhere
ANSWERS = {
    "POST /generate": {200, 400, 408, 413, 500, 503}, "POST /next-token-probs": {200, 400, 408, 413, 500, 503},
    "POST /tokenize": {200, 400, 408, 413, 500, 503}, "POST /detokenize": {200, 400, 408, 413, 500, 503},
    "GET /v1/models": {200, 500, 503}, "GET /v1/models/{model}": {200, 404, 500, 503},
    "POST /v1/completions": {200, 400, 404, 408, 413, 500, 503},
    "GET /health": {200, 500, 503}, "GET /ready": {200, 500, 503}, "GET /metrics": {200, 500},
    "GET /info": {200, 500, 503}}
OPEN = {"GET /health", "GET /ready", "GET /metrics"}  # no API key needed


def _operation(document: dict, label: str) -> dict:
    method, path = label.split(" ", 1)
    return document["paths"][path][method.lower()]


@pytest.mark.parametrize("api_key", [None, "secret"])
def test_the_document_lists_every_status_each_operation_answers_and_no_422(checkpoint, document, api_key):
    """The statuses the server answers, each error with the error body; 401 only where a key is required; no 422,
    which FastAPI documents for its validation errors and this server answers as 400."""
    if api_key is not None:  # the document of a server with an API key (no need to start it)
        document = create_app(Settings(model=checkpoint, api_key=api_key)).openapi()
    assert '"422"' not in json.dumps(document)
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])
    for label in OPERATIONS:
        responses = _operation(document, label)["responses"]
        expected = ANSWERS[label] | ({401} if api_key is not None and label not in OPEN else set())
        assert {int(status) for status in responses} == expected, label
        for status, response in responses.items():
            if int(status) >= 400:
                assert response["description"], (label, status)
                assert response["content"] == {"application/json": {"schema": {
                    "$ref": "#/components/schemas/ErrorResponse"}}}, (label, status)
        if "503" in responses and label not in ("GET /health",):
            assert "Retry-After" in responses["503"]["headers"], label
    for label in ("POST /generate", "POST /v1/completions"):
        content = _operation(document, label)["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}, label
        event = content["text/event-stream"]["schema"]  # one event (OpenAPI 3.1): {"data": ...}
        assert event["type"] == "object" and "data" in event["properties"] and "$defs" not in event, label
        assert content["text/event-stream"]["example"].endswith("data: [DONE]\n\n"), label
    assert "CompletionChunk" in json.dumps(_operation(document, "POST /v1/completions")["responses"]["200"])
    refs = {ref.rsplit("/", 1)[-1] for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(document))}
    assert refs <= set(document["components"]["schemas"]), refs - set(document["components"]["schemas"])
    if api_key is not None:
        assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        assert "security" in _operation(document, "POST /generate")
        assert "security" not in _operation(document, "GET /health")


def test_the_documented_statuses_are_the_real_ones(server):
    """A spot check of the document against the server: the 404s it now lists are real, and so is the stream."""
    response = server.client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404 and set(response.json()["error"]) == ERROR_FIELDS
    assert server.client.get("/v1/models/nope").status_code == 404
    with server.client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert list(sse_events(r.iter_lines()))[-1] == "[DONE]"


# ---- fuzzing ---------------------------------------------------------------------------------------------------

def _quick(case: schemathesis.Case) -> schemathesis.Case:
    """Cuts a generated token budget to MAX_NEW_TOKENS. Only valid values above it change, so a negative case
    stays negative."""
    if isinstance(case.body, dict):
        for name in ("max_new_tokens", "max_tokens"):
            value = case.body.get(name)
            if type(value) is int and value > MAX_NEW_TOKENS:
                case.body[name] = MAX_NEW_TOKENS
    return case


def _check_response(case: schemathesis.Case, response, label: str) -> None:
    __tracebackhide__ = True
    status, media_type = response.status_code, response.headers.get("content-type", [""])[0]
    assert status < 500, f"{label}: {status} for\n{case.as_curl_command()}\n{response.text[:500]}"
    if 400 <= status < 500:
        assert media_type.startswith("application/json"), (label, status, media_type)
        body = json.loads(response.text)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, (label, body)
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
        assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), error
    elif media_type.startswith("text/event-stream"):
        events = list(sse_events(response.text.splitlines()))
        assert events and events[-1] == "[DONE]", (label, case.as_curl_command(), response.text[-300:])
        assert all(isinstance(e, dict) and "error" not in e for e in events[:-1]), (label, response.text[-500:])
        for event in events[:-1]:  # as the document says each event is (where it does: see schemas.GENERATE_SSE)
            EVENTS[label].validate_python(event)
    case.validate_response(response, checks=CHECKS)


def _fuzz(server: LiveServer, operation: schemathesis.APIOperation, label: str, mode: GenerationMode) -> int:
    """Runs the cases of one operation and mode; returns how many ran."""
    @SETTINGS
    @hypothesis.given(operation.as_strategy(generation_mode=mode).map(_quick))
    def fuzz(case: schemathesis.Case) -> None:
        CASES[label, mode.value] += 1
        _check_response(case, case.call(base_url=server.url, timeout=30), label)
    fuzz()
    return CASES[label, mode.value]


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz(server, schema, document, label):
    operation = schema.find_operation_by_label(label)
    raw = _operation(document, label)
    modes = [GenerationMode.POSITIVE]
    if "requestBody" in raw or any(p["schema"].get("type") != "string" for p in raw.get("parameters", [])):
        modes.append(GenerationMode.NEGATIVE)  # no request breaks a schema that takes any string, or nothing
    counts = [_fuzz(server, operation, label, mode) for mode in modes]
    assert all(counts), (label, counts)
    wait_until(lambda: (lambda m: m["lmserve_requests_running"] == m["lmserve_requests_waiting"] == 0)(
        server.metrics()), timeout=10, what="no request running or waiting")
    assert server.client.get("/health").status_code == 200
    assert server.client.get("/ready").status_code == 200
    print(f"{label}: " + ", ".join(f"{n} {m.value}" for n, m in zip(counts, modes)) + " cases")


# ---- numbers JSON can write and no field takes ------------------------------------------------------------------

NUMBERS = ["NaN", "Infinity", "-Infinity", "1e309", "-1", str(2**64)]  # as raw JSON text (Python parses them all)
NON_FINITE = {"NaN", "Infinity", "-Infinity", "1e309"}
BASES = {"/generate": {"prompt": "x", "max_new_tokens": 2}, "/next-token-probs": {"prompt": "x"},
         "/v1/completions": {"prompt": "x", "max_tokens": 2}, "/detokenize": {"tokens": [1]}, "/tokenize": {}}


def _resolve(document: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _numeric(schema: dict) -> bool:
    return schema.get("type") in ("integer", "number")


def numeric_fields(document: dict, path: str) -> list[tuple[str, str]]:
    """(field, how a number goes in: 'scalar', 'item' of a list, 'value' of an object) for every place of a
    number in the body of POST `path`, read off the document, so that a new numeric field is covered too."""
    body = _resolve(document, document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])
    fields = []
    for name, prop in body["properties"].items():
        alternatives = [_resolve(document, a) for a in prop.get("anyOf", [prop])]
        for how, found in (("scalar", any(_numeric(a) for a in alternatives)),
                           ("item", any(a.get("type") == "array" and _numeric(a.get("items", {}))
                                        for a in alternatives)),
                           ("value", any(a.get("type") == "object" and _numeric(a.get("additionalProperties") or {})
                                         for a in alternatives))):
            if found:
                fields.append((name, how))
    return fields


def test_the_numeric_fields_are_found(document):
    found = {path: {name for name, _ in numeric_fields(document, path)} for path in BASES}
    assert {"temperature", "top_k", "seed", "max_new_tokens", "stop_token_ids", "logprobs"} <= found["/generate"]
    assert found["/next-token-probs"] == {"top_k", "temperature"}
    assert {"max_tokens", "n", "prompt", "logit_bias", "best_of", "presence_penalty"} <= found["/v1/completions"]
    assert found["/detokenize"] == {"tokens"} and not found["/tokenize"]


@pytest.mark.parametrize("path", [p for p in BASES if p != "/tokenize"])
def test_every_numeric_field_takes_nan_infinity_and_huge_numbers_as_a_400_naming_it(server, document, path):
    """Sent as raw JSON text, e.g. {"prompt": "x", "temperature": NaN}: a 400 naming the field (or a 200 where the
    value is valid: -1 is a valid presence_penalty), never a 5xx."""
    base = BASES[path]
    for name, how in numeric_fields(document, path):
        for number in NUMBERS:
            value = {"scalar": number, "item": f"[{number}]", "value": f'{{"1": {number}}}'}[how]
            fields = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in base.items() if k != name]
            body = "{" + ", ".join([*fields, f'"{name}": {value}']) + "}"
            response = server.client.post(path, content=body, headers={"content-type": "application/json"})
            assert response.status_code in (200, 400), (body, response.status_code, response.text)
            if number in NON_FINITE:
                assert response.status_code == 400, (body, response.text)
            if response.status_code == 400:
                error = response.json()["error"]
                assert set(error) == ERROR_FIELDS, (body, error)
                param = error["param"] or ""
                assert param == name or param.startswith((f"{name}[", f"{name}.")), (body, error)
    wait_until(lambda: server.metrics()["lmserve_requests_running"] == 0, timeout=10, what="0 running")
