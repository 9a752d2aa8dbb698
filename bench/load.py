"""Load generator for a running lmserve: throughput, latency, errors, determinism and return to idle under a mix
of concurrent requests.

    python bench/load.py --model checkpoints/default --clients 8 --duration 30
    python bench/load.py --url http://127.0.0.1:8000 --clients 32 --requests 500 --disconnect-fraction 0.2

With --model it starts `lmserve serve` on a free 127.0.0.1 port (more server flags: --serve-args), waits for /ready
and stops it with SIGTERM at the end; else it loads --url. N clients loop over requests until --duration and/or
--requests: POST /generate and /v1/completions, streamed (SSE) or not, short/medium/long prompts, greedy and sampled
(top_p, top_k, seeds), some streams closed by the client after a few events, and every --probe-every-th request a
greedy probe whose token ids must equal the first probe's. It reports requests sent/completed/disconnected, errors
by HTTP status and exception, requests/s, generated tokens/s (usage.completion_tokens), p50/p90/p99 of TTFT (first
event with text), inter-token gaps and end-to-end latency, the probes, and /metrics' running/waiting gauges (peak,
at the end, and whether they return to 0). bench/soak.py reuses `run_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "http://127.0.0.1:8000"
R = TypeVar("R")
PROBE = {"prompt": "def fibonacci(n):", "max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
MEDIUM = [  # Python, as the bundled default model is a code model
    "def read_lines(path):\n    \"\"\"Return the stripped lines of a text file.\"\"\"\n    with open(path) as f:\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import json\nimport sys\n\n\ndef main(argv):\n    if len(argv) < 2:\n        print('usage: tool FILE')\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(description='Copy a file')\n    parser.add_",
]
PROMPTS = {"short": ["def fib(n):", "import os\n", "class Point:", "for i in range(", "# Read the config file\n"],
           "medium": MEDIUM,  # long: whole files' worth, still well inside a 256-token context
           "long": ["\n\n".join(MEDIUM) + "\n", "\n\n".join(MEDIUM[::-1]) + "        return None\n\n\ndef copy("]}


def _flag(default: float, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class LoadOptions:
    """What one load run sends; `duration` and/or `requests` bound it (in-flight requests then finish). The fields
    with a help text are also the command line's flags."""
    duration: float | None = 30.0
    requests: int | None = None
    clients: int = _flag(8, "concurrent clients")
    stream_fraction: float = _flag(0.5, "share of requests that stream (SSE)")
    openai_fraction: float = _flag(0.2, "share of requests sent to /v1/completions rather than /generate")
    disconnect_fraction: float = _flag(0.0, "share of streams the client closes after 1-4 events")
    probe_every: int = _flag(10, "every K-th request is the greedy determinism probe; 0: none")
    max_new_tokens: int = _flag(64, "the most new tokens a request asks for (cut to the context left)")
    timeout: float = _flag(120.0, "total seconds one request may take")
    idle_timeout: float = _flag(30.0, "seconds to wait after the load for 0 running and 0 waiting")
    seed: int = _flag(0, "seed of the request mix")
    backoff: float = _flag(1.0, "most seconds a client waits after a 503, as Retry-After asks (clients such as "
                                "openai's do); 0: retry at once")


@dataclass
class RequestResult:
    """One request's outcome: 'ok', 'disconnected', 'status:NNN' or 'exception:Type'; times in s since the run began."""
    kind: str
    started: float
    finished: float = 0.0
    outcome: str = "ok"
    completion_tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    token_ids: list[int] | None = None
    retry_after: float = 0.0  # a 503's Retry-After header, in seconds

    @property
    def error(self) -> bool:
        return self.outcome not in ("ok", "disconnected")


