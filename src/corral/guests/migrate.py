"""Migration of a QEMU guest to another node: the source side, in the reference's phases.

Public API (stable; the HA resource agent and the benchmark call it):

    upid = await migrate(manager, vmid, target, MigrateOptions(online=True, ...),
                         state_dir=None, cancel=None, on_upid=None)

- `manager`: the source node's GuestManager (tree root, node name, run dir, task dir).
- `state_dir`: that node's corrald state dir (cluster key, CA, node certificate, control
  socket); default `manager.state_dir`, else $CORRAL_STATE_DIR or /var/lib/corral.
- `cancel`: an asyncio.Event; setting it aborts the migration (so does
  `request_cancel(manager, vmid)` from another process, i.e. `corral qm migrate-cancel`).
- `on_upid(upid)` is called as soon as the task exists (the CLI prints it and follows
  the log).
- Returns the task's UPID once the guest runs on the target with its config there
  (`TASK OK`), or raises MigrationError (its `upid` names the failed task; the guest
  then still runs on the source, config unchanged and unlocked, nothing left on the
  target). An HA-managed guest is not moved: `migrate vm:ID TARGET` is queued for the
  HA manager (task type `hamigrate`) unless `MigrateOptions(from_ha=True)`, which the
  HA resource agent itself passes.

Call it from a process other than corrald (the detached worker of migrate_worker.py,
which `corral qm migrate` and the API start; the HA daemon; a benchmark): it reads and
renames files in the mounted tree, which corrald's own event loop serves, and it takes
the guest's flock (up to 10 s) without yielding.

The task log carries the reference's lines (timestamped), progress, and timing lines
for the benchmark: `timing: command to QEMU migration start N ms`, `timing: QEMU
completion to target resumed N ms (...)` (config moved and `cont` done on the target:
what the guest's pause lasts beyond QEMU's own downtime, with its steps) and `timing:
QEMU completion to hand-over done N ms` (also source stopped, lock cleared), written
right before `migration finished successfully` and `TASK OK`.

The hand-over's critical path is the rename plus one request: the target's API is
reached over one kept-alive HTTPS connection (Peer) opened by the first check and used
for every call; the completion comes as QEMU's MIGRATION event on a QMP connection held
from the RAM phase's start (Monitor); the config text is prepared before the completion.

Phases: prepare (checks, no side effects: lock, HA, quorum, target online, storages,
running needs --online, CPU model; target `precheck`) -> phase1 (`lock: migrate`; offline
copy of local volumes through qemu-nbd on the target) -> phase2 (target QEMU with
`-incoming defer -S` started by the target's corrald; local disks mirrored to its NBD
exports until ready; RAM migration with xbzrle + auto-converge, downtime limit doubled
when it does not converge) -> phase3 (config rewritten and renamed into the target's
directory only after QEMU reports `completed`, target resumed (it refuses while the
config is not in its directory), source stopped, source volumes freed, lock cleared).
A failure before the rename cancels the migration, continues the source, stops the
target's QEMU and removes its new volumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.guests import storage as storage_mod
from corral.guests.config import VmConfig, parse_config, write_config
from corral.guests.mtunnel import (
    KEEPALIVE_S,
    TLS_OBJECT_ID,
    config_digest,
    migration_capabilities,
    prepare_tls_dir,
    qmp_call,
)
from corral.guests.qemu import GuestError, GuestManager
from corral.guests.qmp import QmpClient, QmpError
from corral.guests.tasks import TaskLog, Upid

MIGRATION_TYPES = ("secure", "insecure")
DEFAULT_DOWNTIME_MS = 100
MAX_DOWNTIME_MS = 2_000_000
UNLIMITED_BANDWIDTH_BYTES = 16 << 30      # QEMU's own default is only 128 MiB/s
NON_CONVERGING_POLLS = 5
POLL_S = 0.1
FAST_POLL_S = 0.01
PROGRESS_EVERY_S = 1.0
API_TIMEOUT_S = 60.0
MAX_REPLY_BYTES = 1 << 20
MIRROR_READY_TIMEOUT_S = 24 * 3600.0
QUERY_FAILURES_TOLERATED = 5
CANCEL_QMP_TIMEOUT_S = 1.0
PREPARED_SUFFIX = ".migrate"           # `<vmid>.conf.migrate`: the config for the target
MONITOR_OPEN_TIMEOUT_S = 2.0
_STORAGE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class MigrationError(RuntimeError):
    """The migration was refused or failed; `upid` names its task (None: no task)."""

    def __init__(self, message: str, upid: Upid | None = None) -> None:
        super().__init__(message)
        self.upid = upid


class MigrationCancelled(MigrationError):
    pass


@dataclass(frozen=True)
class MigrateOptions:
    online: bool = False
    with_local_disks: bool = False
    targetstorage: str | None = None       # "DST", "1" (same ids) or "SRC:DST,SRC2:DST2"
    bwlimit_kib: int | None = None         # KiB/s, overrides migrate_speed
    migration_type: str = "secure"
    migration_network: str | None = None   # CIDR
    from_ha: bool = False                  # the HA manager itself: never redirect to it


def parse_storage_map(text: str | None) -> dict[str, str]:
    """`--targetstorage`: a map src->dst; key "" is the default for unmapped storages."""
    if text is None or text in ("", "1"):
        return {}
    mapping: dict[str, str] = {}
    for item in text.split(","):
        source, sep, target = item.partition(":")
        if not sep:
            source, target = "", item
        if (source and not _STORAGE_RE.match(source)) or not _STORAGE_RE.match(target):
            raise ValueError(f"invalid storage map entry '{item}' (STORAGE or SRC:DST)")
        if source in mapping:
            raise ValueError(f"storage '{source or '(default)'}' mapped twice")
        mapping[source] = target
    return mapping


def validate_options(options: MigrateOptions) -> None:
    """Raise ValueError for an option that can never work (the CLI's exit status 2)."""
    if options.migration_type not in MIGRATION_TYPES:
        raise ValueError(f"--migration-type must be secure or insecure, "
                         f"got '{options.migration_type}'")
    if options.bwlimit_kib is not None and not 0 <= options.bwlimit_kib <= 1 << 40:
        raise ValueError("--bwlimit must be 0..2^40 KiB/s")
    if options.migration_network is not None:
        try:
            ipaddress.ip_network(options.migration_network, strict=False)
        except ValueError:
            raise ValueError(f"--migration-network '{options.migration_network}' is not a "
                             "CIDR (e.g. 10.1.2.0/24)") from None
    parse_storage_map(options.targetstorage)


def cancel_path(manager: GuestManager, vmid: int) -> str:
    return manager.run_path(vmid, "migrate-cancel")


async def request_cancel(manager: GuestManager, vmid: int) -> bool:
    """Ask a running migration of `vmid` on this node to abort (from any process):
    a flag file the migration polls, plus QMP `migrate_cancel` for a RAM phase."""
    active = [t for t in manager.tasks.list_tasks(50) if t.get("type") == "qmigrate"
              and t.get("id") == str(vmid) and t.get("status") == "running"]
    if not active:
        return False
    with open(cancel_path(manager, vmid), "w", encoding="ascii") as handle:
        handle.write(f"{time.time()}\n")
    # Only a shortcut: the migration holds the monitor during its RAM phase and answers
    # the flag itself (within POLL_S); so a short wait here, not QMP's usual 10 s.
    client = QmpClient(manager.qmp_path(vmid))
    with contextlib.suppress(QmpError, GuestError, OSError):
        await client.connect(timeout_s=CANCEL_QMP_TIMEOUT_S)
        await client.command("migrate_cancel", timeout_s=CANCEL_QMP_TIMEOUT_S)
    await client.close()
    return True


# --- talking to the target's corrald --------------------------------------------------


class Peer:
    """The target node's API, authenticated with the node-to-node HMAC header, over one
    kept-alive HTTPS connection opened by the first call and used for every later one
    (checks, keep-alive pings, `resume`): the hand-over then needs no TLS handshake.
    A connection the target dropped (idle, or closed after an error reply) is opened
    again once per call."""

    def __init__(self, state_dir: str, target: str, address: str) -> None:
        from corral.cluster.layout import Layout
        from corral.totem import auth

        layout = Layout(state_dir)
        identity = layout.read_identity()
        self.state_dir = state_dir
        self.nodeid = identity.nodeid
        self.port = identity.api_port
        self.key = auth.read_key_file(str(layout.authkey))
        self.target = target
        self.address = address
        self.context = ssl.create_default_context(cafile=str(layout.ca_cert))
        self.context.check_hostname = False      # verified against the cluster CA instead
        self.connects = 0                         # TLS connections opened (tests, bench)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def call(self, vmid: int, cmd: str, timeout_s: float = API_TIMEOUT_S,
                   **fields: Any) -> Any:
        from corral.daemon.catchup import node_auth_header

        body = json.dumps({"cmd": cmd, **{k: v if isinstance(v, str) else json.dumps(v)
                                          for k, v in fields.items()}}).encode()
        path = f"/api2/json/nodes/{self.target}/qemu/{vmid}/mtunnel"
        loop = asyncio.get_running_loop()
        if self._loop is not loop:               # a connection of an earlier loop is dead
            self._reader = self._writer = None
            self._lock = asyncio.Lock()
            self._loop = loop
        async with self._lock:
            reused = self._writer is not None
            try:
                status, payload = await self._exchange(path, body, timeout_s, node_auth_header)
            except _Dropped:
                if not reused:
                    raise MigrationError(f"node '{self.target}' closed the connection "
                                         f"during '{cmd}'") from None
                try:                            # it idled out: once more on a new one
                    status, payload = await self._exchange(path, body, timeout_s,
                                                           node_auth_header)
                except _Dropped:
                    raise MigrationError(f"node '{self.target}' closed the connection "
                                         f"during '{cmd}'") from None
        try:
            reply = json.loads(payload)
        except ValueError:
            raise MigrationError(f"node '{self.target}' sent a malformed reply "
                                 f"(status {status})") from None
        if status != 200:
            message = str(reply.get("message") or f"HTTP {status}").strip()
            raise MigrationError(f"node '{self.target}': {cmd}: {message}")
        return reply.get("data")

    async def _exchange(self, path: str, body: bytes, timeout_s: float,
                        header_for: Callable[[bytes, int, float], str]) -> tuple[int, bytes]:
        """One request on the open connection (opened first if needed). _Dropped: the
        connection was closed before any byte of the reply came."""
        if self._writer is None:
            await self._connect(timeout_s)
        assert self._reader is not None and self._writer is not None
        header = header_for(self.key, self.nodeid, time.time())
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.address}\r\nAuthorization: {header}"
                   f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                   "Connection: keep-alive\r\n\r\n").encode() + body
        try:
            self._writer.write(request)
            await self._writer.drain()
            head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), timeout_s)
        except asyncio.IncompleteReadError as exc:
            self.close()
            if not exc.partial:
                raise _Dropped() from None
            raise self._unreachable(exc) from None
        except (TimeoutError, OSError, ssl.SSLError, asyncio.LimitOverrunError) as exc:
            self.close()
            if isinstance(exc, (ConnectionError, ssl.SSLError)):
                raise _Dropped() from None
            raise self._unreachable(exc) from None
        status, length, keep = _parse_head(head)
        if length is None or length > MAX_REPLY_BYTES:
            self.close()
            raise MigrationError(f"node '{self.target}' sent a reply without a usable "
                                 f"Content-Length: {head[:80]!r}")
        try:
            payload = await asyncio.wait_for(self._reader.readexactly(length), timeout_s)
        except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            self.close()
            raise self._unreachable(exc) from None
        if not keep:
            self.close()
        return status, payload

    async def _connect(self, timeout_s: float) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.address, self.port, ssl=self.context,
                                        limit=MAX_REPLY_BYTES), timeout_s)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            raise self._unreachable(exc) from None
        self.connects += 1

    def _unreachable(self, exc: BaseException) -> MigrationError:
        return MigrationError(f"cannot reach node '{self.target}' at {self.address}:"
                              f"{self.port}: {exc or type(exc).__name__}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class _Dropped(Exception):
    """The kept-alive connection was closed before the reply started."""


def _parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """(status, Content-Length or None, connection kept) of an HTTP/1.1 reply head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    length: int | None = None
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length" and value.isdigit():
            length = int(value)
        elif name == "connection" and value.lower() == "close":
            keep = False
    return status, length, keep


class Monitor:
    """One QMP connection to the source QEMU held from the RAM phase's start to the
    hand-over: commands (parameters, polls, the hand-over's check) and the MIGRATION
    events on the same socket, read by one reader task. QEMU serves one client per
    monitor; status polls use the guest's second monitor, and this one is closed
    before anything else needs it (stopping the source; the cleanup's own steps use
    it while it is open)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.status = ""                          # the newest MIGRATION event's status
        self.status_ns = 0                        # when it was read (monotonic)
        self.vcpus_stopped = False                # a STOP event came, no RESUME since
        self.changed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._closed_reason = ""

    async def open(self, timeout_s: float = 10.0) -> None:
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=16 << 20), timeout_s)
            greeting = await asyncio.wait_for(reader.readline(), timeout_s)
        except (TimeoutError, OSError) as exc:
            self.close()
            raise QmpError(f"cannot open the QMP monitor {self.path}: "
                           f"{exc or type(exc).__name__}") from None
        if b"QMP" not in greeting:
            self.close()
            raise QmpError(f"unexpected QMP greeting: {greeting[:200]!r}")
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
        await self.command("qmp_capabilities")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                event = message.get("event")
                if event == "MIGRATION":
                    self.status = str(message.get("data", {}).get("status", ""))
                    self.status_ns = time.monotonic_ns()
                    self.changed.set()
                elif event in ("STOP", "RESUME"):
                    self.vcpus_stopped = event == "STOP"
                elif event == "JOB_STATUS_CHANGE":
                    self.changed.set()            # _dismiss_jobs waits for `concluded`
                waiter = self._waiting.pop(str(message.get("id", "")), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            self._closed_reason = "QMP connection closed by QEMU"
        except (OSError, ValueError) as exc:
            self._closed_reason = f"QMP read failed: {exc}"
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(QmpError(self._closed_reason or "QMP connection closed"))
        self._waiting.clear()
        self.changed.set()

    @property
    def open_now(self) -> bool:
        return self._writer is not None and not self._closed_reason

    async def command(self, name: str, /, timeout_s: float = 10.0, **arguments: Any) -> Any:
        if not self.open_now:
            raise QmpError(self._closed_reason or "QMP monitor not open")
        assert self._writer is not None
        self._next_id += 1
        command_id = f"mig-{self._next_id}"
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = waiter
        request: dict[str, Any] = {"execute": name, "id": command_id}
        if arguments:
            request["arguments"] = arguments
        try:
            self._writer.write(json.dumps(request).encode() + b"\n")
            message = await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            raise QmpError(f"{name}: QMP timeout after {timeout_s} s") from None
        finally:
            self._waiting.pop(command_id, None)
        if "error" in message:
            error = message["error"]
            raise QmpError(f"{name}: {error.get('class')}: {error.get('desc')}")
        return message.get("return")

    async def wait_change(self, timeout_s: float) -> None:
        """Until the next MIGRATION event (or the connection closed), at most timeout_s."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout_s)
        self.changed.clear()

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed_reason = self._closed_reason or "closed"
        self._fail_waiters()


def cluster_status(state_dir: str) -> dict[str, Any]:
    from corral.daemon.control import ControlError, request

    socket_path = os.path.join(state_dir, "corrald.sock")
    try:
        return dict(request(socket_path, "status", timeout_s=5.0))
    except (ControlError, OSError) as exc:
        raise MigrationError(f"corrald is not reachable ({socket_path}): {exc}") from None


# --- the migration ---------------------------------------------------------------------


@dataclass
class LocalDisk:
    key: str
    volid: str
    path: str
    fmt: str
    size_bytes: int
    target_storage: str
    new_volid: str | None = None


@dataclass
class Run:
    """Everything one migration has done so far (what the cleanup must undo)."""

    manager: GuestManager
    vmid: int
    target: str
    options: MigrateOptions
    state_dir: str
    log: TaskLog
    cancel: asyncio.Event | None
    started_ns: int = field(default_factory=time.monotonic_ns)
    peer: Peer | None = None
    running: bool = False
    locked: bool = False
    target_started: bool = False
    migration_started: bool = False
    handed_over: bool = False
    mirrors: list[str] = field(default_factory=list)
    nbd_nodes: list[str] = field(default_factory=list)
    disks: list[LocalDisk] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    last_keepalive_s: float = field(default_factory=time.monotonic)
    monitor: Monitor | None = None
    prepared_path: str | None = None          # the target's config text, written early
    original_config_text: str | None = None   # to restore if it was swapped in and failed
    config_swapped: bool = False              # the source's config names the new volumes
    completed_info: dict[str, Any] | None = None   # query-migrate's answer at completion
    target_ms: dict[str, float] = field(default_factory=dict)   # the target's resume steps
    target_held_monitor: bool = False

    async def qmp_cmd(self, name: str, /, **arguments: Any) -> Any:
        """On the held monitor if it is open, else on a short connection."""
        if self.monitor is not None and self.monitor.open_now:
            return await self.monitor.command(name, **arguments)
        return await qmp_call(self.qmp, name, **arguments)

    def release_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    def say(self, line: str) -> None:
        self.log.log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")

    def check_cancel(self) -> None:
        if (self.cancel is not None and self.cancel.is_set()) or \
                os.path.exists(cancel_path(self.manager, self.vmid)):
            raise MigrationCancelled("migration cancelled by request")

    async def keepalive(self) -> None:
        """Tell the target we are alive (it stops a silent incoming migration)."""
        now = time.monotonic()
        if self.peer is None or not self.target_started or now - self.last_keepalive_s < KEEPALIVE_S:
            return
        self.last_keepalive_s = now
        with contextlib.suppress(MigrationError):
            await self.peer.call(self.vmid, "status", timeout_s=5.0)

    def elapsed_ms(self) -> float:
        return (time.monotonic_ns() - self.started_ns) / 1e6

    @property
    def qmp(self) -> str:
        return self.manager.qmp_path(self.vmid)


async def migrate(manager: GuestManager, vmid: int, target: str,
                  options: MigrateOptions | None = None, state_dir: str | None = None,
                  cancel: asyncio.Event | None = None,
                  on_upid: Callable[[Upid], None] | None = None) -> Upid:
    options = options or MigrateOptions()
    try:
        validate_options(options)
    except ValueError as exc:
        raise MigrationError(str(exc)) from None
    if state_dir is None:
        from corral.cluster.layout import default_state_dir
        state_dir = manager.state_dir or default_state_dir()
    try:
        manager.load_config(vmid)             # no task for a guest that is not here
    except (GuestError, ValueError) as exc:
        raise MigrationError(str(exc)) from None
    if not options.from_ha and _ha_managed(manager.root, vmid):
        return _queue_ha(manager, vmid, target, on_upid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cancel_path(manager, vmid))
    upid, log = manager.tasks.begin("qmigrate", str(vmid))
    if on_upid is not None:
        on_upid(upid)
    run = Run(manager, vmid, target, options, state_dir, log, cancel)
    try:
        await _migrate(run)
    except BaseException as exc:
        message = str(exc) or type(exc).__name__
        run.say(f"ERROR: migration aborted (duration {_duration(run)}): {message}")
        manager.tasks.end(upid, log, f"migration aborted: {message}")
        if isinstance(exc, MigrationError):
            exc.upid = upid
            raise
        if isinstance(exc, (GuestError, QmpError, OSError, ValueError)):
            raise MigrationError(message, upid) from exc
        raise
    finally:
        run.release_monitor()
        if run.peer is not None:
            run.peer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cancel_path(manager, vmid))
    manager.tasks.end(upid, log, None)
    return upid


def _duration(run: Run) -> str:
    seconds = int(run.elapsed_ms() / 1000)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _ha_managed(root: str, vmid: int) -> bool:
    try:
        with open(os.path.join(root, "ha", "resources.cfg"), encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return False
    # section headers of ha/resources.cfg: `vm: 100`
    return any(re.match(rf"^vm:\s*{vmid}\s*$", line) for line in text.splitlines())


def _queue_ha(manager: GuestManager, vmid: int, target: str,
              on_upid: Callable[[Upid], None] | None) -> Upid:
    from pathlib import Path

    from corral.ha.daemon.fsenv import append_crm_command

    upid, log = manager.tasks.begin("hamigrate", str(vmid))
    if on_upid is not None:
        on_upid(upid)
    try:
        append_crm_command(Path(manager.root), f"migrate vm:{vmid} {target}")
        log.log(f"Requesting HA migration for VM {vmid} to node {target}")
    except OSError as exc:
        manager.tasks.end(upid, log, str(exc))
        raise MigrationError(f"cannot queue the HA migration: {exc}", upid) from None
    manager.tasks.end(upid, log, None)
    return upid


async def _migrate(run: Run) -> None:
    config = await _prepare(run)
    try:
        await _phase1(run, config)
        if run.running:
            await _phase2(run, config)
        await _phase3(run, config)
    except BaseException as exc:
        if not run.handed_over:
            await _cleanup(run, exc)
        raise


# --- prepare: checks only ------------------------------------------------------------------


async def _prepare(run: Run) -> VmConfig:
    manager, vmid, target, options = run.manager, run.vmid, run.target, run.options
    config = manager.load_config(vmid)
    if config.get("lock"):
        raise MigrationError(f"VM is locked ({config.get('lock')})")
    if target == manager.node:
        raise MigrationError(f"target is local node '{target}'")
    status = await asyncio.to_thread(cluster_status, run.state_dir)
    if not status.get("quorum", {}).get("quorate"):
        raise MigrationError(f"node '{manager.node}' is not quorate")
    rows = {row["name"]: row for row in status.get("nodes", [])}
    if target not in rows:
        raise MigrationError(f"no such cluster node '{target}'")
    if not rows[target].get("online"):
        raise MigrationError(f"target node '{target}' is not online")
    addresses = rows[target].get("addresses") or {}
    address = addresses.get("0") or next(iter(addresses.values()), None)
    if not address:
        raise MigrationError(f"node '{target}' has no address")
    run.peer = Peer(run.state_dir, target, address)
    run.running = manager.pid(vmid) is not None
    run.say(f"starting migration of VM {vmid} to node '{target}' ({address})")
    if run.running and not options.online:
        raise MigrationError("can't migrate running VM without --online")
    if not run.running and options.online:
        run.say("VM isn't running. Doing offline migration instead.")
    local_devices = [key for key, value in config.entries.items()
                     if key.startswith("serial") and value != "socket"]
    if local_devices:
        raise MigrationError(f"can't migrate VM which uses local devices: "
                             f"{', '.join(local_devices)}")
    cpu = (config.get("cpu") or "qemu64").split(",")[0]
    if run.running and cpu.removeprefix("cputype=") == "host":
        raise MigrationError("can't live migrate a VM with CPU model 'host' (tied to this "
                             "host's CPU); use a named model such as x86-64-v2-AES")
    run.disks = await asyncio.to_thread(_local_disks, run, config)
    text = write_config(config)
    await run.peer.call(vmid, "precheck", source=manager.node, digest=config_digest(text),
                        migration_type=options.migration_type,
                        migration_network=options.migration_network or "",
                        accel=manager.accelerator(), disks=_disk_requests(run.disks))
    return config


def _local_disks(run: Run, config: VmConfig) -> list[LocalDisk]:
    storages = run.manager.storages()
    mapping = parse_storage_map(run.options.targetstorage)
    disks: list[LocalDisk] = []
    for key, props in config.disks():
        volid = props["file"]
        if volid == "none":
            continue
        storage_id, _ = storage_mod.split_volume_id(volid)
        storage = storages.get(storage_id)
        if storage.shared:
            continue
        if props.get("media") == "cdrom":
            raise MigrationError(f"{key}: can't migrate local cdrom '{volid}'")
        if run.running and not run.options.with_local_disks:
            raise MigrationError(f"can't live migrate attached local disks without "
                                 f"--with-local-disks ({key}: {volid})")
        path = storage_mod.volume_path(storages, volid)
        target_storage = mapping.get(storage_id, mapping.get("", storage_id))
        fmt = props.get("format") or storage_mod.volume_format(volid)
        disks.append(LocalDisk(key, volid, path, fmt, storage_mod.volume_size(path),
                               target_storage))
        run.say(f"found local disk '{volid}' ({'attached' if run.running else 'offline'}); "
                f"target storage '{target_storage}'")
    return disks


def _disk_requests(disks: list[LocalDisk]) -> list[dict[str, Any]]:
    return [{"key": d.key, "storage": d.target_storage, "size": d.size_bytes, "format": d.fmt}
            for d in disks]


# --- phase 1: lock, offline copies ------------------------------------------------------


def _save_lock(run: Run, config: VmConfig, lock: str | None) -> None:
    with run.manager.guest_lock(run.vmid):
        current = run.manager.load_config(run.vmid)
        if lock is None:
            if current.get("lock") == "migrate":
                current.delete("lock")
        else:
            if current.get("lock"):
                raise MigrationError(f"VM is locked ({current.get('lock')})")
            current.set("lock", lock)
        run.manager.save_config(run.vmid, current)
    config.entries = current.entries
    config.description = current.description


async def _phase1(run: Run, config: VmConfig) -> None:
    _save_lock(run, config, "migrate")
    run.locked = True
    if run.running:
        return
    assert run.peer is not None
    for disk in run.disks:
        run.check_cancel()
        export = await run.peer.call(
            run.vmid, "disk-import", source=run.manager.node,
            migration_type=run.options.migration_type,
            migration_network=run.options.migration_network or "",
            disks=_disk_requests([disk]))
        disk.new_volid = str(export["volid"])
        run.say(f"copying local disk '{disk.volid}' to '{disk.new_volid}' on node "
                f"'{run.target}'")
        await asyncio.to_thread(_copy_volume, run, disk, export)
        run.say(f"{disk.key}: copied {_human(disk.size_bytes)}")


def _copy_volume(run: Run, disk: LocalDisk, export: dict[str, Any]) -> None:
    target = (f"driver=nbd,server.type=inet,server.host={export['host']},"
              f"server.port={export['port']},export={export['export']}")
    command = ["qemu-img", "convert", "-n", "-f", disk.fmt]
    if run.options.migration_type == "secure":
        tls_dir = prepare_tls_dir(run.state_dir, run.manager.run_dir)
        command += ["--object", f"tls-creds-x509,id={TLS_OBJECT_ID},endpoint=client,"
                    f"dir={tls_dir},verify-peer=on"]
        target += f",tls-creds={TLS_OBJECT_ID},tls-hostname={export['tls_hostname']}"
    if run.options.bwlimit_kib:
        command += ["-r", f"{run.options.bwlimit_kib}K"]
    command += [disk.path, "--target-image-opts", target]
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise MigrationError(f"copying {disk.volid} failed: {result.stderr.strip()}")


# --- phase 2: target QEMU, disk mirrors, RAM ------------------------------------------------


async def _phase2(run: Run, config: VmConfig) -> None:
    assert run.peer is not None
    run.check_cancel()
    await _clear_stale(run)
    machine = await _running_machine(run, config)
    run.say(f"starting VM {run.vmid} on remote node '{run.target}' (machine {machine})")
    run.target_started = True
    answer = await run.peer.call(
        run.vmid, "start-incoming", source=run.manager.node, machine=machine,
        digest=config_digest(write_config(config)), migration_type=run.options.migration_type,
        migration_network=run.options.migration_network or "",
        accel=run.manager.accelerator(), disks=_disk_requests(run.disks))
    uri, hostname = str(answer["uri"]), str(answer["tls_hostname"])
    run.say(f"migration listens on {uri}")
    secure = run.options.migration_type == "secure"
    if secure:
        await _source_tls(run)
    if run.disks:
        await _mirror_disks(run, answer.get("nbd") or {}, hostname, secure)
    run.check_cancel()
    if not await _hold_monitor(run):
        run.say("QMP monitor busy: polling for the completion instead of waiting for it")
    await _set_migration_parameters(run, config, hostname, secure)
    _prepare_handover(run, config)
    run.timings_ms["command_to_migration_start"] = run.elapsed_ms()
    run.say(f"start migrate command to {uri}")
    run.migration_started = True
    await run.qmp_cmd("migrate", uri=uri)
    await _watch_migration(run)
    if run.mirrors:
        await _finish_mirrors(run)


def _prepare_handover(run: Run, config: VmConfig) -> None:
    """What the hand-over writes, prepared before QEMU completes: the target's dir and,
    when disks move, the config with the target's volumes (the lock holds it unchanged
    since phase 1) written next to the config as `<vmid>.conf.migrate`, so the
    hand-over swaps it in with one rename instead of writing it (two tree operations)."""
    target_dir = os.path.join(run.manager.root, "nodes", run.target, "qemu-server")
    os.makedirs(target_dir, exist_ok=True)
    if run.disks:
        run.original_config_text = write_config(config)
        path = run.manager.config_path(run.vmid) + PREPARED_SUFFIX
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(write_config(_config_for_target(run, config)))
        run.prepared_path = path


async def _clear_stale(run: Run) -> None:
    """What a migration worker killed with -9 left in the source QEMU (its block jobs,
    NBD client nodes, a RAM migration still going): removed before this one starts,
    else `blockdev-add` and `blockdev-mirror` refuse the names."""
    status = (await run.qmp_cmd("query-migrate")).get("status", "")
    if status in ("setup", "active", "device", "pre-switchover"):
        run.say(f"cancelling a stale migration ({status}) left by an earlier attempt")
        await run.qmp_cmd("migrate_cancel")
        await _wait_not_active(run)
    stale = [job for job in await run.qmp_cmd("query-jobs")
             if str(job.get("id", "")).startswith("mirror-drive-")]
    for job in stale:
        run.say(f"removing stale block job {job['id']} ({job.get('status')})")
        if job.get("status") not in ("concluded", "null"):
            with contextlib.suppress(QmpError):
                await run.qmp_cmd("block-job-cancel", device=job["id"], force=True)
    if stale:
        await _dismiss_jobs(run, [str(job["id"]) for job in stale], 10.0)
    for node in await run.qmp_cmd("query-named-block-nodes"):
        name = str(node.get("node-name", ""))
        if name.startswith("mig-drive-"):
            run.say(f"removing stale NBD node {name}")
            with contextlib.suppress(QmpError):
                await run.qmp_cmd("blockdev-del", **{"node-name": name})


async def _running_machine(run: Run, config: VmConfig) -> str:
    """The machine version the source QEMU really runs (`pc` -> `pc-i440fx-7.2`): the
    target must emulate exactly the same board, as the reference's forcemachine."""
    configured = config.get("machine") or "pc"
    for machine in await run.qmp_cmd("query-machines"):
        if machine.get("alias") == configured:
            return str(machine["name"])
    return configured


