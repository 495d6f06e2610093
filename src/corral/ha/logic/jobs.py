"""How the LRM runs its service jobs (start, stop, migrate of one guest).

The reference forks one worker per job and collects the finished ones at the next round, so
a round never waits for a slow guest. The logic stays sans-I/O: it hands each job to a
`JobRunner` and later collects the exit codes. `SyncJobRunner` (simulator, tests) runs the job
at once, which keeps the simulator deterministic and its logs unchanged; the daemon uses a
thread pool (corral.ha.daemon.jobs.ThreadJobRunner).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from corral.ha.logic.types import ExitCode


class JobRunner(Protocol):
    def start(self, sid: str, work: Callable[[], ExitCode]) -> None:
        """Begin `work` for service `sid` (at most one job per service at a time)."""
    def collect(self) -> dict[str, ExitCode]:
        """Exit codes of the jobs finished since the last call, by service."""


class SyncJobRunner:
    """Runs each job to completion inside `start`."""

    def __init__(self) -> None:
        self._done: dict[str, ExitCode] = {}

    def start(self, sid: str, work: Callable[[], ExitCode]) -> None:
        self._done[sid] = work()

    def collect(self) -> dict[str, ExitCode]:
        done, self._done = self._done, {}
        return done