@dataclass
class LoadReport:
    """What run_load measured; --json writes it as is."""
    url: str
    clients: int
    wall_s: float
    sent: int
    completed: int
    disconnected: int
    errors: int
    errors_by_status: dict[str, int]
    errors_by_exception: dict[str, int]
    sent_by_kind: dict[str, int]
    generated_tokens: int
    requests_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, dict[str, float | None]]  # ttft (streams), itl (inter-token), e2e: p50/p90/p99
    probes_identical: int
    probes_total: int
    metrics_peak: dict[str, float]
    metrics_end: dict[str, float]
    server_requests_by_finish_reason: dict[str, float]
    returned_to_idle: bool
    idle_wait_s: float


class StreamError(Exception):
    """An SSE stream that carried an error event or ended without `data: [DONE]`."""


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 in ms, linearly interpolated; None without samples."""
    ordered = sorted(values)

    def q(p: float) -> float | None:
        i = (len(ordered) - 1) * p
        lo, hi = int(i), min(int(i) + 1, len(ordered) - 1)
        return round(1000 * (ordered[lo] + (ordered[hi] - ordered[lo]) * (i - lo)), 2) if ordered else None
    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """GET /metrics as {'name{labels}': value}; {} when the server does not answer."""
    try:
        text = (await client.get("/metrics")).raise_for_status().text
    except httpx.HTTPError:
        return {}
    samples = (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, _, value in samples}


def build_request(n: int, rng: random.Random, o: LoadOptions, model: str,
                  caps: dict[str, int]) -> tuple[str, str, dict, int | None]:
    """Request number n: (kind, path, JSON body, close the stream after this many events or None)."""
    if o.probe_every and n % o.probe_every == 0:
        return "probe", "/generate", dict(PROBE), None
    prompt = rng.choice(PROMPTS[rng.choice(list(PROMPTS))])
    body: dict = {"prompt": prompt, "temperature": 0 if rng.random() < 0.35 else rng.choice([0.6, 0.9, 1.2])}
    body |= {k: v for k, v in (("top_p", rng.choice([None, 0.9, 0.95])), ("top_k", rng.choice([None, 20, 50])),
                               ("seed", rng.choice([None, rng.randrange(1 << 31)]))) if v is not None}
    body["ignore_eos"] = rng.random() < 0.5
    tokens = rng.randint(min(4, caps[prompt]), caps[prompt])
    stream = rng.random() < o.stream_fraction
    cut = rng.randint(1, 4) if stream and rng.random() < o.disconnect_fraction else None
    if rng.random() < o.openai_fraction:
        body |= {"model": model, "max_tokens": tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "completions" + "-stream" * stream, "/v1/completions", body, cut
    return "generate" + "-stream" * stream, "/generate", body | {"max_new_tokens": tokens, "stream": stream}, cut


async def _exchange(client: httpx.AsyncClient, path: str, body: dict, cut: int | None, result: RequestResult,
                    start: float) -> None:
    """Sends one request and fills `result` from the answer, or from the stream's events as they arrive."""
    if not body.get("stream"):
        data = (await client.post(path, json=body)).raise_for_status().json()
        result.completion_tokens = data["usage"]["completion_tokens"]
        if "outputs" in data:
            result.token_ids = data["outputs"][0]["token_ids"]
        return
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            response.raise_for_status()
        events, last_text = 0, None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("error"):
                raise StreamError(str(event["error"])[:200])
            text = event.get("text") or "".join(c.get("text") or "" for c in event.get("choices", []))
            if text:
                if last_text is not None:
                    result.gaps.append(now - last_text)
                elif result.ttft is None:
                    result.ttft = now - start
                last_text = now
            if event.get("usage"):
                result.completion_tokens = event["usage"]["completion_tokens"]
            events += 1
            if cut is not None and events >= cut:
                result.outcome = "disconnected"
                return  # leaving the block closes the connection mid-stream
    raise StreamError("the stream ended without data: [DONE]")


