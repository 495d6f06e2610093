"""A scripted, totally ordered fake bus for ReplicaCore unit tests: one
global queue of multicasts delivered to every member of the sender's
partition in order, confchgs injected by the test, and an in-memory store
(CfsState over MemoryKV) per node."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from corral.cfs.memkv import MemoryKV
from corral.cfs.ops import Op
from corral.cfs.replica_core import (
    Action,
    Applied,
    Complete,
    LogLine,
    Multicast,
    ReplicaConfig,
    ReplicaCore,
)
from corral.cfs.resync import PatchItem
from corral.cfs.state import CfsState, Outcome


class MemStore:
    """ReplicaStore over a dict; `fail_next` makes the next apply raise."""

    def __init__(self) -> None:
        self.kv = MemoryKV()
        self.state = CfsState(debug_checks=True)
        self.dirty = False
        self.dirty_writes: list[bool] = []
        self.term = 0

    def set_term(self, term: int) -> None:
        self.term = term

    def set_dirty(self, flag: bool) -> None:
        self.dirty = flag
        self.dirty_writes.append(flag)

    def apply_group(self, ops: Sequence[tuple[Op, int]], *, quorate: bool) -> list[Outcome]:
        outcomes = []
        for op, writer in ops:
            outcome = self.state.apply(op, writer=writer, quorate=quorate, reader=self.kv)
            self.kv.apply_batch(outcome.mutations)
            outcomes.append(outcome)
        return outcomes

    def apply_patch(self, delete: Sequence[str], items: Sequence[PatchItem],
                    touch_dirs: Sequence[tuple[str, int, int]] = ()) -> None:
        self.kv.apply_batch(self.state.apply_patch(delete, items, touch_dirs))

    def read_file(self, path: str) -> bytes:
        code, data = self.state.read(path, 0, 1 << 30, self.kv)
        assert code == 0
        return data

    def reload(self) -> MemStore:
        """A restart from this store's records."""
        fresh = MemStore()
        fresh.kv = self.kv
        fresh.dirty = self.dirty
        fresh.term = self.term
        fresh.kv.load_state(fresh.state)
        return fresh


@dataclass
class BusNode:
    core: ReplicaCore
    store: MemStore
    results: dict[int, int] = field(default_factory=dict)
    logs: list[LogLine] = field(default_factory=list)
    applied: list[Op] = field(default_factory=list)


class Bus:
    def __init__(self, nodeids: Sequence[int], config: ReplicaConfig | None = None) -> None:
        self.config = config or ReplicaConfig(part_max_bytes=1024)
        self.nodes: dict[int, BusNode] = {}
        self.queue: deque[tuple[int, bytes]] = deque()
        self.groups: list[tuple[int, ...]] = []
        self.now_ns = 0
        self.next_request = 0
        self.bytes_sent = 0
        for nodeid in nodeids:
            self.add(nodeid, MemStore())

    def add(self, nodeid: int, store: MemStore) -> None:
        core = ReplicaCore(nodeid, f"node{nodeid}", store, self.config, quorate=True)
        self.nodes[nodeid] = BusNode(core, store)

    def run(self, actions: list[Action], nodeid: int) -> None:
        node = self.nodes[nodeid]
        for action in actions:
            if isinstance(action, Multicast):
                self.bytes_sent += len(action.payload)
                self.queue.append((nodeid, action.payload))
            elif isinstance(action, Complete):
                node.results[action.request_id] = action.errno
            elif isinstance(action, Applied):
                node.applied.append(action.op)
            else:
                node.logs.append(action)

    def group_of(self, nodeid: int) -> tuple[int, ...]:
        for group in self.groups:
            if nodeid in group:
                return group
        return ()

    def configure(self, *groups: tuple[int, ...]) -> None:
        """New partitions; pending messages are delivered first (as Totem would)."""
        self.deliver_all()
        self.groups = [tuple(sorted(g)) for g in groups]
        for group in self.groups:
            for nodeid in group:
                self.run(self.nodes[nodeid].core.confchg(group, self.now_ns), nodeid)

    def step(self) -> bool:
        if not self.queue:
            return False
        sender, payload = self.queue.popleft()
        group = self.group_of(sender)
        for nodeid in group:
            self.run(self.nodes[nodeid].core.deliver(sender, payload, self.now_ns), nodeid)
        for nodeid in group:
            self.run(self.nodes[nodeid].core.flush_acks(self.now_ns), nodeid)
        return True

    def deliver_all(self, steps_max: int = 100_000) -> None:
        for _ in range(steps_max):
            if not self.step():
                return
        raise AssertionError("bus did not go quiet")

    def advance(self, ns: int) -> None:
        self.now_ns += ns
        for nodeid, node in self.nodes.items():
            deadline = node.core.next_deadline_ns()
            if deadline is not None and deadline <= self.now_ns:
                self.run(node.core.timer(self.now_ns), nodeid)

    def submit(self, nodeid: int, op: Op) -> int:
        self.next_request += 1
        self.run(self.nodes[nodeid].core.submit(op, self.next_request, self.now_ns), nodeid)
        return self.next_request

    def do(self, nodeid: int, op: Op) -> int:
        request = self.submit(nodeid, op)
        self.deliver_all()
        return self.nodes[nodeid].results[request]

    def digests(self) -> set[tuple[int, int]]:
        return {(n.store.state.version, n.store.state.tree.digest) for n in self.nodes.values()}
