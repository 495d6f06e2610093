"""A tiny stand-in for TotemCore, used only to test the asyncio driver (TotemNode).

It is not Totem: every node broadcasts a heartbeat each `HEARTBEAT_NS`, the
membership is the set of nodes heard from recently, and submitted messages are
broadcast on the next heartbeat tick. Enough to exercise timers, batching,
persist-then-send, listeners, backpressure and leave. Packets carry the ring
seq they were sent under, so a test can check it was on disk first.
"""

from __future__ import annotations

import struct

from corral.totem.config import TotemTimers

HEARTBEAT_NS = 20_000_000
EXPIRY_NS = 200_000_000
QUEUE_LIMIT = 4
EV_DELIVER, EV_CONFIG, CONF_REGULAR = 1, 2, 1
HEADER = struct.Struct(">cIQ")  # kind, nodeid, ring seq


class FakeCore:
    def __init__(self, nodeid: int, timers: TotemTimers, ring_seq: int = 0) -> None:
        self.nodeid = nodeid
        self.ring_seq = ring_seq
        self.initial_ring_seq = ring_seq
        self._persist: int | None = None
        self._deadline = -1
        self._outbox: list[tuple[int, bytes]] = []
        self._events: list[tuple[object, ...]] = []
        self._queue: list[bytes] = []
        self._heard: dict[int, int] = {}
        self._members: tuple[int, ...] = ()
        self._state = 0
        self.received = 0

    def start(self, now_ns: int) -> None:
        self._heard[self.nodeid] = now_ns
        self._deadline = now_ns

    def receive(self, now_ns: int, packet: bytes) -> None:
        kind, sender, _seq = HEADER.unpack_from(packet)
        self.received += 1
        if self._state:
            return
        if kind == b"L":
            self._heard.pop(sender, None)
            self._update_members()
            return
        self._heard[sender] = now_ns
        if kind == b"M":
            self._events.append((EV_DELIVER, sender, packet[HEADER.size:]))
        self._update_members()

    def _update_members(self) -> None:
        members = tuple(sorted(self._heard))
        if members != self._members:
            left = tuple(n for n in self._members if n not in members)
            joined = tuple(n for n in members if n not in self._members)
            self._members = members
            self.ring_seq += 4
            self._persist = self.ring_seq
            ring = (min(members), self.ring_seq)
            self._events.append((EV_CONFIG, CONF_REGULAR, ring, members, joined, left))

    def _packet(self, kind: bytes, body: bytes = b"") -> tuple[int, bytes]:
        return 0, HEADER.pack(kind, self.nodeid, self.ring_seq) + body

    def submit(self, payload: bytes) -> bool:
        if len(self._queue) >= QUEUE_LIMIT:
            return False
        self._queue.append(payload)
        return True

    def tick(self, now_ns: int) -> None:
        if now_ns < self._deadline or self._state:
            return
        self._heard[self.nodeid] = now_ns
        for sender in [n for n, t in self._heard.items() if now_ns - t > EXPIRY_NS]:
            del self._heard[sender]
        self._update_members()
        self._outbox.append(self._packet(b"H"))
        for payload in self._queue:
            # like TotemCore: own messages are handled in-process, the
            # transport sends no copy of a broadcast back to its sender
            self._outbox.append(self._packet(b"M", payload))
            self._events.append((EV_DELIVER, self.nodeid, payload))
        self._queue.clear()
        self._deadline = now_ns + HEARTBEAT_NS

    def leave(self, now_ns: int) -> None:
        self._outbox.append(self._packet(b"L"))
        self._state = 1
        self._deadline = -1

    def next_deadline_ns(self) -> int:
        return self._deadline

    def pop_outbox(self) -> list[tuple[int, bytes]]:
        out, self._outbox = self._outbox, []
        return out

    def pop_events(self) -> list[tuple[object, ...]]:
        out, self._events = self._events, []
        return out

    def take_ring_seq_to_persist(self) -> int | None:
        seq, self._persist = self._persist, None
        return seq

    @property
    def state(self) -> int:
        return self._state

    @property
    def ring_id(self) -> tuple[int, int]:
        return (min(self._members or (self.nodeid,)), self.ring_seq)

    @property
    def members(self) -> tuple[int, ...]:
        return self._members

    @property
    def send_queue_room(self) -> int:
        return QUEUE_LIMIT - len(self._queue)

    def stats(self) -> dict[str, int]:
        return {"received": self.received}
