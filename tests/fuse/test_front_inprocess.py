"""The FUSE handlers called directly, without a mount: appends through a
backend that awaits before applying (as a replicated one does) never land
on the same offset, and reads by inode return exactly the requested byte
ranges across chunk boundaries."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from corral.cfs.fuse import CfsOperations
from corral.cfs.local import LocalBackend
from corral.cfs.ops import Op
from corral.cfs.store import Durability, Store


class SlowBackend(LocalBackend):
    async def submit(self, op: Op) -> int:
        await asyncio.sleep(0.001)  # the multicast round trip
        return await super().submit(op)


def test_concurrent_appends_through_a_slow_backend(tmp_path: Path) -> None:
    with Store(tmp_path / "s", durability=Durability.PROCESS) as store:
        assert store.apply(Op.create("log", 1), writer=0, quorate=True).ok
        ops = CfsOperations(SlowBackend(store, "n1"), gid=33)
        entry = store.state.tree.lookup("log")
        assert entry is not None

        async def run() -> None:
            handles = [await ops.open(entry.ino, os.O_WRONLY | os.O_APPEND, None)
                       for _ in range(5)]

            async def writer(index: int) -> None:
                for line in range(40):
                    # The kernel's offset is ignored for O_APPEND handles.
                    await ops.write(handles[index].fh, 0, f"{index}-{line}\n".encode())

            await asyncio.gather(*(writer(index) for index in range(5)))

        asyncio.run(run())
        lines = store.read_file("log").decode().splitlines()
        assert sorted(lines) == sorted(f"{i}-{n}" for i in range(5) for n in range(40))


def test_reads_by_inode_across_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes: three chunks
    with Store(tmp_path / "s", durability=Durability.PROCESS) as store:
        assert store.apply(Op.create("f", 1), writer=0, quorate=True).ok
        assert store.apply(Op.write("f", 0, data, 1), writer=0, quorate=True).ok
        ops = CfsOperations(LocalBackend(store, "n1"), gid=33)
        entry = store.state.tree.lookup("f")
        assert entry is not None

        async def run() -> None:
            info = await ops.open(entry.ino, os.O_RDONLY, None)
            for offset, size in [(0, 10), (4090, 20), (0, 100_000), (5000, 8000),
                                 (10_239, 5), (10_240, 5), (20_000, 1)]:
                assert await ops.read(info.fh, offset, size) == data[offset:offset + size]

        asyncio.run(run())
