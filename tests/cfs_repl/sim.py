"""Replicas over real Totem cores: the in-memory Totem harness (simulated
time, tests/totem/harness.py) with a CpgCore on each node, one ReplicaCore
per node in the group `corral-cfs`, and a real RocksDB Store per node in a
temporary directory. Quorum is a strict majority of the configured nodes in
the node's current Totem ring, updated at each TotemConfChg (lost at once,
as votequorum loses it). Completions are recorded per request id."""

from __future__ import annotations

import pathlib
from collections import deque
from dataclasses import dataclass, field

from tests.cfs_repl.common import load_test_module

from corral.cfs.ops import Op
from corral.cfs.replica_core import (
    Applied,
    Complete,
    Multicast,
    Phase,
    ReplicaConfig,
    ReplicaCore,
)
from corral.cfs.replication import ReplicatedStore
from corral.cfs.store import Durability, Store
from corral.cpg.core import CpgCore, SyncState
from corral.cpg.events import ConfChg, Deliver, TotemConfChg

GROUP = b"corral-cfs"
CLIENT = 1


harness = load_test_module("crl_cfs_repl_totem_harness", "totem/harness.py")


@dataclass
class Node:
    nodeid: int
    store: Store
    rstore: ReplicatedStore
    core: ReplicaCore
    cpg: CpgCore
    to_totem: deque[bytes] = field(default_factory=deque)
    fed: int = 0
    results: dict[int, int] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    applied: list[Op] = field(default_factory=list)
    sent_bytes: int = 0
    # members of the last Totem ring this node's event stream reported
    ring: tuple[int, ...] = ()


