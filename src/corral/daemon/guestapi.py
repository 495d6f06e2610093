"""The guest endpoints of corrald's HTTPS API (a Router of corral.daemon.api).

    GET  /api2/json/cluster/tasks                        recent tasks of every node (limit=1..500)
    POST /api2/json/nodes/{node}/qemu/{vmid}/mtunnel     the migration tunnel's target side,
                                                         body: {"cmd": ..., ...}

`{node}` must be this node. Authentication: the node-to-node HMAC header of
corral.daemon.catchup (`Authorization: CorralNode=...`, what a source node sends) or an
administrator ticket. The commands and their fields are in corral.guests.mtunnel, which
validates every field; this module only maps paths and errors (a refused or malformed
command is 400 with the reason, as the reference's parameter errors).

The target QEMU therefore runs under this node's daemon: in its network namespace,
with its guest run dir and task dir (`corrald --guest-run-dir/--guest-task-dir`, the
defaults of `corral qm`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from corral.daemon.api import ApiError, Request, Route
from corral.guests.clustertasks import cluster_tasks
from corral.guests.mtunnel import IncomingMigrations, MtunnelError
from corral.guests.qemu import DEFAULT_RUN_DIR, DEFAULT_TASK_DIR, GuestManager

log = logging.getLogger("corral.daemon")

REAP_INTERVAL_S = 10.0
_MTUNNEL_RE = re.compile(r"^/nodes/([A-Za-z0-9][A-Za-z0-9.-]{0,62})/qemu/(\d{3,9})/mtunnel$")


def match_mtunnel(path: str) -> tuple[str, int] | None:
    """(node, vmid) of an mtunnel path (without /api2/json), else None."""
    match = _MTUNNEL_RE.match(path)
    return (match.group(1), int(match.group(2))) if match else None


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
        if path.startswith("/nodes/") and method == "POST":
            return self._mtunnel, "node-or-admin", path
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

    def incoming(self) -> IncomingMigrations:
        """The records of incoming migrations (created on first use: it makes the run
        and task dirs)."""
        if self._incoming is None:
            manager = GuestManager(self.tree_root, self.node, self.run_dir, self.task_dir)
            self._incoming = IncomingMigrations(manager, self.state_dir, self.link_addresses(),
                                                self.quorate)
        self._incoming.link_addresses = self.link_addresses()
        return self._incoming

    async def _mtunnel(self, request: Request, path: str) -> Any:
        target = match_mtunnel(path)
        if target is None:
            raise ApiError(404, "no such path")
        node, vmid = target
        if node != self.node:
            raise ApiError(400, f"this is node '{self.node}', not '{node}'")
        incoming = self.incoming()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._expire_forever())
        try:
            # In a worker thread with its own loop: the handlers read the tree, which is
            # this daemon's own FUSE mount, served by this loop (reading it from the loop
            # would deadlock), and they wait for QEMU and qemu-img.
            return await asyncio.to_thread(asyncio.run, incoming.handle(vmid, request.params))
        except MtunnelError as error:
            raise ApiError(400, str(error)) from None
