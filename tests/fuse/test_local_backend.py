"""LocalBackend without a mount: it applies in place as a quorate node,
refuses everything when read-only, renders the generated files, and expires
locks by its own monotonic clock (utime(0) fails with EACCES and removes a
lock first seen more than 120 s ago)."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path

from corral.cfs.local import LocalBackend
from corral.cfs.ops import Op
from corral.cfs.store import Durability, Store


class Clock:
    def __init__(self) -> None:
        self.now_ns = 1_000_000_000

    def __call__(self) -> int:
        return self.now_ns


def test_local_backend_applies_and_expires_locks(tmp_path: Path) -> None:
    clock = Clock()
    with Store(tmp_path / "s", durability=Durability.PROCESS) as store:
        backend = LocalBackend(store, "n1", monotonic_ns=clock)
        run = asyncio.run
        assert backend.quorate()
        for path in ("priv", "priv/lock", "nodes", "nodes/n1", "nodes/n1/lxc"):
            assert run(backend.submit(Op.mkdir(path, 10))) == 0
        assert run(backend.submit(Op.create("nodes/n1/lxc/101.conf", 10, excl=True))) == 0
        assert run(backend.submit(Op.mkdir("priv/lock/a", 10))) == 0
        assert run(backend.submit(Op.mkdir("priv/lock/a", 10))) == errno.EEXIST
        clock.now_ns += 60 * 1_000_000_000
        assert run(backend.submit(Op.set_mtime("priv/lock/a", 0))) == errno.EACCES
        assert store.state.tree.lookup("priv/lock/a") is not None
        clock.now_ns += 61 * 1_000_000_000
        assert run(backend.submit(Op.set_mtime("priv/lock/a", 0))) == errno.EACCES
        assert store.state.tree.lookup("priv/lock/a") is None
        vmlist = json.loads(backend.virtual_file(".vmlist") or b"")
        assert vmlist["ids"]["101"]["node"] == "n1" and vmlist["ids"]["101"]["type"] == "lxc"
        assert json.loads(backend.virtual_file(".members") or b"")["nodename"] == "n1"
        assert backend.virtual_file(".rrd") is None


def test_read_only_backend_changes_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "s", durability=Durability.PROCESS) as store:
        backend = LocalBackend(store, "n1", read_only=True)
        version = store.state.version
        assert not backend.quorate()
        assert asyncio.run(backend.submit(Op.mkdir("x", 1))) == errno.EACCES
        assert store.state.version == version and store.state.tree.lookup("x") is None
