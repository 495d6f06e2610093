"""Simulated network: one directed link per ordered pair of nodes.

Every packet copy gets a one-way delay (a minimum plus an exponential part);
faults add loss, duplication, a long delay tail, per-packet jitter that breaks
FIFO order (reordering), and cut links (partitions are symmetric cuts, asym
faults cut one direction only). Without the reorder fault each link is FIFO.
Cuts are reference-counted so overlapping partitions heal independently.

`BROADCAST` fans out to every configured node. A node's packets to itself
(loopback) go through a separate fault-free path with `LOOPBACK_DELAY_NS`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from corral.sim.faults import FaultPlan
from corral.sim.scheduler import Scheduler

BROADCAST = 0
BASE_DELAY_MIN_NS = 100_000
BASE_DELAY_MEAN_NS = 50_000
LOOPBACK_DELAY_NS = 1_000


@dataclass(slots=True)
class NetworkStats:
    sent: int = 0
    dropped_cut: int = 0
    dropped_loss: int = 0
    duplicated: int = 0


class SimNetwork:
    def __init__(
        self,
        nodeids: tuple[int, ...],
        rng: random.Random,
        scheduler: Scheduler,
        *,
        loopback: bool,
        on_drop: Callable[[str, int, int, bytes], None] | None = None,
    ) -> None:
        self.nodeids = tuple(sorted(nodeids))
        self.rng = rng
        self.scheduler = scheduler
        self.loopback = loopback
        self.plan = FaultPlan()
        self.stats = NetworkStats()
        self._cuts: dict[tuple[int, int], int] = {}
        self._last_arrival_ns: dict[tuple[int, int], int] = {}
        self._on_drop = on_drop

    # -- faults -----------------------------------------------------------------

    def set_plan(self, plan: FaultPlan) -> None:
        self.plan = plan

    def cut(self, links: list[tuple[int, int]]) -> None:
        for link in links:
            self._cuts[link] = self._cuts.get(link, 0) + 1

    def uncut(self, links: list[tuple[int, int]]) -> None:
        for link in links:
            count = self._cuts.get(link, 0) - 1
            if count > 0:
                self._cuts[link] = count
            else:
                self._cuts.pop(link, None)

    def heal_all(self) -> None:
        self._cuts.clear()

    def is_cut(self, source: int, destination: int) -> bool:
        return (source, destination) in self._cuts

    def cut_links(self) -> list[tuple[int, int]]:
        return sorted(self._cuts)

    # -- sending ----------------------------------------------------------------

    def send(self, source: int, destination: int, packet: bytes) -> None:
        if destination == BROADCAST:
            for node in self.nodeids:
                self._send_one(source, node, packet)
        else:
            self._send_one(source, destination, packet)

    def _send_one(self, source: int, destination: int, packet: bytes) -> None:
        self.stats.sent += 1
        now_ns = self.scheduler.now_ns
        if source == destination:
            if self.loopback:
                self.scheduler.at(now_ns + LOOPBACK_DELAY_NS, ("packet", destination, source, packet))
            return
        if (source, destination) in self._cuts:
            self.stats.dropped_cut += 1
            self._drop("cut", source, destination, packet)
            return
        plan = self.plan
        if plan.loss_probability and self.rng.random() < plan.loss_probability:
            self.stats.dropped_loss += 1
            self._drop("loss", source, destination, packet)
            return
        copies = 1
        if plan.dup_probability and self.rng.random() < plan.dup_probability:
            copies = 2
            self.stats.duplicated += 1
        for _ in range(copies):
            arrival_ns = now_ns + self._delay_ns()
            if not plan.reorder_jitter_ns:
                link = (source, destination)
                arrival_ns = max(arrival_ns, self._last_arrival_ns.get(link, 0))
                self._last_arrival_ns[link] = arrival_ns
            self.scheduler.at(arrival_ns, ("packet", destination, source, packet))

    def _delay_ns(self) -> int:
        plan = self.plan
        delay = BASE_DELAY_MIN_NS + int(self.rng.expovariate(1.0 / BASE_DELAY_MEAN_NS))
        if plan.delay_mean_ns:
            delay += int(self.rng.expovariate(1.0 / plan.delay_mean_ns))
        if plan.reorder_jitter_ns:
            delay += self.rng.randrange(plan.reorder_jitter_ns)
        return delay

    def _drop(self, why: str, source: int, destination: int, packet: bytes) -> None:
        if self._on_drop is not None:
            self._on_drop(why, source, destination, packet)
