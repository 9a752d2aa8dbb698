"""Overload: admission is judged by what will actually wait (a burst that fits the free KV-cache rows is taken
whole), /next-token-probs is admitted, bounded and aborted like generations, and the excess is a 503 with
Retry-After while every admitted request still comes out right."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from model.checkpoint import Checkpoint, GenerationConfig
from service.engine.admission import Admission, QueueFull
from service.engine.engine import Engine, EngineConfig
from service.engine.request import GenerationParams, GenerationRequest
from service.settings import Settings
from tests.support.live_server import LiveServer, assert_error, make_checkpoint, tokenizer, wait_idle, wait_until
from tests.support.models import make_model

GREEDY = {"prompt": "def add(a, b):", "temperature": 0, "ignore_eos": True}


def test_admission_counts_what_waits_for_a_row_or_for_compute():
    admission = Admission(rows=4, max_queue=8)
    for _ in range(12):  # 4 find a row, 8 wait
        admission.admit(generations=1)
    with pytest.raises(QueueFull):
        admission.admit(generations=1)
    with pytest.raises(QueueFull):
        admission.admit(probe_prompts=1)
    admission.release(generations=1)
    admission.admit(generations=1)
    assert (admission.generations, admission.waiting) == (12, 8)

    probes = Admission(rows=2, max_queue=8)
    probes.admit(probe_prompts=8)  # one probe of 8 prompts fills the queue
    with pytest.raises(QueueFull):
        probes.admit(probe_prompts=1)
    probes.admit(generations=1)  # a generation that finds a free row is still taken
    probes.admit(generations=1)
    with pytest.raises(QueueFull):
        probes.admit(generations=1)  # a third would wait, behind a full queue
    probes.release(probe_prompts=8)
    assert probes.waiting == 0


def _engine(max_batch_size: int, max_queue: int) -> Engine:
    tok = tokenizer()
    model = make_model("llama-gqa", vocab_size=tok.vocab_size, max_position_embeddings=128)
    checkpoint = Checkpoint(model=model, tokenizer=tok, generation=GenerationConfig(eos_token_id=tok.eos_id),
                            path=None)
    engine = Engine(checkpoint, EngineConfig(max_batch_size=max_batch_size, max_queue=max_queue, max_seq_len=64))
    engine.start()
    return engine


@pytest.mark.parametrize(("rows", "max_queue", "burst"), [(4, 8, 12), (8, 1, 8)])
def test_a_burst_that_fits_rows_plus_queue_is_taken_whole_on_an_idle_engine(rows, max_queue, burst):
    """The red-team run: --max-queue 8 --max-batch-size 4 refused 4 of 12, --max-queue 1 --max-batch-size 8 refused
    6-7 of 8, because requests not yet picked up by the engine thread counted as waiting."""
    engine = _engine(rows, max_queue)
    params = GenerationParams(max_new_tokens=8, temperature=0, ignore_eos=True)

    async def burst_of(n: int) -> list[str]:
        async def one() -> str:
            try:
                async for out in engine.submit(GenerationRequest([5, 6, 7], params)):
                    if out.finished:
                        return out.finish_reason.value
            except QueueFull:
                return "refused"
            return "unfinished"
        return list(await asyncio.gather(*(one() for _ in range(n))))
    try:
        assert asyncio.run(burst_of(burst)) == ["length"] * burst
        outcomes = asyncio.run(burst_of(rows + max_queue + 3))
        assert outcomes.count("refused") == 3 and outcomes.count("length") == rows + max_queue
        wait_until(lambda: not engine.stats.busy, timeout=5, what="an idle engine")
        assert (engine.admission.generations, engine.admission.probe_prompts) == (0, 0)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_four_times_rows_plus_queue_the_excess_is_503_and_the_admitted_are_right(checkpoint):
    server = LiveServer(Settings(model=checkpoint, max_batch_size=2, max_queue=2, max_seq_len=256)).wait_ready()
    try:
        alone = server.client.post("/generate", json=GREEDY | {"max_new_tokens": 60}).json()["outputs"][0]
        server.slow_down("decode", 0.02)  # 60 tokens: over a second per request

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return list(await asyncio.gather(*(client.post("/generate", json=GREEDY | {"max_new_tokens": 60})
                                                   for _ in range(16))))
        responses = asyncio.run(flood())
        admitted = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(admitted) == 4 and len(refused) == 12
        for response in refused:
            assert_error(response, 503, code="queue_full")
            assert int(response.headers["retry-after"]) >= 1
        assert all(r.json()["outputs"][0]["token_ids"] == alone["token_ids"] for r in admitted)
        metrics = wait_idle(server)
        assert metrics["lmserve_requests_waiting"] == 0 and metrics["lmserve_probe_prompts_waiting"] == 0
    finally:
        server.stop()


def test_probes_are_admitted_bounded_and_aborted_when_their_clients_go(checkpoint):
    """The red-team run: 48 concurrent probes (8 prompts each) with --max-queue 8 were all admitted, and probes
    whose clients had given up kept /generate refused for 5-29 s."""
    server = LiveServer(Settings(model=checkpoint, max_batch_size=4, max_queue=8, max_seq_len=256)).wait_ready()
    try:
        server.slow_down("last_token_logits", 0.5)
        async def probes(body: dict, n: int, timeout: float) -> list[httpx.Response | str]:
            async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
                async def one() -> httpx.Response | str:
                    try:
                        return await client.post("/next-token-probs", json=body)
                    except httpx.TimeoutException:
                        return "gave up"
                return list(await asyncio.gather(*(one() for _ in range(n))))

        outcomes = asyncio.run(probes({"prompt": ["def add(a, b):"] * 8, "top_k": 3}, 48, timeout=30))
        answered = [r for r in outcomes if not isinstance(r, str) and r.status_code == 200]
        refused = [r for r in outcomes if not isinstance(r, str) and r.status_code == 503]
        assert len(answered) + len(refused) == 48 and 1 <= len(answered) <= 8, [len(answered), len(refused)]
        for response in refused:
            assert_error(response, 503, code="queue_full")
        assert all(len(r.json()["results"]) == 8 for r in answered)

        # clients that give up after 0.3 s: their probes are dropped, and the queue is free again at once
        gave_up = asyncio.run(probes({"prompt": "def add(a, b):", "top_k": 3}, 8, timeout=0.3))
        assert gave_up.count("gave up") >= 6
        # computing them all would take 4 s; dropped, at most the one being computed finishes
        wait_until(lambda: server.engine.admission.probe_prompts == 0, timeout=2,
                   what="the abandoned probes to be dropped")
        wait_until(lambda: server.metrics()["lmserve_probe_prompts_waiting"] == 0, timeout=1, what="the gauge at 0")
        generated = server.client.post("/generate", json=GREEDY | {"max_new_tokens": 4})
        assert generated.status_code == 200, generated.text
        wait_idle(server)
    finally:
        server.stop()
