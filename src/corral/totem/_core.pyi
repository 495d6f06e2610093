"""Type stub of the Cython Totem core (ext/totem/_core.pyx): the contract between
the sans-I/O core and everything that drives it (asyncio shell, simulator, tests).

The core does no I/O and reads no clock. Drive it like this:

    core = TotemCore(nodeid, timers, ring_seq=persisted_seq)
    core.start(now_ns)
    loop:
        core.receive(now_ns, packet)     # for every packet from the transport
        core.submit(payload)             # application messages (False = queue full)
        core.tick(now_ns)                # when now_ns >= core.next_deadline_ns()
        seq = core.take_ring_seq_to_persist()   # persist-then-send: if not None,
                                                # write it durably before sending
        for dest, packet in core.pop_outbox(): transport.send(dest, packet)
        for event in core.pop_events(): ...

Packets in `pop_outbox()` carry a destination nodeid; BROADCAST (0) means every
node the transport knows (all configured nodes, members or not).

Events from `pop_events()` are tuples, in the exact order the application must
see them (extended virtual synchrony):

    (EV_DELIVER, sender_nodeid: int, payload: bytes)
    (EV_CONFIG, kind: int (CONF_TRANSITIONAL | CONF_REGULAR), ring_id: tuple[int, int],
                members: tuple[int, ...], joined: tuple[int, ...], left: tuple[int, ...])

`left` on a regular or transitional configuration lists every old member that
did not move on with this node (failed, partitioned away or left); those that
announced a graceful leave (`leave()`) are also returned by `last_leavers()`
right after that configuration.

Configuration events (identical on every node that makes the same transition):
TRANSITIONAL has members = the old members that move to the new ring together,
joined = (), left = old members - transitional; REGULAR has members = the new
ring, joined = new - transitional, left = the same as the transitional one.
A fresh node's "old configuration" is itself alone. Messages of the old ring are
all delivered before TRANSITIONAL; new-ring messages after REGULAR.

submit() never emits packets itself, but it may move next_deadline_ns() to
"now" (to cancel a token hold): re-check the deadline after submitting.
Packets the core addresses to itself (a singleton ring) never appear in the
outbox; own packets received back from a broadcast are ignored (dropped_own).
"""

from corral.totem.config import TotemTimers

BROADCAST: int
EV_DELIVER: int
EV_CONFIG: int
CONF_TRANSITIONAL: int
CONF_REGULAR: int
PROTOCOL_VERSION: int

# Membership states.
STATE_OPERATIONAL: int
STATE_GATHER: int
STATE_COMMIT: int
STATE_RECOVERY: int
STATE_STOPPED: int
STATE_INITIAL: int  # before start()

# Packet types (first byte after magic/version in the common header).
PACKET_TOKEN: int
PACKET_MCAST: int
PACKET_JOIN: int
PACKET_COMMIT: int
PACKET_MERGE_DETECT: int
PACKET_TOKEN_HOLD_CANCEL: int
MCAST_HEADER_SIZE: int
MAX_RTR_ENTRIES: int
RING_FRAMES_MAX: int
SEND_QUEUE_MESSAGES_LIMIT: int
SEND_QUEUE_BYTES_LIMIT: int
STAT_NAMES: tuple[str, ...]

class TotemCore:
    nodeid: int
    def __init__(self, nodeid: int, timers: TotemTimers, ring_seq: int = 0) -> None:
        """ring_seq: the last value take_ring_seq_to_persist() returned (persisted).
        If it was lost (disk loss), pass a value above any ring seq the cluster
        may have used, e.g. wall-clock milliseconds * 4: ring ids must never be
        reused, or stale packets of an old ring could be taken for the new one."""
    def start(self, now_ns: int) -> None: ...
    def receive(self, now_ns: int, packet: bytes) -> None:
        """Feed one packet (after transport authentication). Malformed or foreign
        packets are dropped and counted in stats; this never raises for remote input."""
    def submit(self, payload: bytes) -> bool:
        """Queue one application message (fragmented/packed by the core).
        Returns False when the send queue is full (backpressure); raises
        UsageError when the payload is larger than MAX_MESSAGE_BYTES or the core is stopped."""
    def tick(self, now_ns: int) -> None: ...
    def leave(self, now_ns: int) -> None:
        """Graceful leave: announce it to the ring, then stop. Others record 'leave'."""
    def next_deadline_ns(self) -> int:
        """Earliest armed timer, or -1 when no timer is armed."""
    def pop_outbox(self) -> list[tuple[int, bytes]]: ...
    def pop_events(self) -> list[tuple[object, ...]]: ...
    def take_ring_seq_to_persist(self) -> int | None: ...
    def last_leavers(self) -> tuple[int, ...]:
        """Nodes that left gracefully, reported by the latest configuration change."""
    @property
    def state(self) -> int: ...
    @property
    def ring_id(self) -> tuple[int, int]: ...
    @property
    def ring_epoch(self) -> int:
        """The representative's now_ns when it created the current ring: with
        ring_id it identifies the ring uniquely, even if a node lost its
        persisted ring seq and a (rep, seq) pair comes round again."""
    @property
    def members(self) -> tuple[int, ...]: ...
    @property
    def send_queue_len(self) -> int: ...
    @property
    def send_queue_room(self) -> int:
        """Messages that can still be queued (the byte bound applies too)."""
    @property
    def send_queue_bytes(self) -> int: ...
    @property
    def held(self) -> bool:
        """True while this node (the representative) holds the token on an idle ring."""
    def stats(self) -> dict[str, int]: ...

def state_name(state: int) -> str: ...

# Codec helpers for tests and tools (not needed to drive the core).
def decode_packet(data: bytes) -> dict[str, object]:
    """Decode one packet; raises corral.errors.DecodeError when malformed."""
def encode_packet(fields: dict[str, object]) -> bytes: ...
def encode_records(messages: list[bytes]) -> bytes:
    """An MCAST body carrying each message whole."""