class ReplCluster(harness.Cluster):  # type: ignore[misc,name-defined]
    def __init__(self, nodeids: tuple[int, ...], root: pathlib.Path,
                 config: ReplicaConfig | None = None, **kwargs: object) -> None:
        super().__init__(nodeids, **kwargs)
        self.root = root
        self.rconfig = config or ReplicaConfig(part_max_bytes=64 * 1024)
        self.nodes: dict[int, Node] = {}
        self.next_request = 0
        # Every (nodeid, request id) -> op that was acknowledged with errno 0.
        self.acked: dict[tuple[int, int], Op] = {}
        self.ops: dict[tuple[int, int], Op] = {}

    # ------------------------------------------------------------- lifecycle

    def start(self, *nodeids: int) -> None:
        for nodeid in nodeids or self.nodeids:
            store = Store(self.root / f"n{nodeid}", durability=Durability.PROCESS)
            store.state.debug_checks = True
            rstore = ReplicatedStore(store)
            core = ReplicaCore(nodeid, f"node{nodeid}", rstore, self.rconfig)
            cpg = CpgCore(nodeid)
            self.nodes[nodeid] = Node(nodeid, store, rstore, core, cpg,
                                      fed=len(self.logs[nodeid].events))
            cpg.add_client(CLIENT, 1000 + nodeid)
            cpg.join(CLIENT, 1000 + nodeid, GROUP)
        super().start(*nodeids)

    def crash(self, nodeid: int) -> None:
        """kill -9: no leave, the store is closed as the process dies."""
        super().crash(nodeid)
        node = self.nodes.pop(nodeid)
        node.store.close()

    def close(self) -> None:
        for node in self.nodes.values():
            node.store.close()
        self.nodes.clear()

    # ----------------------------------------------------------------- plumbing

    def _drain(self, nodeid: int) -> None:
        super()._drain(nodeid)
        node = self.nodes.get(nodeid)
        if node is None or nodeid not in self.cores:
            return
        events = self.logs[nodeid].events
        while node.fed < len(events):
            event = events[node.fed]
            node.fed += 1
            if event[0] == "msg":
                node.cpg.deliver(event[1], event[2])
            elif event[0] == "conf":
                node.cpg.configuration(event[1] == harness.CONF_TRANSITIONAL, event[2], event[3])
            for _client, cpg_event in node.cpg.pop_events():
                self._feed(node, cpg_event)
        self._timers(node)
        self._run(node, node.core.flush_acks(self.now_ns))
        node.to_totem.extend(node.cpg.pop_outbox())
        submitted = False
        while node.to_totem and self.cores[nodeid].submit(node.to_totem[0]):
            node.to_totem.popleft()
            submitted = True
        if submitted:
            self._drain(nodeid)

    def _feed(self, node: Node, event: object) -> None:
        now = self.now_ns
        if isinstance(event, Deliver) and event.group == GROUP:
            self._run(node, node.core.deliver(event.nodeid, event.payload, now))
        elif isinstance(event, ConfChg) and event.group == GROUP:
            self._run(node, node.core.confchg([m.nodeid for m in event.members], now))
        elif isinstance(event, TotemConfChg):
            node.ring = tuple(event.members)
            quorate = len(event.members) * 2 > len(self.nodeids)
            self._run(node, node.core.quorum_changed(quorate, now))

    def _timers(self, node: Node) -> None:
        deadline = node.core.next_deadline_ns()
        if deadline is not None and deadline <= self.now_ns:
            self._run(node, node.core.timer(self.now_ns))

    def _run(self, node: Node, actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, Multicast):
                node.sent_bytes += len(action.payload)
                if not node.cpg.mcast(CLIENT, GROUP, action.payload):
                    raise AssertionError("CPG refused a multicast in the simulation")
            elif isinstance(action, Complete):
                node.results[action.request_id] = action.errno
                key = (node.nodeid, action.request_id)
                if action.errno == 0:
                    self.acked[key] = self.ops[key]
            elif isinstance(action, Applied):
                node.applied.append(action.op)
            else:
                node.logs.append(f"{action.level}: {action.text}")  # type: ignore[attr-defined]
        node.to_totem.extend(node.cpg.pop_outbox())

    def _step(self, end_ns: int) -> bool:
        progressed = bool(super()._step(end_ns))
        for nodeid in list(self.nodes):
            if nodeid in self.cores:
                self._drain(nodeid)
        return progressed

    # --------------------------------------------------------------------- API

    def submit(self, nodeid: int, op: Op) -> int:  # type: ignore[override]
        self.next_request += 1
        node = self.nodes[nodeid]
        self.ops[(nodeid, self.next_request)] = op
        self._run(node, node.core.submit(op, self.next_request, self.now_ns))
        self._drain(nodeid)
        return self.next_request

    def result(self, nodeid: int, request_id: int) -> int | None:
        return self.nodes[nodeid].results.get(request_id)

    def wait_result(self, nodeid: int, request_id: int, timeout_s: float = 30) -> int:
        self.run_until(lambda: request_id in self.nodes[nodeid].results,
                       harness.seconds(timeout_s))
        return self.nodes[nodeid].results[request_id]

    def do(self, nodeid: int, op: Op) -> int:
        return self.wait_result(nodeid, self.submit(nodeid, op))

    def synced(self, nodeids: tuple[int, ...] | None = None) -> bool:
        group = tuple(sorted(nodeids or tuple(self.nodes)))
        return self.operational(group) and all(
            self.nodes[n].core.phase is Phase.SYNCED
            and self.nodes[n].core.members == group
            and self.nodes[n].cpg.state == SyncState.OPERATIONAL
            and not self.nodes[n].to_totem
            and self.cores[n].send_queue_len == 0
            and self.nodes[n].core.pending == 0
            for n in group)

    def settle(self, nodeids: tuple[int, ...] | None = None, timeout_s: float = 30) -> None:
        self.run_until(lambda: self.synced(nodeids), harness.seconds(timeout_s))
        self.run_for(harness.ms(20))
        self.run_until(lambda: self.synced(nodeids), harness.seconds(timeout_s))

    def digests(self, nodeids: tuple[int, ...] | None = None) -> dict[int, tuple[int, int]]:
        return {n: (self.nodes[n].store.state.version, self.nodes[n].store.state.tree.digest)
                for n in (nodeids or tuple(self.nodes))}


def formed(root: pathlib.Path, n_nodes: int = 3, **kwargs: object) -> ReplCluster:
    cluster = ReplCluster(tuple(range(1, n_nodes + 1)), root, **kwargs)
    cluster.start()
    cluster.settle()
    return cluster
