"""Tasks: a UPID per long operation, a log file per task and a per-node index.

UPID format (the reference's, exactly): `UPID:node:pid:pstart:starttime:type:id:user:`
with pid, pstart and starttime as 8-digit upper-case hex (pstart may need 9), trailing
colon included. The log lives at `<task_dir>/<last hex digit of starttime>/<UPID>` and
ends with `TASK OK` or `TASK ERROR: <message>`. `<task_dir>/active` lists running tasks,
`<task_dir>/index` finished ones as `UPID endtime-hex status` lines (newest last,
bounded by INDEX_MAX_ENTRIES).

`publish_to(root)` makes the store also publish the node's recent tasks to
`<root>/nodes/<node>/tasks.json` in the replicated tree whenever a task begins or ends
(see clustertasks.py, the cluster-wide list); a failed publish (a read-only tree without
quorum, say) never fails the task: it is counted in `publish_failures`.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

INDEX_MAX_ENTRIES = 1000
_UPID_RE = re.compile(r"^UPID:([A-Za-z0-9][A-Za-z0-9.-]*):([0-9A-F]{8}):([0-9A-F]{8,9}):"
                      r"([0-9A-F]{8}):([^:\s/]+):([^:\s]*):([^:\s]+@[^:\s]+):$")
T = TypeVar("T")


class TaskError(ValueError):
    """A UPID is malformed or a task cannot be found."""


@dataclass(frozen=True)
class Upid:
    node: str
    pid: int
    pstart: int
    starttime: int
    task_type: str
    task_id: str
    user: str

    def __str__(self) -> str:
        return (f"UPID:{self.node}:{self.pid:08X}:{self.pstart:08X}:{self.starttime:08X}:"
                f"{self.task_type}:{self.task_id}:{self.user}:")


def parse_upid(text: str) -> Upid:
    match = _UPID_RE.match(text)
    if not match:
        raise TaskError(f"invalid UPID '{text}'")
    node, pid, pstart, starttime, task_type, task_id, user = match.groups()
    return Upid(node, int(pid, 16), int(pstart, 16), int(starttime, 16), task_type, task_id, user)


def process_start_ticks(pid: int) -> int:
    """Start time of a process in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        stat = handle.read()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def new_upid(node: str, task_type: str, task_id: str, user: str) -> Upid:
    if not task_type or re.search(r"[:/\s]", task_type) or re.search(r"[:\s]", task_id):
        raise TaskError(f"invalid task type/id '{task_type}'/'{task_id}'")
    pid = os.getpid()
    return Upid(node, pid, process_start_ticks(pid), int(time.time()), task_type, task_id, user)