async def send(client: httpx.AsyncClient, path: str, body: dict, cut: int | None, result: RequestResult,
               timeout: float, t0: float) -> RequestResult:
    """Runs one request under a total timeout; every failure becomes the result's outcome, never an exception."""
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_exchange(client, path, body, cut, result, start), timeout)
    except httpx.HTTPStatusError as e:
        result.outcome = f"status:{e.response.status_code}"
        with contextlib.suppress(ValueError):
            result.retry_after = float(e.response.headers.get("retry-after", 0))
    except Exception as e:  # transport errors, timeouts, bad JSON: counted by type, the load goes on
        result.outcome = f"exception:{type(e).__name__}"
    result.finished = time.perf_counter() - t0
    return result


async def _setup(client: httpx.AsyncClient, max_new_tokens: int) -> tuple[str, dict[str, int]]:
    """The served model's name, and per prompt the most new tokens that fit its context."""
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    caps = {}
    for text in [t for texts in PROMPTS.values() for t in texts]:
        info = (await client.post("/tokenize", json={"prompt": text})).json()
        caps[text] = max(1, min(max_new_tokens, info["max_model_len"] - info["count"]))  # 1: a 400, counted
    return model, caps


async def _watch_metrics(client: httpx.AsyncClient, peak: dict[str, float]) -> None:
    """Keeps the highest running/waiting gauges seen, one sample a second, until cancelled."""
    while True:
        now = await metrics(client)
        for name in peak:
            peak[name] = max(peak[name], now.get(f"lmserve_{name}", 0.0))
        await asyncio.sleep(1.0)


async def _wait_idle(client: httpx.AsyncClient, timeout: float) -> tuple[bool, dict[str, float]]:
    """Polls /metrics until nothing runs or waits (True), or the timeout (False); returns the last sample too."""
    deadline = time.monotonic() + timeout
    while True:
        now = await metrics(client)
        if now.get("lmserve_requests_running") == 0 and now.get("lmserve_requests_waiting") == 0:
            return True, now
        if time.monotonic() >= deadline:
            return False, now
        await asyncio.sleep(0.25)


def _finish_reasons(metrics: dict[str, float]) -> dict[str, float]:
    return {k.split('"')[1]: v for k, v in metrics.items() if k.startswith("lmserve_requests_total{")}


