"""CpgCore over real TotemCores (ext/totem) in the in-memory Totem harness
(tests/totem/harness.py, simulated time): formation, joins and messages,
partition (NODEDOWN on both sides, messages while apart), merge (NODEUP,
views agree), a crash with messages in flight, and a randomised run with
loss. Client event logs are checked for per-group virtual synchrony and
total order, as on the fake bus."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import sys
from collections import defaultdict, deque
from types import ModuleType

import pytest

from corral.cpg.core import CpgCore, SyncState
from corral.cpg.events import ConfChg, CpgEvent, Deliver, Member, Reason

from .bus import check_total_order, check_virtual_synchrony

_core = pytest.importorskip("corral.totem._core")
if not hasattr(_core, "TotemCore"):
    pytest.skip("Totem core not built", allow_module_level=True)


def _load_harness() -> ModuleType:
    path = pathlib.Path(__file__).resolve().parent.parent / "totem" / "harness.py"
    spec = importlib.util.spec_from_file_location("crl_cpg_totem_harness", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
G = b"grp"


class CpgCluster(harness.Cluster):  # type: ignore[misc,name-defined]
    """The Totem harness with one CpgCore stacked on each TotemCore."""

    def __init__(self, nodeids: tuple[int, ...], **kwargs: object) -> None:
        super().__init__(nodeids, **kwargs)
        self.cpg: dict[int, CpgCore] = {}
        self.fed: dict[int, int] = {}
        self.to_totem: dict[int, deque[bytes]] = {}
        self.logs_cpg: dict[tuple[int, int], list[CpgEvent]] = defaultdict(list)
        self.stamps: dict[tuple[int, int], list[object]] = defaultdict(list)
        self.position: dict[int, tuple[object, ...]] = {}
        self.incarnation: dict[int, int] = defaultdict(int)

    def start(self, *nodeids: int) -> None:
        for nodeid in nodeids or self.nodeids:
            self.incarnation[nodeid] += 1
            self.cpg[nodeid] = CpgCore(nodeid)
            self.fed[nodeid] = len(self.logs[nodeid].events)
            self.to_totem[nodeid] = deque()
            self.position[nodeid] = ("boot", nodeid, self.incarnation[nodeid], 0)
        super().start(*nodeids)

    def crash(self, nodeid: int) -> None:
        super().crash(nodeid)
        del self.cpg[nodeid]

    def key(self, nodeid: int, client_id: int) -> tuple[int, int]:
        return (nodeid, self.incarnation[nodeid] * 1_000_000 + client_id)

    def _drain(self, nodeid: int) -> None:
        super()._drain(nodeid)
        cpg = self.cpg.get(nodeid)
        if cpg is None or nodeid not in self.cores:
            return
        events = self.logs[nodeid].events
        while self.fed[nodeid] < len(events):
            event = events[self.fed[nodeid]]
            self.fed[nodeid] += 1
            self._feed(nodeid, cpg, event)
        self.to_totem[nodeid].extend(cpg.pop_outbox())
        submitted = False
        while self.to_totem[nodeid] and self.cores[nodeid].submit(self.to_totem[nodeid][0]):
            self.to_totem[nodeid].popleft()
            submitted = True
        if submitted:
            super()._drain(nodeid)
            self._drain(nodeid)

    def _feed(self, nodeid: int, cpg: CpgCore, event: tuple[object, ...]) -> None:
        # A stamp shared by every node that sees the same input (the same message
        # of the same ring, or the same configuration), for the VS checker.
        kind, pos = event[0], self.position[nodeid]
        if kind == "msg":
            sender, payload = event[1], event[2]
            assert isinstance(sender, int) and isinstance(payload, bytes)
            self.position[nodeid] = (*pos[:-1], pos[-1] + 1)
            cpg.deliver(sender, payload)
        else:
            conf_kind, ring_id, members = event[1], event[2], event[3]
            assert isinstance(ring_id, tuple) and isinstance(members, tuple)
            transitional = conf_kind == harness.CONF_TRANSITIONAL
            self.position[nodeid] = ("t" if transitional else "r", ring_id, members, 0)
            if transitional:
                # Survivors of one old ring share its id; key the window by it.
                self.position[nodeid] = ("t", pos[1], members, 0)
            cpg.configuration(transitional, ring_id, members)
        for client_id, cpg_event in cpg.pop_events():
            self.logs_cpg[self.key(nodeid, client_id)].append(cpg_event)
            self.stamps[self.key(nodeid, client_id)].append(self.position[nodeid])

    # ------------------------------------------------------------ API helpers

    def join(self, nodeid: int, client_id: int, pid: int, group: bytes = G) -> None:
        self.cpg[nodeid].join(client_id, pid, group)
        self._drain(nodeid)

    def mcast(self, nodeid: int, client_id: int, payload: bytes, group: bytes = G) -> bool:
        accepted = self.cpg[nodeid].mcast(client_id, group, payload)
        self._drain(nodeid)
        return accepted

    def settled(self) -> bool:
        return self.operational() and all(
            c.state == SyncState.OPERATIONAL for c in self.cpg.values()
        ) and not any(self.to_totem[n] for n in self.cpg) and all(
            self.cores[n].send_queue_len == 0 for n in self.cpg
        )

    def settle(self, nodes: tuple[int, ...] | None = None, timeout_s: float = 10) -> None:
        def done() -> bool:
            group = nodes or tuple(self.cpg)
            return self.operational(group) and all(
                self.cpg[n].state == SyncState.OPERATIONAL
                and not self.to_totem[n]
                and self.cores[n].send_queue_len == 0
                for n in group
            ) and len({self.delivered_in_ring(n) for n in group}) == 1

        self.run_until(done, harness.seconds(timeout_s))
        self.run_for(harness.ms(50))

    def delivered_in_ring(self, nodeid: int) -> int:
        """Messages delivered since the last regular configuration: equal on all
        members once none of them lags behind (a short cut that Totem rode out
        without a membership change can leave one node behind for a while)."""
        count = 0
        for event in reversed(self.logs[nodeid].events):
            if event[0] == "conf" and event[1] != harness.CONF_TRANSITIONAL:
                return count
            count += event[0] == "msg"
        return count

    def deliveries(self, nodeid: int, client_id: int) -> list[bytes]:
        return [e.payload for e in self.logs_cpg[self.key(nodeid, client_id)]
                if isinstance(e, Deliver)]

    def confchgs(self, nodeid: int, client_id: int) -> list[ConfChg]:
        return [e for e in self.logs_cpg[self.key(nodeid, client_id)] if isinstance(e, ConfChg)]


class _CheckView:
    """Adapter so the bus checkers read this cluster's client logs."""

    def __init__(self, cluster: CpgCluster) -> None:
        self.logs = cluster.logs_cpg
        self.stamps = cluster.stamps


