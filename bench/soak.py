"""Soak test: bench/load.py's request mix held for minutes, to catch what only shows over time (errors, memory
growth, output drift, requests that never leave the server).

    python bench/soak.py                                          # 10 minutes, 16 clients, checkpoints/default
    python bench/soak.py --model checkpoints/default --minutes 30 --clients 32 --serve-args '--max-batch-size 32'
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234 --minutes 10 --json soak.json

It starts `lmserve serve --model DIR` itself (default checkpoints/default), so it knows the server's PID, or drives
--url (with --pid for the memory figures). Per minute it reports requests, errors and generated tokens/s. The server
process's resident memory (VmRSS from /proc/PID/status) is read at the end of every minute; the end of minute 1 is
the warm-up baseline, and the growth from there to the end (after the server is idle again) is reported. It ends
with the goal, 0 errors and memory growth <= 5% (plus identical determinism probes and a return to idle), and exits
1 when the goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402
    LoadOptions,
    LoadReport,
    RequestResult,
    add_common_arguments,
    drive,
    format_report,
    options_from_args,
    run_load,
    write_json,
)

GROWTH_GOAL_PCT = 5.0


@dataclass
class Minute:
    minute: int
    requests: int = 0
    errors: int = 0
    disconnected: int = 0
    tokens: int = 0
    seconds: float = 60.0
    tokens_per_s: float = 0.0
    rss_mib: float | None = None  # at the minute's end


@dataclass
class SoakReport:
    minutes: list[Minute]
    load: LoadReport
    rss_warm_mib: float | None
    rss_end_mib: float | None
    rss_growth_pct: float | None
    goal_met: bool


def rss_mib(pid: int | None) -> float | None:
    """The process's resident set (VmRSS) in MiB; None without a PID or once it is gone."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def soak(url: str, pid: int | None, options: LoadOptions, minutes: int) -> SoakReport:
    """run_load for `minutes`, with each request counted in the minute it ended and RSS read at each minute's end."""
    rows = [Minute(i + 1) for i in range(minutes)]

    def count(result: RequestResult) -> None:
        row = rows[min(int(result.finished // 60), minutes - 1)]  # the drain after the deadline joins the last minute
        row.requests += 1
        row.errors += result.error
        row.disconnected += result.outcome == "disconnected"
        row.tokens += result.completion_tokens if result.outcome == "ok" else 0

    async def sample_rss(start: float) -> None:
        for row in rows:
            await asyncio.sleep(max(0.0, start + 60 * row.minute - time.perf_counter()))
            row.rss_mib = rss_mib(pid)
            print(f"minute {row.minute}: {row.requests} requests, {row.errors} errors, "
                  f"{row.tokens / 60:.1f} tokens/s" + (f", RSS {row.rss_mib:.1f} MiB" if row.rss_mib else ""),
                  file=sys.stderr, flush=True)

    sampler = asyncio.create_task(sample_rss(time.perf_counter()))
    try:
        load = await run_load(url, options, on_result=count)
    finally:
        sampler.cancel()
    rows[-1].seconds = max(1.0, load.wall_s - 60 * (minutes - 1))
    for row in rows:
        row.tokens_per_s = round(row.tokens / row.seconds, 1)
    warm, end = rows[0].rss_mib, rss_mib(pid)  # end: after run_load waited for the server to be idle again
    growth = 100 * (end - warm) / warm if warm and end else None
    met = (load.errors == 0 and growth is not None and growth <= GROWTH_GOAL_PCT and load.returned_to_idle
           and load.probes_identical == load.probes_total)
    return SoakReport(rows, load, warm, end, None if growth is None else round(growth, 2), met)


def format_soak(r: SoakReport) -> str:
    """The per-minute table, the load report of the whole run, memory and the goal."""
    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"
    lines = ["| minute | requests | errors | disconnected | tokens/s | RSS MiB at its end |", "|---" * 6 + "|"]
    lines += [f"| {m.minute} | {m.requests} | {m.errors} | {m.disconnected} | {m.tokens_per_s:.1f} | "
              f"{mib(m.rss_mib)} |" for m in r.minutes]
    growth = "not measured (no --pid)" if r.rss_growth_pct is None else f"{r.rss_growth_pct:+.2f}%"
    if len(r.minutes) == 1 and r.rss_growth_pct is not None:
        growth += " (a 1-minute soak: warm-up and end coincide, so this says nothing)"
    lines += ["", format_report(r.load), "",
              f"server RSS: {mib(r.rss_warm_mib)} MiB after warm-up (end of minute 1), {mib(r.rss_end_mib)} MiB at "
              f"the end, growth {growth}",
              f"goal: 0 errors (got {r.load.errors}), RSS growth <= {GROWTH_GOAL_PCT:.0f}% (got {growth}), probes "
              f"identical ({r.load.probes_identical}/{r.load.probes_total}), idle at the end "
              f"({'yes' if r.load.returned_to_idle else 'no'}): {'MET' if r.goal_met else 'NOT MET'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, model="checkpoints/default", clients=16, disconnect_fraction=0.1)
    parser.add_argument("--minutes", type=int, default=10, help="how long to run, in minutes (default 10)")
    parser.add_argument("--pid", type=int, help="with --url: the server's PID, for its memory")
    args = parser.parse_args(argv)
    if args.minutes < 1:
        parser.error("--minutes must be at least 1")
    options = options_from_args(args, duration=60.0 * args.minutes, requests=None)
    if (report := drive(args, lambda server: soak(server.url, server.pid, options, args.minutes))) is None:
        return 130
    print(format_soak(report))
    if args.json:
        write_json(args.json, asdict(report) | {"goal": {"errors": 0, "rss_growth_pct_max": GROWTH_GOAL_PCT}})
    return 0 if report.goal_met else 1


if __name__ == "__main__":
    sys.exit(main())
