"""Throughput of 3 ReplicatedBackends in one process on the CPG tests' fake
Totem: N guest configs created (CREATE + WRITE of 200 B) with 1 and with 32
concurrent submitters; prints files/s and CPU per file for all 3 replicas.

    .venv/bin/python -m tests.cfs_repl.bench_backend [N]
"""

from __future__ import annotations

import asyncio
import pathlib
import resource
import sys
import tempfile
import time

from tests.cfs_repl.common import load_test_module

from corral.cfs.ops import Op
from corral.cfs.replication import ReplicatedBackend
from corral.cfs.store import Durability, Store
from corral.cpg.service import CpgService

T = 1795720870
fakenode = load_test_module("crl_cfs_repl_fakenode", "cpg/fakenode.py")


async def run(n_files: int, concurrency: int) -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="crl-cfs-repl-bench-"))
    network = fakenode.FakeNetwork([1, 2, 3], capacity=1024)
    stores = {n: Store(root / f"n{n}", durability=Durability.PROCESS) for n in (1, 2, 3)}
    backends = {n: ReplicatedBackend(stores[n], CpgService(network.nodes[n]), lambda: True,
                                     f"node{n}") for n in (1, 2, 3)}
    network.start()
    network.configure([[1, 2, 3]])
    for backend in backends.values():
        await backend.start()
    for backend in backends.values():
        await backend.wait_synced()
    for path in ("nodes", "nodes/node1", "nodes/node1/qemu-server"):
        assert await backends[1].submit(Op.mkdir(path, T)) == 0
    todo = list(range(n_files))
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()

    async def worker() -> None:
        while todo:
            path = f"nodes/node1/qemu-server/{1000 + todo.pop()}.conf"
            assert await backends[1].submit(Op.create(path, T, excl=True)) == 0
            assert await backends[1].submit(Op.write(path, 0, b"x" * 200, T)) == 0

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"{n_files} files, {concurrency} submitters: {n_files / elapsed:.0f} files/s, "
          f"CPU {cpu / n_files * 1e3:.2f} ms per file (3 replicas)")
    stages = backends[1].status().get("submit_stages")
    if isinstance(stages, dict):
        print("  node 1 submit stages (mean us): " + ", ".join(
            f"{k.removesuffix('_mean_us')} {v}" for k, v in stages.items()
            if k.endswith("_mean_us")))
    for backend in backends.values():
        await backend.stop()
    await network.stop()
    for store in stores.values():
        store.close()


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    asyncio.run(run(count, 1))
    asyncio.run(run(count, 32))
