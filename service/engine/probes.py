"""/next-token-probs in the engine thread: the probes taken from the inbox, computed a group of prompts at a time
(at most `max_group_tokens` tokens per group), one group per loop iteration between decode steps, so that a big
probe cannot stall the streams; a probe whose caller has gone is dropped before it costs anything more."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.admission import Admission, EngineError
from service.engine.inbox import Probe, ProbeResult

log = logging.getLogger(__name__)
ComputeRows = Callable[[Probe, int, int], ProbeResult]  # (probe, start, end) -> results of prompts [start, end)


@dataclass
class _Job:
    probe: Probe
    results: ProbeResult = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.probe.prompts) - len(self.results)


class ProbeQueue:
    """First come, first served. Every reply (results or error) releases the probe's prompts from `admission`."""

    def __init__(self, admission: Admission, max_group_tokens: int) -> None:
        self.admission, self.max_group_tokens = admission, max_group_tokens
        self._jobs: deque[_Job] = deque()

    def __bool__(self) -> bool:
        return bool(self._jobs)

    @property
    def prompts_waiting(self) -> int:
        return sum(job.remaining for job in self._jobs)

    def add(self, probe: Probe) -> None:
        self._jobs.append(_Job(probe))

    def drop(self, probe_id: str) -> None:
        """Its caller has gone: forget a probe not yet computed (a group being computed finishes, unread)."""
        job = next((job for job in self._jobs if job.probe.probe_id == probe_id), None)
        if job is not None:
            self._jobs.remove(job)
            self.reply(job.probe, EngineError("aborted"))

    def step(self, compute: ComputeRows) -> None:
        """Computes the next group of prompts of the oldest probe; replies once all its prompts are done."""
        job = self._jobs[0]
        prompts, start = job.probe.prompts, len(job.results)
        end, tokens = start + 1, len(prompts[start])
        while end < len(prompts) and tokens + len(prompts[end]) <= self.max_group_tokens:
            tokens += len(prompts[end])
            end += 1
        try:
            job.results += compute(job.probe, start, end)
        except Exception as e:
            log.exception("next-token distribution failed (probe %s)", job.probe.probe_id)
            self._jobs.popleft()
            self.reply(job.probe, e)
            return
        if not job.remaining:
            self._jobs.popleft()
            self.reply(job.probe, job.results)

    def fail_all(self, error: Exception) -> None:
        while self._jobs:
            self.reply(self._jobs.popleft().probe, error)

    def reply(self, probe: Probe, result: ProbeResult | Exception) -> None:
        self.admission.release(probe_prompts=len(probe.prompts))
        probe.reply(result)
