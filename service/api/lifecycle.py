"""The server's life: load the model in the background (so /health and /ready answer while it loads), warm it up,
serve, then drain and stop the engine on shutdown.

Loading runs in a daemon thread: a SIGTERM during a long load is not held up by it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from service.api.generation import Serving
from service.api.metrics import Metrics
from service.engine.engine import Engine, EngineConfig, EngineStats
from service.engine.request import GenerationParams, GenerationRequest
from service.settings import Settings

log = logging.getLogger(__name__)


def engine_config(settings: Settings) -> EngineConfig:
    """The EngineConfig fields that Settings has too (same name, same meaning); the rest keep their defaults."""
    shared = [f.name for f in fields(EngineConfig) if f.name in Settings.model_fields]
    return EngineConfig(**{name: getattr(settings, name) for name in shared})


def load_engine(settings: Settings) -> Engine:
    return Engine.from_checkpoint(str(settings.model), device=settings.device, dtype=settings.dtype,
                                  config=engine_config(settings))


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def run() -> None:
        try:
            result: Any = fn()
        except BaseException as e:  # handed to the awaiting coroutine
            error = e
            loop.call_soon_threadsafe(lambda: future.done() or future.set_exception(error))
        else:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))
    threading.Thread(target=run, name="lmserve-load", daemon=True).start()
    return await future


class ServerState:
    """What /health, /ready and the `get_serving` dependency look at."""

    def __init__(self, settings: Settings, engine: Engine | None = None,
                 loader: Callable[[Settings], Engine] | None = None,
                 on_fatal: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(self.engine_stats, lambda: self.ready)
        self.status = "loading"  # loading -> warming up -> ready -> stopping; or failed
        self.error: str | None = None
        self.serving: Serving | None = None
        self._engine, self._loader, self._on_fatal = engine, loader or load_engine, on_fatal
        self._task: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def engine_stats(self) -> EngineStats | None:
        return self.serving.engine.stats if self.serving is not None else None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            engine = self._engine or await _in_daemon_thread(lambda: self._loader(self.settings))
            self._engine = engine
            if not engine.alive and engine.dead_reason is None:
                engine.start()
            self.serving = Serving(engine, self.settings, self.metrics)
            self.status = "warming up"
            await self._warm_up(self.serving)
        except Exception as e:
            self.status, self.error = "failed", f"{type(e).__name__}: {e}"
            log.error("could not load the model from %s: %s", self.settings.model, self.error)
            if self._on_fatal is not None:
                self._on_fatal()
            return
        self.status = "ready"
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(self.serving))
        log.info("model %s ready in %.1fs: %s parameters, %s on %s", self.serving.name, time.monotonic() - started,
                 f"{engine.runner.num_parameters:,}", engine.runner.dtype, engine.device)

    @staticmethod
    async def _watch(serving: Serving, interval: float = 0.5) -> None:
        """Once the engine thread is gone, nothing answers the requests it had not taken yet: end them."""
        while serving.engine.alive:
            await asyncio.sleep(interval)
        reason = serving.engine.dead_reason or "the engine stopped"
        log.error("engine is not running (%s); failing %d request(s) in flight", reason, len(serving.live))
        while True:  # requests may still be on their way in until the routes see the engine is gone
            serving.fail_all(reason)
            await asyncio.sleep(interval)

    async def _warm_up(self, serving: Serving) -> None:
        """One tiny generation and one next-token distribution, so the first client does not pay for lazy
        initialisation (allocator, kernels, thread pools)."""
        engine = serving.engine
        tok = serving.tokenizer
        if engine.is_encoder_decoder:
            source = tok.encode("warm up", add_eos=tok.eos_id is not None) or [0]
            prompt, sources = [serving.start_id], [source[:engine.max_seq_len]]
        else:
            prompt, sources = (tok.encode("warm up") or [0])[:engine.max_seq_len - 1], None
        request = GenerationRequest(prompt, GenerationParams(max_new_tokens=1, temperature=0.0),
                                    source_ids=sources[0] if sources else None)
        async for out in engine.submit(request):
            if out.finished and out.error:
                raise RuntimeError(f"warm-up generation failed: {out.error}")
        await engine.next_token_probs([prompt], top_k=1, temperature=1.0, sources=sources)

    def begin_shutdown(self, grace: float) -> None:
        """The server stops taking connections (SIGTERM): /ready and new requests get 503 from now on, and what
        still runs after `grace` seconds is aborted, so its streams end with finish_reason abort and [DONE]."""
        if self.ready:
            self.status = "stopping"
        serving = self.serving
        if serving is not None:
            log.info("shutting down: %d request(s) in flight get up to %gs to finish", len(serving.live), grace)
            asyncio.get_running_loop().call_later(grace, serving.abort_all)

    async def stop(self) -> None:
        """Called after the server stopped taking connections and in-flight requests drained (or the grace period
        ran out): stops the engine, aborting whatever is left."""
        was_ready = self.ready or self.status == "stopping"
        if self.status != "failed":
            self.status = "stopping"
        for task in (self._task, self._watchdog):
            if task is not None and not task.done():
                task.cancel()
        engine = self._engine
        if engine is not None:
            await asyncio.to_thread(engine.shutdown, self.settings.shutdown_grace if was_ready else 0.0)