async def _source_tls(run: Run) -> None:
    tls_dir = prepare_tls_dir(run.state_dir, run.manager.run_dir)
    with contextlib.suppress(QmpError):
        await run.qmp_cmd("object-del", id=TLS_OBJECT_ID)   # left by an earlier try
    await run.qmp_cmd("object-add", **{"qom-type": "tls-creds-x509", "id": TLS_OBJECT_ID,
                                             "dir": tls_dir, "endpoint": "client",
                                             "verify-peer": True})


async def _mirror_disks(run: Run, exports: dict[str, Any], hostname: str, secure: bool) -> None:
    speed = (run.options.bwlimit_kib or 0) * 1024
    for disk in run.disks:
        export = exports.get(disk.key)
        if not isinstance(export, dict):
            raise MigrationError(f"node '{run.target}' did not export {disk.key}")
        disk.new_volid = str(export["volid"])
        run.say(f"storage migration listens on nbd:{export['host']}:{export['port']}:"
                f"exportname={export['export']} volume:{disk.new_volid}")
        node = f"mig-drive-{disk.key}"
        server = {"type": "inet", "host": str(export["host"]), "port": str(export["port"])}
        extra: dict[str, Any] = {"tls-creds": TLS_OBJECT_ID, "tls-hostname": hostname} \
            if secure else {}
        await run.qmp_cmd("blockdev-add", driver="nbd", **{"node-name": node},
                       server=server, export=str(export["export"]), **extra)
        run.nbd_nodes.append(node)
        job = f"mirror-drive-{disk.key}"
        arguments: dict[str, Any] = {"job-id": job, "device": f"drive-{disk.key}",
                                     "target": node, "sync": "full", "auto-dismiss": False}
        if speed:
            arguments["speed"] = speed
        await run.qmp_cmd("blockdev-mirror", **arguments)
        run.mirrors.append(job)
    await _wait_mirrors_ready(run)


