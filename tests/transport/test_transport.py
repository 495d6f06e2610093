"""The UDP transport (corral.totem.transport) on real sockets at 127.88.x.y, on both
loops: links come up after pongs, broadcast reaches every other node but not the
sender (its core handles its own packets), unicast reaches one node (to itself
in-process), passive failover moves traffic to the next link
by priority when a link dies, packets from unlisted
addresses and garbage are dropped and counted; and LinkMonitor's up/down rules."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from corral.totem.auth import PacketAuthenticator
from corral.totem.transport import BROADCAST, LinkMonitor, LinkState, PeerLink, UdpTransport

from .conftest import KEY, free_port, make_config, wait_for


def make_transports(n_nodes: int, n_links: int, secauth: bool = False) -> list[UdpTransport]:
    config = make_config(n_nodes, n_links, free_port(), secauth=secauth)
    ids = [node.nodeid for node in config.nodes]
    transports = []
    for nodeid in ids:
        authenticator = PacketAuthenticator(KEY, config.cluster_name, nodeid, 1, ids,
                                            encrypt=secauth)
        transports.append(UdpTransport(config, nodeid, authenticator))
    return transports


def collect(transport: UdpTransport) -> list[tuple[int, bytes]]:
    received: list[tuple[int, bytes]] = []
    transport.on_batch = received.extend
    return received


def all_up(transports: list[UdpTransport]) -> bool:
    return all(row["state"] != "down" for t in transports for row in t.link_status())


def test_links_up_broadcast_and_unicast(run: Callable[[Any], Any]) -> None:
    async def scenario() -> None:
        transports = make_transports(3, 2, secauth=True)
        inboxes = [collect(t) for t in transports]
        for transport in transports:
            await transport.start()
        try:
            await wait_for(lambda: all_up(transports))
            transports[0].send(BROADCAST, b"to everyone")
            transports[1].send(3, b"to three")
            transports[2].send(3, b"to myself")
            await wait_for(lambda: len(inboxes[1]) >= 1 and len(inboxes[2]) >= 3)
            await asyncio.sleep(0.05)
            # the sender gets no copy of its own broadcast (its core already has it)
            assert inboxes[0] == []
            assert inboxes[1] == [(1, b"to everyone")]
            assert sorted(inboxes[2]) == [(1, b"to everyone"), (2, b"to three"),
                                          (3, b"to myself")]
            # link 0 has the higher priority: totem traffic used it
            assert transports[1].counters["tx_totem_link0"] == 1
            assert transports[1].counters["tx_totem_link1"] == 0
            rtts = [row["rtt_ms"] for row in transports[0].link_status() if row["nodeid"] != 1]
            assert all(rtt is not None for rtt in rtts)
        finally:
            for transport in transports:
                transport.close()

    run(scenario())


def test_passive_failover_and_recovery(run: Callable[[Any], Any]) -> None:
    async def scenario() -> None:
        transports = make_transports(2, 2)
        inbox = collect(transports[1])
        collect(transports[0])
        for transport in transports:
            await transport.start()
        try:
            await wait_for(lambda: all_up(transports))
            before = transports[1].counters["rx_link1"]
            transports[0].send(2, b"on link 0")
            await wait_for(lambda: len(inbox) == 1)
            # cut link 0 at node 2: its link-0 socket goes away, pongs stop
            transports[1]._sockets.pop(0).close()
            peer = transports[0].monitor.peers[(2, 0)]
            await wait_for(lambda: peer.state is LinkState.DOWN, 3.0)
            transports[0].send(2, b"on link 1")
            await wait_for(lambda: len(inbox) == 2)
            assert inbox[1] == (1, b"on link 1")
            assert transports[1].counters["rx_link1"] > before
            assert transports[0].counters["tx_totem_link0"] == 1
            assert transports[0].counters["tx_totem_link1"] == 1
            assert peer.times_down == 1
        finally:
            for transport in transports:
                transport.close()

    run(scenario())


def test_all_links_down_still_sends_on_best_link(run: Callable[[Any], Any]) -> None:
    async def scenario() -> None:
        transports = make_transports(2, 2)
        collect(transports[0])
        inbox = collect(transports[1])
        await transports[0].start()
        try:
            await asyncio.sleep(0.2)  # node 2 not started: its links stay down
            assert not transports[0].connected(2)
            await transports[1].start()
            transports[0].send(2, b"sent anyway")  # before any pong arrived
            assert transports[0].counters["tx_no_link_up"] == 1
            assert transports[0].counters["tx_totem_link0"] == 1  # highest priority
            await wait_for(lambda: inbox == [(1, b"sent anyway")])
        finally:
            for transport in transports:
                transport.close()

    run(scenario())


def test_garbage_and_unlisted_sources_dropped(run: Callable[[Any], Any]) -> None:
    async def scenario() -> None:
        transports = make_transports(3, 1)
        inbox = collect(transports[0])
        await transports[0].start()
        port = transports[0].config.links[0].port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listed, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unlisted:
                listed.bind(("127.88.1.3", 0))  # node 3's address, node 3 not running
                unlisted.bind(("127.88.1.77", 0))
                for size in (0, 5, 60, 500):
                    listed.sendto(b"\xaa" * size, ("127.88.1.1", port))
                    unlisted.sendto(b"\xaa" * size, ("127.88.1.1", port))
            await wait_for(lambda: transports[0].counters["rx_packets"] >= 8)
            stats = transports[0].stats()
            assert stats["rx_dropped_unlisted_address"] == 4
            assert stats["drop_malformed"] == 4
            assert inbox == []
        finally:
            transports[0].close()

    run(scenario())


def make_monitor() -> tuple[LinkMonitor, PeerLink, PeerLink]:
    monitor = LinkMonitor({0: 2, 1: 2}, {0: 100, 1: 100})
    fast = PeerLink(2, 0, priority=10, address=("a", 1))
    slow = PeerLink(2, 1, priority=5, address=("b", 1))
    monitor.add(fast)
    monitor.add(slow)
    return monitor, fast, slow


def test_link_monitor_up_after_pong_count_down_after_timeout() -> None:
    monitor, fast, slow = make_monitor()
    assert monitor.best_link(2, [0, 1]) is None
    assert not monitor.on_pong(10, 2, 0, 5)
    assert monitor.on_pong(20, 2, 0, 15)  # second pong in a row: up
    assert monitor.best_link(2, [0, 1]) is fast
    monitor.on_pong(20, 2, 1, 15)
    monitor.on_pong(30, 2, 1, 25)
    assert monitor.best_link(2, [0, 1]) is fast  # higher priority wins
    assert monitor.check(115) == []  # 95 ns since last pong: still up
    assert monitor.check(125) == [fast]  # fast timed out, slow (last at 30) not yet
    assert monitor.best_link(2, [0, 1]) is slow
    assert monitor.check(140) == [slow]
    assert monitor.best_link(2, [0, 1]) is None


def test_link_monitor_ignores_stale_and_future_pongs() -> None:
    monitor, fast, _ = make_monitor()
    assert not monitor.on_pong(1000, 2, 0, 10)  # older than the timeout
    assert not monitor.on_pong(1000, 2, 0, 20)
    assert fast.state is LinkState.DOWN
    assert not monitor.on_pong(1000, 2, 0, 5000)  # from the future
    assert not monitor.on_pong(1000, 9, 0, 990)  # unknown node
    assert fast.pongs_in_a_row == 0
