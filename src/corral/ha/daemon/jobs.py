"""Service jobs of the real LRM on worker threads, so a round never waits for a guest.

A guest start or stop can take a long time (a QEMU guest's shutdown timeout is minutes); the
reference forks a worker per job. Here each job runs on a bounded thread pool; the LRM
collects finished jobs at its next round (corral.ha.logic.jobs). A job that raises counts
as failed (ExitCode.ERROR) and is logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from corral.ha.logic.types import ExitCode

log = logging.getLogger("corral.ha.lrm")
WORKER_THREADS_MAX = 64  # datacenter.cfg max_workers is at most 64


class ThreadJobRunner:
    def __init__(self, threads_max: int = WORKER_THREADS_MAX) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads_max,
                                        thread_name_prefix="corral-ha-job")
        self._running: dict[str, Future[ExitCode]] = {}
        self._lock = threading.Lock()

    def start(self, sid: str, work: Callable[[], ExitCode]) -> None:
        with self._lock:
            if sid in self._running:
                raise RuntimeError(f"a job for {sid} is already running")
            self._running[sid] = self._pool.submit(work)

    def collect(self) -> dict[str, ExitCode]:
        done: dict[str, ExitCode] = {}
        with self._lock:
            for sid, future in list(self._running.items()):
                if not future.done():
                    continue
                del self._running[sid]
                error = future.exception()
                if error is not None:
                    log.error("job for %s failed: %s", sid, error)
                    done[sid] = ExitCode.ERROR
                else:
                    done[sid] = future.result()
        return done

    def running(self) -> set[str]:
        with self._lock:
            return set(self._running)

    def shutdown(self) -> None:
        """Wait for the running jobs (a guest half-started must finish its job)."""
        self._pool.shutdown(wait=True)
