"""Votequorum rules as a sans-I/O state machine.

One `QuorumCore` runs on each node. It is fed:

- `membership_changed(ring_id, members, left_clean, now_ns)`: a new Totem ring,
  with the nodes that left cleanly (a clean shutdown) told apart from failed ones;
- `message_received(sender, payload)`: a `corral-quorum` group message
  (see `corral.quorum.wire`), including this node's own messages echoed back;
- `timer_expired(now_ns)`: the last-man-standing window ran out;
- `set_expected(n)`, `leave()`, `persisted(value)`: local requests and acks.

Each call returns a list of effects for the shell: `Send` (multicast to the
group), `PersistExpected` (write ev_tracking, then call `persisted`),
`MembersChanged`, `QuorateChanged`. `next_deadline_ns` is when to call
`timer_expired` next. No clock, socket or randomness is used here.

The rules (corosync votequorum, see docs/quorum.md for the full text):

- T = votes of the current members, E = this node's expected votes, raised to
  T whenever T > E; H = the highest expected votes among the members.
- quorum = max((H + 2) // 2, (T + 2) // 2). It never decreases, except through
  `expected N`, last_man_standing and allow_downscale. two_node forces it to 1
  while there are at most 2 members.
- quorate iff T >= quorum, unless wait_for_all is still waiting; or by
  auto_tie_breaker in an exact half split.

After a membership change the node is *syncing* until every member's NODEINFO
for the new ring has arrived. While syncing, quorum can be lost but not
gained, so a node never becomes quorate on stale votes.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.errors import DecodeError, UsageError
from corral.quorum.config import MAX_EXPECTED_VOTES, MAX_NODEID, MAX_NODES, QuorumConfig
from corral.quorum.wire import ConfigFlag, NodeFlag, NodeInfo, SetExpected, decode

NS_PER_MS = 1_000_000
RingId = tuple[int, int]  # (representative nodeid, ring sequence)


class ExpectedVotesRefused(UsageError):
    """`expected N` was refused; the message says why."""


class Phase(enum.Enum):
    STARTING = "starting"  # no Totem ring yet
    SYNCING = "syncing"  # new ring, waiting for every member's NODEINFO
    SYNCED = "synced"


# Effects returned to the shell.
@dataclass(frozen=True, slots=True)
class Send:
    payload: bytes


@dataclass(frozen=True, slots=True)
class PersistExpected:
    expected_votes: int


@dataclass(frozen=True, slots=True)
class MembersChanged:
    ring_id: RingId
    members: tuple[int, ...]
    left: tuple[int, ...]
    left_clean: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class QuorateChanged:
    quorate: bool
    ring_id: RingId | None


Effect = Send | PersistExpected | MembersChanged | QuorateChanged


@dataclass(slots=True)
class _Peer:
    """What this node knows about one node (itself included)."""

    votes: int
    expected_votes: int
    flags: NodeFlag = field(default_factory=lambda: NodeFlag(0))
    announced_ring: RingId | None = None


@dataclass(frozen=True, slots=True)
class MemberStatus:
    nodeid: int
    votes: int
    expected_votes: int
    local: bool


@dataclass(frozen=True, slots=True)
class QuorumStatus:
    """A snapshot for `corral quorum status` and the status formatter."""

    nodeid: int
    ring_id: RingId | None
    quorate: bool
    members: tuple[MemberStatus, ...]
    expected_votes: int
    highest_expected: int
    total_votes: int
    quorum: int
    flags: tuple[str, ...]
    waiting_for_all: bool
    syncing: bool
    tracked_expected: int
    config_mismatch: tuple[int, ...]
    dropped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the node's status.json carries it for the CLI)."""
        data = asdict(self)
        data["ring_id"] = list(self.ring_id) if self.ring_id is not None else None
        data["members"] = [asdict(m) for m in self.members]
        data["flags"] = list(self.flags)
        data["config_mismatch"] = list(self.config_mismatch)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuorumStatus:
        """Inverse of `to_dict`; a missing or mistyped field raises UsageError."""
        try:
            ring = data["ring_id"]
            return cls(
                nodeid=int(data["nodeid"]),
                ring_id=(int(ring[0]), int(ring[1])) if ring is not None else None,
                quorate=bool(data["quorate"]),
                members=tuple(
                    MemberStatus(int(m["nodeid"]), int(m["votes"]), int(m["expected_votes"]),
                                 bool(m["local"]))
                    for m in data["members"]
                ),
                expected_votes=int(data["expected_votes"]),
                highest_expected=int(data["highest_expected"]),
                total_votes=int(data["total_votes"]),
                quorum=int(data["quorum"]),
                flags=tuple(str(f) for f in data["flags"]),
                waiting_for_all=bool(data["waiting_for_all"]),
                syncing=bool(data["syncing"]),
                tracked_expected=int(data["tracked_expected"]),
                config_mismatch=tuple(int(n) for n in data["config_mismatch"]),
                dropped={str(k): int(v) for k, v in data.get("dropped", {}).items()},
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise UsageError(f"not a quorum status: {error!r}") from None


class QuorumCore:
    """The votequorum state of one node."""

    def __init__(self, config: QuorumConfig, nodeid: int, tracked_expected: int = 0) -> None:
        if not 1 <= nodeid <= MAX_NODEID:
            raise UsageError(f"nodeid {nodeid} is out of range")
        self.config = config
        self.nodeid = nodeid
        self.phase = Phase.STARTING
        self.ring_id: RingId | None = None
        self.members: tuple[int, ...] = ()
        self.tracked_expected = tracked_expected if config.expected_votes_tracking else 0
        # ev_tracking is a floor after a restart (anchors 2.2).
        self.expected_votes = max(config.expected_votes, self.tracked_expected)
        self.quorum = (self.expected_votes + 2) // 2
        self._quorum_floor = self.quorum
        self.quorate = False
        self.waiting_for_all = config.wait_for_all
        self._two_node_cleared = False
        self._last_quorate_members: frozenset[int] | None = None
        self._sync_pending: set[int] = set()
        self.lms_deadline_ns: int | None = None
        self._persist_pending: int | None = None
        self._leaving = False
        self._peers: dict[int, _Peer] = {
            nodeid: _Peer(config.votes_of(nodeid), self.expected_votes)
        }
        self._mismatch: set[int] = set()
        self.dropped = {"malformed": 0, "spoofed": 0, "stale": 0, "not_member": 0}
        self._out: list[Effect] = []

    # ------------------------------------------------------------------ inputs

    def membership_changed(
        self,
        ring_id: RingId,
        members: Iterable[int],
        left_clean: Collection[int] = (),
        now_ns: int = 0,
    ) -> list[Effect]:
        """A new ring formed; `left_clean` are nodes that shut down cleanly."""
        new = self._check_membership(ring_id, members)
        if ring_id == self.ring_id:
            return []  # the same ring reported twice: nothing changed
        old = set(self.members)
        left = old - set(new)
        clean = {n for n in left if n in left_clean or NodeFlag.LEAVING in self._peers[n].flags}
        clean_votes = sum(self._peers[n].votes for n in clean)  # before _admit forgets any
        self._admit(new, old)
        if len(new) > 2:
            self._two_node_cleared = True
        self.ring_id, self.members = ring_id, new
        self.phase = Phase.SYNCING
        self._sync_pending = set(new) - {self.nodeid}
        downscaled = self.config.allow_downscale and bool(clean) and self._downscale(clean_votes)
        self._recalculate(allow_decrease=downscaled)
        self._out.append(MembersChanged(ring_id, new, tuple(sorted(left)), tuple(sorted(clean))))
        self._evaluate()
        self._lms_after_membership(bool(left), now_ns)
        self._announce()
        self._check_sync_done()
        return self._drain()

    def message_received(self, sender: int, payload: bytes) -> list[Effect]:
        """A group message from `sender` (this node's own messages come back too)."""
        try:
            message = decode(payload)
        except DecodeError:
            self.dropped["malformed"] += 1
            return []
        if message.nodeid != sender:
            self.dropped["spoofed"] += 1
            return []
        if message.ring_id != self.ring_id:
            self.dropped["stale"] += 1
            return []
        if sender not in self.members:
            self.dropped["not_member"] += 1
            return []
        if isinstance(message, SetExpected):
            self._apply_expected(message.expected_votes)
        elif sender != self.nodeid:
            self._apply_nodeinfo(message)
        return self._drain()

    def timer_expired(self, now_ns: int) -> list[Effect]:
        """Call at or after `next_deadline_ns`: runs the last-man-standing step."""
        if self.lms_deadline_ns is None or now_ns < self.lms_deadline_ns:
            return []
        self.lms_deadline_ns = None
        if not self.quorate:
            return []
        count = len(self.members)
        if count < self._highest_expected():
            self.expected_votes = count
            for member in self.members:
                self._peers[member].expected_votes = count
            self._recalculate(allow_decrease=True)
            self._evaluate()
            self._announce()
        return self._drain()

    def set_expected(self, expected_votes: int) -> list[Effect]:
        """`expected N`: validate, then multicast; every member applies it on delivery."""
        if self.ring_id is None:
            raise ExpectedVotesRefused("not a member of a cluster ring yet")
        if isinstance(expected_votes, bool) or not isinstance(expected_votes, int):
            raise ExpectedVotesRefused(f"expected votes must be an integer, got {expected_votes!r}")
        if not 1 <= expected_votes <= MAX_EXPECTED_VOTES:
            raise ExpectedVotesRefused(
                f"expected votes {expected_votes} is outside [1, {MAX_EXPECTED_VOTES}]"
            )
        total = self._total_votes()
        if expected_votes < total:
            raise ExpectedVotesRefused(
                f"expected votes {expected_votes} is below the {total} votes present "
                f"(it would be raised back to {total} at once)"
            )
        new_quorum = max((expected_votes + 2) // 2, (total + 2) // 2)
        if new_quorum > total:
            raise ExpectedVotesRefused(
                f"expected votes {expected_votes} would need quorum {new_quorum} but only "
                f"{total} votes are present; this partition would lose quorum"
            )
        message = SetExpected(self.nodeid, self.ring_id, expected_votes)
        return [Send(message.encode())]

    def reconfigure(self, config: QuorumConfig) -> list[Effect]:
        """The configuration changed at runtime (a node added or removed, votes or
        two_node changed). This node's votes and the configured expected votes take
        effect at once; a lower configured value may lower quorum, but H, the highest
        value among the members, keeps it up until every member has reloaded."""
        old, self.config = self.config, config
        me = self._peers[self.nodeid]
        me.votes = config.votes_of(self.nodeid)
        lowered = config.expected_votes < old.expected_votes
        if config.expected_votes != old.expected_votes:
            self.expected_votes = config.expected_votes
        if config.two_node and not old.two_node:
            self._two_node_cleared = False
        if config.wait_for_all != old.wait_for_all:
            self.waiting_for_all = config.wait_for_all and not self.quorate
        self._mismatch.clear()
        self._recalculate(allow_decrease=lowered)
        self._evaluate()
        self._announce()
        return self._drain()

    def announce(self) -> list[Effect]:
        """Send this node's NODEINFO again (a peer's quorum service just joined the group
        and missed the announcement made at the ring change)."""
        self._announce()
        return self._drain()

    def leave(self) -> list[Effect]:
        """Announce a clean shutdown so that allow_downscale counts this as a clean leave."""
        self._leaving = True
        self._announce()
        return self._drain()

    def persisted(self, expected_votes: int) -> list[Effect]:
        """The shell wrote `expected_votes` to ev_tracking (persist, then act)."""
        self.tracked_expected = max(self.tracked_expected, expected_votes)
        if self._persist_pending is not None and self.tracked_expected >= self._persist_pending:
            self._persist_pending = None
            self._evaluate()
        return self._drain()

    @property
    def next_deadline_ns(self) -> int | None:
        return self.lms_deadline_ns

    # ------------------------------------------------------------------ status

    def flags(self) -> tuple[str, ...]:
        """The `Flags:` line, in corosync-quorumtool's order."""
        named = [
            ("2Node", self._two_node_applies()),
            ("Quorate", self.quorate),
            ("WaitForAll", self.config.wait_for_all),
            ("LastManStanding", self.config.last_man_standing),
            ("AutoTieBreaker", self.config.auto_tie_breaker),
            ("AllowDownscale", self.config.allow_downscale),
        ]
        return tuple(name for name, on in named if on)

    def status(self) -> QuorumStatus:
        members = tuple(
            MemberStatus(n, self._peers[n].votes, self._peers[n].expected_votes, n == self.nodeid)
            for n in self.members
        )
        return QuorumStatus(
            nodeid=self.nodeid,
            ring_id=self.ring_id,
            quorate=self.quorate,
            members=members,
            expected_votes=self.expected_votes,
            highest_expected=self._highest_expected(),
            total_votes=self._total_votes(),
            quorum=self.quorum,
            flags=self.flags(),
            waiting_for_all=self.waiting_for_all,
            syncing=self.phase is Phase.SYNCING,
            tracked_expected=self.tracked_expected,
            config_mismatch=tuple(sorted(self._mismatch)),
            dropped=dict(self.dropped),
        )

    # ------------------------------------------------------------ membership

    def _check_membership(self, ring_id: RingId, members: Iterable[int]) -> tuple[int, ...]:
        new = tuple(sorted(set(members)))
        if self.nodeid not in new:
            raise UsageError(f"membership {new} does not contain this node {self.nodeid}")
        if len(new) > MAX_NODES:
            raise UsageError(f"{len(new)} members exceed the limit of {MAX_NODES}")
        if any(not 1 <= n <= MAX_NODEID for n in new):
            raise UsageError("a member nodeid is out of range")
        if ring_id == self.ring_id and new != self.members:
            raise UsageError(f"ring {ring_id} reported again with other members {new}")
        return new

    def _admit(self, new: tuple[int, ...], old: set[int]) -> None:
        """Create records for joining nodes; forget stale state of nodes that rejoin."""
        for nodeid in new:
            peer = self._peers.get(nodeid)
            if peer is None:
                self._peers[nodeid] = _Peer(self.config.votes_of(nodeid), self.config.expected_votes)
            elif nodeid not in old and nodeid != self.nodeid:
                peer.flags = NodeFlag(0)
                peer.announced_ring = None
        known = set(new) | set(self.config.nodeids) | {self.nodeid}
        for nodeid in [n for n in self._peers if n not in known]:
            del self._peers[nodeid]
        self._mismatch &= set(new)

    def _downscale(self, clean_votes: int) -> bool:
        """allow_downscale: a clean leave lowers expected votes, not below the configured value."""
        floor = self.config.expected_votes
        lowered = max(floor, self.expected_votes - clean_votes)
        if lowered >= self.expected_votes and self._highest_expected() <= lowered:
            return False
        self.expected_votes = lowered
        # Every member applies the same rule to the same change; lower what we recorded
        # for them too, or their pre-change values would hold quorum up until they announce.
        for member in self.members:
            peer = self._peers[member]
            peer.expected_votes = max(floor, peer.expected_votes - clean_votes)
        return True

    def _lms_after_membership(self, nodes_left: bool, now_ns: int) -> None:
        if not self.config.last_man_standing or not nodes_left:
            return
        if self.quorate and len(self.members) >= self.quorum:
            self.lms_deadline_ns = now_ns + self.config.last_man_standing_window_ms * NS_PER_MS
        else:
            self.lms_deadline_ns = None

    # -------------------------------------------------------------- messages

    def _apply_nodeinfo(self, info: NodeInfo) -> None:
        peer = self._peers[info.nodeid]
        # A member lowers its expected votes only through an explicit path (expected N,
        # LMS, downscale, a reload) that this node takes too; once the last member
        # has caught up, quorum may follow H down (never below this node's own E).
        lowered = info.expected_votes < peer.expected_votes
        peer.votes = info.votes
        peer.expected_votes = info.expected_votes
        peer.flags = info.flags
        peer.announced_ring = info.ring_id
        if info.config_flags != self._config_flags() or (
            info.config_expected_votes != self.config.expected_votes
        ) or info.lms_window_ms != self.config.last_man_standing_window_ms:
            self._mismatch.add(info.nodeid)
        else:
            self._mismatch.discard(info.nodeid)
        self._sync_pending.discard(info.nodeid)
        self._recalculate(allow_decrease=lowered)
        self._evaluate()
        self._check_sync_done()

    def _apply_expected(self, expected_votes: int) -> None:
        self.expected_votes = expected_votes
        for member in self.members:
            self._peers[member].expected_votes = expected_votes
        self._recalculate(allow_decrease=True)
        self._evaluate()
        self._announce()

    def _check_sync_done(self) -> None:
        if self.phase is Phase.SYNCING and not self._sync_pending:
            self.phase = Phase.SYNCED
            self._evaluate()

    def _announce(self) -> None:
        if self.ring_id is None:
            return
        flags = NodeFlag(0)
        if self.quorate:
            flags |= NodeFlag.QUORATE
        if self.waiting_for_all:
            flags |= NodeFlag.WAITING_FOR_ALL
        if self._leaving:
            flags |= NodeFlag.LEAVING
        me = self._peers[self.nodeid]
        me.flags, me.expected_votes, me.announced_ring = flags, self.expected_votes, self.ring_id
        info = NodeInfo(
            self.nodeid, self.ring_id, me.votes, self.expected_votes, flags,
            self._config_flags(), self.config.expected_votes,
            self.config.last_man_standing_window_ms,
        )
        self._out.append(Send(info.encode()))

    def _config_flags(self) -> ConfigFlag:
        config, flags = self.config, ConfigFlag(0)
        for on, flag in (
            (config.two_node, ConfigFlag.TWO_NODE),
            (config.wait_for_all, ConfigFlag.WAIT_FOR_ALL),
            (config.last_man_standing, ConfigFlag.LAST_MAN_STANDING),
            (config.auto_tie_breaker, ConfigFlag.AUTO_TIE_BREAKER),
            (config.allow_downscale, ConfigFlag.ALLOW_DOWNSCALE),
            (config.expected_votes_tracking, ConfigFlag.EXPECTED_VOTES_TRACKING),
        ):
            if on:
                flags |= flag
        return flags

    # ------------------------------------------------------------------ rules

    def _total_votes(self) -> int:
        return sum(self._peers[n].votes for n in self.members)

    def _highest_expected(self) -> int:
        highest = self.expected_votes
        for member in self.members:
            highest = max(highest, self._peers[member].expected_votes)
        return highest

    def _two_node_applies(self) -> bool:
        return self.config.two_node and not self._two_node_cleared and len(self.members) <= 2

    def _recalculate(self, allow_decrease: bool) -> None:
        total = self._total_votes()
        if total > self.expected_votes:
            self.expected_votes = total
        self._peers[self.nodeid].expected_votes = self.expected_votes
        highest = self._highest_expected()
        quorum = max((highest + 2) // 2, (total + 2) // 2)
        if not allow_decrease:
            quorum = max(quorum, self._quorum_floor)
        self._quorum_floor = quorum
        self.quorum = 1 if self._two_node_applies() else quorum
        self._track(highest)

    def _track(self, highest: int) -> None:
        """expected_votes_tracking: ask the shell to persist a new highest value."""
        if not self.config.expected_votes_tracking:
            return
        known = max(self.tracked_expected, self._persist_pending or 0)
        if highest > known:
            self._persist_pending = highest
            self._out.append(PersistExpected(highest))

    def _evaluate(self) -> None:
        """Decide quorate from the current numbers; the one place it changes."""
        self._maybe_end_wait()
        quorate = self._votes_suffice()
        if quorate and not self.quorate:
            # Gain quorum only on an agreed view, and only once ev_tracking is on disk.
            if self.phase is not Phase.SYNCED or self._persist_pending is not None:
                quorate = False
        if quorate != self.quorate:
            self.quorate = quorate
            self._out.append(QuorateChanged(quorate, self.ring_id))
            if not quorate:
                self.waiting_for_all = self.config.wait_for_all
                self.lms_deadline_ns = None
                # Only a node that is quorate right now may break a tie: a view kept
                # from before it lost quorum can be stale, and a stale view and a
                # current one can each point into a different half.
                self._last_quorate_members = None
            self._announce()
        if self.quorate:
            self._last_quorate_members = frozenset(self.members)

    def _votes_suffice(self) -> bool:
        if self.waiting_for_all or not self.members:
            return False
        total = self._total_votes()
        if total >= self.quorum:
            return True
        return self.config.auto_tie_breaker and self._holds_tie_breaker(total)

    def _maybe_end_wait(self) -> None:
        """wait_for_all ends once all expected votes are seen together, or when a
        member of this very ring is quorate and not waiting itself."""
        if not self.waiting_for_all or self.phase is not Phase.SYNCED:
            return
        peer_quorate = any(
            NodeFlag.QUORATE in self._peers[n].flags
            and NodeFlag.WAITING_FOR_ALL not in self._peers[n].flags
            and self._peers[n].announced_ring == self.ring_id
            for n in self.members
            if n != self.nodeid
        )
        if self._total_votes() >= self._highest_expected() or peer_quorate:
            self.waiting_for_all = False
            self._announce()

    def _holds_tie_breaker(self, total: int) -> bool:
        """auto_tie_breaker: only in an exact half split that the other side cannot win."""
        highest = self._highest_expected()
        other_side = highest - total
        if total != highest // 2 or other_side >= (highest + 2) // 2:
            return False
        previous = self._last_quorate_members
        if previous is None:
            return False  # not quorate before this change (or never): no tie to break
        here = set(self.members)
        mode = self.config.auto_tie_breaker_mode
        if mode == "lowest":
            return min(previous) in here
        if mode == "highest":
            return max(previous) in here
        # The first listed node that was in the previous partition decides. A listed
        # node from outside it is skipped even if it is here now: the other half
        # cannot know where it went, and must come to the same answer.
        for nodeid in self.config.auto_tie_breaker_nodes:
            if nodeid in previous:
                return nodeid in here
        return False

    def _drain(self) -> list[Effect]:
        out, self._out = self._out, []
        return out