def check(cluster: CpgCluster, nodes: tuple[int, ...]) -> None:
    digests = {cluster.cpg[n].view_digest() for n in nodes}
    assert len(digests) == 1, "views differ"
    check_virtual_synchrony(_CheckView(cluster))  # type: ignore[arg-type]
    check_total_order(_CheckView(cluster))  # type: ignore[arg-type]


def formed(n_nodes: int, **kwargs: object) -> CpgCluster:
    cluster = CpgCluster(tuple(range(1, n_nodes + 1)), **kwargs)
    cluster.start()
    cluster.settle()
    return cluster


def test_groups_and_messages_over_real_totem() -> None:
    cluster = formed(3)
    for nodeid in (1, 2, 3):
        cluster.join(nodeid, 1, 100 + nodeid)
    cluster.settle()
    for i in range(30):
        cluster.mcast(1 + i % 3, 1, b"m%d" % i)
    cluster.settle()
    expected = {b"m%d" % i for i in range(30)}
    orders = [cluster.deliveries(n, 1) for n in (1, 2, 3)]
    assert set(orders[0]) == expected and orders[0] == orders[1] == orders[2]
    assert cluster.cpg[2].membership(G) == (Member(1, 101), Member(2, 102), Member(3, 103))
    check(cluster, (1, 2, 3))


