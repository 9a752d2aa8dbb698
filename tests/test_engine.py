"""The engine end to end (no HTTP): batch invariance, agreement with a no-cache reference, stops, aborts,
streaming text, encoder-decoder requests and next-token distributions."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from model.checkpoint import Checkpoint, GenerationConfig
from model.generate import greedy_generate
from model.tokenizer import Tokenizer
from service.engine.engine import Engine, EngineConfig
from service.engine.request import FinishReason, GenerationParams, GenerationRequest
from tests.support.models import make_model

CORPUS = ["def add(a, b):\n    return a + b\n", "print('hello, world')", "你好，世界！数字和文字。", "🚀🌍 emoji 😀",
          "class Point:\n    x: int\n    y: int\n"] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=420)


def make_checkpoint(tokenizer: Tokenizer, variant: str = "llama-gqa", seed: int = 0) -> Checkpoint:
    model = make_model(variant, seed=seed, vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    generation = GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=tokenizer.pad_id)
    return Checkpoint(model=model, tokenizer=tokenizer, generation=generation, path=Path("memory"))


@pytest.fixture
def engine_factory(tokenizer):
    """Started engines, checked at teardown: every row free and nothing left running."""
    engines: list[Engine] = []

    def make(variant: str = "llama-gqa", **config) -> Engine:
        engine = Engine(make_checkpoint(tokenizer, variant), EngineConfig(**config))
        engine.start()
        engines.append(engine)
        return engine
    yield make
    for engine in engines:
        deadline = 200
        while (engine.stats.running or engine._active) and deadline:  # aborts land within a step
            asyncio.run(asyncio.sleep(0.01))
            deadline -= 1
        assert engine.scheduler.free_rows == engine.config.max_batch_size, "cache rows leaked"
        assert not engine._active and engine.stats.waiting == 0
        engine.shutdown()


async def collect(engine: Engine, request: GenerationRequest):
    outputs = [out async for out in engine.submit(request)]
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    return outputs


def run(engine: Engine, requests: list[GenerationRequest]):
    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))
    return asyncio.run(main())


def tokens_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def text_of(outputs) -> str:
    return "".join(o.text for o in outputs)


def mixed_requests(tokenizer: Tokenizer, n: int = 32, sampled: bool = False) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(5)
    requests = []
    for i in range(n):
        prompt = torch.randint(3, tokenizer.vocab_size, (1 + (i * 7) % 45,), generator=g).tolist()
        params = GenerationParams(max_new_tokens=8 + i % 13, temperature=0.0, logprobs=3,
                                  repetition_penalty=1.0 + 0.1 * (i % 3), ignore_eos=True)
        if sampled:
            params = GenerationParams(max_new_tokens=8 + i % 13, temperature=0.7 + 0.1 * (i % 4), top_k=20 * (i % 2),
                                      top_p=0.9, seed=1000 + i, ignore_eos=True, presence_penalty=0.2 * (i % 2))
        requests.append(GenerationRequest(prompt, params, request_id=f"req{i}"))
    return requests


def test_batched_requests_match_each_request_run_alone(engine_factory, tokenizer):
    engine = engine_factory(max_batch_size=32, max_prefill_tokens=256)
    requests = mixed_requests(tokenizer)
    together = run(engine, requests)
    for request, outputs in zip(requests, together):
        alone = run(engine, [GenerationRequest(request.prompt_ids, request.params)])[0]
        assert tokens_of(outputs) == tokens_of(alone)
        assert len(tokens_of(outputs)) == request.params.max_new_tokens
        lp_batch = [lp for o in outputs for lp in o.logprobs]
        lp_alone = [lp for o in alone for lp in o.logprobs]
        for a, b in zip(lp_batch, lp_alone):
            assert abs(a.logprob - b.logprob) <= 1e-5
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a.top, b.top))


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine_factory, tokenizer):
    engine = engine_factory(max_batch_size=32)
    requests = mixed_requests(tokenizer, sampled=True)
    together = run(engine, requests)
    for request, outputs in zip(requests[:12], together[:12]):
        alone = run(engine, [GenerationRequest(request.prompt_ids, request.params)])[0]
        assert tokens_of(outputs) == tokens_of(alone)
    assert len({tuple(tokens_of(o)) for o in together}) > 20  # and they are not all the same


@torch.no_grad()
def test_greedy_output_equals_a_full_recompute_reference_loop(engine_factory, tokenizer):
    engine = engine_factory(max_batch_size=4, max_prefill_tokens=16)  # chunked prefill too
    model = engine.runner.model
    prompts = [tokenizer.encode("def add(a, b):"), tokenizer.encode("你好"), list(range(3, 60))]
    requests = [GenerationRequest(p, GenerationParams(max_new_tokens=24, temperature=0, ignore_eos=True))
                for p in prompts]
    for prompt, outputs in zip(prompts, run(engine, requests)):
        sequence = list(prompt)
        for _ in range(24):  # no cache: the whole sequence every step
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
        assert tokens_of(outputs) == sequence[len(prompt):]


def test_stop_strings_spanning_token_boundaries(engine_factory, tokenizer):
    engine = engine_factory()
    prompt = tokenizer.encode("print('hello")
    base = GenerationParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    reference = run(engine, [GenerationRequest(prompt, base)])[0]
    ids = tokens_of(reference)
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    full = pieces[-1]
    # a stop string made of the end of token 5's text and the start of token 6's
    boundary = len(pieces[5])
    stop = full[boundary - 1:boundary + 2]
    assert len(stop) == 3
    stopped = run(engine, [GenerationRequest(prompt, GenerationParams(**{**base.__dict__, "stop": (stop,)}))])[0]
    assert stopped[-1].finish_reason is FinishReason.STOP
    assert text_of(stopped) == full[:full.index(stop)]
    assert stop not in text_of(stopped)


def test_eos_stop_tokens_and_max_new_tokens(engine_factory, tokenizer):
    engine = engine_factory()
    prompt = tokenizer.encode("class Point:")
    params = GenerationParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    ids = tokens_of(run(engine, [GenerationRequest(prompt, params)])[0])
    assert len(ids) == 12
    engine.eos_ids = frozenset({ids[4]})  # pretend the 5th greedy token is EOS
    first = ids.index(ids[4])
    out = run(engine, [GenerationRequest(prompt, GenerationParams(max_new_tokens=12, temperature=0))])[0]
    assert out[-1].finish_reason is FinishReason.STOP and tokens_of(out) == ids[:first]
    out = run(engine, [GenerationRequest(prompt, params)])[0]  # ignore_eos goes on
    assert out[-1].finish_reason is FinishReason.LENGTH and tokens_of(out) == ids
    out = run(engine, [GenerationRequest(prompt, GenerationParams(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                                 stop_token_ids=(ids[2],)))])[0]
    assert out[-1].finish_reason is FinishReason.STOP and tokens_of(out) == ids[:ids.index(ids[2])]
    out = run(engine, [GenerationRequest(prompt, GenerationParams(max_new_tokens=3, temperature=0, ignore_eos=True))])
    assert out[0][-1].finish_reason is FinishReason.LENGTH and tokens_of(out[0]) == ids[:3]


def test_abort_mid_generation_releases_the_cache(engine_factory, tokenizer):
    engine = engine_factory(max_batch_size=4)
    long = GenerationParams(max_new_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        # a client that stops listening after three updates
        stream = engine.submit(GenerationRequest(tokenizer.encode("def"), long, request_id="gone"))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        # and an explicit abort, whose stream ends with finish_reason abort
        outputs = []
        async for out in engine.submit(GenerationRequest(tokenizer.encode("x"), long, request_id="cancel")):
            outputs.append(out)
            if len(outputs) == 2:
                engine.abort("cancel")
        return outputs
    outputs = asyncio.run(main())
    assert outputs[-1].finish_reason is FinishReason.ABORT and len(outputs) < 50


def test_a_request_whose_event_loop_is_gone_releases_the_cache(engine_factory, tokenizer):
    engine = engine_factory(max_batch_size=4)
    loop = asyncio.new_event_loop()
    stream = engine.submit(GenerationRequest(tokenizer.encode("def"), GenerationParams(
        max_new_tokens=200, temperature=0, ignore_eos=True), request_id="orphan"))
    first = loop.run_until_complete(stream.__anext__())
    assert first.token_ids and not first.finished
    loop.close()  # the client's event loop ends mid-generation without a word to the engine
    deadline = time.monotonic() + 30
    while engine._active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine._active and engine.scheduler.free_rows == 4
    after = run(engine, [GenerationRequest(tokenizer.encode("x"), GenerationParams(max_new_tokens=5,
                                                                                   ignore_eos=True))])
    assert len(tokens_of(after[0])) == 5  # and the engine serves the next client


def test_streaming_never_breaks_a_utf8_character(engine_factory, tokenizer):
    engine = engine_factory()
    prompts = ["你好，世界", "🚀🌍", "数字和文字 😀"]
    requests = [GenerationRequest(tokenizer.encode(p), GenerationParams(max_new_tokens=40, temperature=1.0, seed=i,
                                                                      ignore_eos=True)) for i, p in enumerate(prompts)]
    for outputs in run(engine, requests):
        ids = tokens_of(outputs)
        full = tokenizer.decode(ids)
        assert text_of(outputs) == full
        emitted = ""
        for out in outputs:
            emitted += out.text
            assert full.startswith(emitted)
            # a replacement character is only ever emitted where the finished text has one too
            assert emitted.count("\ufffd") <= full.count("\ufffd")


def test_encoder_decoder_requests_match_the_models_own_greedy_decode(engine_factory, tokenizer):
    engine = engine_factory("original-encoder-decoder", max_batch_size=3)
    model, bos, eos = engine.runner.model, tokenizer.bos_id, tokenizer.eos_id
    sources = [tokenizer.encode(s, add_eos=True) for s in ("40213", "7", "999999999", "你好", "12")]
    requests = [GenerationRequest([bos], GenerationParams(max_new_tokens=15, temperature=0), source_ids=s)
                for s in sources]
    for source, outputs in zip(sources, run(engine, requests)):
        assert tokens_of(outputs) == greedy_generate(model, [bos], 15, eos_id=eos, source_ids=source)


def test_next_token_distributions(engine_factory, tokenizer):
    engine = engine_factory()
    prompts = [tokenizer.encode("def add("), tokenizer.encode("你好")]
    results = asyncio.run(engine.next_token_probs(prompts, top_k=tokenizer.vocab_size, temperature=0.8))
    model = engine.runner.model
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            expected = torch.softmax(model(torch.tensor([prompt]))[0, -1].double() / 0.8, -1)
        probs = [t["prob"] for t in result["tokens"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        for t in result["tokens"][:10]:
            assert abs(t["prob"] - float(expected[t["id"]])) < 1e-6
            assert t["text"] == tokenizer.token_text(t["id"])
        assert abs(result["entropy"] - float(-(expected * expected.log()).sum())) < 1e-4
        assert result["prompt_tokens"] == len(prompt)


def test_bad_requests_are_refused_before_any_compute(engine_factory, tokenizer):
    engine = engine_factory()
    cases = [
        (GenerationParams(max_new_tokens=0), "max_new_tokens"),
        (GenerationParams(temperature=-1), "temperature"),
        (GenerationParams(top_p=0), "top_p"),
        (GenerationParams(max_new_tokens=256), "together more than the context length 256"),
        (GenerationParams(stop_token_ids=(10**6,)), "stop_token_ids"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.check(GenerationRequest(tokenizer.encode("hello world"), params))
    with pytest.raises(ValueError, match="prompt"):
        engine.check(GenerationRequest([], GenerationParams()))
    with pytest.raises(ValueError, match="prompt"):
        engine.check(GenerationRequest([10**6], GenerationParams()))


def test_the_engine_keeps_no_reference_to_its_checkpoint(tokenizer):
    """The runner owns the model from then on: the checkpoint's own copy of the weights must be free to go."""
    checkpoint = make_checkpoint(tokenizer)
    path, config = checkpoint.path, checkpoint.config
    released = weakref.ref(checkpoint)
    engine = Engine(checkpoint, EngineConfig(max_batch_size=2))
    del checkpoint
    gc.collect()
    assert released() is None
    assert engine.checkpoint_path == path and engine.model_config is config
    assert engine.generation_config.eos_token_id == tokenizer.eos_id


