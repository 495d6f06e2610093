"""CPU cost of the Totem core: per token hop and per application message.

Three cores run in memory with a zero-delay, lossless network (a FIFO of
packets); nothing but the cores' own work is measured, in steady state (the
ring is formed before timing starts).

Run:  .venv/bin/python -m pytest bench/bench_totem_core.py --benchmark-only
 or:  .venv/bin/python bench/bench_totem_core.py      (prints the figures)

- token hop: one core receiving the regular token, finding nothing to send and
  forwarding it (the idle full-speed rotation cost; hold is disabled here).
- message, 1 KiB and 64 B: submit, pack into frames, multicast, store, order
  and deliver on all 3 nodes, divided by the number of messages; so it is the
  whole ring's CPU per message (the reference, corosync, moves ~24k msg/s of
  1 KiB through 3 nodes on this box, i.e. ~42 us per message for 3 daemons).
"""

from __future__ import annotations

import time
from collections import deque

from corral.totem._core import BROADCAST, STATE_OPERATIONAL, TotemCore
from corral.totem.config import TotemConfig

NODES = (1, 2, 3)
HOPS_PER_ROUND = 3000
MESSAGES_PER_ROUND = 6000


class MemoryRing:
    """Three started cores and a FIFO network; `pump()` runs until quiet."""

    def __init__(self, config: TotemConfig) -> None:
        timers = config.timers(len(NODES))
        self.now_ns = 0
        self.cores = {n: TotemCore(n, timers) for n in NODES}
        self.queue: deque[tuple[int, bytes]] = deque()
        self.delivered = 0
        for core in self.cores.values():
            core.start(0)
            self._drain(core)
        while not all(c.state == STATE_OPERATIONAL and c.members == NODES
                      for c in self.cores.values()):
            if not self.pump(100):
                raise AssertionError("ring did not form")
        assert all(c.state == STATE_OPERATIONAL and c.members == NODES for c in self.cores.values())

    def _drain(self, core: TotemCore) -> None:
        core.take_ring_seq_to_persist()
        for dest, packet in core.pop_outbox():
            if dest == BROADCAST:
                for other in NODES:
                    if other != core.nodeid:
                        self.queue.append((other, packet))
            else:
                self.queue.append((dest, packet))
        self.delivered += sum(1 for e in core.pop_events() if e[0] == 1)

    def pump(self, steps: int) -> int:
        """Deliver up to `steps` packets (advancing time 1 us each); returns how many."""
        done = 0
        cores = self.cores
        queue = self.queue
        while done < steps:
            if not queue:
                # Only "due now" deadlines (hold cancel, resume) matter here:
                # the network never loses anything, so no timeout is needed.
                for core in cores.values():
                    deadline = core.next_deadline_ns()
                    if 0 <= deadline <= self.now_ns:
                        core.tick(self.now_ns)
                        self._drain(core)
                if not queue:
                    break
            dest, packet = queue.popleft()
            self.now_ns += 1000
            core = cores[dest]
            core.receive(self.now_ns, packet)
            self._drain(core)
            done += 1
        return done


def _token_ring() -> MemoryRing:
    # seqno_unchanged_const at its maximum: the ring must not go into hold.
    return MemoryRing(TotemConfig(token=3000, seqno_unchanged_const=10_000))


def _run_messages(ring: MemoryRing, size: int, count: int) -> None:
    payload = bytes(size)
    target = ring.delivered + count * len(NODES)
    per_node = count // len(NODES)
    for core in ring.cores.values():
        for _ in range(per_node):
            core.submit(payload)
    while ring.delivered < target:
        if not ring.pump(10_000):
            raise AssertionError("ring went quiet before delivering everything")


def test_token_hop(benchmark) -> None:  # type: ignore[no-untyped-def]
    def setup() -> tuple[tuple[MemoryRing], dict]:
        return (_token_ring(),), {}

    benchmark.pedantic(lambda ring: ring.pump(HOPS_PER_ROUND), setup=setup, rounds=20)
    benchmark.extra_info["hops_per_round"] = HOPS_PER_ROUND
    benchmark.extra_info["us_per_hop"] = benchmark.stats.stats.mean / HOPS_PER_ROUND * 1e6


def _message_bench(benchmark, size: int) -> None:  # type: ignore[no-untyped-def]
    ring = MemoryRing(TotemConfig(token=3000))
    benchmark.pedantic(_run_messages, args=(ring, size, MESSAGES_PER_ROUND), rounds=5)
    per_message = benchmark.stats.stats.mean / MESSAGES_PER_ROUND
    benchmark.extra_info["us_per_message_all_nodes"] = per_message * 1e6
    benchmark.extra_info["messages_per_s_cpu_bound"] = 1 / per_message


def test_message_1k(benchmark) -> None:  # type: ignore[no-untyped-def]
    _message_bench(benchmark, 1024)


def test_message_64b(benchmark) -> None:  # type: ignore[no-untyped-def]
    _message_bench(benchmark, 64)


def main() -> None:
    ring = _token_ring()
    start = time.perf_counter()
    hops = ring.pump(HOPS_PER_ROUND)
    hop_us = (time.perf_counter() - start) / hops * 1e6
    print(f"token hop (idle, no hold):       {hop_us:7.2f} us (incl. the in-memory network)")
    for size in (64, 1024, 16384):
        ring = MemoryRing(TotemConfig(token=3000))
        count = 30_000 if size <= 1024 else 3000
        start = time.perf_counter()
        _run_messages(ring, size, count)
        elapsed = time.perf_counter() - start
        print(f"message {size:5d} B, 3 nodes:       {elapsed / count * 1e6:7.2f} us/msg "
              f"(all 3 cores) = {count / elapsed:9.0f} msg/s CPU-bound")


if __name__ == "__main__":
    main()
