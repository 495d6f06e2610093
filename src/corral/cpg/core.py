"""Closed process groups on top of Totem: the sans-I/O core, one per node.

The core turns Totem's extended-virtual-synchrony stream into per-group
membership and delivery for local clients, as corosync's CPG service does.

Inputs:
- Totem events in the order Totem hands them out: `deliver(sender, payload)` and
  `configuration(transitional, ring_id, members)` (or `totem_event(tuple)`, which
  takes the tuples of `TotemCore.pop_events()` as they are).
- Local API calls of local clients, each identified by a client id chosen by the
  caller and the client's pid: `join`, `leave`, `mcast`, `client_disconnected`.

Outputs:
- `pop_outbox()`: payloads to submit to Totem, in order (the caller keeps the
  order when Totem pushes back).
- `pop_events()`: `(client_id, event)` pairs; events are `Deliver`, `ConfChg`
  and `TotemConfChg` from `corral.cpg.events`.

Why membership stays identical on every node: joins and leaves are Totem
messages, so every node applies them at the same point of the total order.
After a Totem membership change the nodes run a sync: processes on nodes lost
from the ring leave as NODEDOWN at the transitional configuration; then every
node multicasts its joinlist (the processes it has in groups, as implied by
every JOIN/LEAVE it has submitted so far) and every node waits until it has the
joinlists of all ring members. From those it rebuilds one cluster-wide view,
identical everywhere, announcing processes of newly reachable nodes as NODEUP
and dropping entries no joinlist vouches for as PROCDOWN.

Messages that Totem delivers during the sync (a node queued them before the
ring changed) are held back and replayed in order after the sync: the
reconciled view first has their membership effects undone (each node's
joinlist already includes them, because a node submits nothing after its
joinlist until the sync completes), so every node replays them on the same
state and emits the same confchgs. Local operations during a sync are queued
locally and submitted when it completes; nothing is lost.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from corral.cpg import wire
from corral.cpg.events import ConfChg, CpgEvent, Deliver, Member, Reason, TotemConfChg
from corral.errors import DecodeError, UsageError

try:  # The Totem core's event constants; fall back while the extension is a stub.
    from corral.totem._core import (  # type: ignore[attr-defined,unused-ignore]
        CONF_TRANSITIONAL as _CONF_TRANSITIONAL,
    )
    from corral.totem._core import (  # type: ignore[attr-defined,unused-ignore]
        EV_CONFIG as _EV_CONFIG,
    )
    from corral.totem._core import (  # type: ignore[attr-defined,unused-ignore]
        EV_DELIVER as _EV_DELIVER,
    )
except ImportError:  # pragma: no cover - only before ext/totem is built
    _EV_DELIVER, _EV_CONFIG, _CONF_TRANSITIONAL = 1, 2, 1

EV_DELIVER: int = _EV_DELIVER
EV_CONFIG: int = _EV_CONFIG
CONF_TRANSITIONAL: int = _CONF_TRANSITIONAL

# Application messages one node holds back while a sync runs (local queue).
MAX_QUEUED_MESSAGES = 8192
MAX_QUEUED_BYTES = 64 << 20
# Messages from the new ring held back until the sync completes.
MAX_INTERIM_MESSAGES = 65536
MAX_INTERIM_BYTES = 128 << 20
# Local clients of one node.
MAX_CLIENTS = 4096
MAX_PID = 0xFFFF_FFFF

# Counters of stats(); docs/cpg.md says what each means.
STAT_NAMES = (
    "submitted", "delivered", "syncs_completed", "syncs_abandoned", "held_during_sync",
    "malformed_dropped", "foreign_payloads", "stale_joinlists", "interim_dropped",
    "foreign_dropped", "sync_mismatch",
)

NodePid = tuple[int, int]
_MCAST_PREFIX = wire.WIRE_MAGIC + bytes((wire.WIRE_VERSION, wire.Kind.MCAST))
_PID = struct.Struct(">I")


class ErrorCode(enum.IntEnum):
    """Why a local call failed; numbered as corosync's cs_error_t."""

    OK = 1
    LIBRARY = 2
    TRY_AGAIN = 6
    INVALID_PARAM = 7
    BAD_HANDLE = 9
    NOT_EXIST = 12
    EXIST = 14
    NO_SPACE = 15
    MESSAGE_ERROR = 22
    TOO_BIG = 26


