"""Shared helpers of the transport tests: a private 127.88.x.y address plan, a free
port, a cluster config with fast link pings, and running a coroutine on the stock
asyncio loop and on uvloop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from corral.corosync_conf import ClusterConfig, render_cluster

KEY = bytes(range(200))


def free_port(host: str = "127.88.1.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def make_config(n_nodes: int, n_links: int, port: int, secauth: bool = False,
                ping_interval_ms: int = 20, ping_timeout_ms: int = 150) -> ClusterConfig:
    nodes = [(i, f"n{i}", [f"127.88.{link + 1}.{i}" for link in range(n_links)])
             for i in range(1, n_nodes + 1)]
    text = render_cluster("tptest", nodes, secauth=secauth, port=port)
    text = text.replace("    mcastport:", f"    knet_ping_interval: {ping_interval_ms}\n"
                        f"        knet_ping_timeout: {ping_timeout_ms}\n        mcastport:")
    return ClusterConfig.from_text(text)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        if request.param == "uvloop":
            return uvloop.run(coro)
        return asyncio.run(coro)

    return runner


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0,
                   step: Callable[[], Awaitable[None]] | None = None) -> None:
    """Poll `predicate` every 10 ms (tests only) until true or fail after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
