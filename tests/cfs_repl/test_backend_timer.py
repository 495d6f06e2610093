"""The backend's one loop timer follows the core's next deadline: with a
50 ms verification period the lowest member keeps asking and every member
keeps counting rounds while ops flow (the timer is re-armed only when the
deadline moves, so a fired timer must still lead to the next one)."""

from __future__ import annotations

import asyncio
import pathlib

from tests.cfs_repl.common import fake_cluster

from corral.cfs.ops import Op
from corral.cfs.replica_core import ReplicaConfig

T = 1795720870


def test_verification_timer_keeps_firing(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        config = ReplicaConfig(verify_interval_ns=50_000_000)
        async with fake_cluster(tmp_path, config=config) as (_network, _stores, backends):
            assert await backends[2].submit(Op.mkdir("d", T)) == 0
            for i in range(20):
                assert await backends[1 + i % 3].submit(Op.create(f"d/f{i}", T)) == 0
                await asyncio.sleep(0.02)
            for _ in range(200):
                if all(b.core.counters["verify_rounds"] >= 8 for b in backends.values()):
                    break
                await asyncio.sleep(0.02)
            assert all(b.core.counters["verify_rounds"] >= 8 for b in backends.values()), \
                [b.core.counters["verify_rounds"] for b in backends.values()]
            assert all(b.core.counters["repairs"] == 0 for b in backends.values())

    asyncio.run(asyncio.wait_for(main(), 60))
