"""A trivial stand-in core, used ONLY to exercise the simulator harness in tests.

It is not Totem: node 1 is a fixed sequencer, membership is static (one
regular configuration of all nodes, emitted at start), there are no timers and
no retransmissions, so it only works on a fault-free network. `bug` plants one
deliberate fault so tests can prove the harness and checkers catch it:

- "dup": node 2 delivers every 10th message twice;
- "reorder": node 3 swaps the delivery of sequence numbers 5 and 6;
- "drop": node 2 never delivers sequence number 7;
- "invent": node 3 delivers a payload nobody submitted;
- "members": node 2 reports an extra member in the ring;
- "split": node 3 never leaves its own singleton ring (no convergence);
- "stuck": node 2 reports a send queue that never drains.
"""

from __future__ import annotations

import struct
from typing import Any

from corral.sim.cluster import CoreApi
from corral.totem.config import TotemTimers

EV_DELIVER = 1
EV_CONFIG = 2
CONF_TRANSITIONAL = 0
CONF_REGULAR = 1
STATE_OPERATIONAL = 1
SEQUENCER = 1
QUEUE_ROOM = 64


class FakeCore:
    def __init__(self, nodeid: int, timers: TotemTimers, ring_seq: int, n_nodes: int, bug: str) -> None:
        self.nodeid = nodeid
        self.n_nodes = n_nodes
        self.bug = bug
        self.outbox: list[tuple[int, bytes]] = []
        self.events: list[tuple[Any, ...]] = []
        self.next_seq = 1
        self.next_deliver = 1
        self.pending: dict[int, tuple[int, bytes]] = {}
        self.held: tuple[int, bytes] | None = None
        self.state = STATE_OPERATIONAL
        self.ring_id = (1, 4)
        self.members = tuple(range(1, n_nodes + 1))
        if bug == "split" and nodeid == 3:
            self.ring_id = (3, 4)
            self.members = (3,)
        self.send_queue_len = 1 if bug == "stuck" and nodeid == 2 else 0

    def start(self, now_ns: int) -> None:
        members = self.members
        if self.bug == "members" and self.nodeid == 2:
            members = (*members, 99)
        self.events.append((EV_CONFIG, CONF_REGULAR, self.ring_id, members, members, ()))

    def submit(self, payload: bytes) -> bool:
        if self.bug == "split" and self.nodeid == 3:
            return False
        if self.nodeid == SEQUENCER:
            self._order(self.nodeid, payload)
        else:
            self.outbox.append((SEQUENCER, b"S" + struct.pack("!I", self.nodeid) + payload))
        return True

    def receive(self, now_ns: int, packet: bytes) -> None:
        if self.bug == "split" and self.nodeid == 3:
            return  # cut off from everything, in its own ring
        if packet[:1] == b"S" and self.nodeid == SEQUENCER:
            (sender,) = struct.unpack_from("!I", packet, 1)
            self._order(sender, packet[5:])
        elif packet[:1] == b"O":
            seq, sender = struct.unpack_from("!QI", packet, 1)
            self.pending[seq] = (sender, packet[13:])
            self._deliver_ready()

    def _order(self, sender: int, payload: bytes) -> None:
        packet = b"O" + struct.pack("!QI", self.next_seq, sender) + payload
        self.next_seq += 1
        self.outbox.append((0, packet))

    def _deliver_ready(self) -> None:
        while self.next_deliver in self.pending:
            seq = self.next_deliver
            sender, payload = self.pending.pop(seq)
            self.next_deliver += 1
            self._deliver(seq, sender, payload)

    def _deliver(self, seq: int, sender: int, payload: bytes) -> None:
        bug, me = self.bug, self.nodeid
        if bug == "reorder" and me == 3 and seq == 5:
            self.held = (sender, payload)
            return
        if bug == "drop" and me == 2 and seq == 7:
            return
        self.events.append((EV_DELIVER, sender, payload))
        if bug == "dup" and me == 2 and seq % 10 == 0:
            self.events.append((EV_DELIVER, sender, payload))
        if bug == "invent" and me == 3 and seq == 4:
            self.events.append((EV_DELIVER, sender, b"csim:%d:999999:" % sender))
        if self.held is not None and seq == 6:
            self.events.append((EV_DELIVER, *self.held))
            self.held = None

    def tick(self, now_ns: int) -> None:
        pass

    def next_deadline_ns(self) -> int:
        return -1

    def stats(self) -> dict[str, int]:
        return {"dropped_malformed": 0}

    def take_ring_seq_to_persist(self) -> int | None:
        return None

    def pop_outbox(self) -> list[tuple[int, bytes]]:
        out, self.outbox = self.outbox, []
        return out

    def pop_events(self) -> list[tuple[Any, ...]]:
        out, self.events = self.events, []
        return out


def fake_api(n_nodes: int, bug: str = "") -> CoreApi:
    return CoreApi(
        factory=lambda nodeid, timers, ring_seq: FakeCore(nodeid, timers, ring_seq, n_nodes, bug),
        ev_deliver=EV_DELIVER,
        ev_config=EV_CONFIG,
        conf_transitional=CONF_TRANSITIONAL,
        conf_regular=CONF_REGULAR,
        state_operational=STATE_OPERATIONAL,
        loopback=True,
    )
