"""Stop strings in streamed text."""

from __future__ import annotations


class StopStringMatcher:
    """Finds stop strings in streamed text, even across token boundaries, and holds back any tail that could
    still become one, so the stop string itself is never emitted."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            emit, self.pending = self.pending[:min(hits)], ""
            return emit, True
        hold = 0
        for s in self.stops:  # longest suffix of pending that is a prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        emit = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return emit, False

    def flush(self) -> str:
        emit, self.pending = self.pending, ""
        return emit
