"""When ReplicatedBackend answers a submit (three backends on the fake
asyncio Totem of the CPG tests, real stores with Durability.PROCESS): the
submitter's WAL sync starts at the local apply, while the other members'
ACKs are still outstanding (the overlap), yet the answer waits for both
halves: not before every member's ACK even when the sync is done, not
before the sync even when every ACK is in. A held sync or a held ACK is
released by the test, so each assertion would fail if the backend
answered early."""

from __future__ import annotations

import asyncio
import pathlib
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from tests.cfs_repl.common import Backends, Stores, fake_cluster

from corral.cfs.ops import Op
from corral.cfs.replica_core import Action
from corral.cfs.replication import ReplicatedBackend
from corral.cfs.store import Store

T = 1795720870


class HeldSync:
    """Wraps store.sync: records when it starts and blocks (in the worker
    thread) until released."""

    def __init__(self, store: Store) -> None:
        self.real = store.sync
        self.gate = threading.Event()
        self.gate.set()
        self.started = 0
        self.finished = 0
        store.sync = self  # type: ignore[method-assign]

    def __call__(self) -> None:
        self.started += 1
        assert self.gate.wait(10), "sync held too long"
        self.real()
        self.finished += 1


class HeldAcks:
    """Withholds one backend's ACKs until released."""

    def __init__(self, backend: ReplicatedBackend) -> None:
        self.backend = backend
        self.real: Callable[[int], list[Action]] = backend.core.flush_acks
        self.held = False
        backend.core.flush_acks = self  # type: ignore[method-assign]

    def __call__(self, now_ns: int) -> list[Action]:
        return [] if self.held else self.real(now_ns)

    def release(self) -> None:
        self.held = False
        self.backend._guarded(self.backend.core.flush_acks)


@asynccontextmanager
async def cluster(tmp_path: pathlib.Path) -> AsyncIterator[tuple[Any, Stores, Backends]]:
    async with fake_cluster(tmp_path) as (network, stores, backends):
        assert await backends[1].submit(Op.mkdir("d", T)) == 0
        yield network, stores, backends


def run(main: Callable[[], Any]) -> None:
    """A broken answer order may hang a submit: fail after 60 s instead."""
    asyncio.run(asyncio.wait_for(main(), 60))


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def stays_pending(future: asyncio.Future[int], seconds: float = 0.2) -> None:
    await asyncio.sleep(seconds)
    assert not future.done(), "answered early"


def test_sync_overlaps_acks_but_answer_waits_for_all_acks(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as (_network, stores, backends):
            sync = HeldSync(stores[1])
            acks = HeldAcks(backends[2])
            sync.gate.clear()
            acks.held = True
            before = sync.started
            answer = asyncio.ensure_future(backends[1].submit(Op.create("d/a", T)))
            await until(lambda: stores[3].state.tree.lookup("d/a") is not None, "the apply")
            # the sync began while node 2's ACK is still missing
            await until(lambda: sync.started > before, "the WAL sync to start")
            assert backends[1].core._unconfirmed, "confirmed without node 2's ACK"
            sync.gate.set()
            await until(lambda: sync.finished > before, "the WAL sync to finish")
            # durable here, but node 2 has not confirmed: no answer yet
            await stays_pending(answer)
            acks.release()
            assert await asyncio.wait_for(answer, 10) == 0
            assert sync.started == before + 1, "one sync covered the op"

    run(main)


def test_answer_waits_for_the_sync_after_every_ack(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as (_network, stores, backends):
            sync = HeldSync(stores[1])
            sync.gate.clear()
            answer = asyncio.ensure_future(backends[1].submit(Op.create("d/b", T)))
            # every member applied it and ACKed: the core has confirmed it
            await until(lambda: stores[1].state.tree.lookup("d/b") is not None
                        and not backends[1].core._unconfirmed, "the confirmation")
            await stays_pending(answer)
            sync.gate.set()
            assert await asyncio.wait_for(answer, 10) == 0
            assert sync.finished >= 1
            stages = backends[1].status()["submit_stages"]
            assert isinstance(stages, dict) and stages["count"] >= 1
            assert stages["durable_wait_p50_us"] > 0  # type: ignore[operator]

    run(main)


@pytest.mark.parametrize("count", [20])
def test_concurrent_submits_share_syncs(tmp_path: pathlib.Path, count: int) -> None:
    """Many submits in flight: every one answered 0, all durable, fewer syncs than ops."""
    async def main() -> None:
        async with cluster(tmp_path) as (_network, stores, backends):
            sync = HeldSync(stores[1])
            before = sync.started
            codes = await asyncio.gather(*(backends[1].submit(Op.create(f"d/c{i}", T))
                                           for i in range(count)))
            assert codes == [0] * count
            assert sync.finished - before < count

    run(main)


def test_direct_sends_keep_the_submit_order_under_pushback(tmp_path: pathlib.Path) -> None:
    """Multicasts go to CPG at once only when nothing is queued before them:
    with a tiny send window (pushback) and fragmented ops mixed with small
    ones, node 2 applies node 1's ops exactly in submit order, every
    fragmented op arrives whole and all trees end equal."""
    from corral.cfs.replica_core import ReplicaConfig

    async def main() -> None:
        config = ReplicaConfig(part_max_bytes=1024)
        applied: list[str] = []

        def record_node1_ops(stores: Stores, _backends: Backends) -> None:
            real_apply = stores[2].apply_group

            def record(ops: Any, *, quorate: bool) -> Any:
                applied.extend(op.path for op, writer in ops if writer == 1)
                return real_apply(ops, quorate=quorate)

            stores[2].apply_group = record  # type: ignore[method-assign]

        async with fake_cluster(tmp_path, prefix="p", capacity=2, pending_limit=2, config=config,
                                before_start=record_node1_ops) as (network, stores, backends):
            assert await backends[1].submit(Op.mkdir("d", T)) == 0
            applied.clear()
            sizes = [10 if i % 3 else 5000 for i in range(30)]
            ops = [Op.create(f"d/f{i:02d}", T) for i in range(30)]
            writes = [Op.write(f"d/f{i:02d}", 0, bytes([65 + i % 26]) * size, T)
                      for i, size in enumerate(sizes)]
            for batch in (ops, writes):
                # one submit per loop turn, with node 2 writing too (ACKs from
                # node 1): new multicasts keep arriving while others wait for room
                tasks = []
                for i, op in enumerate(batch):
                    tasks.append(asyncio.ensure_future(backends[1].submit(op)))
                    tasks.append(asyncio.ensure_future(backends[2].submit(
                        Op.create(f"d/{id(batch)}-{i}", T))))
                    await asyncio.sleep(0)
                assert await asyncio.gather(*tasks) == [0] * len(tasks)
            await network.settle()
            await asyncio.sleep(0.05)
            assert applied == [op.path for op in ops] + [op.path for op in writes]
            for i, size in enumerate(sizes):
                assert stores[3].read_file(f"d/f{i:02d}") == bytes([65 + i % 26]) * size
            assert len({(s.state.version, s.state.tree.digest) for s in stores.values()}) == 1

    run(main)
