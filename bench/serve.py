"""Served throughput and latency vs the in-process engine, so the HTTP overhead is visible.

    python bench/serve.py [--seconds 10] [--rounds 2] [--clients 1 8 32] [--device cpu]

The model is bench/decode.py's (GPT-2-small shape, random float32 weights). For each client count it runs,
for a bounded time: (a) the engine in this process, N concurrent streams through `Engine.submit`; (b) a real
`lmserve serve` subprocess on 127.0.0.1, N concurrent streaming clients on POST /generate; the two alternate,
best round of each kept. Prompts have mixed
lengths (16..48 tokens), 64 new tokens each, greedy. Prints tokens/s, time to first token and inter-token
latency (median, p99) and ends with `RESULT served_vs_engine=... ttft_p50_ms=... itl_p50_ms=...` (32 clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import GPT2_SMALL  # noqa: E402

from model.checkpoint import save_checkpoint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.model import Transformer  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.training.init import stdlib_sample  # noqa: E402
from service.engine.engine import Engine, EngineConfig  # noqa: E402
from service.engine.request import GenerationParams, GenerationRequest  # noqa: E402

NEW_TOKENS = 64
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def row(self, name: str, clients: int) -> str:
        def pct(values: list[float], q: float) -> float:
            return 1000 * statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")
        return (f"| {name} | {clients} | {self.rate:.1f} | {1000 * statistics.median(self.ttft):.0f} | "
                f"{pct(self.ttft, 99):.0f} | {1000 * statistics.median(self.itl):.1f} | {pct(self.itl, 99):.1f} |")


def prompts(tokenizer: Tokenizer, count: int) -> list[str]:
    """Texts of 16..48 tokens, cut from the standard library."""
    text = "".join(stdlib_sample(8))
    ids = tokenizer.encode(text)
    out, start = [], 0
    for i in range(count):
        n = 16 + (i * 13) % 33
        out.append(tokenizer.decode(ids[start:start + n]))
        start += n
    return out


async def engine_client(engine: Engine, texts: list[str], deadline: float, run: Run) -> None:
    params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    i = 0
    while time.perf_counter() < deadline:
        start = last = time.perf_counter()
        first = True
        prompt = engine.tokenizer.encode(texts[i % len(texts)])
        async for out in engine.submit(GenerationRequest(prompt, params)):
            now = time.perf_counter()
            if out.token_ids:
                (run.ttft if first else run.itl).append(now - (start if first else last))
                first, last = False, now
                run.tokens += len(out.token_ids)
        i += 1


async def http_client(url: str, texts: list[str], deadline: float, run: Run, offset: int) -> None:
    body = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        i = offset
        while time.perf_counter() < deadline:
            start = last = time.perf_counter()
            first = True
            async with client.stream("POST", "/generate", json=body | {"prompt": texts[i % len(texts)]}) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("token_id") is None:
                        continue
                    now = time.perf_counter()
                    (run.ttft if first else run.itl).append(now - (start if first else last))
                    first, last = False, now
                    run.tokens += 1
            i += 1


async def measure(clients: int, seconds: float, make_client) -> Run:
    run = Run()
    start = time.perf_counter()
    await asyncio.gather(*(make_client(start + seconds, run, c) for c in range(clients)))
    run.seconds = time.perf_counter() - start  # includes finishing the requests in flight at the deadline
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per path; the best counts")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    max_clients = max(args.clients)

    torch.manual_seed(0)
    tokenizer = Tokenizer.train(stdlib_sample(), vocab_size=2048)
    model = Transformer(ModelConfig(**GPT2_SMALL))
    workdir = Path(tempfile.mkdtemp(prefix="lmserve-bench-"))
    checkpoint_dir = save_checkpoint(workdir / "gpt2-small-random", model, tokenizer)
    texts = prompts(tokenizer, 64)
    engine_config = dict(max_batch_size=max_clients, max_seq_len=256, max_prefill_tokens=2048)

    port = free_port()
    env = os.environ | {"LMSERVE_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--model", str(checkpoint_dir),
                               "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
                               "--max-batch-size", str(max_clients), "--max-seq-len", "256",
                               "--max-prefill-tokens", "2048"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the server did not become ready")
        engine = Engine.from_checkpoint(str(checkpoint_dir), device=args.device,
                                        config=EngineConfig(**engine_config))
        engine.start()
        asyncio.run(measure(2, 2, lambda d, r, c: engine_client(engine, texts, d, r)))  # warm-up
        asyncio.run(measure(2, 2, lambda d, r, c: http_client(url, texts, d, r, c)))
        # alternate the two paths and keep each one's best round, so drift in the machine's speed (a shared
        # VM's neighbours) does not land on one side of the ratio; the idle side's engine thread just waits
        in_process: dict[int, Run] = {}
        served: dict[int, Run] = {}
        for n in args.clients:
            for _ in range(args.rounds):
                run = asyncio.run(measure(n, args.seconds, lambda d, r, c: engine_client(engine, texts[c:], d, r)))
                in_process[n] = max(in_process.get(n, run), run, key=lambda x: x.rate)
                run = asyncio.run(measure(n, args.seconds, lambda d, r, c: http_client(url, texts, d, r, c)))
                served[n] = max(served.get(n, run), run, key=lambda x: x.rate)
        engine.shutdown()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    print(f"\nGPT-2-small shape, random float32 weights, {args.device}, {torch.get_num_threads()} threads; "
          f"prompts 16..48 tokens, {NEW_TOKENS} new tokens, greedy; best of {args.rounds} alternating rounds of "
          f"{args.seconds:.0f} s per row")
    print("| path | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for n in args.clients:
        print(in_process[n].row("engine (in process)", n))
        print(served[n].row("HTTP /generate (SSE)", n))
    for n in args.clients:
        print(f"served / engine at {n} clients: {served[n].rate / in_process[n].rate:.2f}")
    top = max_clients
    print(f"RESULT served_vs_engine={served[top].rate / in_process[top].rate:.2f} "
          f"ttft_p50_ms={1000 * statistics.median(served[top].ttft):.0f} "
          f"itl_p50_ms={1000 * statistics.median(served[top].itl):.1f}")


if __name__ == "__main__":
    main()
