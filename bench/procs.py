"""Processes started by a benchmark run: start, watch their output, stop them all.

Every process the harness starts is registered here and stopped by its pid in
`stop_all()` (SIGTERM, then SIGKILL), which the harness calls from `finally`
blocks, so an error or Ctrl-C leaves nothing behind. Children get their own
session, so a terminal's Ctrl-C reaches only the harness, which then cleans up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

STOP_GRACE_S = 3.0


class LineWatcher:
    """Reads a process's stdout in a thread and keeps each JSON line as an event."""

    def __init__(self, stream: IO[str], label: str) -> None:
        self.label = label
        self.events: list[dict[str, Any]] = []
        self.other_lines: list[str] = []
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            with self._condition:
                if isinstance(event, dict):
                    self.events.append(event)
                else:
                    self.other_lines.append(line)
                self._condition.notify_all()
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float, start_index: int = 0
    ) -> dict[str, Any] | None:
        """The first event at or after start_index that satisfies predicate, or None."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            index = start_index
            while True:
                while index < len(self.events):
                    if predicate(self.events[index]):
                        return self.events[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._condition.wait(remaining)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._condition:
            return list(self.events)

    def count(self) -> int:
        with self._condition:
            return len(self.events)


class ProcessSet:
    """The processes of one run, each stopped by pid when the run ends."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[str]] = []
        self._lock = threading.Lock()

    def start(
        self, argv: Sequence[str], log_path: Path | None = None, capture_stdout: bool = False
    ) -> subprocess.Popen[str]:
        """Start argv; stdout is piped if capture_stdout, else it goes to log_path with stderr."""
        log = open(log_path, "a") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else log,
                stderr=log if log_path else subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        finally:
            if log_path and not isinstance(log, int):
                log.close()
        with self._lock:
            self._procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, proc: subprocess.Popen[str], grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, wait up to grace_s, then SIGKILL; always reaps."""
        self.kill(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill(proc, signal.SIGKILL)
            proc.wait(timeout=grace_s)

    def stop_all(self) -> None:
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            self.kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc, signal.SIGKILL)
                proc.wait(timeout=STOP_GRACE_S)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    # After the command name: state is field 3, utime field 14 and stime field 15.
    return int(fields[11]) + int(fields[12])


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
