"""A migration as a detached worker process: it outlives whoever started it.

The API's `POST /nodes/{node}/qemu/{vmid}/migrate` calls
`spawn_worker(WorkerSettings(...))`, which starts

    python -m corral.guests.migrate_worker '<settings as JSON>'

`corral qm migrate` calls `fork_worker` (the same, by forking the CLI: no interpreter
start). That process forks once more and exits, so the worker is nobody's child (init reaps it)
and runs in a session of its own: the death of the CLI (even SIGKILL) or of the daemon
that started it does not reach it, and a Ctrl-C on the CLI's terminal is not delivered
to it. The worker writes exactly one line to its stdout, then points stdout and stderr
away (stderr to `<run dir>/<vmid>.migrate.log`, for tracebacks only):

    UPID:...            the migration's task (or the `hamigrate` task of an HA guest)
    ERROR: <message>    refused before a task existed (no such guest, bad options)

Everything else goes to the task log, which the starter follows. SIGTERM or SIGINT to
the worker requests a cancel, as `qm migrate-cancel` (the guest stays on the source).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.guests.migrate import MigrateOptions, MigrationError, migrate
from corral.guests.qemu import GuestManager
from corral.guests.tasks import Upid, parse_upid

FIRST_LINE_TIMEOUT_S = 60.0      # the worker reads the config (through the tree) first
MAX_LINE_BYTES = 4096


class WorkerError(RuntimeError):
    """The worker could not be started, or refused the migration before a task existed."""


@dataclass(frozen=True)
class WorkerSettings:
    root: str
    node: str
    run_dir: str
    task_dir: str
    state_dir: str | None
    vmid: int
    target: str
    options: MigrateOptions = field(default_factory=MigrateOptions)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        raw: dict[str, Any] = json.loads(text)
        options = MigrateOptions(**raw.pop("options"))
        return cls(**raw, options=options)


def spawn_worker(settings: WorkerSettings,
                 timeout_s: float = FIRST_LINE_TIMEOUT_S) -> Upid:
    """Start a detached worker and return its task's UPID (blocking: call it from a
    thread in an event loop). WorkerError when it refuses before a task exists."""
    os.makedirs(settings.run_dir, exist_ok=True)
    stderr_path = os.path.join(settings.run_dir, f"{settings.vmid}.migrate.log")
    with open(stderr_path, "ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "corral.guests.migrate_worker", settings.to_json()],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            start_new_session=True)
    assert process.stdout is not None
    try:
        line = _first_line(process.stdout.fileno(), timeout_s)
    finally:
        process.stdout.close()
        process.wait()            # the intermediate exits at once; the worker is not ours
    return _upid_from(line, stderr_path)


def fork_worker(settings: WorkerSettings, timeout_s: float = FIRST_LINE_TIMEOUT_S) -> Upid:
    """As spawn_worker, by forking this process instead of starting an interpreter
    (~0.2 s less): for single-threaded callers with no event loop running (the CLI).
    Not for corrald (threads, its FUSE mount): it uses spawn_worker."""
    os.makedirs(settings.run_dir, exist_ok=True)
    stderr_path = os.path.join(settings.run_dir, f"{settings.vmid}.migrate.log")
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        _become_worker(settings, read_fd, write_fd, stderr_path)   # never returns
    os.close(write_fd)
    try:
        line = _first_line(read_fd, timeout_s)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)        # the intermediate exits at once; the worker is not ours
    return _upid_from(line, stderr_path)


def _become_worker(settings: WorkerSettings, read_fd: int, write_fd: int,
                   stderr_path: str) -> None:
    code = 1
    try:
        os.close(read_fd)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(write_fd, 1)
        os.close(write_fd)
        errors = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(errors, 2)
        os.close(errors)
        code = asyncio.run(_run(settings))
    except BaseException:         # the traceback goes to the worker's log file
        with contextlib.suppress(Exception):
            traceback.print_exc()
            _say("ERROR: the migration worker failed (see its log file)")
    finally:
        os._exit(code)


def _upid_from(line: str, stderr_path: str) -> Upid:
    if line.startswith("UPID:"):
        return parse_upid(line)
    if line.startswith("ERROR: "):
        raise WorkerError(line.removeprefix("ERROR: "))
    raise WorkerError(f"the migration worker did not start (see {stderr_path})")


def _first_line(fd: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data and len(data) < MAX_LINE_BYTES:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, MAX_LINE_BYTES)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def _say(line: str) -> None:
    """The one line for the starter, on fd 1 itself (sys.stdout may be someone else's
    object in a forked caller); then fd 1 goes to /dev/null: nothing of the worker may
    depend on its starter's pipe (stderr already goes to the worker's log file)."""
    os.write(1, (line + "\n").encode())
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


async def _run(settings: WorkerSettings) -> int:
    manager = GuestManager(settings.root, settings.node, settings.run_dir, settings.task_dir)
    manager.state_dir = settings.state_dir
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, cancel.set)
    said: list[Upid] = []

    def started(upid: Upid) -> None:
        said.append(upid)
        _say(str(upid))

    try:
        await migrate(manager, settings.vmid, settings.target, settings.options,
                      state_dir=settings.state_dir, cancel=cancel, on_upid=started)
    except MigrationError as exc:
        if not said:
            _say(f"ERROR: {exc}")
        return 1
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("ERROR: usage: python -m corral.guests.migrate_worker SETTINGS_JSON", flush=True)
        return 2
    try:
        settings = WorkerSettings.from_json(argv[0])
    except (ValueError, TypeError, KeyError) as exc:
        print(f"ERROR: bad worker settings: {exc}", flush=True)
        return 2
    if os.fork() != 0:
        os._exit(0)               # the starter reaps this one; init adopts the worker
    os.setsid()
    try:
        return asyncio.run(_run(settings))
    except Exception as exc:      # the traceback goes to the worker's log file
        with contextlib.suppress(Exception):
            _say(f"ERROR: {type(exc).__name__}: {exc}")   # /dev/null if already said
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
