"""LocalBackend without a mount: it applies in place as a quorate node,
refuses everything when read-only, renders the generated files, and expires
locks by its own monotonic clock (utime(0) fails with EACCES and removes a
lock first seen more than 120 s ago). With the default FSYNC durability it
answers an op only after a WAL sync that began after the op was written,
and writers waiting together share one sync (group commit)."""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from pathlib import Path

import pytest

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


def test_fsync_answers_only_after_the_sync(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(tmp_path / "s") as store:
        assert store.durability is Durability.FSYNC
        backend = LocalBackend(store, "n1")
        release = threading.Event()
        started: list[int] = []
        real_sync = store.sync

        def gated_sync() -> None:
            started.append(store.state.version)
            assert release.wait(10)
            real_sync()

        monkeypatch.setattr(store, "sync", gated_sync)

        async def run() -> None:
            first = asyncio.create_task(backend.submit(Op.mkdir("a", 1)))
            await asyncio.sleep(0.1)
            # Written (later ops see it) but not answered: its sync is held.
            assert store.state.tree.lookup("a") is not None
            assert started and not first.done()
            others = [asyncio.create_task(backend.submit(Op.create(f"a/{i}", 1)))
                      for i in range(50)]
            await asyncio.sleep(0.1)
            assert not any(task.done() for task in others)
            release.set()
            assert await first == 0
            assert await asyncio.gather(*others) == [0] * 50

        asyncio.run(run())
        # One sync for the first op, one for the 50 that waited together.
        assert len(started) == 2 == backend._commit.syncs
    with Store(tmp_path / "s") as again:
        assert len(again.state.tree.sorted_names(again.state.tree.lookup("a"))) == 50


def test_failed_sync_fails_every_waiter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.errors import InvariantError

    with Store(tmp_path / "s") as store:
        backend = LocalBackend(store, "n1")

        def broken_sync() -> None:
            raise OSError(5, "disk gone")

        monkeypatch.setattr(store, "sync", broken_sync)

        async def run() -> list[object]:
            return await asyncio.gather(*(backend.submit(Op.mkdir(f"d{i}", 1)) for i in range(3)),
                                        return_exceptions=True)

        results = asyncio.run(run())
        assert all(isinstance(result, InvariantError) for result in results)
        assert store.failed
        with pytest.raises(InvariantError):
            asyncio.run(backend.submit(Op.mkdir("later", 1)))
