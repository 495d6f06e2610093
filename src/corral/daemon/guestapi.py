"""The guest endpoints of corrald's HTTPS API (a Router of corral.daemon.api).

    GET    /api2/json/cluster/tasks                      recent tasks of every node (limit=1..500)
    POST   /api2/json/nodes/{node}/qemu/{vmid}/mtunnel   the migration tunnel's target side,
                                                         body: {"cmd": ..., ...}
    POST   /api2/json/nodes/{node}/qemu/{vmid}/migrate   start a migration (a detached worker,
                                                         corral.guests.migrate_worker) -> UPID
    GET    /api2/json/nodes/{node}/tasks                 this node's tasks (limit, start, vmid,
                                                         typefilter, errors)
    GET    /api2/json/nodes/{node}/tasks/{upid}/status   running | stopped + exitstatus
    GET    /api2/json/nodes/{node}/tasks/{upid}/log      [{n, t}] (start, limit)
    DELETE /api2/json/nodes/{node}/tasks/{upid}          stop a running task (a migration:
                                                         cancel, the guest stays here)

`{node}` must be this node (a UPID of another node: 400 naming it; no proxying).
Authentication: mtunnel takes the node-to-node HMAC header of corral.daemon.catchup
(`Authorization: CorralNode=...`, what a source node sends) or an administrator ticket;
the others an administrator ticket. Bad parameters are 400 with `errors` per parameter,
as the reference's.

Nothing here reads the tree from the event loop: the tree is this daemon's own FUSE
mount, served by this loop (it would deadlock). Handlers that read it run in a worker
thread: the slow mtunnel commands each in a fresh thread and loop, `resume` and
`status` (the source's keep-alive pings and the hand-over) on one long-lived thread
with its own loop (no thread or loop to create on the hand-over's critical path).

The target QEMU therefore runs under this node's daemon: in its network namespace,
with its guest run dir and task dir (`corrald --guest-run-dir/--guest-task-dir`, the
defaults of `corral qm`). A migration started here runs in a worker process of its own
(not a child of this daemon: a daemon restart does not stop it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import re
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from corral.daemon.api import ApiError, Request, Route
from corral.guests.clustertasks import cluster_tasks
from corral.guests.migrate import MigrateOptions, parse_storage_map, request_cancel
from corral.guests.migrate_worker import WorkerError, WorkerSettings, spawn_worker
from corral.guests.mtunnel import IncomingMigrations, MtunnelError
from corral.guests.qemu import DEFAULT_RUN_DIR, DEFAULT_TASK_DIR, GuestManager
from corral.guests.tasks import TaskError, Upid, parse_upid

log = logging.getLogger("corral.daemon")

REAP_INTERVAL_S = 10.0
MAX_TASK_LIST = 10000
MAX_LOG_LINES = 50000
_NODE = r"([A-Za-z0-9][A-Za-z0-9.-]{0,62})"
_MTUNNEL_RE = re.compile(rf"^/nodes/{_NODE}/qemu/(\d{{1,10}})/mtunnel$")
_MIGRATE_RE = re.compile(rf"^/nodes/{_NODE}/qemu/(\d{{1,10}})/migrate$")
_TASKS_RE = re.compile(rf"^/nodes/{_NODE}/tasks$")
_TASK_RE = re.compile(rf"^/nodes/{_NODE}/tasks/([^/]+?)(/status|/log)?$")
_FAST_COMMANDS = ("resume", "status")
_VMID_MIN, _VMID_MAX = 100, 999_999_999
T = TypeVar("T")


def match_mtunnel(path: str) -> tuple[str, int] | None:
    """(node, vmid) of an mtunnel path (without /api2/json), else None."""
    match = _MTUNNEL_RE.match(path)
    return (match.group(1), int(match.group(2))) if match else None


class _LoopThread:
    """One long-lived thread running its own event loop (started on first use)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name=self.name,
                                           daemon=True)
            self.thread.start()
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop = None


def _bad(errors: dict[str, str]) -> ApiError:
    return ApiError(400, "Parameter verification failed.", errors)


def _flag(params: dict[str, str], name: str, errors: dict[str, str]) -> bool:
    value = params.get(name, "0")
    if value not in ("0", "1"):
        errors[name] = "type check ('boolean') failed - got '" + value[:40] + "'"
    return value == "1"


def _int(params: dict[str, str], name: str, default: int, low: int, high: int,
         errors: dict[str, str]) -> int:
    value = params.get(name)
    if value is None or value == "":
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        errors[name] = f"must be an integer {low}..{high}"
        return default
    return int(value)