class TaskLog:
    """The open log of one running task; `log()` timestamps nothing, as the reference."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.warnings = 0
        self._handle = open(path, "a", encoding="utf-8")

    def log(self, line: str) -> None:
        self._handle.write(line.rstrip("\n") + "\n")
        self._handle.flush()

    def warn(self, line: str) -> None:
        self.warnings += 1
        self.log(f"WARN: {line}")

    def finish(self, status: str) -> None:
        self.log(status)
        self._handle.close()


class TaskStore:
    """Task logs and the active/index lists of one node."""

    def __init__(self, task_dir: str, node: str) -> None:
        self.task_dir = task_dir
        self.node = node
        self.publish_root: str | None = None
        self.publish_failures = 0
        self.last_publish_error = ""
        os.makedirs(task_dir, exist_ok=True)

    def publish_to(self, root: str | None) -> None:
        """Publish the recent task list into the tree at `root` on every begin/end."""
        self.publish_root = root

    def log_path(self, upid: Upid) -> str:
        return os.path.join(self.task_dir, f"{upid.starttime & 0xF:X}", str(upid))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(os.path.join(self.task_dir, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _rewrite(self, name: str, lines: list[str]) -> None:
        path = os.path.join(self.task_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
        os.replace(path + ".tmp", path)

    def _read(self, name: str) -> list[str]:
        try:
            with open(os.path.join(self.task_dir, name), encoding="utf-8") as handle:
                return [line.rstrip("\n") for line in handle if line.strip()]
        except FileNotFoundError:
            return []

    def begin(self, task_type: str, task_id: str, user: str = "root@pam") -> tuple[Upid, TaskLog]:
        upid = new_upid(self.node, task_type, task_id, user)
        path = self.log_path(upid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with self._locked():
            self._rewrite("active", [*self._read("active"), str(upid)])
            self._publish()
        return upid, TaskLog(path)

    def end(self, upid: Upid, log: TaskLog, error: str | None) -> str:
        if error is not None:
            status = f"ERROR: {error.splitlines()[0] if error else 'unknown error'}"
        elif log.warnings:
            status = f"WARNINGS: {log.warnings}"
        else:
            status = "OK"
        log.finish(f"TASK {status}")
        with self._locked():
            self._rewrite("active", [line for line in self._read("active") if line != str(upid)])
            index = [*self._read("index"), f"{upid} {int(time.time()):08X} {status}"]
            self._rewrite("index", index[-INDEX_MAX_ENTRIES:])
            self._publish()
        return status

    def _publish(self) -> None:
        """Called with the store lock held, so two writers cannot publish out of order."""
        if self.publish_root is None:
            return
        from corral.guests.clustertasks import publish  # clustertasks imports this module
        try:
            publish(self, self.publish_root)
        except (OSError, ValueError) as exc:
            self.publish_failures += 1
            self.last_publish_error = str(exc)

    def run(self, task_type: str, task_id: str, work: Callable[[TaskLog], T],
            user: str = "root@pam") -> tuple[Upid, T]:
        """Run `work` as a task; its exception becomes `TASK ERROR:` and is re-raised."""
        upid, log = self.begin(task_type, task_id, user)
        try:
            result = work(log)
        except BaseException as exc:
            self.end(upid, log, str(exc) or type(exc).__name__)
            raise
        self.end(upid, log, None)
        return upid, result

    async def run_async(self, task_type: str, task_id: str,
                        work: Callable[[TaskLog], Awaitable[T]],
                        user: str = "root@pam") -> tuple[Upid, T]:
        """As `run`, for a coroutine."""
        upid, log = self.begin(task_type, task_id, user)
        try:
            result = await work(log)
        except BaseException as exc:
            self.end(upid, log, str(exc) or type(exc).__name__)
            raise
        self.end(upid, log, None)
        return upid, result

    def status(self, upid: Upid) -> dict[str, object]:
        """The reference's task status shape: running, or stopped with exitstatus."""
        result: dict[str, object] = {"upid": str(upid), "node": upid.node, "pid": upid.pid,
                                     "pstart": upid.pstart, "starttime": upid.starttime,
                                     "type": upid.task_type, "id": upid.task_id, "user": upid.user}
        if str(upid) in self._read("active") and _alive(upid.pid, upid.pstart):
            result["status"] = "running"
            return result
        result["status"] = "stopped"
        last = (self.read_log(upid) or [""])[-1]
        result["exitstatus"] = last[5:] if last.startswith("TASK ") else "unexpected status"
        return result

    def read_log(self, upid: Upid) -> list[str]:
        try:
            with open(self.log_path(upid), encoding="utf-8") as handle:
                return [line.rstrip("\n") for line in handle]
        except FileNotFoundError:
            raise TaskError(f"no such task '{upid}'") from None

    def list_active(self) -> list[tuple[str, bool]]:
        """Active UPIDs, newest first, each with whether its process still runs."""
        result = []
        for line in reversed(self._read("active")):
            upid = parse_upid(line)
            result.append((line, _alive(upid.pid, upid.pstart)))
        return result

    def list_finished(self, limit: int) -> list[tuple[str, int, str]]:
        """The newest `limit` finished tasks as (UPID, endtime, status), newest first."""
        result = []
        for line in reversed(self._read("index")[-limit:] if limit > 0 else []):
            upid_text, end_hex, status = line.split(" ", 2)
            result.append((upid_text, int(end_hex, 16), status))
        return result

    def list_tasks(self, limit: int = 50) -> list[dict[str, object]]:
        """Newest first: active tasks, then finished ones from the index."""
        entries: list[dict[str, object]] = []
        for line in reversed(self._read("active")):
            entries.append({**self.status(parse_upid(line))})
        for line in reversed(self._read("index")):
            upid_text, end_hex, status = line.split(" ", 2)
            upid = parse_upid(upid_text)
            entries.append({"upid": upid_text, "node": upid.node, "type": upid.task_type,
                            "id": upid.task_id, "user": upid.user, "starttime": upid.starttime,
                            "endtime": int(end_hex, 16), "status": status})
        return entries[:limit]


def _alive(pid: int, pstart: int) -> bool:
    try:
        return process_start_ticks(pid) == pstart
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False
