"""The inference engine: continuous batching in a background thread, with an asyncio-friendly API.

    engine = Engine.from_checkpoint("checkpoints/default")
    engine.start()
    async for out in engine.submit(GenerationRequest(prompt_ids, GenerationParams(max_new_tokens=32))):
        print(out.text, end="")

The thread loops: take new requests and aborts from the inbox, ask the scheduler for a plan, let the runner
execute it, sample one token per sequence that produced logits, then detokenize, check stops and hand the
outputs to each request's asyncio queue, a step's outputs in one call per event loop. The HTTP layer only calls
`submit`, `abort`, `next_token_probs` and reads `stats`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from model.checkpoint import Checkpoint, load_checkpoint
from model.tokenizer import IncrementalDetokenizer
from service.backends.cpu.threads import release_cpu_threads
from service.engine.admission import Admission, EngineError
from service.engine.device import default_dtype, resolve_device
from service.engine.inbox import Abort, Message, Probe, ProbeResult, Sink, Submit, Wake
from service.engine.probes import ProbeQueue
from service.engine.request import FinishReason, GenerationRequest, RequestOutput, TokenLogprob
from service.engine.runner import DecodeInput, ModelRunner
from service.engine.sampling import RowState, SampleResult, make_generator, sample, top_k_distribution
from service.engine.scheduler import ScheduledSequence, Scheduler, StepPlan
from service.engine.stop import StopStringMatcher

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_size: int = 32  # sequences decoding together (KV-cache rows)
    max_seq_len: int | None = None  # context per sequence; default: the model's max_position_embeddings
    max_prefill_tokens: int = 512  # prompt tokens per step; longer prompts are chunked
    max_queue: int = 256  # requests (and probe prompts) waiting for a row or for compute; more get QueueFull
    cuda_graphs: bool = True
    cpu_kernels: bool = True  # float32 CPU models on our kernels (service/backends/cpu/) where they build
    seed: int = 0  # for requests without their own seed


@dataclass(frozen=True)
class EngineStats:
    """How full the engine is after its last step (read by /metrics without locking: the engine thread swaps in a
    new snapshot, never mutates one)."""

    running: int = 0  # requests holding a KV-cache row
    waiting: int = 0  # requests queued for a row
    probes_waiting: int = 0  # next-token-probs prompts not yet computed
    free_rows: int = 0
    max_batch_size: int = 0  # KV-cache rows in all
    cache_usage: float = 0.0  # fraction of KV-cache slots in use

    @classmethod
    def of(cls, scheduler: Scheduler, probes_waiting: int = 0) -> EngineStats:
        free = scheduler.free_rows
        return cls(running=scheduler.max_batch_size - free, waiting=scheduler.num_waiting,
                   probes_waiting=probes_waiting, free_rows=free, max_batch_size=scheduler.max_batch_size,
                   cache_usage=scheduler.cache_usage)

    @property
    def busy(self) -> bool:
        return self.running + self.waiting + self.probes_waiting > 0


def _deliver(outputs: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, output in outputs:
        q.put_nowait(output)


@dataclass
class _Active:
    """Engine-thread state of one request."""

    request: GenerationRequest
    seq: ScheduledSequence
    sink: Sink
    tokens: list[int]  # decoder tokens: prompt + generated
    row_state: RowState
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    output_ids: list[int] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Engine:
    """Serves one checkpoint. The model goes to the runner, which runs a copy of its own (on CPU with repacked
    weights); the engine keeps only the checkpoint's config, tokenizer, defaults and path, so that the original
    weights are freed once the caller lets go of the checkpoint."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        model_config = self.model_config = checkpoint.config
        self.generation_config = checkpoint.generation  # the checkpoint's defaults (generation_config.json)
        self.checkpoint_path = checkpoint.path
        self.tokenizer = checkpoint.tokenizer
        self.max_seq_len = min(self.config.max_seq_len or model_config.max_position_embeddings,
                               model_config.max_position_embeddings)
        window = model_config.sliding_window
        if window is not None and window < self.max_seq_len:  # up to the window, full attention is the same
            log.warning("the model attends over a sliding window of %d tokens: serving %d tokens of context, not %d",
                        window, window, self.max_seq_len)
            self.max_seq_len = window
        self.eos_ids = frozenset(checkpoint.generation.eos_token_ids)  # each of them ends a generation
        self.vocab_size = model_config.vocab_size
        self.is_encoder_decoder = model_config.is_encoder_decoder
        self.runner = ModelRunner(checkpoint.model, self.config.max_batch_size, self.max_seq_len,
                                  max_source_len=self.max_seq_len if self.is_encoder_decoder else None,
                                  cuda_graphs=self.config.cuda_graphs,
                                  cpu_kernels=self.config.cpu_kernels)
        self.device = self.runner.device
        self.scheduler = Scheduler(self.config.max_batch_size, self.max_seq_len, self.config.max_prefill_tokens)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.admission = Admission(self.config.max_batch_size, self.config.max_queue)
        self._active: dict[str, _Active] = {}
        self._probes = ProbeQueue(self.admission, self.config.max_prefill_tokens)
        # outputs waiting for the end of the step, by the event loop they go to: (queue, output, request or None)
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput, _Active | None]]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._accepting = True
        self.dead_reason: str | None = None
        self.stats = EngineStats.of(self.scheduler)

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", dtype: str | None = None,
                        config: EngineConfig | None = None) -> Engine:
        torch_device = resolve_device(device)
        checkpoint = load_checkpoint(path, device=torch_device, dtype=dtype or default_dtype(torch_device))
        return cls(checkpoint, config)

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        release_cpu_threads()  # the loader's idle OpenMP workers would slow every step of the engine thread
        self.runner.release_unused_memory()  # the loaded model's row-major weights, now that nothing holds them
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    def shutdown(self, grace_seconds: float = 0.0) -> None:
        """Stops taking requests, lets in-flight ones finish for up to grace_seconds, aborts the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_seconds
        while self.stats.busy and time.monotonic() < deadline and self.alive:
            time.sleep(0.01)
        self._stopping.set()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the API the HTTP layer calls ----------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raises ValueError (naming the field) for a request the engine would refuse, before any compute."""
        params = request.params
        params.validate(self.vocab_size)
        prompt = request.prompt_ids
        if not prompt:
            raise ValueError("prompt: must hold at least one token")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt: token ids must be in [0, {self.vocab_size})")
        if self.is_encoder_decoder and not request.source_ids:
            raise ValueError("prompt: an encoder-decoder model needs a non-empty source")
        if request.source_ids and len(request.source_ids) > self.max_seq_len:
            raise ValueError(f"prompt: the source has {len(request.source_ids)} tokens; "
                             f"the limit is {self.max_seq_len}")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise ValueError(f"max_new_tokens: the prompt has {len(prompt)} tokens and max_new_tokens is "
                             f"{params.max_new_tokens}, together more than the context length {self.max_seq_len}")

    async def submit(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queues the request and yields its outputs as they come; leaving the loop early aborts it."""
        self.check(request)
        self._check_accepting()
        self.admission.admit(generations=1)  # released by the engine thread when it posts the last output
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._inbox.put(Submit(request, Sink(loop, outputs)))
        finished = False
        try:
            while True:
                out = await outputs.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(Abort(request_id))

    def _check_accepting(self) -> None:
        if not self._accepting or not self.alive:
            raise EngineError(self.dead_reason or "the engine is not accepting requests")

    async def next_token_probs(self, prompts: list[list[int]], top_k: int, temperature: float,
                               sources: list[list[int]] | None = None) -> ProbeResult:
        """Top-k next tokens (id, text, prob, logprob) and the full distribution's entropy, for each prompt,
        computed in the engine thread between decode steps. Admitted like a generation (each prompt counts as one
        waiting request); cancelling the caller (a client gone) drops whatever is not computed yet."""
        self._check_accepting()
        self.admission.admit(probe_prompts=len(prompts))  # released by the engine thread when it replies
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ProbeResult] = loop.create_future()

        def reply(result: ProbeResult | Exception) -> None:
            setter = future.set_exception if isinstance(result, Exception) else future.set_result
            loop.call_soon_threadsafe(lambda: future.done() or setter(result))
        probe = Probe(uuid.uuid4().hex, prompts, sources, top_k, temperature, reply)
        self._inbox.put(probe)
        try:
            return await future
        except asyncio.CancelledError:  # the caller has gone (a client disconnected): drop what is not computed
            self.abort(probe.probe_id)
            raise

    # ---- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_inbox(block=not self._has_work)
                self._flush()
                if self._has_work:
                    if self.scheduler.has_work:
                        self._step_guarded()
                    if self._probes:
                        self._probes.step(self._probe_rows)
                    self._flush()
                    if not self._has_work:
                        release_cpu_threads()  # idle: leave the cores' OpenMP threads to whoever computes next
                self._update_stats()
        except Exception as e:  # a bug outside any one request: report it on /health
            log.exception("engine thread died")
            self.dead_reason = f"engine thread died: {e!r}"
        finally:
            reason = FinishReason.ABORT if self.dead_reason is None else FinishReason.ERROR
            for active in list(self._active.values()):
                self._finish(active, reason, error=self.dead_reason)
            self._refuse_inbox(reason)
            self._probes.fail_all(EngineError(self.dead_reason or "the engine stopped"))
            self._flush()
            self._update_stats()

    @property
    def _has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._probes)

    def _update_stats(self) -> None:
        self.stats = EngineStats.of(self.scheduler, self._probes.prompts_waiting)

    def _refuse_inbox(self, reason: FinishReason) -> None:
        """Answers whatever is still queued once the thread stops, so no caller waits forever."""
        error = self.dead_reason or "the engine stopped"
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, Submit):
                self._post(message.sink, RequestOutput.ended(message.request, reason, error))
            elif isinstance(message, Probe):
                self._probes.reply(message, EngineError(error))

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: Message) -> None:
        match message:
            case Submit(request, sink):
                self._add(request, sink)
            case Abort(request_id):
                if request_id in self._active:
                    self._finish(self._active[request_id], FinishReason.ABORT)
                else:
                    self._probes.drop(request_id)
            case Probe():
                self._probes.add(message)
            case Wake():
                pass
            case _:  # a bug in whoever sent it; the engine thread dies of it and /health says why
                raise TypeError(f"not an engine message: {message!r}")

    def _add(self, request: GenerationRequest, sink: Sink) -> None:
        params = request.params
        seq = ScheduledSequence(request.request_id, len(request.prompt_ids), params.max_new_tokens)
        try:
            self.scheduler.add(seq)
        except ValueError as e:
            self._post(sink, RequestOutput.ended(request, FinishReason.ERROR, str(e)))
            return
        row_state = RowState(params, make_generator(params.seed, self.device), request.prompt_ids, [])
        active = _Active(request, seq, sink, list(request.prompt_ids), row_state,
                         IncrementalDetokenizer(self.tokenizer), StopStringMatcher(params.stop))
        active.row_state.output_ids = active.output_ids
        self._active[request.request_id] = active

    def _step_guarded(self) -> None:
        """One step of the plan. A forward pass that raises is run again one sequence at a time, so that only the
        request at fault fails (its chunk or decode token is written to the same cache slots again, which is
        harmless); the others go on."""
        plan = self.scheduler.schedule()
        try:
            self.runner.move_rows(plan.moves)
        except Exception as e:  # the rows may be half moved: no request of this step can be trusted
            log.exception("moving cache rows failed")
            for seq in [c.seq for c in plan.prefill] + plan.decode:
                self._fail(seq.request_id, e)
            return
        try:
            actives, logits = self._forward(plan)
        except Exception:
            log.exception("a forward pass of %d sequences failed; running each alone",
                          len(plan.prefill) + len(plan.decode))
            actives, logits = self._forward_each(plan)
        if not actives:
            return
        for group, result in self._sample(actives, logits):
            for i, active in enumerate(group):
                token, logprob = result.token_ids[i], result.logprobs[i]  # logprob: None unless the request asked
                top = result.top_logprobs[i]
                try:
                    self._accept(active, token, None if logprob is None else TokenLogprob(token, logprob, top))
                except Exception as e:
                    log.exception("handling the new token of request %s failed", active.request_id)
                    self._fail(active.request_id, e)

    def _forward_each(self, plan: StepPlan) -> tuple[list[_Active], torch.Tensor | None]:
        """`_forward` one sequence at a time; a sequence whose pass raises ends with an error."""
        actives, parts = [], []
        alone = [(c.seq, StepPlan(prefill=[c])) for c in plan.prefill]
        alone += [(seq, StepPlan(decode=[seq])) for seq in plan.decode]
        for seq, one in alone:
            try:
                found, part = self._forward(one)
            except Exception as e:
                log.exception("the forward pass of request %s failed", seq.request_id)
                self._fail(seq.request_id, e)
                continue
            if part is not None:
                actives += found
                parts.append(part)
        return actives, torch.cat(parts) if parts else None

    def _forward(self, plan: StepPlan) -> tuple[list[_Active], torch.Tensor | None]:
        """Runs the plan's passes (moves already made): the requests that produced logits and their logits (R, V)."""
        runner = self.runner
        if self.is_encoder_decoder:
            admitted = [self._active[c.seq.request_id] for c in plan.prefill if c.start == 0]
            if admitted:
                runner.encode_sources([a.seq.row for a in admitted], [a.request.source_ids for a in admitted])
        ready: list[tuple[_Active, torch.Tensor]] = []
        if plan.prefill:
            tokens = {c.seq.request_id: self._active[c.seq.request_id].tokens for c in plan.prefill}
            for request_id, logits in runner.prefill(plan.prefill, tokens).items():
                ready.append((self._active[request_id], logits))
        decoded = None
        if plan.decode:
            actives = [self._active[s.request_id] for s in plan.decode]
            decoded = runner.decode([DecodeInput(a.seq.row, a.tokens[-1], a.seq.num_tokens - 1) for a in actives])
            ready.extend(zip(actives, decoded))
        self.scheduler.step_done(plan)
        if not ready:
            return [], None
        # (R, V): decode-only steps (the usual ones) already have it in one tensor
        logits = decoded if len(ready) == len(plan.decode) else torch.stack([logits for _, logits in ready])
        return [active for active, _ in ready], logits

    def _fail(self, request_id: str, error: Exception) -> None:
        """Ends a request with an error; the message is for the log (the API layer shows clients a generic one)."""
        if request_id in self._active:
            self._finish(self._active[request_id], FinishReason.ERROR, error=f"internal error: {error!r}")

    def _sample(self, actives: list[_Active], logits: torch.Tensor) -> list[tuple[list[_Active], SampleResult]]:
        """One token per request from its row of `logits` (R, V), as (requests, their result) groups: one group for
        the batch, or, when one request's settings break the batch, one per request that samples alone (the one
        at fault ends with an error, the others go on)."""
        try:
            return [(actives, sample(logits, [a.row_state for a in actives], self.generator))]
        except Exception:
            log.exception("sampling a batch of %d failed; sampling each request alone", len(actives))
        groups = []
        for i, active in enumerate(actives):
            try:
                groups.append(([active], sample(logits[i:i + 1], [active.row_state], self.generator)))
            except Exception as e:
                log.exception("sampling request %s failed", active.request_id)
                self._fail(active.request_id, e)
        return groups

    def _accept(self, active: _Active, token: int, logprob: TokenLogprob | None) -> None:
        """Adds a sampled token to its request: stop checks, detokenization, streaming."""
        params = active.request.params
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            self._finish(active, FinishReason.STOP)
            return
        active.output_ids.append(token)
        active.tokens.append(token)
        self.scheduler.append_token(active.seq)
        text, stopped = active.stops.feed(active.detok.push(token))
        logprobs = [logprob] if params.logprobs is not None else None
        if stopped:
            self._finish(active, FinishReason.STOP, text, [token], logprobs, flush=False)
        elif len(active.output_ids) >= params.max_new_tokens:
            self._finish(active, FinishReason.LENGTH, text, [token], logprobs)
        else:
            self._emit(active, RequestOutput(request_id=active.request_id, text=text, token_ids=[token],
                                             logprobs=logprobs, prompt_tokens=len(active.request.prompt_ids),
                                             completion_tokens=len(active.output_ids)))

    def _finish(self, active: _Active, reason: FinishReason, text: str = "", token_ids: list[int] | None = None,
                logprobs: list[TokenLogprob] | None = None, error: str | None = None, flush: bool = True) -> None:
        self.scheduler.finish(active.request_id)
        self._active.pop(active.request_id, None)
        if flush:  # whatever the detokenizer and the stop matcher still hold
            tail, stopped = active.stops.feed(active.detok.flush())
            text += tail + ("" if stopped else active.stops.flush())
        if logprobs is None and active.request.params.logprobs is not None:
            logprobs = []
        self._emit(active, RequestOutput(request_id=active.request_id, text=text, token_ids=token_ids or [],
                                         logprobs=logprobs, prompt_tokens=len(active.request.prompt_ids),
                                         completion_tokens=len(active.output_ids), finished=True,
                                         finish_reason=reason, error=error))

    def _emit(self, active: _Active, output: RequestOutput) -> None:
        self._post(active.sink, output, active)

    def _post(self, sink: Sink, output: RequestOutput, active: _Active | None = None) -> None:
        if output.finished:
            self.admission.release(generations=1)
        self._outbox.setdefault(sink.loop, []).append((sink.queue, output, active))

    def _flush(self) -> None:
        """Hands each event loop the outputs posted since the last flush in one call: one wake-up of its thread
        per step, not one per token, as every cross-thread call writes to the loop's wake-up socket."""
        outbox, self._outbox = self._outbox, {}
        for loop, posted in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(q, output) for q, output, _ in posted])
            except RuntimeError:  # that event loop is gone: nobody is listening; free what its requests hold
                for _, _, active in posted:
                    if active is not None and active.request_id in self._active:
                        self.scheduler.finish(active.request_id)
                        del self._active[active.request_id]
                        self.admission.release(generations=1)

    def _probe_rows(self, probe: Probe, start: int, end: int) -> ProbeResult:
        """The next-token distributions of probe prompts [start, end), from one cache-free forward."""
        sources = probe.sources[start:end] if probe.sources is not None else None
        logits = self.runner.last_token_logits(probe.prompts[start:end], sources)
        ids, probs, logprobs, entropy = top_k_distribution(logits, probe.top_k, probe.temperature)
        results = []
        for row, prompt in enumerate(probe.prompts[start:end]):
            tokens = [{"id": i, "text": self.tokenizer.token_text(i), "prob": p, "logprob": lp}
                      for i, p, lp in zip(ids[row].tolist(), probs[row].tolist(), logprobs[row].tolist())]
            results.append({"prompt_tokens": len(prompt), "tokens": tokens, "entropy": float(entropy[row])})
        return results
