"""CPG end to end through real `corral engine` processes on 127.0.0.x: three
engines started with --ipc-socket, a CpgClient on each node joins one group,
every client receives every message in the same order (its own included),
kill -9 of one engine shows up as NODEDOWN on the others, and its restarted
engine's new client is announced as JOIN. Skipped when the Totem core is not
built. Processes are stopped in teardown, also on failure."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral.cpg.events import ConfChg, CpgEvent, Deliver, Member, Reason
from corral.cpg.ipc import CpgClient, CpgClientHandle

try:
    from corral.totem import _core

    HAVE_CORE = hasattr(_core, "TotemCore")
except ImportError:
    HAVE_CORE = False

pytestmark = [
    pytest.mark.realproc,
    pytest.mark.skipif(not HAVE_CORE, reason="the Totem core extension is not built yet"),
]


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[Any]:
    from corral.demo import LocalCluster

    local = LocalCluster(3, str(tmp_path / "c"), prefix="crl-cpg", use_netns=False,
                         totem_options={"token": "1000", "token_coefficient": "0"},
                         stats_interval_s=2.0)
    local.setup()
    try:
        yield local
    finally:
        local.close()
        for nodeid in local.nodeids:
            if os.path.exists(local.log_path(nodeid)):
                with open(local.log_path(nodeid), errors="replace") as handle:
                    sys.stderr.write(f"--- node {nodeid} ---\n{handle.read()[-1500:]}\n")


def socket_path(cluster: Any, nodeid: int) -> str:
    return os.path.join(cluster.node_dir(nodeid), "cpg.sock")


def start(cluster: Any, nodeid: int) -> None:
    cluster.start(nodeid, ["--ipc-socket", socket_path(cluster, nodeid)])


async def connect(cluster: Any, nodeid: int, timeout_s: float = 20) -> CpgClient:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await CpgClient.connect(socket_path(cluster, nodeid))
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def until(handle: CpgClientHandle, predicate: Any, timeout_s: float = 30) -> list[CpgEvent]:
    out: list[CpgEvent] = []

    async def collect() -> None:
        async for event in handle.events():
            out.append(event)
            if predicate(event):
                return
        raise AssertionError("events ended")

    await asyncio.wait_for(collect(), timeout_s)
    return out


def test_cpg_across_real_engines(cluster: Any) -> None:
    for nodeid in cluster.nodeids:
        start(cluster, nodeid)

    async def main() -> None:
        clients = {n: await connect(cluster, n) for n in cluster.nodeids}
        handles = {n: await clients[n].join("realproc") for n in cluster.nodeids}
        pid = os.getpid()
        everyone = (Member(1, pid), Member(2, pid), Member(3, pid))
        for handle in handles.values():
            await until(handle, lambda e: isinstance(e, ConfChg) and e.members == everyone)
        for i in range(30):
            await handles[1 + i % 3].mcast(b"msg-%d" % i)
        orders = []
        for handle in handles.values():
            # Until all 30: an mcast returns once its node accepted it, so msg-28
            # (node 2) may be ordered after msg-29 (node 3) if the token reaches
            # node 3 first. The order must only be the same everywhere.
            delivered: set[bytes] = set()

            def all_in(event: CpgEvent, delivered: set[bytes] = delivered) -> bool:
                if isinstance(event, Deliver):
                    delivered.add(event.payload)
                return len(delivered) == 30

            got = await until(handle, all_in)
            seen = [e.payload for e in got if isinstance(e, Deliver)]
            assert len(seen) == len(set(seen))
            orders.append(seen)
        assert orders[0] == orders[1] == orders[2]
        assert sorted(orders[0]) == sorted(b"msg-%d" % i for i in range(30))

        cluster.kill(3)
        for nodeid in (1, 2):
            await until(handles[nodeid], lambda e: isinstance(e, ConfChg)
                        and e.left == (Member(3, pid, Reason.NODEDOWN),))
        start(cluster, 3)
        fresh = await connect(cluster, 3)
        rejoined = await fresh.join("realproc")
        await until(rejoined, lambda e: isinstance(e, ConfChg) and e.members == everyone)
        for nodeid in (1, 2):
            await until(handles[nodeid], lambda e: isinstance(e, ConfChg) and e.members == everyone)
        await rejoined.mcast(b"back")
        for handle in (handles[1], handles[2], rejoined):
            await until(handle, lambda e: isinstance(e, Deliver) and e.payload == b"back")
        for client in (clients[1], clients[2], fresh):
            await client.finalize()

    asyncio.run(main())
    for nodeid in cluster.nodeids:
        assert cluster.stop(nodeid) == 0
