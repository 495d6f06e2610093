"""Discrete-event scheduler: a heap of (time_ns, insertion number, event).

Equal times are broken by insertion order, which is itself a pure function of
the seed, so the run is reproducible; events themselves are never compared.
"""

from __future__ import annotations

import heapq
from typing import Any

Event = tuple[Any, ...]


class Scheduler:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Event]] = []
        self._inserted = 0
        self.now_ns = 0

    def at(self, time_ns: int, event: Event) -> None:
        if time_ns < self.now_ns:
            time_ns = self.now_ns
        heapq.heappush(self._heap, (time_ns, self._inserted, event))
        self._inserted += 1

    def after(self, delay_ns: int, event: Event) -> None:
        self.at(self.now_ns + delay_ns, event)

    def pop(self) -> Event | None:
        """Advance the clock to the next event and return it (None when empty)."""
        if not self._heap:
            return None
        time_ns, _, event = heapq.heappop(self._heap)
        self.now_ns = time_ns
        return event

    def peek_time_ns(self) -> int:
        return self._heap[0][0] if self._heap else -1

    def __len__(self) -> int:
        return len(self._heap)