class CpgError(UsageError):
    """A local CPG call was refused; `code` says why (as corosync's cs_error_t)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class SyncState(enum.Enum):
    NO_RING = "no_ring"  # no regular configuration yet: queue local operations
    OPERATIONAL = "operational"  # membership agreed: apply messages as they come
    TRANSITIONAL = "transitional"  # old ring ending: apply old-ring messages, queue local ops
    SYNC = "sync"  # new ring: waiting for every member's joinlist


class LocalState(enum.Enum):
    JOINING = "joining"  # JOIN queued or submitted, not yet delivered
    JOINED = "joined"  # own JOIN delivered: the process is a member
    LEAVING = "leaving"  # LEAVE queued or submitted, not yet delivered


# Enum members used on hot paths, looked up once.
_LEAVING = LocalState.LEAVING
_OPERATIONAL = SyncState.OPERATIONAL
_SYNC = SyncState.SYNC
_MAX_GROUP_NAME_BYTES = wire.MAX_GROUP_NAME_BYTES
_MAX_PAYLOAD_BYTES = wire.MAX_PAYLOAD_BYTES


@dataclass(slots=True)
class _Client:
    pid: int
    groups: dict[bytes, LocalState] = field(default_factory=dict)


# A locally queued operation: (kind, group, pid, encoded payload).
_QueuedOp = tuple[wire.Kind, bytes, int, bytes]


class CpgCore:
    """CPG state machine of one node; see the module docstring for the protocol."""

    def __init__(self, nodeid: int) -> None:
        if not 0 < nodeid <= 0xFFFF_FFFF:
            raise UsageError(f"nodeid {nodeid} out of range")
        self.nodeid = nodeid
        self._state = SyncState.NO_RING
        self._view: dict[bytes, set[NodePid]] = {}
        self._clients: dict[int, _Client] = {}
        # group -> pid -> client id, for this node's processes (routing of events).
        self._local: dict[bytes, dict[int, int]] = {}
        # group -> client ids a delivery goes to (local pids in the view, by pid):
        # derived from _local and _view, dropped whenever either changes.
        self._recipients: dict[bytes, tuple[int, ...]] = {}
        # (group, pid) whose LEAVE is queued or in flight after the client went away.
        self._orphan_leaves: set[tuple[bytes, int]] = set()
        # Own entries implied by every JOIN/LEAVE submitted so far: the joinlist.
        self._own_sent: set[tuple[bytes, int]] = set()
        self._queue: deque[_QueuedOp] = deque()
        self._queued_bytes = 0
        self._outbox: list[bytes] = []
        self._events: list[tuple[int, CpgEvent]] = []
        self._ring_id: tuple[int, int] = (0, 0)
        self._ring_members: tuple[int, ...] = ()
        self._trans_members: frozenset[int] = frozenset()
        self._transitional_seen = False
        self._joinlists: dict[int, tuple[tuple[bytes, int], ...]] = {}
        self._interim: list[tuple[int, wire.WireMsg]] = []
        self._interim_bytes = 0
        self._stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)

    # ------------------------------------------------------------------ queries

    @property
    def state(self) -> SyncState:
        return self._state

    @property
    def ring_id(self) -> tuple[int, int]:
        return self._ring_id

    @property
    def ring_members(self) -> tuple[int, ...]:
        return self._ring_members

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def groups(self) -> list[bytes]:
        return sorted(self._view)

    def membership(self, group: bytes) -> tuple[Member, ...]:
        """Current members of `group` in the agreed view, sorted by (nodeid, pid)."""
        return tuple(Member(n, p) for n, p in sorted(self._view.get(group, ())))

    def client_groups(self, client_id: int) -> dict[bytes, LocalState]:
        client = self._clients.get(client_id)
        return dict(client.groups) if client else {}

    def client_pid(self, client_id: int) -> int:
        return self._client(client_id).pid

    def view_digest(self) -> tuple[tuple[bytes, tuple[NodePid, ...]], ...]:
        """The whole view as a comparable value (tests and simulator checkers)."""
        return tuple((g, tuple(sorted(m))) for g, m in sorted(self._view.items()))

    def can_queue(self, n_bytes: int) -> bool:
        """Would an mcast of n_bytes be accepted now (False only while a sync runs)?"""
        if self._state == SyncState.OPERATIONAL:
            return True
        return (
            len(self._queue) < MAX_QUEUED_MESSAGES
            and self._queued_bytes + n_bytes <= MAX_QUEUED_BYTES
        )

    # ------------------------------------------------------------------ outputs

    def pop_outbox(self) -> list[bytes]:
        out = self._outbox
        if not out:
            return []
        self._outbox = []
        return out

    def pop_events(self) -> list[tuple[int, CpgEvent]]:
        out = self._events
        if not out:
            return []
        self._events = []
        return out

    # ------------------------------------------------------------------ local API

    def add_client(self, client_id: int, pid: int) -> None:
        """Register a local client; it then receives totem confchgs. Idempotent."""
        if not 0 <= pid <= MAX_PID:
            raise CpgError(ErrorCode.INVALID_PARAM, f"pid {pid} out of range")
        client = self._clients.get(client_id)
        if client is not None:
            if client.pid != pid:
                raise CpgError(ErrorCode.INVALID_PARAM, "client id already used by another pid")
            return
        if len(self._clients) >= MAX_CLIENTS:
            raise CpgError(ErrorCode.NO_SPACE, f"more than {MAX_CLIENTS} local clients")
        self._clients[client_id] = _Client(pid)

    def join(self, client_id: int, pid: int, group: bytes) -> None:
        """Ask to join `group`; the process's own confchg (reason JOIN) confirms it."""
        try:
            wire.check_group_name(group)
        except ValueError as exc:
            raise CpgError(ErrorCode.INVALID_PARAM, str(exc)) from None
        group = bytes(group)
        self.add_client(client_id, pid)
        local = self._local.get(group, {})
        if pid in local or (group, pid) in self._orphan_leaves:
            raise CpgError(ErrorCode.EXIST, f"pid {pid} is already in group {group!r}")
        if self._own_entry_count() >= wire.MAX_ENTRIES_PER_NODE:
            raise CpgError(ErrorCode.NO_SPACE, "too many group memberships on this node")
        self._local.setdefault(group, {})[pid] = client_id
        self._recipients.clear()
        self._clients[client_id].groups[group] = LocalState.JOINING
        self._send(wire.Kind.JOIN, group, pid, wire.encode_join(group, pid))

    def leave(self, client_id: int, group: bytes) -> None:
        """Ask to leave `group`; the process's own confchg (reason LEAVE) confirms it."""
        client = self._client(client_id)
        state = client.groups.get(bytes(group))
        if state is None or state == LocalState.LEAVING:
            raise CpgError(ErrorCode.NOT_EXIST, f"not in group {group!r}")
        client.groups[bytes(group)] = LocalState.LEAVING
        self._send_leave(bytes(group), client.pid, Reason.LEAVE)

    def mcast(self, client_id: int, group: bytes, payload: bytes) -> bool:
        """Multicast to `group`. False means try again: a sync runs and the local
        queue is full. The sender receives its own message in the total order."""
        client = self._client(client_id)
        if type(group) is not bytes:
            group = bytes(group)
        if type(payload) is not bytes:
            payload = bytes(payload)
        state = client.groups.get(group)
        if state is None or state is _LEAVING:
            raise CpgError(ErrorCode.NOT_EXIST, f"not in group {group!r}")
        if len(payload) > wire.MAX_PAYLOAD_BYTES:
            raise CpgError(ErrorCode.TOO_BIG, f"payload over {wire.MAX_PAYLOAD_BYTES} bytes")
        if self._state is _OPERATIONAL:
            # Hot path: what _send -> _submit does for a MCAST, encoded in place
            # (same bytes as wire.encode_mcast; the group was checked at join).
            self._outbox.append(b"".join(
                (_MCAST_PREFIX, bytes((len(group),)), group, _PID.pack(client.pid), payload)))
            self._stats["submitted"] += 1
            return True
        if not self.can_queue(len(payload)):
            return False
        encoded = wire.encode_mcast(group, client.pid, payload)
        self._send(wire.Kind.MCAST, group, client.pid, encoded)
        return True

    def client_disconnected(self, client_id: int) -> None:
        """The client went away without leaving: its groups see it leave as PROCDOWN."""
        client = self._clients.pop(client_id, None)
        if client is None:
            return
        self._recipients.clear()
        for group, state in sorted(client.groups.items()):
            self._local[group].pop(client.pid, None)
            if not self._local[group]:
                del self._local[group]
            self._orphan_leaves.add((group, client.pid))
            if state != LocalState.LEAVING:
                self._send_leave(group, client.pid, Reason.PROCDOWN)

    # ------------------------------------------------------------------ totem input

    def totem_event(self, event: tuple[object, ...]) -> None:
        """Feed one event tuple exactly as `TotemCore.pop_events()` returns it."""
        kind = event[0]
        if kind == EV_DELIVER:
            sender, payload = event[1], event[2]
            if type(payload) is not bytes:
                if not isinstance(payload, bytes | bytearray | memoryview):
                    raise UsageError(f"malformed totem delivery event {event!r:.80}")
                payload = bytes(payload)
            if not isinstance(sender, int):
                raise UsageError(f"malformed totem delivery event {event!r:.80}")
            self.deliver(sender, payload)
        elif kind == EV_CONFIG:
            conf_kind, ring_id, members = event[1], event[2], event[3]
            if not isinstance(ring_id, tuple) or not isinstance(members, tuple):
                raise UsageError(f"malformed totem configuration event {event!r:.80}")
            self.configuration(conf_kind == CONF_TRANSITIONAL, ring_id, members)
        else:
            raise UsageError(f"unknown totem event kind {kind!r}")

    def totem_events(self, events: Iterable[tuple[object, ...]]) -> None:
        """Feed a batch of events in order, as `totem_event` one by one would."""
        deliver = self.deliver
        for event in events:
            # Hot path: a delivery as TotemCore makes it (int sender, bytes payload).
            if event[0] == EV_DELIVER and len(event) == 3 and type(event[2]) is bytes \
                    and type(event[1]) is int:
                deliver(event[1], event[2])
            else:
                self.totem_event(event)

    def configuration(
        self, transitional: bool, ring_id: tuple[int, int], members: Iterable[int]
    ) -> None:
        """A Totem configuration change (transitional or regular)."""
        if transitional:
            self._on_transitional(frozenset(members))
        else:
            self._on_regular((int(ring_id[0]), int(ring_id[1])), tuple(sorted(set(members))))

    def deliver(self, sender: int, payload: bytes) -> None:
        """One Totem delivery; malformed payloads are counted and dropped."""
        if self._state is not _SYNC and payload.startswith(_MCAST_PREFIX) and len(payload) > 4:
            # Hot path: an application message outside a sync, decoded in place
            # with the same checks as wire.decode (a test compares the two).
            name_bytes = payload[4]
            group_end = 5 + name_bytes
            if (
                1 <= name_bytes <= _MAX_GROUP_NAME_BYTES
                and group_end + 4 <= len(payload) <= group_end + 4 + _MAX_PAYLOAD_BYTES
            ):
                (pid,) = _PID.unpack_from(payload, group_end)
                self._deliver(sender, payload[5:group_end], pid, payload[group_end + 4:])
                return
        try:
            message = wire.decode(payload)
        except wire.ForeignPayload:
            self._stats["foreign_payloads"] += 1
            return
        except DecodeError:
            self._stats["malformed_dropped"] += 1
            return
        if isinstance(message, wire.JoinlistMsg):
            self._on_joinlist(sender, message)
        elif self._state == SyncState.SYNC:
            self._hold_interim(sender, message, len(payload))
        else:
            self._apply(sender, message)

    # ------------------------------------------------------------------ sending

    def _client(self, client_id: int) -> _Client:
        client = self._clients.get(client_id)
        if client is None:
            raise CpgError(ErrorCode.BAD_HANDLE, f"unknown client {client_id}")
        return client

    def _own_entry_count(self) -> int:
        return sum(len(pids) for pids in self._local.values()) + len(self._orphan_leaves)

    def _send_leave(self, group: bytes, pid: int, reason: Reason) -> None:
        self._send(wire.Kind.LEAVE, group, pid, wire.encode_leave(group, pid, reason))

    def _send(self, kind: wire.Kind, group: bytes, pid: int, encoded: bytes) -> None:
        if self._state == SyncState.OPERATIONAL:
            self._submit(kind, group, pid, encoded)
        else:
            self._queue.append((kind, group, pid, encoded))
            self._queued_bytes += len(encoded)

    def _submit(self, kind: wire.Kind, group: bytes, pid: int, encoded: bytes) -> None:
        # The joinlist must describe exactly what the submitted messages imply.
        if kind == wire.Kind.JOIN:
            self._own_sent.add((group, pid))
        elif kind == wire.Kind.LEAVE:
            self._own_sent.discard((group, pid))
        self._outbox.append(encoded)
        self._stats["submitted"] += 1

    def _flush_queue(self) -> None:
        while self._queue:
            self._submit(*self._queue.popleft())
        self._queued_bytes = 0

    # ------------------------------------------------------------------ configuration

    def _on_transitional(self, trans: frozenset[int]) -> None:
        if self._state == SyncState.SYNC:
            self._abandon_sync()
        known = set(self._ring_members)
        for members in self._view.values():
            known.update(n for n, _ in members)
        self._remove_nodes(known - trans - {self.nodeid})
        self._ring_members = tuple(n for n in self._ring_members if n in trans)
        self._trans_members = frozenset(trans) | {self.nodeid}
        self._transitional_seen = True
        if self._state != SyncState.NO_RING:
            self._state = SyncState.TRANSITIONAL

    def _on_regular(self, ring_id: tuple[int, int], members: tuple[int, ...]) -> None:
        if not self._transitional_seen:
            # Totem always reports a transitional configuration first; without one,
            # the survivors are the members common to both rings.
            self._on_transitional(frozenset(self._ring_members) & frozenset(members))
        self._transitional_seen = False
        self._ring_id = ring_id
        self._ring_members = members
        event = TotemConfChg(ring_id, members)
        for client_id in sorted(self._clients):
            self._events.append((client_id, event))
        self._state = SyncState.SYNC
        self._joinlists = {}
        self._interim = []
        self._interim_bytes = 0
        self._outbox.append(wire.encode_joinlist(ring_id, sorted(self._own_sent)))
        self._stats["submitted"] += 1

    def _remove_nodes(self, lost: set[int]) -> None:
        if not lost:
            return
        for group in sorted(self._view):
            old = self._view[group]
            gone = sorted(e for e in old if e[0] in lost)
            if gone:
                left = tuple(Member(n, p, Reason.NODEDOWN) for n, p in gone)
                self._change(group, old - set(gone), left, ())

    def _abandon_sync(self) -> None:
        # A new configuration arrived before every joinlist did. The held-back
        # messages were delivered in the ring that is ending, so every survivor
        # holds the same ones: apply them now, before the ring's end is reported.
        held, self._interim = self._interim, []
        self._interim_bytes = 0
        self._joinlists = {}
        self._state = SyncState.TRANSITIONAL
        for sender, message in held:
            self._apply(sender, message)
        self._stats["syncs_abandoned"] += 1

    # ------------------------------------------------------------------ sync

    def _hold_interim(self, sender: int, message: wire.WireMsg, n_bytes: int) -> None:
        if (
            len(self._interim) >= MAX_INTERIM_MESSAGES
            or self._interim_bytes + n_bytes > MAX_INTERIM_BYTES
        ):
            # Every node of the ring sees the same stream, so all drop the same ones.
            self._stats["interim_dropped"] += 1
            return
        self._interim.append((sender, message))
        self._interim_bytes += n_bytes
        self._stats["held_during_sync"] += 1

    def _on_joinlist(self, sender: int, message: wire.JoinlistMsg) -> None:
        if (
            self._state != SyncState.SYNC
            or message.ring_id != self._ring_id
            or sender not in self._ring_members
            or sender in self._joinlists
        ):
            self._stats["stale_joinlists"] += 1
            return
        self._joinlists[sender] = message.entries
        if len(self._joinlists) == len(self._ring_members):
            self._complete_sync()

    def _complete_sync(self) -> None:
        target = self._pre_interim_view()
        for group in sorted(set(self._view) | set(target)):
            self._reconcile_group(group, target.get(group, set()))
        self._state = SyncState.OPERATIONAL
        held, self._interim = self._interim, []
        self._interim_bytes = 0
        final = self._joinlist_view()
        self._joinlists = {}
        for sender, message in held:
            self._apply(sender, message)
        if final != self._view:
            # Only a peer that breaks the protocol (or held-back messages dropped
            # at the bound) gets here; the view is still identical on every node.
            self._stats["sync_mismatch"] += 1
        self._flush_queue()
        self._stats["syncs_completed"] += 1

    def _pre_interim_view(self) -> dict[bytes, set[NodePid]]:
        # Joinlists already include the held-back JOIN/LEAVE messages (each node
        # submitted them before its joinlist); undo them, newest first, so that
        # replaying them afterwards reproduces their confchgs on every node.
        view = self._joinlist_view()
        for sender, message in reversed(self._interim):
            if isinstance(message, wire.JoinMsg):
                view.get(message.group, set()).discard((sender, message.pid))
            elif isinstance(message, wire.LeaveMsg):
                view.setdefault(message.group, set()).add((sender, message.pid))
        return {g: m for g, m in view.items() if m}

    def _joinlist_view(self) -> dict[bytes, set[NodePid]]:
        view: dict[bytes, set[NodePid]] = {}
        for nodeid, entries in self._joinlists.items():
            for group, pid in entries:
                view.setdefault(group, set()).add((nodeid, pid))
        return view

    def _reconcile_group(self, group: bytes, target: set[NodePid]) -> None:
        old = self._view.get(group, set())
        if old == target:
            return
        left = tuple(Member(n, p, Reason.PROCDOWN) for n, p in sorted(old - target))
        joined = tuple(Member(n, p, Reason.NODEUP) for n, p in sorted(target - old))
        self._change(group, set(target), left, joined)
        for member in joined:
            if member.nodeid == self.nodeid:
                self._own_joined(group, member.pid)
        for member in left:
            if member.nodeid == self.nodeid:
                self._own_left(group, member.pid)

    # ------------------------------------------------------------------ applying messages

    def _apply(self, sender: int, message: wire.WireMsg) -> None:
        if isinstance(message, wire.McastMsg):
            self._deliver_mcast(sender, message)
        elif isinstance(message, wire.JoinMsg):
            self._apply_join(sender, message.group, message.pid)
        elif isinstance(message, wire.LeaveMsg):
            self._apply_leave(sender, message.group, message.pid, message.reason)

    def _apply_join(self, sender: int, group: bytes, pid: int) -> None:
        old = self._view.get(group, set())
        if (sender, pid) not in old:
            if self._node_entry_count(sender) >= wire.MAX_ENTRIES_PER_NODE:
                self._stats["foreign_dropped"] += 1
                return
            joined = (Member(sender, pid, Reason.JOIN),)
            self._change(group, old | {(sender, pid)}, (), joined)
        if sender == self.nodeid:
            self._own_joined(group, pid)

    def _apply_leave(self, sender: int, group: bytes, pid: int, reason: int) -> None:
        old = self._view.get(group, set())
        if (sender, pid) in old:
            left = (Member(sender, pid, reason),)
            self._change(group, old - {(sender, pid)}, left, ())
        if sender == self.nodeid:
            self._own_left(group, pid)

    def _deliver_mcast(self, sender: int, message: wire.McastMsg) -> None:
        self._deliver(sender, message.group, message.pid, message.payload)

    def _deliver(self, sender: int, group: bytes, pid: int, payload: bytes) -> None:
        recipients = self._recipients.get(group)
        if recipients is None:
            recipients = self._recipients[group] = self._recipients_of(group)
        if not recipients:
            return
        event = Deliver(group, sender, pid, payload)
        events = self._events
        for client_id in recipients:
            events.append((client_id, event))
        self._stats["delivered"] += len(recipients)

    def _recipients_of(self, group: bytes) -> tuple[int, ...]:
        """This node's clients that receive the group's messages, in pid order."""
        local = self._local.get(group, {})
        members = self._view.get(group, ())
        return tuple(local[pid] for pid in sorted(local) if (self.nodeid, pid) in members)

    def _node_entry_count(self, nodeid: int) -> int:
        return sum(1 for members in self._view.values() for n, _ in members if n == nodeid)

    def _change(
        self,
        group: bytes,
        new: set[NodePid],
        left: tuple[Member, ...],
        joined: tuple[Member, ...],
    ) -> None:
        """Install `new` as the group's view and tell local processes in old or new."""
        old = self._view.get(group, set())
        self._recipients.clear()
        if new:
            self._view[group] = new
        else:
            self._view.pop(group, None)
        event = ConfChg(group, tuple(Member(n, p) for n, p in sorted(new)), left, joined)
        local = self._local.get(group, {})
        for pid in sorted(local):
            if (self.nodeid, pid) in old or (self.nodeid, pid) in new:
                self._events.append((local[pid], event))

    def _own_joined(self, group: bytes, pid: int) -> None:
        client_id = self._local.get(group, {}).get(pid)
        client = self._clients.get(client_id) if client_id is not None else None
        if client is not None and client.groups.get(group) == LocalState.JOINING:
            client.groups[group] = LocalState.JOINED

    def _own_left(self, group: bytes, pid: int) -> None:
        self._orphan_leaves.discard((group, pid))
        local = self._local.get(group)
        if local is None or pid not in local:
            return
        client = self._clients.get(local[pid])
        if client is not None and client.groups.get(group) == LocalState.LEAVING:
            del client.groups[group]
            del local[pid]
            self._recipients.clear()
            if not local:
                del self._local[group]
