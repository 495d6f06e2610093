"""The asyncio driver (corral.totem.node.TotemNode) over real UDP transports, with the
tiny FakeCore of tests/transport/fakecore.py standing in for TotemCore, on both
loops: the core's timer is re-armed and fires, membership events and deliveries
reach listeners (per event and per batch) in order, the ring seq is on disk before any packet sent under it
(persist, then send), submit() reports backpressure and wait_writable() resumes,
stop() sends the leave that the others see, status() reports ring and links, and
a listener or core that raises stops the node."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

from corral.errors import InvariantError, UsageError
from corral.totem.auth import PacketAuthenticator
from corral.totem.config import TotemConfig
from corral.totem.node import TotemNode, load_ring_seq, store_ring_seq
from corral.totem.transport import UdpTransport

from .conftest import KEY, free_port, make_config, wait_for
from .fakecore import EV_CONFIG, EV_DELIVER, HEADER, FakeCore


class CheckingTransport(UdpTransport):
    """Fails the test if a packet leaves before its ring seq is on disk."""

    state_dir = ""
    violations = 0

    def send(self, dest: int, payload: bytes) -> None:
        _kind, sender, ring_seq = HEADER.unpack_from(payload)
        if load_ring_seq(self.state_dir, sender) < ring_seq:
            self.violations += 1
        super().send(dest, payload)


def make_nodes(n_nodes: int, state_root: str) -> list[TotemNode]:
    config = make_config(n_nodes, 1, free_port())
    ids = [node.nodeid for node in config.nodes]
    timers = TotemConfig().timers(n_nodes)
    nodes = []
    for nodeid in ids:
        authenticator = PacketAuthenticator(KEY, config.cluster_name, nodeid, 1, ids)
        transport = CheckingTransport(config, nodeid, authenticator)
        transport.state_dir = os.path.join(state_root, f"n{nodeid}")
        nodes.append(TotemNode(nodeid, timers, transport, transport.state_dir,
                               core_factory=FakeCore))
    return nodes


def test_formation_delivery_persist_and_leave(run: Callable[[Any], Any], tmp_path: Any) -> None:
    async def scenario() -> None:
        nodes = make_nodes(3, str(tmp_path))
        events: dict[int, list[tuple[Any, ...]]] = {n.nodeid: [] for n in nodes}
        batches: dict[int, list[list[tuple[Any, ...]]]] = {n.nodeid: [] for n in nodes}
        # Per node: how many events the per-event listener (registered first) had
        # seen when the batch listener got each run.
        seen_before: dict[int, list[int]] = {n.nodeid: [] for n in nodes}
        for node in nodes:
            node.add_listener(events[node.nodeid].append)

            def on_run(run: list[tuple[Any, ...]], nodeid: int = node.nodeid) -> None:
                batches[nodeid].append(run)
                seen_before[nodeid].append(len(events[nodeid]))

            node.add_batch_listener(on_run)
            await node.start()
        try:
            await wait_for(lambda: all(n.core.members == (1, 2, 3) for n in nodes))
            assert nodes[0].submit(b"hello")
            await wait_for(lambda: all(
                (EV_DELIVER, 1, b"hello") in events[n.nodeid] for n in nodes))
            # FakeCore forms its membership from heartbeats, before the links have
            # had their pongs: wait for those separately.
            await wait_for(lambda: all(
                row["state"] != "down" for n in nodes for row in n.transport.link_status()))
            for node in nodes:
                configs = [e for e in events[node.nodeid] if e[0] == EV_CONFIG]
                assert configs[-1][3] == (1, 2, 3)
                assert load_ring_seq(node.state_dir, node.nodeid) == node.core.ring_seq
                assert node.counters["timer_fires"] >= 2
                status = node.status()
                assert status["members"] == (1, 2, 3)
                assert {row["state"] for row in status["links"]} == {"up", "localhost"}
                assert isinstance(node.transport, CheckingTransport)
                assert node.transport.violations == 0
            for node in nodes:
                # A batch listener sees the same events in the same order, in
                # non-empty lists (one per input).
                runs = batches[node.nodeid]
                assert all(runs)
                assert [e for b in runs for e in b] == events[node.nodeid]
                # Deliveries come in runs, each configuration event alone, and the
                # earlier listener has seen exactly the events up to each run's end.
                assert all(len(b) == 1 for b in runs if any(e[0] != EV_DELIVER for e in b))
                ends = [sum(len(b) for b in runs[:i + 1]) for i in range(len(runs))]
                assert seen_before[node.nodeid] == ends
            await nodes[2].stop()
            await wait_for(lambda: nodes[0].core.members == (1, 2), 1.0)
            assert not nodes[2].running
        finally:
            for node in nodes:
                await node.stop(leave=False)

    run(scenario())


def test_backpressure(run: Callable[[Any], Any], tmp_path: Any) -> None:
    async def scenario() -> None:
        (node,) = make_nodes(1, str(tmp_path))
        await node.start()
        try:
            accepted = 0
            while node.submit(b"x"):
                accepted += 1
            assert accepted == 4
            assert node.counters["submit_rejected"] == 1
            await asyncio.wait_for(node.wait_writable(), 2.0)
            assert node.submit(b"y")
        finally:
            await node.stop()
        with pytest.raises(UsageError):
            node.submit(b"z")

    run(scenario())


def test_failing_listener_stops_node(run: Callable[[Any], Any], tmp_path: Any) -> None:
    async def scenario() -> None:
        (node,) = make_nodes(1, str(tmp_path))

        def broken(event: tuple[Any, ...]) -> None:
            raise RuntimeError("listener bug")

        node.add_listener(broken)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: None)
        await node.start()  # the first event comes from the first timer tick
        with pytest.raises(RuntimeError, match="listener bug"):
            await asyncio.wait_for(node.wait_stopped(), 2.0)
        assert not node.running

    run(scenario())


def test_ring_seq_file(tmp_path: Any) -> None:
    state_dir = str(tmp_path)
    assert load_ring_seq(state_dir, 4) == 0
    store_ring_seq(state_dir, 4, 1234)
    assert load_ring_seq(state_dir, 4) == 1234
    store_ring_seq(state_dir, 4, 1238)
    assert load_ring_seq(state_dir, 4) == 1238
    assert os.listdir(state_dir) == ["ringid_4"]
    with open(os.path.join(state_dir, "ringid_4"), "w") as handle:
        handle.write("garbage")
    with pytest.raises(InvariantError):
        load_ring_seq(state_dir, 4)


def test_restart_resumes_from_persisted_ring_seq(run: Callable[[Any], Any], tmp_path: Any) -> None:
    async def scenario() -> None:
        (node,) = make_nodes(1, str(tmp_path))
        store_ring_seq(node.state_dir, 1, 400)
        (again,) = make_nodes(1, str(tmp_path))
        assert isinstance(again.core, FakeCore)
        assert again.core.initial_ring_seq == 400

    run(scenario())


class ExplodingCore(FakeCore):
    def receive(self, now_ns: int, packet: bytes) -> None:
        raise RuntimeError("core bug")


def test_core_exception_stops_node(run: Callable[[Any], Any], tmp_path: Any) -> None:
    async def scenario() -> None:
        nodes = make_nodes(2, str(tmp_path))
        broken = TotemNode(2, TotemConfig().timers(2), nodes[1].transport, nodes[1].state_dir,
                           core_factory=ExplodingCore)
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        await nodes[0].start()
        await broken.start()
        try:
            with pytest.raises(RuntimeError, match="core bug"):
                await asyncio.wait_for(broken.wait_stopped(), 3.0)
            assert not broken.running
        finally:
            await nodes[0].stop(leave=False)
            await broken.stop(leave=False)

    run(scenario())


class ByteLimitedCore(FakeCore):
    """Refuses by bytes while send_queue_room (messages) still shows room."""

    def submit(self, payload: bytes) -> bool:
        if sum(map(len, self._queue)) + len(payload) > 10:
            return False
        return super().submit(payload)


def test_wait_writable_does_not_spin_on_byte_limit(run: Callable[[Any], Any],
                                                  tmp_path: Any) -> None:
    async def scenario() -> None:
        (template,) = make_nodes(1, str(tmp_path))
        node = TotemNode(1, TotemConfig().timers(1), template.transport, template.state_dir,
                         core_factory=ByteLimitedCore)
        await node.start()
        try:
            assert node.submit(b"x" * 8)
            assert not node.submit(b"x" * 8)
            assert node.core.send_queue_room > 0
            fires = node.counters["timer_fires"]
            await asyncio.wait_for(node.wait_writable(), 2.0)
            assert node.counters["timer_fires"] > fires  # waited for the core to move
            assert node.submit(b"x" * 8)
        finally:
            await node.stop()

    run(scenario())
