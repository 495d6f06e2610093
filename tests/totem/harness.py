"""In-memory harness for Totem cores: a few cores, a queue-based network and simulated time.

The network is a priority queue of (arrival time, order) packet copies; each link
has a fixed one-way delay (FIFO), optional random loss from a seeded RNG, and can
be cut (partitions, crashes). Time only moves when the harness jumps to the next
packet arrival or core deadline, so minutes of protocol time run in milliseconds
of CPU. The harness honours persist-then-send: it takes the ring seq to persist
before it takes a core's outbox.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.totem._core import (
    BROADCAST,
    CONF_REGULAR,
    CONF_TRANSITIONAL,
    EV_CONFIG,
    EV_DELIVER,
    STATE_OPERATIONAL,
    TotemCore,
)
from corral.totem.config import NS_PER_MS, TotemConfig, TotemTimers

LINK_DELAY_NS = 100_000
# A run stops with an error after this many steps without reaching its goal.
STEPS_MAX = 5_000_000


@dataclass
class NodeLog:
    delivered: list[tuple[int, bytes]] = field(default_factory=list)
    # Every event in order: ("msg", sender, payload) or ("conf", kind, ring, members, joined, left)
    events: list[tuple[object, ...]] = field(default_factory=list)
    persisted_ring_seq: int = 0


class Cluster:
    def __init__(
        self,
        nodeids: tuple[int, ...],
        *,
        config: TotemConfig | None = None,
        loss: float = 0.0,
        seed: int = 1,
        link_delay_ns: int = LINK_DELAY_NS,
        jitter_ns: int = 0,
        duplicate: float = 0.0,
    ) -> None:
        self.nodeids = tuple(sorted(nodeids))
        self.config = config or TotemConfig(token=1000)
        self.timers: TotemTimers = self.config.timers(len(self.nodeids))
        self.loss = loss
        self.rng = random.Random(seed)
        self.link_delay_ns = link_delay_ns
        # jitter > 0 breaks per-link FIFO order (reordering); duplicate is the
        # probability that a packet copy is delivered twice.
        self.jitter_ns = jitter_ns
        self.duplicate = duplicate
        self.now_ns = 0
        self.cores: dict[int, TotemCore] = {}
        self.logs: dict[int, NodeLog] = {n: NodeLog() for n in self.nodeids}
        self.cut: set[tuple[int, int]] = set()
        # Optional filter: return True to drop a packet (source, target, packet).
        self.drop_filter: Callable[[int, int, bytes], bool] | None = None
        self.packets_sent = 0
        self._queue: list[tuple[int, int, int, bytes]] = []
        self._order = 0

    # -- control ---------------------------------------------------------------

    def start(self, *nodeids: int) -> None:
        for nodeid in nodeids or self.nodeids:
            core = TotemCore(nodeid, self.timers, ring_seq=self.logs[nodeid].persisted_ring_seq)
            self.cores[nodeid] = core
            core.start(self.now_ns)
            self._drain(nodeid)

    def crash(self, nodeid: int) -> None:
        """The node stops at once: no leave message, its queued packets are lost."""
        del self.cores[nodeid]
        self.logs[nodeid].events.append(("stop",))
        self._queue = [item for item in self._queue if item[2] != nodeid]
        heapq.heapify(self._queue)

    def leave(self, nodeid: int) -> None:
        self.cores[nodeid].leave(self.now_ns)
        self._drain(nodeid)
        del self.cores[nodeid]
        self.logs[nodeid].events.append(("stop",))

    def partition(self, *groups: tuple[int, ...]) -> None:
        self.cut = set()
        for a in self.nodeids:
            for b in self.nodeids:
                if not any(a in g and b in g for g in groups):
                    self.cut.add((a, b))

    def heal(self) -> None:
        self.cut = set()

    def submit(self, nodeid: int, payload: bytes) -> bool:
        ok = self.cores[nodeid].submit(payload)
        self._drain(nodeid)
        return ok

    # -- running ---------------------------------------------------------------

    def run_for(self, duration_ns: int) -> None:
        self.run_until(lambda: False, duration_ns, must=False)

    def run_until(
        self, goal: Callable[[], bool], timeout_ns: int, *, must: bool = True
    ) -> int:
        """Step until goal() holds; returns the simulated time it took."""
        start = self.now_ns
        end = start + timeout_ns
        for _ in range(STEPS_MAX):
            if goal():
                return self.now_ns - start
            if not self._step(end):
                if must and not goal():
                    raise AssertionError(f"goal not reached within {timeout_ns / 1e9:.3f} s")
                return self.now_ns - start
        raise AssertionError("step budget exhausted")

    def _step(self, end_ns: int) -> bool:
        next_packet = self._queue[0][0] if self._queue else None
        next_timer, timer_node = None, 0
        for nodeid, core in self.cores.items():
            deadline = core.next_deadline_ns()
            if deadline >= 0 and (next_timer is None or deadline < next_timer):
                next_timer, timer_node = deadline, nodeid
        candidates = [t for t in (next_packet, next_timer) if t is not None]
        if not candidates or min(candidates) > end_ns:
            self.now_ns = end_ns
            return False
        if next_timer is not None and (next_packet is None or next_timer <= next_packet):
            self.now_ns = max(self.now_ns, next_timer)
            self.cores[timer_node].tick(self.now_ns)
            self._drain(timer_node)
            return True
        arrival, _, dest, packet = heapq.heappop(self._queue)
        self.now_ns = max(self.now_ns, arrival)
        core = self.cores.get(dest)
        if core is not None:
            core.receive(self.now_ns, packet)
            self._drain(dest)
        return True

    def _drain(self, nodeid: int) -> None:
        core = self.cores.get(nodeid)
        if core is None:
            return
        log = self.logs[nodeid]
        seq = core.take_ring_seq_to_persist()
        if seq is not None:
            log.persisted_ring_seq = seq
        for dest, packet in core.pop_outbox():
            targets = [n for n in self.nodeids if n != nodeid] if dest == BROADCAST else [dest]
            for target in targets:
                self._transmit(nodeid, target, packet)
        for event in core.pop_events():
            if event[0] == EV_DELIVER:
                log.delivered.append((event[1], event[2]))
                log.events.append(("msg", event[1], event[2]))
            elif event[0] == EV_CONFIG:
                log.events.append(("conf", *event[1:]))

    def _transmit(self, source: int, target: int, packet: bytes) -> None:
        self.packets_sent += 1
        if (source, target) in self.cut:
            return
        if self.loss and self.rng.random() < self.loss:
            return
        if self.drop_filter is not None and self.drop_filter(source, target, packet):
            return
        copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            delay = self.link_delay_ns
            if self.jitter_ns:
                delay += self.rng.randrange(self.jitter_ns)
            self._order += 1
            heapq.heappush(self._queue, (self.now_ns + delay, self._order, target, packet))

    # -- observations ------------------------------------------------------------

    def operational(self, nodeids: tuple[int, ...] | None = None) -> bool:
        """All given nodes operational in one ring whose members are exactly them."""
        nodeids = tuple(sorted(nodeids or self.cores))
        rings = {self.cores[n].ring_id for n in nodeids}
        return (
            len(rings) == 1
            and all(self.cores[n].state == STATE_OPERATIONAL for n in nodeids)
            and all(self.cores[n].members == nodeids for n in nodeids)
        )

    def configs(self, nodeid: int, kind: int | None = None) -> list[tuple[object, ...]]:
        return [e for e in self.logs[nodeid].events if e[0] == "conf" and (kind is None or e[1] == kind)]

    def regular_configs(self, nodeid: int) -> list[tuple[object, ...]]:
        return self.configs(nodeid, CONF_REGULAR)

    def transitional_configs(self, nodeid: int) -> list[tuple[object, ...]]:
        return self.configs(nodeid, CONF_TRANSITIONAL)


def ms(value: float) -> int:
    return int(value * NS_PER_MS)


def seconds(value: float) -> int:
    return int(value * 1_000_000_000)