def test_partition_and_merge_over_real_totem() -> None:
    cluster = formed(3)
    for nodeid in (1, 2, 3):
        cluster.join(nodeid, 1, 100 + nodeid)
    cluster.settle()
    cluster.partition((1, 2), (3,))
    cluster.settle((1, 2))
    cluster.settle((3,))
    assert cluster.confchgs(1, 1)[-1].left == (Member(3, 103, Reason.NODEDOWN),)
    assert {m.nodeid for m in cluster.confchgs(3, 1)[-1].left} == {1, 2}
    cluster.mcast(1, 1, b"apart-12")
    cluster.mcast(3, 1, b"apart-3")
    cluster.join(3, 2, 203)
    cluster.settle((1, 2))
    cluster.settle((3,))
    assert b"apart-3" not in cluster.deliveries(1, 1)
    cluster.heal()
    cluster.settle()
    merged = cluster.confchgs(1, 1)[-1]
    assert set(merged.joined) == {Member(3, 103, Reason.NODEUP), Member(3, 203, Reason.NODEUP)}
    cluster.mcast(3, 2, b"together")
    cluster.settle()
    assert all(b"together" in cluster.deliveries(n, 1) for n in (1, 2, 3))
    check(cluster, (1, 2, 3))


def test_crash_with_messages_in_flight_over_real_totem() -> None:
    cluster = formed(3)
    for nodeid in (1, 2, 3):
        cluster.join(nodeid, 1, 100 + nodeid)
    cluster.settle()
    for i in range(20):
        cluster.mcast(1 + i % 3, 1, b"f%d" % i)
    cluster.crash(3)
    cluster.settle((1, 2))
    assert cluster.confchgs(1, 1)[-1].left == (Member(3, 103, Reason.NODEDOWN),)
    assert cluster.deliveries(1, 1) == cluster.deliveries(2, 1)
    # Everything nodes 1 and 2 sent reached both (their queues survive the change).
    sent_by_survivors = {b"f%d" % i for i in range(20) if i % 3 != 2}
    assert sent_by_survivors <= set(cluster.deliveries(1, 1))
    cluster.start(3)
    cluster.join(3, 1, 333)
    cluster.settle()
    assert cluster.cpg[1].membership(G)[-1] == Member(3, 333)
    check(cluster, (1, 2, 3))


N_SEEDS = 100 if os.environ.get("CORRAL_SOAK") == "1" else 8


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_random_partitions_and_crashes_with_loss_over_real_totem(seed: int) -> None:
    # Bursts of messages, joins and leaves right after each cut, crash and heal
    # land in Totem's queue while it gathers, so they arrive during the CPG sync.
    rng = random.Random(seed)
    cluster = formed(4, loss=0.02, seed=seed)
    for nodeid in (1, 2, 3, 4):
        cluster.join(nodeid, 1, 1000 + nodeid, G)
    cluster.settle(timeout_s=30)
    counter = 0
    extra: dict[int, int] = {}

    def burst(alive: list[int] | None = None) -> None:
        nonlocal counter
        alive = alive or [1, 2, 3, 4]
        for _ in range(4):
            counter += 1
            cluster.mcast(rng.choice(alive), 1, b"r%d" % counter)
        nodeid = rng.choice(alive)
        if nodeid in extra:
            cluster.cpg[nodeid].leave(extra.pop(nodeid), G)
        else:
            extra[nodeid] = 2000 + counter
            cluster.join(nodeid, extra[nodeid], 2000 + counter)
        cluster.run_for(harness.ms(rng.randint(100, 1500)))

    for _round in range(4):
        nodes = [1, 2, 3, 4]
        rng.shuffle(nodes)
        if rng.random() < 0.25:
            # A crash: the node's processes go NODEDOWN; it restarts empty and
            # its first process joins again.
            victim = nodes[0]
            cluster.crash(victim)
            extra.pop(victim, None)
            for _ in range(2):
                burst(alive=[n for n in (1, 2, 3, 4) if n != victim])
            cluster.start(victim)
            cluster.join(victim, 1, 1000 + victim, G)
        else:
            cut = rng.randint(1, 3)
            cluster.partition(tuple(sorted(nodes[:cut])), tuple(sorted(nodes[cut:])))
            for _ in range(3):
                burst()
            cluster.heal()
        burst()
        cluster.settle(timeout_s=60)
        check(cluster, (1, 2, 3, 4))
    for nodeid in (1, 2, 3, 4):
        stats = cluster.cpg[nodeid].stats()
        assert stats["sync_mismatch"] == 0 and stats["malformed_dropped"] == 0


