"""What the replication tests share: loading the fake asyncio Totem of the CPG tests
(and the Totem harness) as modules, and three ReplicatedBackends on that fake Totem with
real stores (Durability.PROCESS), started and synced, stopped and closed afterwards."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

from corral.cfs.replication import ReplicatedBackend
from corral.cfs.store import Durability, Store
from corral.cpg.service import CpgService

NODES = (1, 2, 3)
TESTS = pathlib.Path(__file__).resolve().parent.parent


def load_test_module(name: str, relative_path: str) -> ModuleType:
    """A helper file of another test directory (tests/<relative_path>) as a module,
    loaded once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / relative_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fakenode() -> ModuleType:
    return load_test_module("crl_cfs_repl_fakenode", "cpg/fakenode.py")


Stores = dict[int, Store]
Backends = dict[int, ReplicatedBackend]


@asynccontextmanager
async def fake_cluster(tmp_path: pathlib.Path, prefix: str = "n", capacity: int | None = None,
                       pending_limit: int | None = None,
                       quorate: Callable[[int], bool] = lambda _n: True,
                       before_start: Callable[[Stores, Backends], None] | None = None,
                       **backend_options: Any) -> AsyncIterator[tuple[Any, Stores, Backends]]:
    """(network, stores, backends) of nodes 1-3 in one ring, every backend synced.
    `before_start` sees them built but not started (to wrap a store method or add a
    change listener)."""
    network = fakenode().FakeNetwork(list(NODES), **({} if capacity is None
                                                     else {"capacity": capacity}))
    stores = {n: Store(tmp_path / f"{prefix}{n}", durability=Durability.PROCESS) for n in NODES}
    cpg_options = {} if pending_limit is None else {"pending_limit": pending_limit}
    backends = {n: ReplicatedBackend(stores[n], CpgService(network.nodes[n], **cpg_options),
                                     lambda n=n: quorate(n), f"node{n}", **backend_options)
                for n in NODES}
    if before_start is not None:
        before_start(stores, backends)
    network.start()
    network.configure([list(NODES)])
    try:
        for backend in backends.values():
            await backend.start()
        for backend in backends.values():
            await backend.wait_synced()
        yield network, stores, backends
    finally:
        for backend in backends.values():
            await backend.stop()
        await network.stop()
        for store in stores.values():
            store.close()
