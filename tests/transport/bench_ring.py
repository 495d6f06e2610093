"""CPU cost of a Totem token hop through the whole shell: three TotemNodes with
the real core, real UdpTransports on 127.88.x.y and AES-256-GCM, in one process
and one loop, so the process CPU time divided by the hops is the shell's cost per
hop (receive, open, core, seal, send, timer) without scheduler noise between
processes. A message every `--period-ms` keeps the token from being held (as
under a light load, when the token circulates continuously).

    .venv/bin/python tests/transport/bench_ring.py [--seconds S] [--profile FILE]

Not a test (not collected by pytest): a measurement tool for docs/transport.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tests.transport.conftest import KEY, free_port, make_config  # noqa: E402

from corral.totem.auth import PacketAuthenticator  # noqa: E402
from corral.totem.node import TotemNode  # noqa: E402
from corral.totem.transport import UdpTransport  # noqa: E402


async def measure(seconds: float, period_ms: float, profile: str | None) -> None:
    config = make_config(3, 1, free_port(), secauth=True, ping_interval_ms=250,
                         ping_timeout_ms=2000)
    ids = [node.nodeid for node in config.nodes]
    state_root = tempfile.mkdtemp(prefix="crl-tp-ring-")
    nodes = []
    for nodeid in ids:
        auth = PacketAuthenticator(KEY, config.cluster_name, nodeid, time.time_ns(), ids,
                                   encrypt=True)
        transport = UdpTransport(config, nodeid, auth)
        nodes.append(TotemNode(nodeid, config.totem.timers(3), transport,
                               os.path.join(state_root, f"n{nodeid}")))
    for node in nodes:
        await node.start()
    try:
        while not all(len(node.core.members) == 3 for node in nodes):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)

        async def load() -> None:
            while True:
                nodes[0].submit(b"x" * 64)
                await asyncio.sleep(period_ms / 1000)

        loader = asyncio.create_task(load())
        await asyncio.sleep(0.3)
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        hops_before = sum(node.core.stats()["tokens_processed"] for node in nodes)
        cpu_before, wall_before = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu_s, wall_s = time.process_time() - cpu_before, time.monotonic() - wall_before
        hops = sum(node.core.stats()["tokens_processed"] for node in nodes) - hops_before
        if profiler is not None and profile:
            profiler.disable()
            profiler.dump_stats(profile)
        loader.cancel()
        print(f"{hops / wall_s:.0f} hops/s, rotation {3 * wall_s / hops * 1e3:.3f} ms, "
              f"CPU per hop {cpu_s / hops * 1e6:.1f} us "
              f"({100 * cpu_s / wall_s:.0f} % of a core)")
    finally:
        for node in nodes:
            await node.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--period-ms", type=float, default=2.0)
    parser.add_argument("--profile")
    args = parser.parse_args()
    import uvloop

    uvloop.run(measure(args.seconds, args.period_ms, args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