def test_messages_sent_while_totem_gathers_are_held_until_sync() -> None:
    cluster = formed(4)
    for nodeid in (1, 2, 3, 4):
        cluster.join(nodeid, 1, 100 + nodeid)
    cluster.settle()
    cluster.partition((1, 2), (3, 4))
    for i in range(5):  # Totem queues these while it detects the cut
        cluster.mcast(1, 1, b"x%d" % i)
        cluster.run_for(harness.ms(100))
    cluster.settle((1, 2))
    cluster.settle((3, 4))
    assert cluster.cpg[1].stats()["held_during_sync"] > 0
    for nodeid in (1, 2):
        events = cluster.logs_cpg[cluster.key(nodeid, 1)]
        down = next(i for i, e in enumerate(events)
                    if isinstance(e, ConfChg) and e.left and e.left[0].nodeid == 3)
        after = [e.payload for e in events[down:] if isinstance(e, Deliver)]
        assert after[-4:] == [b"x1", b"x2", b"x3", b"x4"]
    check(cluster, (1, 2))


def test_largest_payload_and_longest_names_over_real_totem() -> None:
    from corral.cpg import wire

    cluster = formed(2)
    group = b"n" * wire.MAX_GROUP_NAME_BYTES
    cluster.join(1, 1, 0xFFFF_FFFF, group)
    cluster.join(2, 1, 7, group)
    cluster.settle()
    big = bytes(range(256)) * (wire.MAX_PAYLOAD_BYTES // 256)
    assert len(big) == wire.MAX_PAYLOAD_BYTES
    assert cluster.mcast(1, 1, big, group)
    cluster.settle()
    assert cluster.deliveries(2, 1) == [big] and cluster.deliveries(1, 1) == [big]


@pytest.mark.parametrize("seed", range(4 if os.environ.get("CORRAL_SOAK") != "1" else 200))
def test_nested_partitions_five_nodes_five_percent_loss(seed: int) -> None:
    # Harsher: 5 nodes, 5 % loss, cuts into 2 or 3 parts that sometimes change
    # again before healing (a sync interrupted by a new configuration), crashes.
    rng = random.Random(seed)
    ids = (1, 2, 3, 4, 5)
    cluster = formed(5, loss=0.05, seed=seed)
    for nodeid in ids:
        cluster.join(nodeid, 1, 1000 + nodeid, G)
    cluster.settle(timeout_s=60)
    counter = 0
    extra: dict[int, int] = {}

    def burst(alive: tuple[int, ...] = ids) -> None:
        nonlocal counter
        for _ in range(6):
            counter += 1
            cluster.mcast(rng.choice(alive), 1, b"r%d" % counter)
        nodeid = rng.choice(alive)
        if nodeid in extra:
            cluster.cpg[nodeid].leave(extra.pop(nodeid), G)
        else:
            extra[nodeid] = 3000 + counter
            cluster.join(nodeid, extra[nodeid], 3000 + counter)
        cluster.run_for(harness.ms(rng.randint(50, 2500)))

    for _round in range(8):
        nodes = list(ids)
        rng.shuffle(nodes)
        if rng.random() < 0.25:
            victim = nodes[0]
            cluster.crash(victim)
            extra.pop(victim, None)
            for _ in range(2):
                burst(tuple(n for n in ids if n != victim))
            cluster.start(victim)
            cluster.join(victim, 1, 1000 + victim, G)
        else:
            cuts = sorted(rng.sample(range(1, 5), rng.randint(1, 2)))
            bounds = list(zip([0, *cuts], [*cuts, 5], strict=True))
            cluster.partition(*(tuple(sorted(nodes[a:b])) for a, b in bounds))
            for _ in range(rng.randint(1, 4)):
                burst()
            if rng.random() < 0.5:
                rng.shuffle(nodes)
                cluster.partition(tuple(sorted(nodes[:2])), tuple(sorted(nodes[2:])))
                burst()
            cluster.heal()
        burst()
        cluster.settle(timeout_s=120)
        check(cluster, ids)
    for nodeid in ids:
        stats = cluster.cpg[nodeid].stats()
        assert stats["sync_mismatch"] == 0 and stats["malformed_dropped"] == 0
