"""ReplicatedBackend (asyncio) on CpgService over the fake asyncio Totem of
the CPG tests, with real stores: start and sync, a write on one node read on
the others, same errno for a conflict, EACCES without quorum, generated
files (.members, .vmlist, .version, .clusterlog) and the replicated cluster
log, group commit (store synced before the answer), a clean stop. Runs on
asyncio and uvloop."""

from __future__ import annotations

import asyncio
import errno
import json
import pathlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from tests.cfs_repl.common import fake_cluster, fakenode

from corral.cfs.ops import Op
from corral.cfs.replication import ReplicatedBackend
from corral.cfs.store import Durability, Store
from corral.cpg.service import CpgService

T = 1795720870


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]:
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def runner(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(asyncio.wait_for(main(), 30))

    return runner


def test_backend_end_to_end(tmp_path: pathlib.Path, run: Any) -> None:
    async def main() -> None:
        quorate = {1: True, 2: True, 3: True}
        changes: list[Op] = []
        async with fake_cluster(
                tmp_path, quorate=quorate.__getitem__,
                before_start=lambda _stores, backends: backends[3].add_change_listener(
                    changes.append),
                node_names={1: "node1", 2: "node2", 3: "node3"}, node_ips={1: "10.0.0.1"},
                cluster_name="lab") as (network, stores, backends):
            b1, b2, b3 = backends[1], backends[2], backends[3]
            # group commit: an op is answered only after a WAL sync that covers it
            events: list[str] = []
            real_sync, real_apply = stores[1].sync, stores[1].apply_group

            def sync() -> None:
                events.append("sync")
                real_sync()

            def apply_group(ops: Any, *, quorate: bool) -> Any:
                events.append("apply")
                return real_apply(ops, quorate=quorate)

            stores[1].sync = sync  # type: ignore[method-assign]
            stores[1].apply_group = apply_group  # type: ignore[method-assign]
            for path in ("nodes", "nodes/node1", "nodes/node1/qemu-server",
                         "nodes/node2", "nodes/node2/qemu-server"):
                assert await b1.submit(Op.mkdir(path, T)) == 0
                assert events[-2:] == ["apply", "sync"], events
            assert await b2.submit(Op.create("nodes/node2/qemu-server/100.conf", T,
                                             excl=True)) == 0
            assert await b3.submit(Op.write("nodes/node2/qemu-server/100.conf", 0,
                                            b"cores: 2\n", T)) == 0
            codes = await asyncio.gather(
                b1.submit(Op.create("nodes/node1/qemu-server/101.conf", T, excl=True)),
                b2.submit(Op.create("nodes/node2/qemu-server/101.conf", T, excl=True)))
            assert sorted(codes) == [0, errno.EEXIST]
            await network.settle()
            for store in stores.values():
                assert store.read_file("nodes/node2/qemu-server/100.conf") == b"cores: 2\n"
            assert len({(s.state.version, s.state.tree.digest) for s in stores.values()}) == 1
            # node 3's change feed saw the others' ops, not its own
            assert "nodes/node1/qemu-server" in [op.path for op in changes]
            assert all(op.kind.name != "WRITE" for op in changes)
            # without quorum: EACCES at once, nothing changes; reads still work
            quorate[3] = False
            assert await b3.submit(Op.mkdir("x", T)) == errno.EACCES
            assert not b3.quorate()
            assert stores[3].read_file("nodes/node2/qemu-server/100.conf") == b"cores: 2\n"
            quorate[3] = True
            members = json.loads(b1.virtual_file(".members") or b"")
            assert members["cluster"]["name"] == "lab"
            assert members["nodelist"]["node1"] == {"id": 1, "online": 1, "ip": "10.0.0.1"}
            vmlist = json.loads(b3.virtual_file(".vmlist") or b"")
            assert vmlist["ids"]["100"]["node"] == "node2"
            assert "101" in vmlist["ids"]
            version = json.loads(b2.virtual_file(".version") or b"")
            assert version["vmlist"] == stores[2].state.guests_version
            b2.log(6, "probe", "hello from 2")
            await network.settle()
            await asyncio.sleep(0.05)
            for backend in backends.values():
                log = json.loads(backend.virtual_file(".clusterlog") or b"")
                assert [e["msg"] for e in log["data"]] == ["hello from 2"]
            assert b1.virtual_file("storage.cfg") is None
            assert b1.status()["phase"] == "synced"

    run(main)


def test_backend_with_quorum_service_partition_and_heal(tmp_path: pathlib.Path,
                                                        run: Any) -> None:
    """The real QuorumService gates writes: the minority side answers EACCES
    and keeps its tree; after the heal it catches up and writes again."""
    from corral.quorum.config import QuorumConfig
    from corral.quorum.service import QuorumService

    async def main() -> None:
        network = fakenode().FakeNetwork([1, 2, 3])
        config = QuorumConfig.from_options({}, {1: 1, 2: 1, 3: 1})
        cpgs = {n: CpgService(network.nodes[n]) for n in (1, 2, 3)}
        quorums = {n: QuorumService(cpgs[n], config) for n in (1, 2, 3)}
        stores = {n: Store(tmp_path / f"q{n}", durability=Durability.PROCESS) for n in (1, 2, 3)}
        backends = {n: ReplicatedBackend(stores[n], cpgs[n], quorums[n], f"node{n}")
                    for n in (1, 2, 3)}
        network.start()
        try:
            for n in (1, 2, 3):
                await quorums[n].start()
                await backends[n].start()
            network.configure([[1, 2, 3]])
            for n in (1, 2, 3):
                await quorums[n].wait_quorate()
                await backends[n].wait_synced()
            assert await backends[1].submit(Op.mkdir("d", T)) == 0
            network.configure([[1, 2], [3]])
            await network.settle()
            await asyncio.sleep(0.05)
            assert not quorums[3].quorate
            before = (stores[3].state.version, stores[3].state.tree.digest)
            assert await backends[3].submit(Op.mkdir("minority", T)) == errno.EACCES
            for i in range(5):
                assert await backends[2].submit(Op.create(f"d/f{i}", T)) == 0
            assert (stores[3].state.version, stores[3].state.tree.digest) == before
            network.configure([[1, 2, 3]])
            await quorums[3].wait_quorate()
            for _ in range(200):
                await network.settle()
                if all(b.core.phase.value == "synced" and b.core.members == (1, 2, 3)
                       for b in backends.values()):
                    break
                await asyncio.sleep(0.01)
            assert await backends[3].submit(Op.create("d/after", T)) == 0
            await network.settle()
            await asyncio.sleep(0.05)
            states = {(s.state.version, s.state.tree.digest) for s in stores.values()}
            assert len(states) == 1
            assert stores[3].state.tree.lookup("d/f4") is not None
        finally:
            for backend in backends.values():
                await backend.stop()
            for quorum in quorums.values():
                await quorum.stop()
            await network.stop()
            for store in stores.values():
                store.close()

    run(main)
