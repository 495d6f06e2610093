"""Test helper: serve a local-mode mount AND apply operations to the store
behind the kernel's back, the way a replicated backend applies operations
delivered from other nodes. Commands arrive as JSON files in a directory:

    python tests/fuse/remote_node.py STORE MOUNTPOINT CMD_DIR READY_FILE [notify]

With `notify`, the backend offers a change feed (as a replicated backend
does for operations from other nodes) and the kernel caches names and
attributes for 30 s, so only the front's invalidation can show changes.

`CMD_DIR/<n>.json` holds a list of [kind, path, arg] items (kinds: write,
truncate, rename, unlink, mkdir, create, mtime; and quorum with arg "0" or
"1", which makes the node lose or regain quorum); after applying them the
helper writes `CMD_DIR/<n>.done` with the errnos.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from corral.cfs.local import LocalBackend
from corral.cfs.mount import run_mount
from corral.cfs.ops import Op
from corral.cfs.store import Durability, Store

REMOTE_WRITER = 2


def to_op(kind: str, path: str, arg: str) -> Op:
    if kind == "write":
        return Op.write(path, 0, arg.encode(), 1_700_000_000)
    if kind == "truncate":
        return Op.truncate(path, int(arg), 1_700_000_000)
    if kind == "create":
        return Op.create(path, 1_700_000_000)
    if kind == "mkdir":
        return Op.mkdir(path, 1_700_000_000)
    if kind == "unlink":
        return Op.unlink(path)
    if kind == "rename":
        return Op.rename(path, arg, 1_700_000_000)
    if kind == "mtime":
        return Op.set_mtime(path, int(arg))
    raise ValueError(kind)


class FeedBackend(LocalBackend):
    """LocalBackend whose change feed also reports the "remote" operations."""

    def set_quorate(self, quorate: bool) -> None:
        self._read_only = not quorate

    def report(self, op: Op) -> None:
        for listener in self._listeners:
            listener(op)


async def follow(backend: FeedBackend, commands: Path, notify: bool) -> None:
    store = backend.store
    while True:
        for command in sorted(commands.glob("*.json")):
            codes = []
            for item in json.loads(command.read_text()):
                if item[0] == "quorum":
                    backend.set_quorate(item[2] == "1")
                    codes.append(0)
                    continue
                op = to_op(*item)
                codes.append(store.apply(op, writer=REMOTE_WRITER, quorate=True).errno)
                if notify and codes[-1] == 0:
                    backend.report(op)
            command.unlink()
            command.with_suffix(".done").write_text(json.dumps(codes))
        await asyncio.sleep(0.02)


async def main(store_dir: str, mountpoint: str, commands: str, ready_file: str,
               notify: bool) -> None:
    with Store(store_dir, durability=Durability.PROCESS) as store:
        backend = FeedBackend(store, "n1")
        ready = asyncio.Event()
        serving = asyncio.create_task(run_mount(
            backend, mountpoint, ready=ready, cache_timeout_s=30.0 if notify else 1.0))
        await ready.wait()
        follower = asyncio.create_task(follow(backend, Path(commands), notify))
        Path(ready_file).write_text("up\n")
        await serving
        follower.cancel()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5], notify=sys.argv[5:] == ["notify"]))
