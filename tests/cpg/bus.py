"""A fake, deterministic, totally ordered bus standing in for Totem in CPG tests.

It keeps one send queue per node (what Totem has accepted but not yet sent),
delivers messages one at a time to every member of the sender's ring, and
applies configuration changes the test scripts, with extended-virtual-synchrony
semantics: each node first sees a transitional configuration (its old ring
members that move with it), optionally some old-ring messages from those
members, then the regular configuration. Messages still queued at a node when
its ring changes are sent in the new ring, as corosync does.

Checkers at the end of the file verify agreement of views, per-group virtual
synchrony and total order over the collected client events.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from corral.cpg.checkers import (
    total_order_violations,
    view_agreement_violations,
    virtual_synchrony_violations,
)
from corral.cpg.core import CpgCore
from corral.cpg.events import ConfChg, CpgEvent, Deliver


@dataclass
class Bus:
    nodeids: list[int]
    cores: dict[int, CpgCore] = field(default_factory=dict)
    queues: dict[int, deque[bytes]] = field(default_factory=dict)
    ring_of: dict[int, tuple[int, ...]] = field(default_factory=dict)
    ring_id_of: dict[int, tuple[int, int]] = field(default_factory=dict)
    # (nodeid, client_id) -> events in order; survives crashes for the checkers.
    logs: dict[tuple[int, int], list[CpgEvent]] = field(default_factory=lambda: defaultdict(list))
    # Parallel to logs: the bus input that produced each event. Events produced by
    # one delivery (or one configuration of one transitional set or ring) share
    # it, so checkers can tell one confchg from a later one with equal content.
    stamps: dict[tuple[int, int], list[Hashable]] = field(
        default_factory=lambda: defaultdict(list)
    )
    stamp: int = 0
    incarnation: dict[int, int] = field(default_factory=dict)
    seq: int = 0
    delivered_count: int = 0

    def __post_init__(self) -> None:
        for nodeid in self.nodeids:
            self._boot(nodeid)

    def _boot(self, nodeid: int) -> None:
        self.cores[nodeid] = CpgCore(nodeid)
        self.queues[nodeid] = deque()
        self.ring_of[nodeid] = ()
        self.incarnation[nodeid] = self.incarnation.get(nodeid, -1) + 1

    def client_key(self, nodeid: int, client_id: int) -> tuple[int, int]:
        # Client ids restart with a node, so logs are keyed per incarnation.
        return (nodeid, self.incarnation[nodeid] * 1_000_000 + client_id)

    def collect(self, nodeid: int) -> None:
        core = self.cores[nodeid]
        self.queues[nodeid].extend(core.pop_outbox())
        for client_id, event in core.pop_events():
            self.logs[self.client_key(nodeid, client_id)].append(event)
            self.stamps[self.client_key(nodeid, client_id)].append(self.stamp)

    # -------------------------------------------------------------- local API

    def join(self, nodeid: int, client_id: int, pid: int, group: bytes) -> None:
        self.cores[nodeid].join(client_id, pid, group)
        self.collect(nodeid)

    def leave(self, nodeid: int, client_id: int, group: bytes) -> None:
        self.cores[nodeid].leave(client_id, group)
        self.collect(nodeid)

    def mcast(self, nodeid: int, client_id: int, group: bytes, payload: bytes) -> bool:
        accepted = self.cores[nodeid].mcast(client_id, group, payload)
        self.collect(nodeid)
        return accepted

    def disconnect(self, nodeid: int, client_id: int) -> None:
        self.cores[nodeid].client_disconnected(client_id)
        self.collect(nodeid)

    # -------------------------------------------------------------- membership

    def configure(self, rings: list[list[int]], old_tail: int = 0) -> None:
        """Install new rings. Each node of a ring sees its transitional set (its old
        ring members now in the same new ring), then up to `old_tail` queued
        messages per transitional member delivered in the old ring, then the ring."""
        transitions: dict[tuple[tuple[int, ...], frozenset[int]], list[int]] = {}
        for ring in rings:
            for nodeid in ring:
                trans = frozenset(self.ring_of[nodeid]) & frozenset(ring) | {nodeid}
                transitions.setdefault((self.ring_of[nodeid], trans), []).append(nodeid)
        for (_, trans), nodes in sorted(transitions.items(), key=lambda kv: sorted(kv[1])):
            self.stamp += 1
            for nodeid in nodes:
                self.cores[nodeid].configuration(True, (0, 0), sorted(trans))
                self.collect(nodeid)
            for _ in range(old_tail):
                for sender in sorted(trans):
                    if self.queues[sender]:
                        self._deliver(self.queues[sender].popleft(), sender, sorted(trans))
        for ring in rings:
            self.seq += 4
            ring_id = (min(ring), self.seq)
            self.stamp += 1
            for nodeid in ring:
                self.ring_of[nodeid] = tuple(sorted(ring))
                self.ring_id_of[nodeid] = ring_id
                self.cores[nodeid].configuration(False, ring_id, sorted(ring))
                self.collect(nodeid)

    def crash(self, nodeid: int) -> None:
        """The node stops; its queue is lost. Survivors learn at the next configure()."""
        del self.cores[nodeid]
        self.queues[nodeid].clear()
        self.ring_of[nodeid] = ()

    def restart(self, nodeid: int) -> None:
        self._boot(nodeid)

    # -------------------------------------------------------------- delivery

    def _deliver(self, payload: bytes, sender: int, members: list[int]) -> None:
        self.stamp += 1
        for nodeid in members:
            self.cores[nodeid].deliver(sender, payload)
            self.collect(nodeid)
        self.delivered_count += 1

    def inject(self, sender: int, payload: bytes) -> None:
        """Deliver a raw payload from `sender` to its whole ring (a forged message)."""
        self._deliver(payload, sender, list(self.ring_of[sender]))

    def step(self) -> bool:
        """Deliver one queued message per ring (lowest ready sender first, rotating)."""
        progressed = False
        for ring in sorted({r for n, r in self.ring_of.items() if r and n in self.cores}):
            senders = [n for n in ring if self.queues[n]]
            if not senders:
                continue
            sender = senders[self.delivered_count % len(senders)]
            self._deliver(self.queues[sender].popleft(), sender, list(ring))
            progressed = True
        return progressed

    def run(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("bus did not go idle")

    def run_steps(self, n_steps: int) -> None:
        for _ in range(n_steps):
            if not self.step():
                return

    # -------------------------------------------------------------- views

    def events(self, nodeid: int, client_id: int) -> list[CpgEvent]:
        return self.logs[self.client_key(nodeid, client_id)]

    def deliveries(self, nodeid: int, client_id: int) -> list[bytes]:
        return [e.payload for e in self.events(nodeid, client_id) if isinstance(e, Deliver)]

    def confchgs(self, nodeid: int, client_id: int, group: bytes) -> list[ConfChg]:
        return [
            e for e in self.events(nodeid, client_id)
            if isinstance(e, ConfChg) and e.group == group
        ]


# ------------------------------------------------------------------ checkers


def check_views_agree(bus: Bus) -> None:
    """Every operational node of a ring has the same view of every group."""
    rings = {r for n, r in bus.ring_of.items() if r and n in bus.cores}
    problems = view_agreement_violations(bus.cores, sorted(rings))
    assert not problems, problems


def check_virtual_synchrony(bus: Bus) -> int:
    """Per-group virtual synchrony over all client logs; returns pairs compared."""
    compared, problems = virtual_synchrony_violations(bus.logs, bus.stamps)
    assert not problems, problems
    return compared


def check_total_order(bus: Bus) -> None:
    problems = total_order_violations(bus.logs)
    assert not problems, problems
