"""Closed process groups in the simulator: one `CpgCore` per node on top of Totem.

With `--cpg`, every node runs a `corral.cpg.core.CpgCore` fed with its Totem
core's events, and the workload acts through CPG clients instead of raw Totem
submissions: clients join and leave groups, disconnect, and multicast
uniquely named payloads. The Totem-level checkers keep running underneath:
every CPG message travels in a Totem payload prefixed with the usual
`csim:<node>:<counter>:` header, which is stripped before CPG sees it.

Checks (each raises `Violation`):

- cpg-integrity, after every step: a client is delivered only messages some
  client multicast to that group, from the (node, pid) named as sender, at
  most once;
- at the end, once every node's CPG finished its sync in the final ring:
  cpg-total-order and cpg-virtual-synchrony over every client's event log
  (`corral.cpg.checkers`, with confchgs stamped by the Totem input that caused
  them: the Totem message id, or the configuration change), cpg-views (every
  node holds the same group view, and it is exactly the set of live clients
  that joined and did not leave or disconnect), cpg-self-delivery (a live
  client that never left a group delivered every message it multicast there).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from corral.cpg import checkers as cpg_checkers
from corral.cpg.core import CpgCore, CpgError, SyncState
from corral.cpg.events import CpgEvent, Deliver
from corral.sim.checkers import PAYLOAD_MAGIC, Violation

GROUPS = (b"alpha", b"beta", b"gamma")
MAX_CLIENTS_PER_NODE = 6
# (nodeid, incarnation, client id): one client process of one node incarnation.
ClientKey = tuple[int, int, int]


@dataclass(slots=True)
class SimClient:
    pid: int
    groups: set[bytes] = field(default_factory=set)  # joined or joining, not leaving
    left_some_group: set[bytes] = field(default_factory=set)
    gone: bool = False


@dataclass(slots=True)
class CpgNode:
    core: CpgCore
    incarnation: int
    to_totem: deque[bytes] = field(default_factory=deque)
    clients: dict[int, SimClient] = field(default_factory=dict)


class CpgLayer:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.nodes: dict[int, CpgNode] = {}
        self.logs: dict[ClientKey, list[CpgEvent]] = {}
        self.stamps: dict[ClientKey, list[Hashable]] = {}
        # payload -> (sender client, group); payloads are unique in a run.
        self.sent: dict[bytes, tuple[ClientKey, bytes]] = {}
        self.sent_by: dict[ClientKey, list[tuple[bytes, bytes]]] = {}
        self.delivered: dict[ClientKey, set[bytes]] = {}
        self.pids: dict[ClientKey, int] = {}
        self.next_client_id = 1
        self.next_pid = 1000
        self.mcast_counter = 0
        self.operations = 0
        self.refused = 0
        self.vs_pairs_compared = 0

    # -- node lifecycle -------------------------------------------------------------

    def on_start(self, nodeid: int, incarnation: int) -> None:
        self.nodes[nodeid] = CpgNode(CpgCore(nodeid), incarnation)

    def on_crash(self, nodeid: int) -> None:
        node = self.nodes.pop(nodeid, None)
        if node is not None:
            for client in node.clients.values():
                client.gone = True

    # -- Totem events in, CPG events out ----------------------------------------------

    def on_totem_deliver(self, nodeid: int, sender: int, payload: bytes, stamp: Hashable) -> None:
        node = self.nodes.get(nodeid)
        if node is None:  # a leaving node's last events
            return
        inner = payload.split(b":", 3)[3]
        node.core.deliver(sender, inner)
        self._collect(nodeid, node, stamp)

    def on_totem_config(self, nodeid: int, transitional: bool, ring_id: tuple[int, int], members: tuple[int, ...], stamp: Hashable) -> None:
        node = self.nodes.get(nodeid)
        if node is None:
            return
        node.core.configuration(transitional, ring_id, members)
        self._collect(nodeid, node, stamp)

    def _collect(self, nodeid: int, node: CpgNode, stamp: Hashable) -> None:
        for client_id, event in node.core.pop_events():
            key = (nodeid, node.incarnation, client_id)
            self.logs.setdefault(key, []).append(event)
            self.stamps.setdefault(key, []).append(stamp)
            if isinstance(event, Deliver):
                self._check_delivery(key, event)

    def _check_delivery(self, key: ClientKey, event: Deliver) -> None:
        origin = self.sent.get(event.payload)
        if origin is None:
            raise Violation("cpg-integrity", [key[0], event.nodeid], f"client {key} delivered {event.payload[:40]!r} that nobody multicast")
        sender, group = origin
        if group != event.group or (sender[0], self._pid(sender)) != (event.nodeid, event.pid):
            raise Violation("cpg-integrity", [key[0], event.nodeid], f"client {key} delivered {event.payload!r} as from {(event.nodeid, event.pid)} in {event.group!r}; sent by {sender} in {group!r}")
        seen = self.delivered.setdefault(key, set())
        if event.payload in seen:
            raise Violation("cpg-integrity", [key[0]], f"client {key} delivered {event.payload!r} twice")
        seen.add(event.payload)

    def _pid(self, key: ClientKey) -> int:
        return self.pids[key]

    def pending_payloads(self, nodeid: int) -> list[bytes]:
        """CPG's outgoing messages for Totem, in order (kept while Totem refuses)."""
        node = self.nodes.get(nodeid)
        if node is None:
            return []
        node.to_totem.extend(node.core.pop_outbox())
        return list(node.to_totem)

    def submitted(self, nodeid: int, count: int) -> None:
        node = self.nodes[nodeid]
        for _ in range(count):
            node.to_totem.popleft()

    # -- workload ---------------------------------------------------------------------

    def act(self, nodeid: int) -> None:
        """One random client operation on `nodeid`."""
        node = self.nodes[nodeid]
        rng = self.rng
        live = [cid for cid in sorted(node.clients) if not node.clients[cid].gone]
        members = [cid for cid in live if node.clients[cid].groups]
        draw = rng.random()
        self.operations += 1
        try:
            if (draw < 0.15 or not members) and len(live) < MAX_CLIENTS_PER_NODE:
                self._join_new(nodeid, node)
            elif draw < 0.22 and live:
                self._join_more(node, live[rng.randrange(len(live))])
            elif draw < 0.30 and members:
                self._leave(node, members[rng.randrange(len(members))])
            elif draw < 0.33 and live:
                self._disconnect(node, live[rng.randrange(len(live))])
            elif members:
                self._mcast(nodeid, node, members[rng.randrange(len(members))])
        except CpgError:
            self.refused += 1

    def _join_new(self, nodeid: int, node: CpgNode) -> None:
        client_id, pid = self.next_client_id, self.next_pid
        self.next_client_id += 1
        self.next_pid += 1
        node.clients[client_id] = SimClient(pid)
        self.pids[(nodeid, node.incarnation, client_id)] = pid
        self._join_more(node, client_id)

    def _join_more(self, node: CpgNode, client_id: int) -> None:
        client = node.clients[client_id]
        choices = [g for g in GROUPS if g not in client.groups and g not in client.left_some_group]
        if not choices:
            return
        group = choices[self.rng.randrange(len(choices))]
        node.core.join(client_id, client.pid, group)
        client.groups.add(group)

    def _leave(self, node: CpgNode, client_id: int) -> None:
        client = node.clients[client_id]
        groups = sorted(client.groups)
        group = groups[self.rng.randrange(len(groups))]
        node.core.leave(client_id, group)
        client.groups.discard(group)
        client.left_some_group.add(group)

    def _disconnect(self, node: CpgNode, client_id: int) -> None:
        node.core.client_disconnected(client_id)
        node.clients[client_id].gone = True
        node.clients[client_id].groups.clear()

    def _mcast(self, nodeid: int, node: CpgNode, client_id: int) -> None:
        client = node.clients[client_id]
        groups = sorted(client.groups)
        group = groups[self.rng.randrange(len(groups))]
        self.mcast_counter += 1
        payload = b"cpgm:%d:%d:%d" % (nodeid, client.pid, self.mcast_counter)
        key = (nodeid, node.incarnation, client_id)
        if node.core.mcast(client_id, group, payload):
            self.sent[payload] = (key, group)
            self.sent_by.setdefault(key, []).append((group, payload))
        else:
            self.refused += 1

    # -- end of run ---------------------------------------------------------------------

    def settled(self) -> bool:
        return all(
            node.core.state == SyncState.OPERATIONAL and not node.to_totem
            for node in self.nodes.values()
        )

    def check_final(self) -> None:
        problems = cpg_checkers.total_order_violations(self.logs)
        if problems:
            raise Violation("cpg-total-order", [], "; ".join(problems[:3]))
        self.vs_pairs_compared, problems = cpg_checkers.virtual_synchrony_violations(self.logs, self.stamps)
        if problems:
            raise Violation("cpg-virtual-synchrony", [], "; ".join(problems[:3]))
        self._check_views()
        self._check_self_delivery()

    def _expected_view(self) -> tuple[tuple[bytes, tuple[tuple[int, int], ...]], ...]:
        view: dict[bytes, list[tuple[int, int]]] = {}
        for nodeid, node in sorted(self.nodes.items()):
            for client in node.clients.values():
                if client.gone:
                    continue
                for group in client.groups:
                    view.setdefault(group, []).append((nodeid, client.pid))
        return tuple((group, tuple(sorted(members))) for group, members in sorted(view.items()))

    def _check_views(self) -> None:
        expected = self._expected_view()
        for nodeid, node in sorted(self.nodes.items()):
            digest = node.core.view_digest()
            if digest != expected:
                raise Violation("cpg-views", [nodeid], f"n{nodeid} holds group view {digest}, expected {expected}")

    def _check_self_delivery(self) -> None:
        for nodeid, node in sorted(self.nodes.items()):
            for client_id, client in sorted(node.clients.items()):
                if client.gone:
                    continue
                key = (nodeid, node.incarnation, client_id)
                got = self.delivered.get(key, set())
                for group, payload in self.sent_by.get(key, []):
                    if group in client.left_some_group:
                        continue
                    if payload not in got:
                        raise Violation("cpg-self-delivery", [nodeid], f"client {key} never delivered its own {payload!r} in {group!r}")

    def summary(self) -> dict[str, Any]:
        return {
            "cpg_operations": self.operations,
            "cpg_mcasts": len(self.sent),
            "cpg_deliveries": sum(len(seen) for seen in self.delivered.values()),
            "cpg_refused": self.refused,
            "cpg_vs_pairs": self.vs_pairs_compared,
        }


def wrap(nodeid: int, counter: int, inner: bytes) -> bytes:
    """A Totem payload that carries one CPG message under the simulator's header."""
    return b"%s:%d:%d:" % (PAYLOAD_MAGIC, nodeid, counter) + inner


def config_stamp(transitional: bool, old_ring: Any, ring: Any, members: tuple[int, ...]) -> Hashable:
    """The same value on every node that sees the same configuration change."""
    if transitional:
        return ("t", old_ring, ring, members)
    return ("r", ring, members)