def test_a_forward_pass_that_raises_is_run_again_one_sequence_at_a_time(engine_factory, tokenizer, monkeypatch):
    """A one-off failure costs a retry and nothing else; a request whose own pass keeps raising fails alone, in
    prefill or in decode, and the requests beside it get exactly the tokens they get alone."""
    engine = engine_factory()
    params = GenerationParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    alone = tokens_of(run(engine, [GenerationRequest([5, 6, 7], params)])[0])
    real_decode, real_prefill = engine.runner.decode, engine.runner.prefill
    calls = {"n": 0}

    def flaky(inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real_decode(inputs)
    monkeypatch.setattr(engine.runner, "decode", flaky)
    retried = run(engine, [GenerationRequest([5, 6, 7], params)])[0]
    assert tokens_of(retried) == alone and retried[-1].finish_reason is FinishReason.LENGTH

    poisoned = {"prefill": GenerationRequest([5, 6, 7], params), "decode": GenerationRequest([5, 6, 7], params)}

    def decode(inputs):
        if any(engine.scheduler.rows[i.row].request_id == poisoned["decode"].request_id for i in inputs):
            raise RuntimeError("simulated decode failure")
        return real_decode(inputs)

    def prefill(chunks, tokens):
        if any(c.seq.request_id == poisoned["prefill"].request_id for c in chunks):
            raise RuntimeError("simulated prefill failure")
        return real_prefill(chunks, tokens)
    monkeypatch.setattr(engine.runner, "decode", decode)
    monkeypatch.setattr(engine.runner, "prefill", prefill)
    good = [GenerationRequest([5, 6, 7], params) for _ in range(3)]
    outputs = run(engine, [good[0], poisoned["prefill"], good[1], poisoned["decode"], good[2]])
    for bad, stage in ((outputs[1], "prefill"), (outputs[3], "decode")):
        assert bad[-1].finish_reason is FinishReason.ERROR and stage in bad[-1].error
    assert tokens_of(outputs[1]) == [] and len(tokens_of(outputs[3])) == 1  # its first token came from prefill
    for out in (outputs[0], outputs[2], outputs[4]):
        assert tokens_of(out) == alone and out[-1].finish_reason is FinishReason.LENGTH
    assert engine.alive


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_with_graphs_matches_cpu(tokenizer):
    checkpoint = make_checkpoint(tokenizer)
    cpu = Engine(checkpoint, EngineConfig(max_batch_size=8))
    requests = mixed_requests(tokenizer, n=8)
    cpu.start()
    expected = [tokens_of(o) for o in run(cpu, requests)]
    cpu.shutdown()
    checkpoint.model.to("cuda")
    checkpoint.model.reset_buffers("cuda")
    gpu = Engine(checkpoint, EngineConfig(max_batch_size=8, cuda_graphs=True))
    assert gpu.runner.graphs is not None
    gpu.start()
    got = [tokens_of(o) for o in run(gpu, [GenerationRequest(r.prompt_ids, r.params) for r in requests])]
    gpu.shutdown()
    agree = sum(a == b for a, b in zip(expected, got))
    assert agree >= 7  # float32 on both; a rare near-tie may flip one token


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").exists() or torch.get_num_threads() < 2,
                    reason="counts the process's threads in Linux's /proc, with 2+ OpenMP threads")