async def _wait_mirrors_ready(run: Run) -> None:
    started = time.monotonic()
    last_log_s = 0.0
    while True:
        run.check_cancel()
        await run.keepalive()
        jobs = {job["device"]: job for job in await run.qmp_cmd("query-block-jobs")}
        missing = [j for j in run.mirrors if j not in jobs]
        if missing:
            raise MigrationError(f"mirror job {missing[0]} disappeared (target gone?)")
        now = time.monotonic()
        if now - last_log_s >= PROGRESS_EVERY_S:
            last_log_s = now
            for name in run.mirrors:
                job = jobs[name]
                total, done = int(job.get("len", 0)), int(job.get("offset", 0))
                state = "ready" if job.get("ready") else \
                    f"transferred {_human(done)} of {_human(total)} " \
                    f"({100.0 * done / max(total, 1):.2f}%) in {int(now - started)}s"
                run.say(f"{name.removeprefix('mirror-')}: {state}")
        if all(jobs[name].get("ready") for name in run.mirrors):
            run.say("all 'mirror' jobs are ready")
            return
        if now - started > MIRROR_READY_TIMEOUT_S:
            raise MigrationError("mirror jobs did not become ready")
        await asyncio.sleep(POLL_S)


async def _set_migration_parameters(run: Run, config: VmConfig, hostname: str,
                                    secure: bool) -> None:
    capabilities = migration_capabilities(run.manager.accelerator())
    await run.qmp_cmd("migrate-set-capabilities", capabilities=[
        {"capability": name, "state": state} for name, state in capabilities.items()])
    run.say("set migration capabilities")
    downtime_ms = _downtime_ms(config)
    bandwidth = _bandwidth_bytes(run.options, config)
    memory_bytes = config.int_value("memory", 512) << 20
    cache = 1 << max(0, (memory_bytes // 10 - 1).bit_length())
    run.say(f"migration downtime limit: {downtime_ms} ms")
    run.say(f"migration cachesize: {_human(cache)}")
    if bandwidth != UNLIMITED_BANDWIDTH_BYTES:
        run.say(f"migration speed limit: {_human(bandwidth)}/s")
    parameters: dict[str, Any] = {"downtime-limit": downtime_ms, "max-bandwidth": bandwidth,
                                  "xbzrle-cache-size": cache,
                                  "tls-creds": TLS_OBJECT_ID if secure else "",
                                  "tls-hostname": hostname if secure else ""}
    await run.qmp_cmd("migrate-set-parameters", **parameters)
    run.say(f"set migration parameters ({'TLS, verify-peer' if secure else 'insecure, plain TCP'})")


def _downtime_ms(config: VmConfig) -> int:
    raw = config.get("migrate_downtime")
    if raw is None:
        return DEFAULT_DOWNTIME_MS
    return max(1, min(MAX_DOWNTIME_MS, int(float(raw) * 1000)))


def _bandwidth_bytes(options: MigrateOptions, config: VmConfig) -> int:
    limits = []
    if options.bwlimit_kib:
        limits.append(options.bwlimit_kib * 1024)
    speed = config.get("migrate_speed")
    if speed and float(speed) > 0:
        limits.append(int(float(speed) * (1 << 20)))
    return min(limits) if limits else UNLIMITED_BANDWIDTH_BYTES


async def _watch_migration(run: Run) -> None:
    """Poll query-migrate every POLL_S for progress lines and to double the downtime
    limit when the remaining RAM keeps growing (as the reference), on the held monitor,
    and take the completion from QEMU's MIGRATION event on it as it is sent, not at the
    next poll. Without the monitor (another client held it): short connections, every
    FAST_POLL_S near the end."""
    last_log_s = 0.0
    last_remaining: int | None = None
    growing = failures = 0
    downtime_ms: int | None = None
    next_poll_s = 0.0
    while True:
        run.check_cancel()
        await run.keepalive()
        monitor = run.monitor
        if monitor is not None and monitor.status == "completed":
            _completed(run, monitor.status_ns)
            return
        now = time.monotonic()
        if (monitor is not None and monitor.status in ("failed", "cancelled")) or \
                now >= next_poll_s:
            next_poll_s = now + POLL_S
            try:
                info = await run.qmp_cmd("query-migrate")
                failures = 0
            except (QmpError, OSError) as exc:
                failures += 1
                if failures > QUERY_FAILURES_TOLERATED:
                    raise MigrationError(f"query-migrate failed: {exc}") from None
                await asyncio.sleep(POLL_S)
                continue
            state = info.get("status", "")
            if state == "completed":
                _completed(run, monitor.status_ns if monitor is not None and
                           monitor.status == "completed" else time.monotonic_ns(), info)
                return
            if state in ("failed", "cancelled"):
                raise MigrationError(f"migration status: {state}"
                                     f"{': ' + info['error-desc'] if info.get('error-desc') else ''}")
            if state in ("active", "device", "pre-switchover"):
                ram = info.get("ram", {})
                remaining = int(ram.get("remaining", 0))
                if now - last_log_s >= PROGRESS_EVERY_S:
                    last_log_s = now
                    _log_progress(run, info)
                if last_remaining is not None and (remaining > last_remaining or remaining == 0):
                    growing += 1
                last_remaining = remaining
                if growing > NON_CONVERGING_POLLS and state == "active":
                    growing = 0
                    downtime_ms = min(MAX_DOWNTIME_MS,
                                      (downtime_ms or _downtime_ms_now(info)) * 2)
                    await run.qmp_cmd("migrate-set-parameters", **{"downtime-limit": downtime_ms})
                    run.say(f"auto-increased downtime to continue migration: {downtime_ms} ms")
                per_poll = int(ram.get("mbps", 0) * 1e6 / 8 * POLL_S)
                if monitor is None and (state != "active" or remaining <= per_poll):
                    next_poll_s = now + FAST_POLL_S
        if run.monitor is not None:
            await run.monitor.wait_change(max(0.0, next_poll_s - time.monotonic()))
        else:
            await asyncio.sleep(max(0.0, next_poll_s - time.monotonic()))


async def _hold_monitor(run: Run) -> bool:
    """Open the monitor held to the hand-over; False if another client holds it now.
    (Status polls use the guest's second monitor, `<vmid>.qmp-status`, so holding this
    one keeps nobody waiting but the CLI's own lifecycle commands, which the migration
    lock refuses anyway.)"""
    monitor = Monitor(run.qmp)
    try:
        await monitor.open(timeout_s=MONITOR_OPEN_TIMEOUT_S)
    except QmpError:
        monitor.close()
        return False
    run.monitor = monitor
    return True


def _completed(run: Run, seen_ns: int, info: dict[str, Any] | None = None) -> None:
    run.timings_ms["completed_at"] = (seen_ns - run.started_ns) / 1e6
    run.completed_info = info
    run.say("migration status: completed")


def _downtime_ms_now(info: dict[str, Any]) -> int:
    return int(info.get("expected-downtime") or DEFAULT_DOWNTIME_MS) or DEFAULT_DOWNTIME_MS


def _log_progress(run: Run, info: dict[str, Any]) -> None:
    ram = info.get("ram", {})
    total = int(ram.get("total", 0))
    transferred = int(ram.get("transferred", 0))
    rate = float(ram.get("mbps", 0)) * 1e6 / 8
    line = (f"migration active, transferred {_human(transferred)} of {_human(total)} "
            f"VM-state, {_human(int(rate))}/s")
    dirty_rate = int(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", 4096))
    if dirty_rate > rate > 0:
        line += f", VM dirties lots of memory: {_human(dirty_rate)}/s"
    run.say(line)
    xbzrle = info.get("xbzrle-cache")
    if xbzrle and xbzrle.get("pages"):
        run.say(f"xbzrle: send updates to {xbzrle.get('pages')} pages in "
                f"{_human(int(xbzrle.get('bytes', 0)))} encoded memory, cache-miss "
                f"{100 * float(xbzrle.get('cache-miss-rate', 0)):.2f}%, overflow "
                f"{xbzrle.get('overflow', 0)}")


def _log_completed(run: Run, info: dict[str, Any]) -> None:
    ram = info.get("ram", {})
    total_ms = max(int(info.get("total-time", 0)), 1)
    transferred = int(ram.get("transferred", 0))
    run.say(f"average migration speed: {_human(int(transferred * 1000 / total_ms))}/s - "
            f"downtime {info.get('downtime', '?')} ms")
    run.say(f"migration completed, transferred {_human(transferred)} VM-state")


async def _finish_mirrors(run: Run) -> None:
    """block-job-cancel on a ready mirror completes it without pivoting: the source keeps
    its disk, the target's volume holds the same data. The NBD client nodes stay (a
    failure before the rename removes them in the cleanup; after the hand-over the
    source QEMU quits): their removal is not on the hand-over's critical path."""
    for job in run.mirrors:
        await run.qmp_cmd("block-job-cancel", device=job)
    await _dismiss_jobs(run, run.mirrors)
    run.mirrors.clear()
    run.say("mirror jobs completed")


async def _dismiss_jobs(run: Run, names: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending and time.monotonic() < deadline:
        jobs = {job["id"]: job for job in await run.qmp_cmd("query-jobs")}
        for name in list(pending):
            job = jobs.get(name)
            if job is None:
                pending.discard(name)
            elif job.get("status") == "concluded":
                if job.get("error"):
                    run.say(f"{name}: {job['error']}")
                await run.qmp_cmd("job-dismiss", id=name)
                pending.discard(name)
        if pending and run.monitor is not None and run.monitor.open_now:
            await run.monitor.wait_change(FAST_POLL_S)     # woken by JOB_STATUS_CHANGE
        elif pending:
            await asyncio.sleep(FAST_POLL_S)
    if pending:
        raise MigrationError(f"mirror jobs did not finish: {', '.join(sorted(pending))}")


# --- phase 3: the hand-over ------------------------------------------------------------------


async def _check_source_stopped(run: Run) -> None:
    """The source's vCPUs must be stopped before the config moves. On the held monitor
    the STOP event (QEMU stops the guest before it completes; nothing resumed it since)
    says so with no round trip: right after completion QEMU's main loop can take over
    100 ms to answer a command (it is finishing the migration, closing TLS). Without
    the monitor: query-status."""
    monitor = run.monitor
    if monitor is not None and monitor.open_now and monitor.vcpus_stopped:
        return
    status = (await run.qmp_cmd("query-status")).get("status")
    if status not in ("postmigrate", "finish-migrate"):
        raise MigrationError(f"source VM is '{status}' after the migration, "
                             "expected 'postmigrate'")


def _config_for_target(run: Run, config: VmConfig) -> VmConfig:
    new_config = parse_config(write_config(config))
    for disk in run.disks:
        if disk.new_volid is None:
            raise MigrationError(f"{disk.key} was not copied")
        value = new_config.entries[disk.key]
        new_config.entries[disk.key] = value.replace(disk.volid, disk.new_volid, 1)
    return new_config


async def _phase3(run: Run, config: VmConfig) -> None:
    """The hand-over's critical path: check the source is paused (on the held monitor),
    rename the config (with the target's volumes written first when disks moved), one
    `resume` on the open connection to the target."""
    manager, vmid = run.manager, run.vmid
    assert run.peer is not None
    if run.running:
        await _check_source_stopped(run)
    run.timings_ms["checked_at"] = run.elapsed_ms()
    source_path = manager.config_path(vmid)
    target_path = os.path.join(manager.root, "nodes", run.target, "qemu-server", f"{vmid}.conf")
    if run.disks:
        run.original_config_text = run.original_config_text or write_config(config)
        run.config_swapped = True
        if run.prepared_path is None:           # offline: the copies are done now
            manager.save_config(vmid, _config_for_target(run, config))
        else:
            os.replace(run.prepared_path, source_path)
            run.prepared_path = None
    if os.path.exists(target_path):
        raise MigrationError(f"node '{run.target}' already has a config for VM {vmid}")
    os.makedirs(os.path.dirname(target_path), exist_ok=True)
    os.rename(source_path, target_path)          # the hand-over: the guest is the target's now
    run.handed_over = True
    run.timings_ms["renamed_at"] = run.elapsed_ms()
    await _finish_on_target(run, target_path)


async def _finish_on_target(run: Run, target_path: str) -> None:
    """After the rename nothing is rolled back: every step logs and goes on."""
    assert run.peer is not None
    errors = []
    answer = None
    try:
        if run.running or run.disks:
            answer = await run.peer.call(run.vmid, "resume")
            run.timings_ms["resumed_at"] = run.elapsed_ms()
            run.target_ms = {k: float(answer.get(k) or 0) for k in ("config_wait_ms", "cont_ms")}
            run.target_held_monitor = bool(answer.get("held_monitor"))
    except MigrationError as exc:
        errors.append(f"resume on target failed: {exc}")
    run.say(f"config moved to node '{run.target}'")
    if answer is not None and run.running:
        run.say(f"VM {run.vmid} resumed on node '{run.target}' ({answer.get('status')})")
    if run.running:
        try:            # QEMU's figures, read after the guest runs again on the target
            _log_completed(run, run.completed_info or await run.qmp_cmd("query-migrate"))
        except (QmpError, OSError) as exc:
            run.say(f"query-migrate after completion failed: {exc}")
    run.release_monitor()                        # hard_stop needs the monitor
    if run.running:
        await run.manager.hard_stop(run.vmid, run.log)
    storages = run.manager.storages() if run.disks else None
    for disk in run.disks:
        assert storages is not None
        try:
            storage_mod.remove_volume(storages, disk.volid)
            run.say(f"removed source volume '{disk.volid}'")
        except storage_mod.StorageError as exc:
            errors.append(str(exc))
    try:
        _unlock_at(target_path)
    except (OSError, ValueError) as exc:
        errors.append(f"clearing the lock failed: {exc}")
    if errors:
        raise MigrationError("migration finished with problems: " + "; ".join(errors))
    if "completed_at" in run.timings_ms:
        run.say(f"timing: command to QEMU migration start "
                f"{run.timings_ms['command_to_migration_start']:.0f} ms")
        if "resumed_at" in run.timings_ms:
            done = run.timings_ms
            run.say(f"timing: QEMU completion to target resumed "
                    f"{done['resumed_at'] - done['completed_at']:.0f} ms (source checked "
                    f"after {done['checked_at'] - done['completed_at']:.1f} ms, config "
                    f"renamed after {done['renamed_at'] - done['completed_at']:.1f} ms, resume "
                    f"request {done['resumed_at'] - done['renamed_at']:.1f} ms: target "
                    f"waited {run.target_ms.get('config_wait_ms', 0):.1f} ms for the "
                    f"config, cont {run.target_ms.get('cont_ms', 0):.1f} ms"
                    f"{' on its held QMP connection' if run.target_held_monitor else ''})")
        run.say(f"timing: QEMU completion to hand-over done "
                f"{run.elapsed_ms() - run.timings_ms['completed_at']:.0f} ms")
    run.say(f"migration finished successfully (duration {_duration(run)})")


def _unlock_at(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        config = parse_config(handle.read())
    if config.get("lock") == "migrate":
        config.delete("lock")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(write_config(config))
    os.replace(path + ".tmp", path)


# --- cleanup after a failure before the hand-over ----------------------------------------


async def _cleanup(run: Run, error: BaseException) -> None:
    run.say(f"ERROR: {error or type(error).__name__}")
    run.say("aborting phase 2 - cleanup resources" if run.running else
            "aborting phase 1 - cleanup resources")
    if run.migration_started:
        await _try(run, "migrate_cancel", run.qmp_cmd("migrate_cancel"))
        await _wait_not_active(run)
    for job in run.mirrors:
        await _try(run, f"cancel {job}", run.qmp_cmd("block-job-cancel", device=job,
                                                    force=True))
    if run.mirrors:
        with contextlib.suppress(MigrationError, QmpError, OSError):
            await _dismiss_jobs(run, run.mirrors, 10.0)
    for node in run.nbd_nodes:
        await _try(run, f"remove {node}", run.qmp_cmd("blockdev-del",
                                                   **{"node-name": node}))
    if run.running and run.manager.pid(run.vmid) is not None:
        with contextlib.suppress(QmpError, OSError):
            status = (await run.qmp_cmd("query-status")).get("status")
            if status in ("postmigrate", "paused", "finish-migrate"):
                await _try(run, "cont on source", run.qmp_cmd("cont"))
    run.release_monitor()
    if run.peer is not None and (run.target_started or run.disks):
        try:
            answer = await run.peer.call(run.vmid, "stop")
            for volid in answer.get("removed", []):
                run.say(f"removed volume '{volid}' on node '{run.target}'")
        except MigrationError as exc:
            run.say(f"ERROR: stopping the target failed: {exc}")
    if run.prepared_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(run.prepared_path)
    if run.locked:
        try:
            with run.manager.guest_lock(run.vmid):
                if not os.path.exists(run.manager.config_path(run.vmid)):
                    # a rename that failed on its way back may still have moved it: never
                    # recreate the config here while another node may own the guest
                    raise GuestError("the config is no longer on this node; not restoring it")
                config = parse_config(run.original_config_text) \
                    if run.config_swapped and run.original_config_text else \
                    run.manager.load_config(run.vmid)       # the source's volumes again
                if config.get("lock") == "migrate":
                    config.delete("lock")
                run.manager.save_config(run.vmid, config)
        except (GuestError, OSError, ValueError) as exc:
            run.say(f"ERROR: clearing the lock failed: {exc}")


async def _try(run: Run, what: str, action: Any) -> None:
    try:
        await action
    except (QmpError, GuestError, OSError) as exc:
        run.say(f"{what}: {exc}")


async def _wait_not_active(run: Run, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = await run.qmp_cmd("query-migrate")
        except (QmpError, OSError):
            return
        if info.get("status") not in ("active", "setup", "cancelling", "device",
                                      "pre-switchover"):
            return
        await asyncio.sleep(FAST_POLL_S)


def _human(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"


__all__ = ["MigrateOptions", "MigrationCancelled", "MigrationError", "migrate",
           "parse_storage_map", "request_cancel", "validate_options"]
