"""Prometheus metrics, in a registry of the app's own (so a process, or a test, can hold several apps).

Engine gauges are read from `engine.stats` when Prometheus scrapes, not pushed on every step. Latencies are
measured per engine request (one prompt x one choice) in the HTTP layer: time to first token, the gaps between
tokens, end to end, and queue time (approximated as arrival to first token, which includes the prefill: the
engine reports nothing finer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.engine.engine import EngineStats
from service.engine.request import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    """Gauges computed at scrape time from the engine's last step snapshot."""

    def __init__(self, stats: Callable[[], EngineStats | None], ready: Callable[[], bool]) -> None:
        self.stats, self.ready = stats, ready

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.stats() or EngineStats()  # no engine yet: all zero
        values = {
            "lmserve_requests_running": ("requests holding a KV-cache row", stats.running),
            "lmserve_requests_waiting": ("requests queued for a KV-cache row", stats.waiting),
            "lmserve_probe_prompts_waiting": ("/next-token-probs prompts not yet computed", stats.probes_waiting),
            "lmserve_kv_cache_usage_ratio": ("fraction of KV-cache slots in use", stats.cache_usage),
            "lmserve_kv_cache_free_rows": ("KV-cache rows free for new requests", stats.free_rows),
            "lmserve_kv_cache_rows": ("KV-cache rows in all (max batch size)", stats.max_batch_size),
            "lmserve_ready": ("1 once the model is loaded and warmed up", int(self.ready())),
        }
        for name, (documentation, value) in values.items():
            yield GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None], ready: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("lmserve_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("lmserve_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("lmserve_requests", "engine requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.http_requests = Counter("lmserve_http_requests", "HTTP requests answered, by route and status",
                                     ["method", "route", "status"], registry=r)
        self.ttft = Histogram("lmserve_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmserve_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("lmserve_e2e_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("lmserve_queue_time_seconds",
                                    "arrival to first output (approximation: includes the prefill)",
                                    buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(stats, ready))

    def timer(self, prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latency and token bookkeeping of one engine request, fed with its outputs as they arrive."""

    __slots__ = ("metrics", "prompt_tokens", "completion_tokens", "start", "last", "done")

    def __init__(self, metrics: Metrics, prompt_tokens: int) -> None:
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens  # as the client counts them (encoder-decoder: the source)
        self.completion_tokens = 0
        self.start = time.monotonic()
        self.last: float | None = None
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        m = self.metrics
        if out.token_ids:
            if self.last is None:
                m.ttft.observe(now - self.start)
                m.queue_time.observe(now - self.start)
            else:
                m.itl.observe(now - self.last)
            self.last = now
        self.completion_tokens = out.completion_tokens
        if out.finished:
            self.finish(out.finish_reason.value if out.finish_reason else "unknown")

    def discard(self) -> None:
        """The engine never took the request (e.g. a full queue): count nothing for it."""
        self.done = True

    def finish(self, reason: str) -> None:
        """Counts the request once: from its last output, or as aborted when its consumer went away first."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.start)
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generation_tokens.inc(self.completion_tokens)
        m.requests.labels(reason).inc()
