"""A fake Totem for the asyncio CPG tests: nodes with bounded send queues (so
submit() can say False and wait_writable() can block), one delivery task that
hands each queued message to every member of the sender's ring in turn, and
scripted configuration changes with a transitional then a regular event, as
the real Totem core reports them."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from corral.cpg.core import CONF_TRANSITIONAL, EV_CONFIG, EV_DELIVER

CONF_REGULAR = 0 if CONF_TRANSITIONAL != 0 else 1
Listener = Callable[[tuple[object, ...]], None]


class FakeNode:
    def __init__(self, network: FakeNetwork, nodeid: int, capacity: int) -> None:
        self.network = network
        self.nodeid = nodeid
        self.capacity = capacity
        self.queue: deque[bytes] = deque()
        self.listeners: list[Listener] = []
        self.writable_waiters: list[asyncio.Future[None]] = []
        self.submit_refusals = 0

    def submit(self, payload: bytes) -> bool:
        if len(self.queue) >= self.capacity:
            self.submit_refusals += 1
            return False
        self.queue.append(payload)
        self.network.kick()
        return True

    async def wait_writable(self) -> None:
        while len(self.queue) >= self.capacity:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.writable_waiters.append(future)
            await future

    def add_listener(self, callback: Listener) -> None:
        self.listeners.append(callback)

    def emit(self, event: tuple[object, ...]) -> None:
        for listener in self.listeners:
            listener(event)

    def popped(self) -> None:
        waiters, self.writable_waiters = self.writable_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)


class FakeNetwork:
    def __init__(self, nodeids: list[int], capacity: int = 64) -> None:
        self.nodes = {n: FakeNode(self, n, capacity) for n in nodeids}
        self.ring_of: dict[int, tuple[int, ...]] = {n: () for n in nodeids}
        self.seq = 0
        self.paused = False
        self._work: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._turn = 0

    def start(self) -> None:
        self._work = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def kick(self) -> None:
        if self._work is not None:
            self._work.set()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.kick()

    def configure(self, rings: list[list[int]]) -> None:
        for ring in rings:
            for nodeid in ring:
                trans = tuple(sorted(set(self.ring_of[nodeid]) & set(ring) | {nodeid}))
                left = tuple(n for n in self.ring_of[nodeid] if n not in ring)
                self.nodes[nodeid].emit((EV_CONFIG, CONF_TRANSITIONAL, (0, 0), trans, (), left))
        for ring in rings:
            self.seq += 4
            members = tuple(sorted(ring))
            for nodeid in ring:
                joined = tuple(n for n in ring if n not in self.ring_of[nodeid])
                self.ring_of[nodeid] = members
                self.nodes[nodeid].emit(
                    (EV_CONFIG, CONF_REGULAR, (members[0], self.seq), members, joined, ())
                )
        self.kick()

    def step(self) -> bool:
        senders = [n for n, node in self.nodes.items() if node.queue and self.ring_of[n]]
        if not senders or self.paused:
            return False
        self._turn += 1
        sender = senders[self._turn % len(senders)]
        payload = self.nodes[sender].queue.popleft()
        for nodeid in self.ring_of[sender]:
            self.nodes[nodeid].emit((EV_DELIVER, sender, payload))
        self.nodes[sender].popped()
        return True

    async def _run(self) -> None:
        assert self._work is not None
        while True:
            while self.step():
                await asyncio.sleep(0)
            self._work.clear()
            await self._work.wait()

    async def settle(self) -> None:
        """Wait until every queue is empty (or delivery is paused)."""
        for _ in range(100_000):
            busy = any(node.queue for node in self.nodes.values()) and not self.paused
            if not busy:
                for _ in range(5):
                    await asyncio.sleep(0)
                if not any(node.queue for node in self.nodes.values()) or self.paused:
                    return
            await asyncio.sleep(0)
        raise AssertionError("network did not settle")
