"""Safety checkers for Totem's extended virtual synchrony, run after every step.

The checker sees what each process observes: submissions, deliveries and
configuration events, in the order its core emitted them. A process is one
incarnation of a node (`Proc = (nodeid, incarnation)`): a crashed and restarted
node is a new process, as in the EVS model, so duplicate and self-delivery
checks never mix incarnations.

Checks, each raising `Violation(checker, nodes, detail)` at the first breach:

- integrity: no invented delivery (the payload was submitted, byte for byte, by
  the node the core names as sender), no duplicate delivery at a process,
  per-sender FIFO order, no delivery outside a configuration;
- total-order: no two processes deliver two messages in opposite orders
  (checked incrementally in O(processes) per delivery, see `_check_order`);
- same-config: a message is delivered in the same regular ring everywhere
  (messages delivered in a transitional configuration count for the regular
  ring they were sent in);
- config-consistency: members of a regular ring id are identical everywhere;
  a process is a member of every configuration it installs; ring seqs strictly
  increase at a process; a transitional configuration is a subset of the old
  ring and of the next one, and the same at every process that moves from
  the same old ring to the same new ring; joined/left agree with members;
- virtual-synchrony: processes that install the same two consecutive
  configurations delivered the same set of messages between them (this also
  gives "a message delivered at a sender that stays in the ring is delivered at
  every process that moves on with it");
- at the end (`check_final`): self-delivery (a live process delivered every
  message it submitted), and all live processes delivered the same messages in
  the final regular configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

Proc = tuple[int, int]
MessageId = tuple[int, int]
RingKey = tuple[int, ...]
ConfigKey = tuple[int, RingKey, tuple[int, ...]]

CONF_TRANSITIONAL = 0
CONF_REGULAR = 1
PAYLOAD_MAGIC = b"csim"
_FILLER = bytes(range(256)) * 2


class Violation(Exception):
    """A checker found a safety or liveness breach."""

    def __init__(self, checker: str, nodes: list[int], detail: str) -> None:
        super().__init__(f"[{checker}] nodes {nodes}: {detail}")
        self.checker = checker
        self.nodes = nodes
        self.detail = detail


def make_payload(nodeid: int, counter: int, filler_bytes: int) -> bytes:
    """A payload that names its sender and a per-node counter, plus filler."""
    head = b"%s:%d:%d:" % (PAYLOAD_MAGIC, nodeid, counter)
    start = counter & 0xFF
    pattern = _FILLER[start:start + 256]
    return head + (pattern * (filler_bytes // 256 + 1))[:filler_bytes]


def parse_payload(payload: bytes) -> MessageId | None:
    parts = payload.split(b":", 3)
    if len(parts) < 4 or parts[0] != PAYLOAD_MAGIC:
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None


def proc_name(proc: Proc) -> str:
    return f"n{proc[0]}.{proc[1]}"


@dataclass(slots=True)
class ProcState:
    proc: Proc
    alive: bool = True
    delivered: dict[MessageId, int] = field(default_factory=dict)
    submitted: list[MessageId] = field(default_factory=list)
    last_counter_from: dict[int, int] = field(default_factory=dict)
    regular: tuple[RingKey, tuple[int, ...]] | None = None
    last_config: ConfigKey | None = None
    segment: list[MessageId] = field(default_factory=list)


class EvsChecker:
    def __init__(self, kinds: tuple[int, int] = (CONF_TRANSITIONAL, CONF_REGULAR)) -> None:
        self.conf_transitional, self.conf_regular = kinds
        self.procs: dict[Proc, ProcState] = {}
        self.submitted: dict[MessageId, tuple[Proc, bytes]] = {}
        self.deliverers: dict[MessageId, list[Proc]] = {}
        self.message_ring: dict[MessageId, RingKey] = {}
        self.ring_members: dict[RingKey, tuple[tuple[int, ...], Proc]] = {}
        self.disk_epoch: dict[int, int] = {}
        self.transitional_members: dict[tuple[RingKey, RingKey], tuple[tuple[int, ...], Proc]] = {}
        self.segments: dict[tuple[ConfigKey, ConfigKey], tuple[frozenset[MessageId], Proc]] = {}
        # max_position[(p, o)] = max position at o of a message both p and o delivered.
        self.max_position: dict[tuple[Proc, Proc], int] = {}
        self.deliveries = 0
        self.configs = 0

    # -- inputs -------------------------------------------------------------------

    def on_start(self, proc: Proc, disk_lost: bool = False) -> None:
        if proc in self.procs:
            raise ValueError(f"process {proc_name(proc)} started twice")
        self.procs[proc] = ProcState(proc)
        if disk_lost:
            self.disk_epoch[proc[0]] = self.disk_epoch.get(proc[0], 0) + 1

    def ring_key(self, ring_id: tuple[int, int]) -> RingKey:
        """The ring id, plus the representative's disk-loss epoch once it lost its disk.

        A node that lost its persisted ring seq can legitimately form a ring id
        it (or a ring it represented) already used, as corosync can when its
        ringid file is lost; the epoch keeps those apart instead of reporting a
        false membership mismatch."""
        rep, seq = int(ring_id[0]), int(ring_id[1])
        epoch = self.disk_epoch.get(rep, 0)
        return (rep, seq, epoch) if epoch else (rep, seq)

    def on_crash(self, proc: Proc) -> None:
        self.procs[proc].alive = False

    def on_submit(self, proc: Proc, payload: bytes) -> None:
        message = parse_payload(payload)
        if message is None or message[0] != proc[0] or message in self.submitted:
            raise ValueError(f"workload bug: bad or reused payload {payload[:40]!r}")
        self.submitted[message] = (proc, payload)
        self.procs[proc].submitted.append(message)

    def on_deliver(self, proc: Proc, sender: int, payload: bytes) -> None:
        state = self.procs[proc]
        message = self._check_integrity(state, sender, payload)
        ring = self._check_same_config(state, message)
        self._check_order(state, message)
        position = len(state.delivered)
        state.delivered[message] = position
        state.last_counter_from[sender] = message[1]
        state.segment.append(message)
        self.deliverers.setdefault(message, []).append(proc)
        self.message_ring.setdefault(message, ring)
        self.deliveries += 1

    def on_config(
        self,
        proc: Proc,
        kind: int,
        ring_id: tuple[int, int],
        members: tuple[int, ...],
        joined: tuple[int, ...],
        left: tuple[int, ...],
    ) -> None:
        state = self.procs[proc]
        ring = self.ring_key(ring_id)
        members = tuple(sorted(members))
        if proc[0] not in members:
            self._fail("config-consistency", [proc[0]], f"{proc_name(proc)} installs {kind=} ring {ring} {members} without itself")
        # A node can be in `left` and in `members` of one regular configuration:
        # it failed and came back (restarted) within one membership change; then
        # it is in `joined` too. A member that never left cannot have left.
        if set(joined) - set(members) or set(left) & (set(members) - set(joined)):
            self._fail("config-consistency", [proc[0]], f"{proc_name(proc)} ring {ring}: joined {joined} / left {left} disagree with members {members}")
        if kind == self.conf_regular:
            self._check_regular(state, ring, members)
        elif kind == self.conf_transitional:
            self._check_transitional(state, ring, members)
        else:
            self._fail("config-consistency", [proc[0]], f"unknown configuration kind {kind}")
        key: ConfigKey = (kind, ring, members)
        self._check_segment(state, key)
        state.last_config = key
        state.segment = []
        self.configs += 1

    # -- per-step checks ------------------------------------------------------------

    def _check_integrity(self, state: ProcState, sender: int, payload: bytes) -> MessageId:
        proc = state.proc
        message = parse_payload(payload)
        origin = self.submitted.get(message) if message is not None else None
        if message is None or origin is None:
            self._fail("integrity", [proc[0], sender], f"{proc_name(proc)} delivered a message nobody submitted: {payload[:40]!r}")
        if origin[0][0] != sender or origin[1] != payload:
            self._fail("integrity", [proc[0], sender], f"{proc_name(proc)} delivered {message} as from n{sender} with {len(payload)} bytes; submitted by {proc_name(origin[0])} with {len(origin[1])} bytes")
        if message in state.delivered:
            self._fail("integrity", [proc[0]], f"{proc_name(proc)} delivered {message} twice")
        last = state.last_counter_from.get(sender, -1)
        if message[1] <= last:
            self._fail("integrity", [proc[0], sender], f"{proc_name(proc)} delivered n{sender}'s message {message[1]} after its message {last} (per-sender FIFO)")
        if state.regular is None:
            self._fail("integrity", [proc[0]], f"{proc_name(proc)} delivered {message} before installing any configuration")
        return message

    def _check_same_config(self, state: ProcState, message: MessageId) -> RingKey:
        if state.regular is None:  # unreachable: _check_integrity rejects it first
            self._fail("integrity", [state.proc[0]], "delivery outside a configuration")
        ring = state.regular[0]
        first = self.message_ring.get(message)
        if first is not None and first != ring:
            others = [p[0] for p in self.deliverers[message]]
            self._fail("same-config", [state.proc[0], *others], f"{proc_name(state.proc)} delivered {message} in ring {ring}, others in ring {first}")
        return ring

    def _check_order(self, state: ProcState, message: MessageId) -> None:
        """Total order agreement, incrementally.

        For a pair (p, o), max_position[(p, o)] is the highest position at o of a
        message both have delivered. When p delivers m that o delivered at
        position k, every message p delivered before m must sit before k at o:
        that is exactly max_position[(p, o)] < k. The table is kept exact by
        updating it whenever the pair's common set grows, from either side.
        """
        proc = state.proc
        position = len(state.delivered)
        for other in self.deliverers.get(message, ()):
            if other == proc:
                continue
            other_position = self.procs[other].delivered[message]
            if self.max_position.get((proc, other), -1) > other_position:
                witness = self._order_witness(state, self.procs[other], other_position)
                self._fail("total-order", [proc[0], other[0]], f"{proc_name(proc)} delivered {witness} before {message}, {proc_name(other)} delivered them the other way round")
            pair = (proc, other)
            self.max_position[pair] = max(self.max_position.get(pair, -1), other_position)
            self.max_position[(other, proc)] = position

    @staticmethod
    def _order_witness(state: ProcState, other: ProcState, after: int) -> MessageId | None:
        for message in state.delivered:
            if other.delivered.get(message, -1) > after:
                return message
        return None

    def _check_regular(self, state: ProcState, ring_id: RingKey, members: tuple[int, ...]) -> None:
        proc = state.proc
        known = self.ring_members.get(ring_id)
        if known is None:
            self.ring_members[ring_id] = (members, proc)
        elif known[0] != members:
            self._fail("config-consistency", [proc[0], known[1][0]], f"ring {ring_id}: {proc_name(proc)} has members {members}, {proc_name(known[1])} has {known[0]}")
        if state.regular is not None and ring_id[1] <= state.regular[0][1]:
            self._fail("config-consistency", [proc[0]], f"{proc_name(proc)} installed ring {ring_id} after ring {state.regular[0]} (seq must increase)")
        last = state.last_config
        if last is not None and last[0] == self.conf_transitional and not set(last[2]) <= set(members):
            self._fail("config-consistency", [proc[0]], f"{proc_name(proc)} transitional members {last[2]} not a subset of new ring {ring_id} {members}")
        state.regular = (ring_id, members)

    def _check_transitional(self, state: ProcState, ring_id: RingKey, members: tuple[int, ...]) -> None:
        proc = state.proc
        if state.regular is None:
            return
        old_members = state.regular[1]
        if not set(members) <= set(old_members):
            self._fail("config-consistency", [proc[0]], f"{proc_name(proc)} transitional {ring_id} {members} not a subset of old ring {state.regular[0]} {old_members}")
        # Everyone moving from the same old ring to the same new ring moves together.
        transition = (state.regular[0], ring_id)
        known = self.transitional_members.get(transition)
        if known is None:
            self.transitional_members[transition] = (members, proc)
        elif known[0] != members:
            self._fail("config-consistency", [proc[0], known[1][0]], f"from ring {state.regular[0]} to {ring_id}: {proc_name(proc)} has transitional members {members}, {proc_name(known[1])} has {known[0]}")

    def _check_segment(self, state: ProcState, key: ConfigKey) -> None:
        if state.last_config is None:
            return
        pair = (state.last_config, key)
        delivered = frozenset(state.segment)
        known = self.segments.get(pair)
        if known is None:
            self.segments[pair] = (delivered, state.proc)
            return
        if known[0] != delivered:
            only_here = sorted(delivered - known[0])[:5]
            only_there = sorted(known[0] - delivered)[:5]
            self._fail("virtual-synchrony", [state.proc[0], known[1][0]], f"between {pair[0]} and {pair[1]}: only {proc_name(state.proc)} delivered {only_here}, only {proc_name(known[1])} delivered {only_there}")

    # -- end of run -------------------------------------------------------------------

    def check_final(self, live: list[Proc]) -> None:
        """Self-delivery and equal delivery in the final ring, for live processes."""
        for proc in live:
            state = self.procs[proc]
            missing = [m for m in state.submitted if m not in state.delivered]
            if missing:
                self._fail("self-delivery", [proc[0]], f"{proc_name(proc)} never delivered {len(missing)} of its own messages, first {missing[:5]}")
        rings = {self.procs[p].regular for p in live}
        if len(rings) > 1:
            detail = "; ".join(f"{proc_name(p)}: {self.procs[p].regular}" for p in live)
            self._fail("membership-agreement", [p[0] for p in live], f"live processes end in different rings: {detail}")
        if live:
            reference = self.procs[live[0]]
            for proc in live[1:]:
                state = self.procs[proc]
                if (state.last_config, frozenset(state.segment)) != (reference.last_config, frozenset(reference.segment)):
                    diff = sorted(frozenset(state.segment) ^ frozenset(reference.segment))[:5]
                    self._fail("virtual-synchrony", [proc[0], reference.proc[0]], f"final ring: {proc_name(proc)} and {proc_name(reference.proc)} delivered different messages (e.g. {diff})")

    def _fail(self, checker: str, nodes: list[int], detail: str) -> NoReturn:
        raise Violation(checker, sorted(set(nodes)), detail)