def parse_migrate_params(params: dict[str, str], this_node: str) -> tuple[str, MigrateOptions]:
    """The reference's migrate parameters -> (target, options); ApiError 400 with one
    entry per bad parameter."""
    errors: dict[str, str] = {}
    known = {"target", "online", "with-local-disks", "targetstorage", "bwlimit",
             "migration_type", "migration_network", "force"}
    for name in params:
        if name not in known:
            errors[name] = "property is not defined in schema and the schema does not " \
                           "allow additional properties"
    target = params.get("target", "")
    if not target:
        errors["target"] = "property is missing and it is not optional"
    elif not re.fullmatch(_NODE, target):
        errors["target"] = f"invalid node name '{target[:64]}'"
    elif target == this_node:
        errors["target"] = f"target is local node '{target}'"
    online = _flag(params, "online", errors)
    local_disks = _flag(params, "with-local-disks", errors)
    storage = params.get("targetstorage") or None
    if storage is not None:
        try:
            parse_storage_map(storage)
        except ValueError as exc:
            errors["targetstorage"] = str(exc)
    bwlimit = _int(params, "bwlimit", 0, 0, 1 << 40, errors) if "bwlimit" in params else None
    kind = params.get("migration_type", "secure")
    if kind not in ("secure", "insecure"):
        errors["migration_type"] = "value must be one of: secure, insecure"
    network = params.get("migration_network") or None
    if network is not None:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            errors["migration_network"] = f"'{network[:64]}' is not a CIDR (e.g. 10.1.2.0/24)"
    if errors:
        raise _bad(errors)
    return target, MigrateOptions(online=online, with_local_disks=local_disks,
                                  targetstorage=storage, bwlimit_kib=bwlimit,
                                  migration_type=kind, migration_network=network)


def filter_tasks(entries: list[dict[str, object]], params: dict[str, str]) -> list[dict[str, object]]:
    """GET /nodes/{node}/tasks: start, limit, vmid, typefilter, errors (ApiError 400)."""
    errors: dict[str, str] = {}
    start = _int(params, "start", 0, 0, MAX_TASK_LIST, errors)
    limit = _int(params, "limit", 50, 0, MAX_TASK_LIST, errors)
    vmid = params.get("vmid")
    if vmid is not None and not (vmid.isdigit() and _VMID_MIN <= int(vmid) <= _VMID_MAX):
        errors["vmid"] = f"invalid VMID (an integer {_VMID_MIN}..{_VMID_MAX})"
    only_errors = _flag(params, "errors", errors)
    typefilter = params.get("typefilter")
    if typefilter is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", typefilter):
        errors["typefilter"] = "invalid task type"
    if errors:
        raise _bad(errors)
    rows = []
    for entry in entries:
        if vmid is not None and entry.get("id") != vmid:
            continue
        if typefilter is not None and entry.get("type") != typefilter:
            continue
        status = str(entry.get("status", ""))
        if only_errors and status in ("OK", "running"):
            continue
        rows.append(entry)
    return rows[start:start + limit]