def test_release_cpu_threads_frees_the_callers_openmp_workers():
    from service.backends.cpu.threads import _openmp, release_cpu_threads

    assert _openmp() is not None  # torch's CPU build runs on libgomp
    counts = {}

    def compute_then_release() -> None:  # a fresh thread, so no other test's pool is touched
        counts["before"] = _threads()
        torch.ones(1 << 22).sum()  # a parallel region: this thread gets its own pool of workers
        counts["computing"] = _threads()
        release_cpu_threads()
        counts["released"] = _threads()
        torch.ones(1 << 22).sum()  # and the next region makes new ones
        counts["again"] = _threads()
    worker = threading.Thread(target=compute_then_release)
    worker.start()
    worker.join()
    workers = torch.get_num_threads() - 1
    assert counts["computing"] == counts["before"] + workers
    assert counts["released"] == counts["before"]
    assert counts["again"] == counts["computing"]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts the process's threads in Linux's /proc")
def test_an_idle_engine_holds_no_openmp_workers(engine_factory, tokenizer):
    engine = engine_factory()
    idle = _threads()  # the engine thread, before its first parallel region
    params = GenerationParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    run(engine, mixed_requests(tokenizer, n=4) + [GenerationRequest([5, 6, 7], params)])
    deadline = time.monotonic() + 5
    while _threads() != idle and time.monotonic() < deadline:  # it lets go once its last step is done
        time.sleep(0.01)
    assert _threads() == idle
