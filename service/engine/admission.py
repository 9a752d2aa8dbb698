"""How much work the engine takes: counted when a caller submits it (not when the engine thread gets to it), so that
a burst is judged by what will actually wait. Pure Python, shared by the event loop and the engine thread."""

from __future__ import annotations

import threading


class EngineError(RuntimeError):
    """The engine cannot take this request now (queue full, shutting down, or dead)."""


class QueueFull(EngineError):
    pass


class Admission:
    """What the engine has taken and not yet answered. A generation that will find a free KV-cache row is always
    taken; otherwise work is refused once `max_queue` requests and probe prompts wait (for a row, or for the
    compute a probe needs). Released by the engine thread when it posts a request's last output or replies to a
    probe."""

    def __init__(self, rows: int, max_queue: int) -> None:
        self.rows, self.max_queue = rows, max_queue
        self.generations = 0  # submitted, not finished
        self.probe_prompts = 0  # submitted, not answered
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return max(0, self.generations - self.rows) + self.probe_prompts

    def admit(self, generations: int = 0, probe_prompts: int = 0) -> None:
        with self._lock:
            finds_a_row = generations > 0 and self.generations + generations <= self.rows
            if not finds_a_row and self.waiting >= self.max_queue:
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests)")
            self.generations += generations
            self.probe_prompts += probe_prompts

    def release(self, generations: int = 0, probe_prompts: int = 0) -> None:
        with self._lock:
            self.generations -= generations
            self.probe_prompts -= probe_prompts
