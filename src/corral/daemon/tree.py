"""The configuration filesystem inside corrald: store + ReplicatedBackend + FUSE mount.

    tree = Tree(state_dir / "cfs", mountpoint, cpg, quorum, node_name, config)
    await tree.start()        # opens the store, joins `corral-cfs`, mounts
    tree.update(config)       # nodelist / config_version shown in .members
    tree.read_conf()          # corosync.conf in the tree (text) or None
    await tree.write_conf(t)  # replace corosync.conf in the tree (needs quorum)
    await tree.stop()         # unmount, leave the group, close the store

The tree's `corosync.conf` is the cluster-wide copy, as in the reference: the
daemon writes a new config there when it changes one (and when the tree
lacks it or holds an older one), and adopts a newer one found there (see
Daemon._watch_tree). It also creates `nodes/<node>/{qemu-server,lxc}` for
this node once quorate.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

from corral.corosync_conf import ClusterConfig

log = logging.getLogger("corral.daemon")

CONF_PATH = "corosync.conf"
MOUNT_READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class TreeUnavailable(Exception):
    """The filesystem modules are missing or the mount failed."""


class Tree:
    def __init__(self, store_dir: Path, mountpoint: str, cpg: Any, quorum: Any, node_name: str,
                 config: ClusterConfig) -> None:
        self.store_dir = store_dir
        self.mountpoint = mountpoint
        self.cpg = cpg
        self.quorum = quorum
        self.node_name = node_name
        self.config = config
        self.store: Any = None
        self.backend: Any = None
        self.mounted = False
        self._stop = asyncio.Event()
        self._mount_task: asyncio.Task[Any] | None = None
        self._node_dirs_done = False

    async def start(self, mount: bool = True) -> None:
        try:
            from corral.cfs.replication import ReplicatedBackend
            from corral.cfs.store import Durability, Store
        except ImportError as error:
            raise TreeUnavailable(f"the configuration filesystem is not available: {error}") \
                from None
        self.store_dir.parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.store_dir, durability=Durability.PROCESS)
        self.backend = ReplicatedBackend(
            self.store, self.cpg, self.quorum, self.node_name,
            cluster_name=self.config.cluster_name, config_version=self.config.config_version,
            node_names={n.nodeid: n.name for n in self.config.nodes},
            node_ips={n.nodeid: n.addrs[min(n.addrs)] for n in self.config.nodes})
        await self.backend.start()
        if mount:
            await self._mount()

    async def _mount(self) -> None:
        try:
            from corral.cfs.mount import run_mount
        except ImportError as error:
            raise TreeUnavailable(f"the FUSE front is not available: {error}") from None
        ready = asyncio.Event()
        self._mount_task = asyncio.get_running_loop().create_task(
            run_mount(self.backend, self.mountpoint, stop=self._stop, ready=ready,
                      handle_signals=False))
        waiter = asyncio.get_running_loop().create_task(ready.wait())
        done, _ = await asyncio.wait([self._mount_task, waiter], timeout=MOUNT_READY_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._mount_task in done:
            failure = self._mount_task.exception()
            self._mount_task = None
            raise TreeUnavailable(f"cannot mount {self.mountpoint}: {failure}")
        if not ready.is_set():
            raise TreeUnavailable(f"mounting {self.mountpoint} timed out")
        self.mounted = True

    def update(self, config: ClusterConfig) -> None:
        self.config = config
        if self.backend is None:
            return
        self.backend.config_version = config.config_version
        self.backend.node_names = {n.nodeid: n.name for n in config.nodes}
        self.backend.node_ips = {n.nodeid: n.addrs[min(n.addrs)] for n in config.nodes}

    def read_conf(self) -> str | None:
        if self.store is None:
            return None
        try:
            return bytes(self.store.read_file(CONF_PATH)).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    async def write_conf(self, text: str) -> int:
        """Replace corosync.conf in the tree (write a temporary file, rename); errno."""
        from corral.cfs.ops import Op

        mtime = int(time.time())
        temporary = CONF_PATH + ".new"
        data = text.encode()
        for op in (Op.create(temporary, mtime), Op.truncate(temporary, 0, mtime),
                   Op.write(temporary, 0, data, mtime), Op.rename(temporary, CONF_PATH, mtime)):
            code = await self.backend.submit(op)
            if code:
                log.warning("tree: writing corosync.conf failed: %s", os.strerror(code))
                return int(code)
        return 0

    async def ensure_node_dirs(self) -> None:
        if self._node_dirs_done or self.backend is None or not self.backend.quorate():
            return
        from corral.cfs.ops import Op

        mtime = int(time.time())
        for path in ("nodes", f"nodes/{self.node_name}", f"nodes/{self.node_name}/qemu-server",
                     f"nodes/{self.node_name}/lxc", f"nodes/{self.node_name}/priv"):
            code = await self.backend.submit(Op.mkdir(path, mtime))
            if code not in (0, errno.EEXIST):
                log.debug("tree: mkdir %s: %s", path, os.strerror(code))
                return
        self._node_dirs_done = True

    def status(self) -> dict[str, Any]:
        if self.backend is None:
            return {"mounted": False}
        status = dict(self.backend.status())
        status.update(mounted=self.mounted, mountpoint=self.mountpoint)
        return status

    async def stop(self) -> None:
        self._stop.set()
        if self._mount_task is not None:
            try:
                await asyncio.wait_for(self._mount_task, STOP_TIMEOUT_S)
            except Exception as error:
                log.error("tree: unmount failed: %r", error)
            self.mounted = False
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.backend.stop(), STOP_TIMEOUT_S)
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()