class GuestApi:
    """Created by the daemon; the guest manager is made on first use (it creates dirs)."""

    def __init__(self, state_dir: str, tree_root: str, node: str,
                 link_addresses: Callable[[], list[str]], quorate: Callable[[], bool],
                 run_dir: str = DEFAULT_RUN_DIR, task_dir: str = DEFAULT_TASK_DIR) -> None:
        self.state_dir = state_dir
        self.tree_root = tree_root
        self.node = node
        self.link_addresses = link_addresses
        self.quorate = quorate
        self.run_dir = run_dir
        self.task_dir = task_dir
        self._incoming: IncomingMigrations | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._fast = _LoopThread("corral-mtunnel")
        self._holding: set[asyncio.Task[None]] = set()

    async def _expire_forever(self) -> None:
        """Stop incoming migrations whose source went silent (it crashed or lost us)."""
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            incoming = self._incoming
            if incoming is None or not incoming.records:
                continue
            try:
                await asyncio.to_thread(asyncio.run, incoming.expire(time.monotonic_ns()))
            except Exception:
                log.exception("guests: expiring incoming migrations failed")

    def route(self, method: str, path: str) -> Route | None:
        if path == "/cluster/tasks" and method == "GET":
            return self._cluster_tasks, "admin", ""
        if not path.startswith("/nodes/"):
            return None
        if method == "POST" and _MTUNNEL_RE.match(path):
            return self._mtunnel, "node-or-admin", path
        if method == "POST" and _MIGRATE_RE.match(path):
            return self._migrate, "admin", path
        if method == "GET" and _TASKS_RE.match(path):
            return self._tasks, "admin", path
        match = _TASK_RE.match(path)
        if match is not None and (method, match.group(3)) in (
                ("GET", "/status"), ("GET", "/log"), ("DELETE", None)):
            return self._task, "admin", path
        return None

    async def _cluster_tasks(self, request: Request, _: str) -> list[dict[str, Any]]:
        """Every node's published recent tasks (GET /cluster/tasks). Read in a thread:
        the tree is this daemon's own FUSE mount, served by this event loop."""
        limit_text = request.params.get("limit", "50")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 500:
            raise ApiError(400, "Parameter verification failed.",
                           {"limit": "must be an integer 1..500"})
        result = await asyncio.to_thread(cluster_tasks, self.tree_root, int(limit_text))
        for problem in result.problems:
            log.warning("cluster tasks: skipped %s", problem)
        return result.tasks

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        self._fast.close()

    def incoming(self) -> IncomingMigrations:
        """The records of incoming migrations (created on first use: it makes the run
        and task dirs)."""
        if self._incoming is None:
            manager = GuestManager(self.tree_root, self.node, self.run_dir, self.task_dir)
            self._incoming = IncomingMigrations(manager, self.state_dir, self.link_addresses(),
                                                self.quorate)
        self._incoming.link_addresses = self.link_addresses()
        return self._incoming

    def _this_node(self, node: str) -> None:
        if node != self.node:
            raise ApiError(400, f"this is node '{self.node}', not '{node}'")

    async def _mtunnel(self, request: Request, path: str) -> Any:
        target = match_mtunnel(path)
        if target is None:
            raise ApiError(404, "no such path")
        node, vmid = target
        self._this_node(node)
        incoming = self.incoming()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._expire_forever())
        try:
            # Never on this loop: the handlers read the tree, this daemon's own FUSE mount
            # served by this loop (reading it from the loop would deadlock). The quick
            # commands on the long-lived thread, the slow ones (QEMU, qemu-img) each in a
            # thread of their own so one cannot hold up another migration's.
            work = incoming.handle(vmid, request.params)
            command = request.params.get("cmd")
            if command in _FAST_COMMANDS:
                return await self._fast.run(work)
            answer = await asyncio.to_thread(asyncio.run, work)
            if command == "start-incoming":     # `resume` then needs no QMP connect
                holding = asyncio.get_running_loop().create_task(
                    self._fast.run(incoming.hold_monitor(vmid)))
                self._holding.add(holding)
                holding.add_done_callback(self._holding.discard)
            return answer
        except MtunnelError as error:
            raise ApiError(400, str(error)) from None

    async def _migrate(self, request: Request, path: str) -> str:
        """Start a migration of a guest of this node: a detached worker (it outlives this
        request and this daemon); the answer is its UPID. An HA-managed guest is queued
        for the HA manager by the worker (task type hamigrate)."""
        match = _MIGRATE_RE.match(path)
        assert match is not None
        self._this_node(match.group(1))
        vmid = int(match.group(2))
        if not _VMID_MIN <= vmid <= _VMID_MAX:
            raise _bad({"vmid": f"invalid VMID (an integer {_VMID_MIN}..{_VMID_MAX})"})
        target, options = parse_migrate_params(request.params, self.node)
        settings = WorkerSettings(self.tree_root, self.node, self.run_dir, self.task_dir,
                                  self.state_dir, vmid, target, options)
        try:
            upid = await asyncio.to_thread(spawn_worker, settings)
        except WorkerError as error:
            raise ApiError(500, str(error)) from None
        return str(upid)

    async def _tasks(self, request: Request, path: str) -> list[dict[str, object]]:
        match = _TASKS_RE.match(path)
        assert match is not None
        self._this_node(match.group(1))
        manager = self.incoming().manager
        entries = await asyncio.to_thread(manager.tasks.list_tasks, MAX_TASK_LIST)
        return filter_tasks(entries, request.params)

    def _task_upid(self, path: str) -> tuple[Upid, str | None]:
        match = _TASK_RE.match(path)
        assert match is not None
        self._this_node(match.group(1))
        text = urllib.parse.unquote(match.group(2))
        try:
            upid = parse_upid(text)
        except TaskError:
            raise _bad({"upid": f"invalid UPID '{text[:200]}'"}) from None
        if upid.node != self.node:
            raise _bad({"upid": f"task of node '{upid.node}', not of this node "
                                f"'{self.node}' (ask that node)"})
        return upid, match.group(3)

    async def _task(self, request: Request, path: str) -> Any:
        upid, what = self._task_upid(path)
        tasks = self.incoming().manager.tasks
        try:
            if what == "/status":
                return await asyncio.to_thread(tasks.status, upid)
            if what == "/log":
                errors: dict[str, str] = {}
                start = _int(request.params, "start", 0, 0, MAX_LOG_LINES, errors)
                limit = _int(request.params, "limit", 50, 0, MAX_LOG_LINES, errors)
                if errors:
                    raise _bad(errors)
                lines = await asyncio.to_thread(tasks.read_log, upid)
                return [{"n": start + i + 1, "t": line}
                        for i, line in enumerate(lines[start:start + limit])]
            return await self._stop_task(upid)
        except TaskError as error:
            raise ApiError(404, str(error)) from None

    async def _stop_task(self, upid: Upid) -> None:
        """DELETE: a running migration is cancelled (flag + migrate_cancel, the guest
        stays here); another running task's process gets SIGTERM, unless it is this
        daemon itself (the target side of a migration: the source cancels that)."""
        manager = self.incoming().manager
        status = await asyncio.to_thread(manager.tasks.status, upid)
        if status.get("status") != "running":
            return None
        if upid.task_type == "qmigrate" and upid.task_id.isdigit():
            await asyncio.to_thread(asyncio.run, request_cancel(manager, int(upid.task_id)))
            return None
        if upid.pid == os.getpid():
            raise ApiError(400, f"task {upid} runs inside corrald and cannot be stopped "
                                "on its own")
        try:
            os.kill(upid.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return None
