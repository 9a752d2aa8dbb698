"""Who runs this step: admission, chunked prefill, decoding and cache-row bookkeeping. Pure Python, no tensors.

The KV cache has `max_batch_size` rows of `max_seq_len` slots. A sequence holds one row from admission to
finish. Running sequences are kept in rows 0..n-1 (when one leaves, the highest row is moved into its hole),
so a decode step over all running sequences reads a contiguous block of the cache without gathering.

Each step the scheduler plans (vLLM-style continuous batching):
  1. row moves that close holes left by finished/aborted sequences;
  2. one decode token for every running sequence whose prompt is fully in the cache;
  3. prefill chunks, within a token budget: first the unfinished prompts of running sequences, then new
     sequences admitted first-come-first-served while rows are free. Long prompts are chunked.
Requests join and leave between steps; nobody waits for a batch to finish.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class ScheduledSequence:
    """The scheduler's view of one request: lengths and its cache row, nothing else."""

    request_id: str
    prompt_len: int
    max_new_tokens: int
    num_tokens: int = 0  # prompt + generated tokens known so far
    num_computed: int = 0  # tokens whose keys/values are in the cache
    row: int | None = None
    status: Status = Status.WAITING
    arrival: int = field(default_factory=itertools.count().__next__)

    def __post_init__(self) -> None:
        self.num_tokens = self.num_tokens or self.prompt_len

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens


@dataclass
class PrefillChunk:
    seq: ScheduledSequence
    start: int  # feed prompt tokens [start, end)
    end: int

    @property
    def completes_prompt(self) -> bool:
        """The last prompt token is in this chunk: its logits give the first new token."""
        return self.end == self.seq.prompt_len


@dataclass
class StepPlan:
    moves: list[tuple[int, int]] = field(default_factory=list)  # (from_row, to_row), applied in order first
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[ScheduledSequence] = field(default_factory=list)  # each feeds its newest token

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    def __init__(self, max_batch_size: int, max_seq_len: int, max_prefill_tokens: int = 512) -> None:
        if max_batch_size < 1 or max_seq_len < 2 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size, max_prefill_tokens must be >= 1 and max_seq_len >= 2")
        self.max_batch_size, self.max_seq_len, self.max_prefill_tokens = max_batch_size, max_seq_len, max_prefill_tokens
        self.waiting: deque[ScheduledSequence] = deque()
        self.rows: list[ScheduledSequence | None] = [None] * max_batch_size  # row -> sequence holding it
        self.by_id: dict[str, ScheduledSequence] = {}

    # ---- state ---------------------------------------------------------------------------------------

    @property
    def running(self) -> list[ScheduledSequence]:
        return [s for s in self.rows if s is not None]

    @property
    def free_rows(self) -> int:
        return sum(s is None for s in self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or self.free_rows < self.max_batch_size

    @property
    def cache_usage(self) -> float:
        """Fraction of cache slots holding keys/values."""
        return sum(s.num_computed for s in self.running) / (self.max_batch_size * self.max_seq_len)

    # ---- requests come and go ------------------------------------------------------------------------

    def add(self, seq: ScheduledSequence) -> None:
        if seq.prompt_len < 1:
            raise ValueError("a sequence needs at least one prompt token")
        if seq.max_len > self.max_seq_len:
            raise ValueError(f"prompt ({seq.prompt_len} tokens) + max_new_tokens ({seq.max_new_tokens}) "
                             f"exceeds the context length {self.max_seq_len}")
        if seq.request_id in self.by_id:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, request_id: str) -> ScheduledSequence | None:
        """Releases a finished or aborted sequence (waiting or running); its row is reused next step."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.row is not None:
            self.rows[seq.row] = None
            seq.row = None
        seq.status = Status.FINISHED
        return seq

    def append_token(self, seq: ScheduledSequence) -> None:
        """The engine sampled one more token for seq."""
        seq.num_tokens += 1

    # ---- the plan for one step -----------------------------------------------------------------------

    def _compact(self) -> list[tuple[int, int]]:
        """Moves the highest running rows into holes so rows 0..n-1 are the running ones."""
        moves = []
        for hole in range(self.max_batch_size):
            if self.rows[hole] is not None:
                continue
            last = max((r for r in range(hole + 1, self.max_batch_size) if self.rows[r] is not None), default=None)
            if last is None:
                break
            seq = self.rows[last]
            self.rows[hole], self.rows[last], seq.row = seq, None, hole
            moves.append((last, hole))
        return moves

    def schedule(self) -> StepPlan:
        plan = StepPlan(moves=self._compact())
        running = self.running  # in row order
        plan.decode = [s for s in running if not s.prefilling and s.num_computed == s.num_tokens - 1]
        budget = self.max_prefill_tokens
        for seq in running:
            if seq.prefilling and budget > 0:
                end = min(seq.prompt_len, seq.num_computed + budget)
                plan.prefill.append(PrefillChunk(seq, seq.num_computed, end))
                budget -= end - seq.num_computed
        while self.waiting and budget > 0 and self.free_rows:
            seq = self.waiting.popleft()
            seq.row = self.rows.index(None)
            self.rows[seq.row] = seq
            seq.status = Status.RUNNING
            end = min(seq.prompt_len, budget)
            plan.prefill.append(PrefillChunk(seq, 0, end))
            budget -= end
        return plan

    def step_done(self, plan: StepPlan) -> None:
        """Records that the runner computed the plan's tokens into the cache."""
        for chunk in plan.prefill:
            chunk.seq.num_computed = chunk.end
        for seq in plan.decode:
            seq.num_computed += 1