async def run_load(url: str, options: LoadOptions,
                   on_result: Callable[[RequestResult], None] | None = None) -> LoadReport:
    """Runs the load against `url` and reports; `on_result` sees every request as it ends (soak.py's minutes)."""
    limits = httpx.Limits(max_connections=options.clients + 4, max_keepalive_connections=options.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=options.timeout, limits=limits) as client:
        model, caps = await _setup(client, options.max_new_tokens)
        before = _finish_reasons(await metrics(client))
        deadline = time.monotonic() + options.duration if options.duration else float("inf")
        numbers, limit = itertools.count(), options.requests or float("inf")
        results: list[RequestResult] = []
        reference: list[list[int]] = []
        probes = [0, 0]
        t0 = time.perf_counter()

        async def loop(c: int) -> None:
            rng = random.Random(options.seed * 1_000_003 + c)
            while time.monotonic() < deadline and (n := next(numbers)) < limit:
                kind, path, body, cut = build_request(n, rng, options, model, caps)
                result = await send(client, path, body, cut, RequestResult(kind, time.perf_counter() - t0),
                                    options.timeout, t0)
                results.append(result)
                if kind == "probe" and not result.error:
                    if not reference:
                        reference.append(result.token_ids)
                    probes[0] += result.token_ids == reference[0]
                    probes[1] += 1
                result.token_ids = None  # only probes need them; a soak keeps every result
                if result.retry_after and options.backoff:
                    await asyncio.sleep(min(result.retry_after, options.backoff, max(0, deadline - time.monotonic())))
                if on_result is not None:
                    on_result(result)

        peak = {"requests_running": 0.0, "requests_waiting": 0.0}
        watcher = asyncio.create_task(_watch_metrics(client, peak))
        try:
            await asyncio.gather(*(loop(c) for c in range(options.clients)))
        finally:
            watcher.cancel()
        wall = time.perf_counter() - t0
        end = await metrics(client)  # the gauges as the load ends: aborted streams may still be leaving
        idle_start = time.monotonic()
        idle, now = await _wait_idle(client, options.idle_timeout)
        idle_wait = time.monotonic() - idle_start
        after = _finish_reasons(now)

    done = [r for r in results if r.outcome == "ok"]
    failed = [r for r in results if r.error]
    tokens = sum(r.completion_tokens for r in done)
    return LoadReport(
        url=url, clients=options.clients, wall_s=round(wall, 2), sent=len(results), completed=len(done),
        disconnected=sum(r.outcome == "disconnected" for r in results), errors=len(failed),
        errors_by_status=dict(Counter(r.outcome[7:] for r in failed if r.outcome.startswith("status:"))),
        errors_by_exception=dict(Counter(r.outcome[10:] for r in failed if r.outcome.startswith("exception:"))),
        sent_by_kind=dict(sorted(Counter(r.kind for r in results).items())), generated_tokens=tokens,
        requests_per_s=round(len(done) / wall, 2), tokens_per_s=round(tokens / wall, 1),
        latency_ms={"ttft": percentiles([r.ttft for r in done if r.ttft is not None]),
                    "itl": percentiles([g for r in done for g in r.gaps]),
                    "e2e": percentiles([r.finished - r.started for r in done])},
        probes_identical=probes[0], probes_total=probes[1], metrics_peak=peak,
        metrics_end={k: end.get(f"lmserve_{k}", float("nan")) for k in peak},
        server_requests_by_finish_reason={k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)},
        returned_to_idle=idle, idle_wait_s=round(idle_wait, 2))


def format_report(r: LoadReport) -> str:
    """A readable table of the report."""
    def row(name: str, p: dict[str, float | None]) -> str:
        return f"| {name} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in p.values()) + " |"
    errors = ", ".join([f"HTTP {k}: {v}" for k, v in r.errors_by_status.items()]
                       + [f"{k}: {v}" for k, v in r.errors_by_exception.items()]) or "none"
    return "\n".join([
        f"lmserve load: {r.url}, {r.clients} clients, {r.wall_s:.1f} s",
        f"requests: sent {r.sent}, completed {r.completed}, disconnected on purpose {r.disconnected}, "
        f"errors {r.errors} ({errors})",
        "by kind: " + ", ".join(f"{k} {v}" for k, v in r.sent_by_kind.items()),
        f"throughput: {r.requests_per_s:.2f} requests/s, {r.tokens_per_s:.1f} generated tokens/s "
        f"({r.generated_tokens} tokens in completed requests)",
        "| latency (ms) | p50 | p90 | p99 |", "|---|---|---|---|",
        *(row(name, r.latency_ms[k]) for k, name in (("ttft", "time to first token (streams)"),
                                                     ("itl", "inter-token"), ("e2e", "end to end"))),
        f"determinism probes: {r.probes_identical}/{r.probes_total} identical to the first",
        "server gauges running/waiting: peak {requests_running:.0f}/{requests_waiting:.0f}, ".format(**r.metrics_peak)
        + "as the load ended {requests_running:.0f}/{requests_waiting:.0f}".format(**r.metrics_end),
        "server requests by finish_reason: "
        + (", ".join(f"{k} {v:.0f}" for k, v in r.server_requests_by_finish_reason.items()) or "none"),
        f"returned to idle: {'yes' if r.returned_to_idle else 'NO'} (after {r.idle_wait_s:.2f} s)"])


def write_json(path: str, data: object) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def wait_ready(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Polls GET /ready until 200, the deadline, or the server process dying."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise SystemExit("the server exited before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise SystemExit(f"{url}/ready was not 200 within {timeout:.0f} s")


class Server(NamedTuple):
    url: str
    pid: int | None


@contextlib.contextmanager
def served(model: str, serve_args: str = "", ready_timeout: float = 300.0,
           stop_timeout: float = 60.0) -> Iterator[Server]:
    """`lmserve serve --model` on a free loopback port, stopped with SIGTERM (then SIGKILL) however the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+b", prefix="lmserve-load-", suffix=".log", delete=False)
    # our --host/--port come last so they win; a session of its own keeps the terminal's Ctrl-C for us to handle
    command = [sys.executable, "-m", "service", "serve", "--model", str(Path(model).resolve()),
               *shlex.split(serve_args), "--host", "127.0.0.1", "--port", str(port)]
    env = {"LMSERVE_LOG_LEVEL": "warning"} | dict(os.environ)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started lmserve (pid {proc.pid}) on 127.0.0.1:{port}, log {log.name}", file=sys.stderr)
    try:
        wait_ready(f"http://127.0.0.1:{port}", ready_timeout, alive=lambda: proc.poll() is None)
        yield Server(f"http://127.0.0.1:{port}", proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        status = f"stopped lmserve (pid {proc.pid}, exit status {proc.returncode})"
        if proc.returncode == 0:
            os.unlink(log.name)  # a clean run's log (warnings only) is not worth keeping
            print(status, file=sys.stderr)
        else:
            tail = Path(log.name).read_text(errors="replace")[-3000:]
            print(f"{tail}\n{status}; its log: {log.name}", file=sys.stderr)


def add_common_arguments(parser: argparse.ArgumentParser, model: str | None, **defaults: float) -> None:
    """The flags load.py and soak.py share (LoadOptions' with `defaults` over its own); a given --url wins over a
    default --model."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server to load (default " + (
        f"{DEFAULT_URL} unless --model is given)" if model is None else "none: a server is started from --model)"))
    where.add_argument("--model", default=model, metavar="DIR", help="start `lmserve serve --model DIR` on a free "
                       "127.0.0.1 port and load it" + (f" (default {model})" if model else ""))
    parser.add_argument("--serve-args", default="", help="extra flags for the started server, one string, e.g. "
                                                         "'--max-batch-size 16 --max-queue 64'")
    for f in fields(LoadOptions):
        if "help" in f.metadata:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                                default=defaults.get(f.name, f.default), help=f.metadata["help"] + " (%(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /ready (%(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")


def options_from_args(args: argparse.Namespace, duration: float | None, requests: int | None) -> LoadOptions:
    flags = {f.name: getattr(args, f.name) for f in fields(LoadOptions) if "help" in f.metadata}
    return LoadOptions(duration=duration, requests=requests, **flags)


def drive(args: argparse.Namespace, work: Callable[[Server], Coroutine[Any, Any, R]]) -> R | None:
    """Runs `work` against the server started from --model, or the one at --url (with --pid if given); None when
    interrupted (Ctrl-C, or SIGTERM, which unwinds the same way). A server started here is stopped in every case."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.model and not args.url:
            context = served(args.model, args.serve_args, args.ready_timeout)
        else:
            wait_ready(url := (args.url or DEFAULT_URL).rstrip("/"), args.ready_timeout)
            context = contextlib.nullcontext(Server(url, getattr(args, "pid", None)))
        with context as server:
            return asyncio.run(work(server))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, model=None)
    parser.add_argument("--duration", type=float, help="seconds to send for (default 30 unless --requests is given)")
    parser.add_argument("--requests", type=int, help="requests to send in all")
    args = parser.parse_args(argv)
    options = options_from_args(args, args.duration if args.duration or args.requests else 30.0, args.requests)
    if (report := drive(args, lambda server: run_load(server.url, options))) is None:
        return 130
    print(format_report(report))
    if args.json:
        write_json(args.json, asdict(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
