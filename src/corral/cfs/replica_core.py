"""Replication of the configuration tree over a process group (sans-I/O).

`ReplicaCore` is one node's replica. The shell (`corral.cfs.replication`)
feeds it the CPG events of the group `corral-cfs` (`confchg` with the
group's member nodeids, `deliver` with the sender's nodeid), quorum changes,
local submits (an `Op` and a request id) and timer expiry, always with the
current monotonic time in ns. It returns actions: `Multicast(payload)` (send
in order), `Complete(request_id, errno)` (answer the local submitter, after
making the store durable) and `LogLine`s. It changes the node's store
through `ReplicaStore` synchronously, so that digests are read at exact
points of the delivery order; it has no clock, socket or randomness.

Protocol (docs/cfs-replication.md has the full description):

- Ops are multicast as OP messages and applied on every member in delivery
  order (`store.apply_group`), with the node's quorum flag at that point;
  the submitter gets the errno its own node got, once every member has
  applied the op (ACK positions; `flush_acks` once per batch of
  deliveries). An op not yet confirmed when the membership changes is
  decided at the end of the next resync (its errno if this node is quorate
  there and kept its tree, EIO otherwise).
- Every group membership change starts a resync: the lowest member sends
  SYNC_START, everyone answers STATE (term, version, root digest, dirty flag),
  the leader is chosen by `choose_leader`, members whose digest differs
  walk the leader's tree (QUERY/ANSWER), FETCH what differs and apply the
  PATCH, then send SYNC_DONE; when all have, every member adopts the same
  version, applies the ops delivered meanwhile (held) and sends the ops
  submitted meanwhile (queued; EAGAIN after `eagain_ns`).
- The lowest member asks for a verification every `verify_interval_ns`:
  each member reports (version, digest) as of the request's delivery; any
  difference starts a repair (a resync) and is logged.
- The lowest member judges lock expiry with its LockTracker and multicasts
  UNLOCK ops for expired locks; the expiry is read from the tree's
  datacenter.cfg when it judges (locks.ExpirySetting).
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from corral.cfs import ops as ops_mod
from corral.cfs import resync
from corral.cfs.locks import ExpirySetting, LockTracker
from corral.cfs.ops import Op
from corral.cfs.resync import PatchItem
from corral.cfs.state import CfsState, Outcome
from corral.cfs.virtual import CLUSTERLOG_SHOWN
from corral.errors import DecodeError, InvariantError, UsageError

# ===================================================================== wire
#
# Every message starts with a 4-byte header: magic `CF`, format version (1),
# type. Integers are little-endian, as in the rest of `corral.cfs`. Decoding
# checks every length against the buffer and the bounds below; a short,
# long, unknown or hostile buffer raises `DecodeError` (counted, dropped). A
# higher format version raises `NewerVersion`. A logical message larger
# than one part travels as FRAG parts, reassembled per sender (CPG keeps a
# sender's messages in order) and handled at the position of its last part,
# the same stream position on every member.

MAGIC = b"CF"
FORMAT_VERSION = 1
HEADER = struct.Struct("<2sBB")
# One CPG payload is at most 1 MiB; parts stay well below it.
PART_MAX_BYTES = 512 * 1024
# A reassembled message (an op of 16 MiB, a patch part of a few MiB) fits in this.
MESSAGE_MAX_BYTES = 64 * 1024 * 1024
PARTS_MAX = MESSAGE_MAX_BYTES // 1024
MEMBERS_MAX = 1024
PATHS_MAX = 1 << 20
PATH_MAX_BYTES = 4096
LOG_ENTRIES_MAX = 4096
LOG_TEXT_MAX_BYTES = 4096


class NewerVersion(DecodeError):
    """A peer speaks a newer format: this node must be upgraded."""


class MsgType(enum.IntEnum):
    OP = 1
    SYNC_START = 2
    STATE = 3
    QUERY = 4
    ANSWER = 5
    FETCH = 6
    PATCH = 7
    SYNC_DONE = 8
    VERIFY_REQUEST = 9
    VERIFY = 10
    LOG = 11
    FRAG = 12
    ACK = 13


Epoch = tuple[int, int]  # (nodeid of the member that started the sync, its counter)


@dataclass(frozen=True, slots=True)
class OpMsg:
    origin: int
    request_id: int
    op_bytes: bytes


@dataclass(frozen=True, slots=True)
class SyncStart:
    epoch: Epoch
    members: tuple[int, ...]


STATE_DIRTY = 0x01


@dataclass(frozen=True, slots=True)
class StateMsg:
    epoch: Epoch
    term: int
    version: int
    digest: int
    flags: int


@dataclass(frozen=True, slots=True)
class WalkMsg:
    """QUERY (follower to leader), ANSWER (leader to follower): encoded
    `resync` queries/answers; PATCH (leader to follower): encoded patch items
    of one part, `last` on the final part."""

    kind: MsgType
    epoch: Epoch
    target: int
    body: bytes
    last: bool = True


@dataclass(frozen=True, slots=True)
class Fetch:
    epoch: Epoch
    target: int
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """The sender has applied the first `position` ops of the synced period
    that began with the resync `epoch`."""

    epoch: Epoch
    position: int


@dataclass(frozen=True, slots=True)
class SyncDone:
    epoch: Epoch
    version: int


@dataclass(frozen=True, slots=True)
class VerifyRequest:
    round_id: int


@dataclass(frozen=True, slots=True)
class Verify:
    round_id: int
    version: int
    digest: int


@dataclass(frozen=True, slots=True)
class LogRecord:
    uid: int
    time: int
    pri: int
    pid: int
    node: str
    user: str
    tag: str
    msg: str


@dataclass(frozen=True, slots=True)
class LogMsg:
    entries: tuple[LogRecord, ...]


@dataclass(frozen=True, slots=True)
class Frag:
    seq: int
    index: int
    count: int
    chunk: bytes


Message = (OpMsg | SyncStart | StateMsg | WalkMsg | Fetch | SyncDone | VerifyRequest
           | Verify | LogMsg | Frag | Ack)

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_EPOCH = struct.Struct("<IQ")
_OP_HEAD = struct.Struct("<IQ")
_STATE = struct.Struct("<IQQQQB")
_WALK = struct.Struct("<IQIB")
_DONE = struct.Struct("<IQQ")
_VERIFY = struct.Struct("<QQQ")
_FRAG = struct.Struct("<III")
_LOG_HEAD = struct.Struct("<IQBI")


_KIND_OP = int(MsgType.OP)
_KIND_ACK = int(MsgType.ACK)
_OP_END = HEADER.size + _OP_HEAD.size
_ACK_END = HEADER.size + _DONE.size


def _head(kind: MsgType) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, int(kind))


def _text(value: str, bound: int) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")[:bound]
    return _U16.pack(len(raw)) + raw


def encode(message: Message) -> bytes:
    """The wire form of one logical message (before fragmentation)."""
    if isinstance(message, OpMsg):
        return _head(MsgType.OP) + _OP_HEAD.pack(message.origin, message.request_id) + \
            message.op_bytes
    if isinstance(message, SyncStart):
        return b"".join([_head(MsgType.SYNC_START), _EPOCH.pack(*message.epoch),
                         _U16.pack(len(message.members)),
                         *(_U32.pack(n) for n in message.members)])
    if isinstance(message, StateMsg):
        return _head(MsgType.STATE) + _STATE.pack(*message.epoch, message.term,
                                                  message.version, message.digest,
                                                  message.flags)
    if isinstance(message, Ack):
        return _head(MsgType.ACK) + _DONE.pack(*message.epoch, message.position)
    if isinstance(message, WalkMsg):
        return _head(message.kind) + _WALK.pack(*message.epoch, message.target,
                                                int(message.last)) + message.body
    if isinstance(message, Fetch):
        parts = [_head(MsgType.FETCH), _EPOCH.pack(*message.epoch), _U32.pack(message.target),
                 _U32.pack(len(message.paths))]
        parts += [_text(path, PATH_MAX_BYTES) for path in message.paths]
        return b"".join(parts)
    if isinstance(message, SyncDone):
        return _head(MsgType.SYNC_DONE) + _DONE.pack(*message.epoch, message.version)
    if isinstance(message, VerifyRequest):
        return _head(MsgType.VERIFY_REQUEST) + struct.pack("<Q", message.round_id)
    if isinstance(message, Verify):
        return _head(MsgType.VERIFY) + _VERIFY.pack(message.round_id, message.version,
                                                    message.digest)
    if isinstance(message, LogMsg):
        parts = [_head(MsgType.LOG), _U16.pack(len(message.entries))]
        for e in message.entries:
            parts += [_LOG_HEAD.pack(e.uid, e.time, e.pri, e.pid)]
            parts += [_text(v, LOG_TEXT_MAX_BYTES) for v in (e.node, e.user, e.tag, e.msg)]
        return b"".join(parts)
    return _head(MsgType.FRAG) + _FRAG.pack(message.seq, message.index, message.count) + \
        message.chunk


def fragment(payload: bytes, seq: int, part_max_bytes: int = PART_MAX_BYTES) -> list[bytes]:
    """`payload` itself if it fits in one part, else FRAG parts."""
    if len(payload) <= part_max_bytes:
        return [payload]
    count = -(-len(payload) // part_max_bytes)
    return [encode(Frag(seq, i, count, payload[i * part_max_bytes:(i + 1) * part_max_bytes]))
            for i in range(count)]


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def take(self, size: int) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise DecodeError("cfs message truncated")
        chunk = bytes(self.data[self.pos:self.pos + size])
        self.pos += size
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size))

    def text(self, bound: int) -> str:
        (size,) = self.unpack(_U16)
        if size > bound:
            raise DecodeError("text over its bound")
        return self.take(size).decode("utf-8", "surrogateescape")

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError("trailing bytes after cfs message")


def decode(payload: bytes) -> Message:
    """Parse one message; a malformed buffer raises DecodeError."""
    if len(payload) > MESSAGE_MAX_BYTES + 64:
        raise DecodeError("cfs message over its bound")
    if len(payload) < HEADER.size:
        raise DecodeError("cfs message shorter than its header")
    magic, version, kind = HEADER.unpack_from(payload, 0)
    if magic != MAGIC:
        raise DecodeError("not a cfs message")
    if version > FORMAT_VERSION:
        raise NewerVersion(f"cfs format {version}, this node speaks {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise DecodeError(f"cfs format {version} is no longer spoken")
    # The two messages of every replicated write, parsed without a reader.
    if kind == _KIND_OP:
        if len(payload) < _OP_END:
            raise DecodeError("cfs message truncated")
        origin, request_id = _OP_HEAD.unpack_from(payload, HEADER.size)
        return OpMsg(origin, request_id, bytes(payload[_OP_END:]))
    if kind == _KIND_ACK:
        if len(payload) != _ACK_END:
            raise DecodeError("cfs message truncated" if len(payload) < _ACK_END else
                              "trailing bytes after cfs message")
        node, counter, position = _DONE.unpack_from(payload, HEADER.size)
        return Ack((node, counter), position)
    try:
        msg_type = MsgType(kind)
    except ValueError:
        raise DecodeError(f"unknown cfs message type {kind}") from None
    reader = _Reader(payload, HEADER.size)
    message = _DECODERS[msg_type](reader, msg_type)
    reader.finish()
    return message


def _dec_op(reader: _Reader, kind: MsgType) -> Message:
    origin, request_id = reader.unpack(_OP_HEAD)
    return OpMsg(origin, request_id, reader.rest())


def _dec_sync_start(reader: _Reader, kind: MsgType) -> Message:
    node, counter = reader.unpack(_EPOCH)
    (count,) = reader.unpack(_U16)
    if count > MEMBERS_MAX:
        raise DecodeError("member list over its bound")
    members = tuple(reader.unpack(_U32)[0] for _ in range(count))
    return SyncStart((node, counter), members)


def _dec_state(reader: _Reader, kind: MsgType) -> Message:
    node, counter, term, version, digest, flags = reader.unpack(_STATE)
    return StateMsg((node, counter), term, version, digest, flags)


def _dec_ack(reader: _Reader, kind: MsgType) -> Message:
    node, counter, position = reader.unpack(_DONE)
    return Ack((node, counter), position)


def _dec_walk(reader: _Reader, kind: MsgType) -> Message:
    node, counter, target, last = reader.unpack(_WALK)
    if last > 1:
        raise DecodeError("bad last flag")
    return WalkMsg(kind, (node, counter), target, reader.rest(), bool(last))


def _dec_fetch(reader: _Reader, kind: MsgType) -> Message:
    node, counter = reader.unpack(_EPOCH)
    (target,) = reader.unpack(_U32)
    (count,) = reader.unpack(_U32)
    if count > PATHS_MAX:
        raise DecodeError("path list over its bound")
    return Fetch((node, counter), target,
                 tuple(reader.text(PATH_MAX_BYTES) for _ in range(count)))


def _dec_done(reader: _Reader, kind: MsgType) -> Message:
    node, counter, version = reader.unpack(_DONE)
    return SyncDone((node, counter), version)


def _dec_verify_request(reader: _Reader, kind: MsgType) -> Message:
    return VerifyRequest(struct.unpack("<Q", reader.take(8))[0])


def _dec_verify(reader: _Reader, kind: MsgType) -> Message:
    return Verify(*reader.unpack(_VERIFY))


def _dec_log(reader: _Reader, kind: MsgType) -> Message:
    (count,) = reader.unpack(_U16)
    if count > LOG_ENTRIES_MAX:
        raise DecodeError("log entries over their bound")
    entries = []
    for _ in range(count):
        uid, time_s, pri, pid = reader.unpack(_LOG_HEAD)
        node, user, tag, msg = (reader.text(LOG_TEXT_MAX_BYTES) for _ in range(4))
        entries.append(LogRecord(uid, time_s, pri, pid, node, user, tag, msg))
    return LogMsg(tuple(entries))


def _dec_frag(reader: _Reader, kind: MsgType) -> Message:
    seq, index, count = reader.unpack(_FRAG)
    if not 2 <= count <= PARTS_MAX or index >= count:
        raise DecodeError("fragment index or count out of bounds")
    return Frag(seq, index, count, reader.rest())


_DECODERS = {
    MsgType.OP: _dec_op,
    MsgType.SYNC_START: _dec_sync_start,
    MsgType.STATE: _dec_state,
    MsgType.QUERY: _dec_walk,
    MsgType.ANSWER: _dec_walk,
    MsgType.PATCH: _dec_walk,
    MsgType.FETCH: _dec_fetch,
    MsgType.SYNC_DONE: _dec_done,
    MsgType.VERIFY_REQUEST: _dec_verify_request,
    MsgType.VERIFY: _dec_verify,
    MsgType.LOG: _dec_log,
    MsgType.FRAG: _dec_frag,
    MsgType.ACK: _dec_ack,
}


def split_items(sizes: Sequence[int], budget_bytes: int) -> list[range]:
    """Split consecutive items into runs whose summed sizes stay near the budget."""
    runs: list[range] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > budget_bytes:
            runs.append(range(start, index))
            start, total = index, 0
        total += size
    runs.append(range(start, len(sizes)))
    return runs


# ===================================================================== core

DEFAULT_EAGAIN_NS = 10 * 1_000_000_000
DEFAULT_VERIFY_INTERVAL_NS = 60 * 1_000_000_000
# Submitted ops waiting for a resync to end; beyond it a submit fails with EAGAIN.
PENDING_SUBMITS_MAX = 4096
CLUSTERLOG_MAX = 1000
# The leader sends a patch in parts of about this much content each.
PATCH_PART_BYTES = 4 * 1024 * 1024


class Phase(enum.Enum):
    JOINING = "joining"  # not a member of the group (yet, or any more)
    SYNCING = "syncing"  # a membership change or repair: states, walk, patch
    SYNCED = "synced"  # ops are applied as delivered


class SyncStep(enum.Enum):
    AWAIT_START = "await_start"  # waiting for the lowest member's SYNC_START
    AWAIT_STATES = "await_states"
    WALKING = "walking"  # follower: digest-walk rounds with the leader
    AWAIT_PATCH = "await_patch"  # follower: FETCH sent
    AWAIT_DONE = "await_done"  # waiting for every follower's SYNC_DONE


@dataclass(frozen=True, slots=True)
class Multicast:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Complete:
    """Answer the submitter with `errno` once the store is durable up to the
    `applied_seq`-th change this core made (the op's own apply for a
    confirmed op, everything applied so far otherwise)."""

    request_id: int
    errno: int
    applied_seq: int = 0


@dataclass(frozen=True, slots=True)
class LogLine:
    level: str  # "info", "warning", "error"
    text: str


@dataclass(frozen=True, slots=True)
class Applied:
    """The tree changed without a local submit (another node's op, an UNLOCK
    of the lowest member, a resync patch shown as the op that has the same
    effect on caches): for the FUSE front's cache invalidation."""

    op: Op


Action = Multicast | Complete | LogLine | Applied


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    eagain_ns: int = DEFAULT_EAGAIN_NS
    verify_interval_ns: int = DEFAULT_VERIFY_INTERVAL_NS
    part_max_bytes: int = PART_MAX_BYTES
    patch_part_bytes: int = PATCH_PART_BYTES
    pending_submits_max: int = PENDING_SUBMITS_MAX
    clusterlog_max: int = CLUSTERLOG_MAX

    def __post_init__(self) -> None:
        if self.eagain_ns <= 0 or self.verify_interval_ns <= 0:
            raise UsageError("eagain_ns and verify_interval_ns must be positive")
        if not 1024 <= self.part_max_bytes <= PART_MAX_BYTES:
            raise UsageError(f"part_max_bytes must be in [1024, {PART_MAX_BYTES}]")
        if self.patch_part_bytes < 1 or self.pending_submits_max < 1 or self.clusterlog_max < 1:
            raise UsageError("bounds must be positive")


class ReplicaStore(Protocol):
    """What the core needs from the node's store (`corral.cfs.store.Store`
    wrapped with a durable resync marker). Calls are synchronous: the core
    reads digests at exact points of the delivery order."""

    @property
    def state(self) -> CfsState: ...

    @property
    def dirty(self) -> bool:
        """A resync patch was (partly) applied and the resync did not finish."""
        ...

    def set_dirty(self, flag: bool) -> None:
        """Persist the marker before returning."""
        ...

    @property
    def term(self) -> int:
        """How many quorate resyncs this tree's history went through."""
        ...

    def set_term(self, term: int) -> None:
        """Persist the term before returning."""
        ...

    def apply_group(self, ops: Sequence[tuple[Op, int]], *, quorate: bool) -> list[Outcome]: ...

    def apply_patch(self, delete: Sequence[str], items: Sequence[PatchItem],
                    touch_dirs: Sequence[tuple[str, int, int]] = ()) -> None: ...

    def read_file(self, path: str) -> bytes: ...


@dataclass(slots=True)
class SyncReport:
    """What the last resync did (for logs, tests and status)."""

    epoch: Epoch
    leader: int
    followers: tuple[int, ...]
    wire_bytes: int = 0
    queries: int = 0
    fetched: int = 0
    deleted: int = 0
    repair: bool = False


@dataclass(slots=True)
class _Sync:
    repair: bool
    step: SyncStep = SyncStep.AWAIT_START
    epoch: Epoch | None = None
    states: dict[int, StateMsg] = field(default_factory=dict)
    leader: int = 0
    followers: tuple[int, ...] = ()
    done: dict[int, int] = field(default_factory=dict)
    walk: resync.ResyncWalk | None = None
    rounds: int = 0
    patch_started: bool = False
    report: SyncReport | None = None


@dataclass(slots=True)
class _Partial:
    seq: int
    count: int
    parts: list[bytes]
    size: int


@dataclass(slots=True)
class _Waiting:
    request_id: int
    payload: bytes
    deadline_ns: int


def _op_encode_errno(op: Op) -> tuple[int, bytes]:
    try:
        return 0, ops_mod.encode(op)
    except UsageError:
        too_long = max(len(op.path.encode("utf-8", "surrogateescape")),
                       len(op.path2.encode("utf-8", "surrogateescape"))) > ops_mod.PATH_MAX_BYTES
        return (errno.ENAMETOOLONG if too_long else
                errno.EFBIG if len(op.data) > ops_mod.DATA_MAX_BYTES else errno.EINVAL), b""


class ReplicaCore:
    """One node's replica of the configuration tree (see the module doc)."""

    def __init__(self, nodeid: int, nodename: str, store: ReplicaStore,
                 config: ReplicaConfig | None = None, *, quorate: bool = False) -> None:
        if not 1 <= nodeid < 1 << 32:
            raise UsageError(f"nodeid {nodeid} out of range")
        self.nodeid = nodeid
        self.nodename = nodename
        self.store = store
        self.config = config or ReplicaConfig()
        self.quorate = quorate
        self.phase = Phase.JOINING
        self.members: tuple[int, ...] = ()
        self.sync: _Sync | None = None
        self.last_sync: SyncReport | None = None
        self.tracker = LockTracker()
        self.lock_expiry = ExpirySetting()
        self.clusterlog: dict[tuple[str, int, int], LogRecord] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("malformed", "newer_version", "not_member", "stale", "spoofed", "frag_dropped",
             "ops_applied", "ops_refused_inquorate", "ops_resent", "syncs", "repairs",
             "verify_rounds", "unlocks_sent", "eagain", "eacces", "held_dropped"), 0)
        self._held: list[tuple[int, OpMsg]] = []
        self._waiting: list[_Waiting] = []
        self._in_flight: dict[int, bytes] = {}
        self._own_frag_ops: dict[int, int] = {}
        self._partial: dict[int, _Partial] = {}
        self._send_seq = 0
        self._epoch_counter = 0
        self._verify_counter = 0
        self._verify_round: int | None = None
        self._verify_replies: dict[int, tuple[int, int]] = {}
        self._next_verify_ns: int | None = None
        self._log_uid = 0
        self._wire_size = 0
        # Acknowledgement of own ops once every member applied them (see _confirm).
        self._period: Epoch | None = None
        self._position = 0
        self._acks: dict[int, int] = {}
        self.ack_due = False
        self._unconfirmed: dict[int, tuple[int, int, int]] = {}
        # Store changes made so far (applies and patches), and the count at
        # the newest apply of an own op: the shell starts its WAL sync then,
        # overlapping the ACK round, instead of once the op is confirmed.
        self.applied_seq = 0
        self.durable_wanted = 0
        self._unsure: dict[int, int] = {}
        self._out: list[Action] = []

    # ------------------------------------------------------------------ inputs

    def confchg(self, members: Sequence[int], now_ns: int) -> list[Action]:
        """The group's membership changed (CPG ConfChg; nodeids of its members)."""
        self.members = tuple(sorted(set(members)))
        self._drop_held(now_ns)
        self._drop_partials(now_ns)
        self._verify_round = None
        if self.nodeid not in self.members:
            self._left_group()
        else:
            self._begin_sync(now_ns, repair=False)
        return self._drain()

    def deliver(self, sender: int, payload: bytes, now_ns: int) -> list[Action]:
        """A message of the group, in delivery order (own messages included)."""
        if sender not in self.members or self.phase is Phase.JOINING:
            self.counters["not_member"] += 1
            return self._drain()
        try:
            message: Message | None = decode(payload)
            self._wire_size = len(payload)
            if isinstance(message, Frag):
                whole = self._reassemble(sender, message)
                message = decode(whole) if whole is not None else None
                self._wire_size = len(whole or b"")
            if message is not None:
                self._handle(sender, message, now_ns)
        except NewerVersion as error:
            self.counters["newer_version"] += 1
            self._log("error", f"node {sender} speaks a newer cfs protocol ({error}): "
                               "upgrade this node")
        except DecodeError:
            self.counters["malformed"] += 1
        return self._drain()

    def quorum_changed(self, quorate: bool, now_ns: int) -> list[Action]:
        self.quorate = quorate
        if not quorate:
            for item in self._waiting:
                self._complete(item.request_id, errno.EACCES)
            self._waiting = []
        return self._drain()

    def submit(self, op: Op, request_id: int, now_ns: int) -> list[Action]:
        """Apply `op` cluster-wide; a Complete(request_id, errno) follows once
        every member applied it (or at once if it is refused)."""
        if request_id in self._in_flight or request_id in self._unconfirmed \
                or request_id in self._unsure \
                or any(w.request_id == request_id for w in self._waiting):
            raise UsageError(f"request id {request_id} is already pending")
        code, op_bytes = _op_encode_errno(op)
        if code or not self.quorate:
            self._complete(request_id, code or errno.EACCES)
            return self._drain()
        payload = encode(OpMsg(self.nodeid, request_id, op_bytes))
        if self.pending >= self.config.pending_submits_max:
            self.counters["eagain"] += 1
            self._complete(request_id, errno.EAGAIN)
        elif self.phase is Phase.SYNCED and not self._waiting:
            self._send_op(request_id, payload)
        else:
            self._waiting.append(_Waiting(request_id, payload, now_ns + self.config.eagain_ns))
        return self._drain()

    def log(self, now_s: int, pri: int, tag: str, msg: str, *, user: str = "root@pam",
            pid: int = 0) -> list[Action]:
        """Add an entry to the replicated cluster log."""
        self._log_uid += 1
        record = LogRecord(self._log_uid, now_s, pri, pid, self.nodename, user, tag, msg)
        if self.phase is Phase.JOINING:
            self._add_log(record)
        else:
            self._send(LogMsg((record,)))
        return self._drain()

    def timer(self, now_ns: int) -> list[Action]:
        """Call at or after next_deadline_ns()."""
        keep = []
        for item in self._waiting:
            if item.deadline_ns <= now_ns:
                self.counters["eagain"] += 1
                self._complete(item.request_id, errno.EAGAIN)
            else:
                keep.append(item)
        self._waiting = keep
        if (self._next_verify_ns is not None and now_ns >= self._next_verify_ns
                and self._is_lowest() and self.phase is Phase.SYNCED):
            self._verify_counter += 1
            self._send(VerifyRequest((self.nodeid << 32) | (self._verify_counter & 0xFFFFFFFF)))
            self._next_verify_ns = now_ns + self.config.verify_interval_ns
        return self._drain()

    def next_deadline_ns(self) -> int | None:
        deadlines = [item.deadline_ns for item in self._waiting]
        if self._next_verify_ns is not None and self._is_lowest() and \
                self.phase is Phase.SYNCED:
            deadlines.append(self._next_verify_ns)
        return min(deadlines) if deadlines else None

    def fail_all(self) -> list[Action]:
        """The shell stops: queued submits fail with EAGAIN, in-flight ones
        (possibly applied elsewhere) with EIO."""
        for item in self._waiting:
            self._complete(item.request_id, errno.EAGAIN)
        self._waiting = []
        for request_id in [*self._in_flight, *self._unconfirmed, *self._unsure]:
            self._complete(request_id, errno.EIO)
        self._in_flight.clear()
        self._unconfirmed.clear()
        self._unsure.clear()
        return self._drain()

    # -------------------------------------------------------------- inspection

    @property
    def pending(self) -> int:
        return (len(self._waiting) + len(self._in_flight) + len(self._unconfirmed)
                + len(self._unsure))

    def flush_acks(self, now_ns: int) -> list[Action]:
        """Call once per batch of deliveries (the shell: once per loop
        iteration): tells the group how many ops this node has applied."""
        if self.ack_due and self.phase is Phase.SYNCED and self._period is not None:
            self.ack_due = False
            self._send(Ack(self._period, self._position))
        return self._drain()

    def log_entries(self) -> list[LogRecord]:
        return list(self.clusterlog.values())

    # ---------------------------------------------------------------- internal

    def _drain(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _log(self, level: str, text: str) -> None:
        self._out.append(LogLine(level, text))

    def _complete(self, request_id: int, code: int, applied_seq: int | None = None) -> None:
        if code == errno.EACCES:
            self.counters["eacces"] += 1
        self._out.append(Complete(request_id, code,
                                  self.applied_seq if applied_seq is None else applied_seq))

    def _lock_expiry_ns(self) -> int:
        """The cluster-wide expiry as the tree says now (re-read on change)."""
        problem = self.lock_expiry.follow(self.store.state.tree, self.store.read_file)
        if problem is not None:
            self._log("warning", problem)
        return self.lock_expiry.expiry_ns

    def _is_lowest(self) -> bool:
        return bool(self.members) and self.members[0] == self.nodeid

    def _send(self, message: Message) -> int:
        self._send_seq = (self._send_seq + 1) & 0xFFFFFFFF
        for part in fragment(encode(message), self._send_seq, self.config.part_max_bytes):
            self._out.append(Multicast(part))
        return self._send_seq

    def _send_op(self, request_id: int, payload: bytes) -> None:
        self._send_seq = (self._send_seq + 1) & 0xFFFFFFFF
        parts = fragment(payload, self._send_seq, self.config.part_max_bytes)
        if len(parts) > 1:
            self._own_frag_ops[self._send_seq] = request_id
        self._in_flight[request_id] = payload
        for part in parts:
            self._out.append(Multicast(part))

    def _reassemble(self, sender: int, frag: Frag) -> bytes | None:
        partial = self._partial.get(sender)
        if frag.index == 0:
            if partial is not None:
                self.counters["frag_dropped"] += 1
            self._partial[sender] = _Partial(frag.seq, frag.count, [frag.chunk], len(frag.chunk))
            return None
        if partial is None or partial.seq != frag.seq or partial.count != frag.count \
                or len(partial.parts) != frag.index:
            # Its start came before the last membership change: every member drops it.
            self._partial.pop(sender, None)
            self.counters["frag_dropped"] += 1
            return None
        partial.parts.append(frag.chunk)
        partial.size += len(frag.chunk)
        if partial.size > MESSAGE_MAX_BYTES:
            del self._partial[sender]
            self.counters["malformed"] += 1
            return None
        if len(partial.parts) < partial.count:
            return None
        del self._partial[sender]
        if sender == self.nodeid:
            self._own_frag_ops.pop(frag.seq, None)
        return b"".join(partial.parts)

    def _drop_held(self, now_ns: int) -> None:
        """Ops held by a resync that another change interrupted: every member
        of that view holds the same ones, so all drop them here and each
        sender sends its own again after the next resync. (Applying them now
        would touch trees not yet synced, and only some members of the new
        view have them.)"""
        held, self._held = self._held, []
        again = []
        for sender, message in held:
            payload = self._in_flight.pop(message.request_id, None) \
                if sender == self.nodeid else None
            if payload is not None:
                again.append(_Waiting(message.request_id, payload,
                                      now_ns + self.config.eagain_ns))
        self.counters["held_dropped"] += len(held)
        self.counters["ops_resent"] += len(again)
        self._waiting[:0] = again

    def _drop_partials(self, now_ns: int) -> None:
        """At a membership change every member drops messages whose parts
        straddle it; this node sends its own lost ops again after the resync."""
        own = self._partial.get(self.nodeid)
        if own is not None:
            request_id = self._own_frag_ops.pop(own.seq, None)
            payload = self._in_flight.pop(request_id, None) if request_id is not None else None
            if request_id is not None and payload is not None:
                self.counters["ops_resent"] += 1
                self._waiting.insert(0, _Waiting(request_id, payload,
                                                        now_ns + self.config.eagain_ns))
        self._partial.clear()

    def _left_group(self) -> None:
        self._end_period()
        self.phase = Phase.JOINING
        self.sync = None
        self._held = []
        self._next_verify_ns = None

    # -- messages

    def _handle(self, sender: int, message: Message, now_ns: int) -> None:
        if isinstance(message, OpMsg):
            self._on_op(sender, message, now_ns)
        elif isinstance(message, LogMsg):
            for record in message.entries:
                self._add_log(record)
        elif isinstance(message, VerifyRequest | Verify):
            self._on_verify(sender, message, now_ns)
        elif isinstance(message, Ack):
            self._on_ack(sender, message)
        else:
            self._on_sync_message(sender, message, now_ns)

    def _on_op(self, sender: int, message: OpMsg, now_ns: int) -> None:
        if message.origin != sender:
            self.counters["spoofed"] += 1
            return
        if self.phase is Phase.SYNCING:
            self._held.append((sender, message))
            return
        self._apply_op(sender, message, now_ns)

    def _apply_op(self, sender: int, message: OpMsg, now_ns: int) -> None:
        own = sender == self.nodeid and message.request_id in self._in_flight
        if own:
            del self._in_flight[message.request_id]
        try:
            op = ops_mod.decode(message.op_bytes)
        except DecodeError:
            self.counters["malformed"] += 1
            if own:
                self._complete(message.request_id, errno.EINVAL)
            return
        (outcome,) = self.store.apply_group([(op, sender)], quorate=self.quorate)
        self.applied_seq += 1
        if not self.quorate:
            self.counters["ops_refused_inquorate"] += 1
        elif outcome.ok:
            self.counters["ops_applied"] += 1
        self._position += 1
        # Only other nodes wait for this node's ACK, and only for their ops.
        self.ack_due = self.ack_due or (sender != self.nodeid and len(self.members) > 1)
        if outcome.ok and outcome.mutations and not own:
            self._out.append(Applied(op))
        if own and outcome.ok and outcome.mutations:
            # Answer once every member has applied it (then any later quorate
            # partition holds a node that has it), not at the local apply.
            self.durable_wanted = self.applied_seq
            self._unconfirmed[message.request_id] = (self._position, outcome.errno,
                                                     self.applied_seq)
            self._confirm()
        elif own:
            self._complete(message.request_id, outcome.errno)
        requests = self.tracker.follow(outcome.effects, now_ns)
        if requests and self._is_lowest() and self.quorate and self.phase is Phase.SYNCED:
            expiry_ns = self._lock_expiry_ns()
            for request in requests:
                if self.tracker.is_expired(request.path, request.checksum, now_ns, expiry_ns):
                    self.counters["unlocks_sent"] += 1
                    self._log("info", f"lock {request.path} expired: sending UNLOCK")
                    unlock = ops_mod.encode(Op.unlock(request.path, request.checksum))
                    self._send(OpMsg(self.nodeid, 0, unlock))

    def _on_ack(self, sender: int, message: Ack) -> None:
        if self.phase is not Phase.SYNCED or message.epoch != self._period:
            self.counters["stale"] += 1
            return
        self._acks[sender] = max(self._acks.get(sender, 0), message.position)
        self._confirm()

    def _confirm(self) -> None:
        if not self._unconfirmed:
            return
        stable = min([self._acks.get(n, 0) for n in self.members if n != self.nodeid],
                     default=self._position)
        for request_id, (position, code, applied_seq) in list(self._unconfirmed.items()):
            if position <= stable:
                del self._unconfirmed[request_id]
                self._complete(request_id, code, applied_seq)

    def _end_period(self) -> None:
        """The synced period ends (membership change, repair, leaving): own ops
        not yet confirmed by every member are decided at the next resync."""
        for request_id, (_position, code, _seq) in self._unconfirmed.items():
            self._unsure[request_id] = code
        self._unconfirmed.clear()
        self._period = None
        self._acks = {}
        self.ack_due = False

    def _add_log(self, record: LogRecord) -> None:
        key = (record.node, record.uid, record.time)
        if key in self.clusterlog:
            return
        self.clusterlog[key] = record
        while len(self.clusterlog) > self.config.clusterlog_max:
            oldest = min(self.clusterlog, key=lambda k: (self.clusterlog[k].time, k))
            del self.clusterlog[oldest]

    # -- verification

    def _on_verify(self, sender: int, message: VerifyRequest | Verify, now_ns: int) -> None:
        if self.phase is not Phase.SYNCED:
            return
        if isinstance(message, VerifyRequest):
            if sender != self.members[0]:
                self.counters["stale"] += 1
                return
            # Every member captures its state at this same point of the order.
            self._verify_round = message.round_id
            self._verify_replies = {}
            state = self.store.state
            self._send(Verify(message.round_id, state.version, state.tree.digest))
            return
        if message.round_id != self._verify_round:
            self.counters["stale"] += 1
            return
        self._verify_replies[sender] = (message.version, message.digest)
        if len(self._verify_replies) < len(self.members):
            return
        self.counters["verify_rounds"] += 1
        replies, self._verify_replies = self._verify_replies, {}
        self._verify_round = None
        if len(set(replies.values())) > 1:
            self.counters["repairs"] += 1
            detail = ", ".join(f"node {n}: version {v} digest {d:016x}"
                               for n, (v, d) in sorted(replies.items()))
            self._log("warning", f"repair: tree digests differ ({detail}); resyncing")
            self._begin_sync(now_ns, repair=True)

    # -- resync

    def _begin_sync(self, now_ns: int, *, repair: bool) -> None:
        self._end_period()
        self.phase = Phase.SYNCING
        self.sync = _Sync(repair)
        self._next_verify_ns = None
        # Even alone, the sync ends through a message of the new ring: ops the
        # old ring delivers after the change are held until then and applied
        # with the quorum of the new ring, never with a stale quorate flag.
        if self._is_lowest():
            self._epoch_counter += 1
            self._send(SyncStart((self.nodeid, self._epoch_counter), self.members))

    def _on_sync_message(self, sender: int, message: Message, now_ns: int) -> None:
        if isinstance(message, SyncStart):
            self._on_sync_start(sender, message, now_ns)
            return
        sync = self.sync
        epoch = getattr(message, "epoch", None)
        if sync is None or self.phase is not Phase.SYNCING or epoch != sync.epoch:
            self.counters["stale"] += 1
            return
        if sync.report is not None and isinstance(message, WalkMsg | Fetch):
            sync.report.wire_bytes += self._wire_size
        if isinstance(message, StateMsg):
            self._on_state(sync, sender, message, now_ns)
        elif isinstance(message, WalkMsg):
            self._on_walk(sync, sender, message, now_ns)
        elif isinstance(message, Fetch):
            self._on_fetch(sync, sender, message)
        elif isinstance(message, SyncDone):
            self._on_done(sync, sender, message, now_ns)

    def _on_sync_start(self, sender: int, message: SyncStart, now_ns: int) -> None:
        if sender != self.members[0] or message.members != self.members:
            self.counters["stale"] += 1
            return
        if self.phase is Phase.SYNCED:
            # A SYNC_START for an identical earlier view, delivered late: every
            # member takes it at this same point, so resyncing stays consistent.
            self._end_period()
            self.phase = Phase.SYNCING
            self.sync = _Sync(False)
            self._next_verify_ns = None
        sync = self.sync
        if sync is None:
            raise InvariantError("syncing without sync state")
        repair = sync.repair
        self.sync = sync = _Sync(repair, SyncStep.AWAIT_STATES, message.epoch)
        state = self.store.state
        flags = STATE_DIRTY if self.store.dirty else 0
        self._send(StateMsg(message.epoch, self.store.term, state.version, state.tree.digest,
                            flags))

    def _on_state(self, sync: _Sync, sender: int, message: StateMsg, now_ns: int) -> None:
        if sync.step is not SyncStep.AWAIT_STATES or sender in sync.states:
            self.counters["stale"] += 1
            return
        sync.states[sender] = message
        if len(sync.states) < len(self.members):
            return
        sync.leader = choose_leader(sync.states)
        leader_digest = sync.states[sync.leader].digest
        sync.followers = tuple(n for n in self.members
                               if sync.states[n].digest != leader_digest)
        assert sync.epoch is not None
        sync.report = SyncReport(sync.epoch, sync.leader, sync.followers, repair=sync.repair)
        if not sync.followers:
            self._finish_sync(now_ns, max(s.version for s in sync.states.values()))
            return
        sync.step = SyncStep.AWAIT_DONE
        if self.nodeid in sync.followers:
            sync.step = SyncStep.WALKING
            sync.walk = resync.ResyncWalk(self.store.state.tree)
            self._send_queries(sync, sync.walk.start(leader_digest))

    def _send_queries(self, sync: _Sync, queries: list[resync.Query]) -> None:
        assert sync.epoch is not None and sync.walk is not None
        sync.rounds += 1
        if queries:
            self._send(WalkMsg(MsgType.QUERY, sync.epoch, sync.leader,
                               resync.encode_queries(queries)))
            return
        walk = sync.walk
        if walk.fetch:
            sync.step = SyncStep.AWAIT_PATCH
            self._send(Fetch(sync.epoch, sync.leader, tuple(walk.fetch)))
            return
        self._apply_patch_part(sync, [], last=True)

    def _on_walk(self, sync: _Sync, sender: int, message: WalkMsg, now_ns: int) -> None:
        if message.kind is MsgType.QUERY:
            if message.target != self.nodeid or sync.leader != self.nodeid \
                    or sender not in sync.followers:
                return
            tree = self.store.state.tree
            answers = [resync.answer(tree, query)
                       for query in resync.decode_queries(message.body)]
            assert sync.epoch is not None
            self._send(WalkMsg(MsgType.ANSWER, sync.epoch, sender,
                               resync.encode_answers(answers)))
            return
        if message.target != self.nodeid or sender != sync.leader or sync.walk is None:
            return
        if message.kind is MsgType.ANSWER and sync.step is SyncStep.WALKING:
            self._send_queries(sync, sync.walk.feed(resync.decode_answers(message.body)))
        elif message.kind is MsgType.PATCH and sync.step is SyncStep.AWAIT_PATCH:
            self._apply_patch_part(sync, resync.decode_patch(message.body), last=message.last)

    def _on_fetch(self, sync: _Sync, sender: int, message: Fetch) -> None:
        if message.target != self.nodeid or sync.leader != self.nodeid \
                or sender not in sync.followers:
            return
        items = resync.build_patch(self.store.state.tree, message.paths, self.store.read_file)
        sizes = [len(item.content or b"") + len(item.path) + 16 for item in items]
        runs = split_items(sizes, self.config.patch_part_bytes)
        for index, run in enumerate(runs):
            body = resync.encode_patch([items[i] for i in run])
            self._send(WalkMsg(MsgType.PATCH, message.epoch, sender, body,
                               last=index == len(runs) - 1))

    def _apply_patch_part(self, sync: _Sync, items: list[PatchItem], *, last: bool) -> None:
        walk = sync.walk
        assert walk is not None and sync.epoch is not None and sync.report is not None
        if not self.store.dirty:
            self.store.set_dirty(True)  # persisted before the tree changes
        delete = walk.delete if not sync.patch_started else []
        sync.patch_started = True
        touch = walk.touch_dirs if last else []
        self.store.apply_patch(delete, items, touch)
        self.applied_seq += 1
        self._out += [Applied(Op.unlink(path)) for path in delete]
        self._out += [Applied(Op.set_mtime(item.path, item.mtime) if item.is_dir else
                              Op.truncate(item.path, len(item.content or b""), item.mtime))
                      for item in items]
        self._out += [Applied(Op.set_mtime(path, mtime)) for path, mtime, _ in touch]
        sync.report.fetched += len(items)
        sync.report.deleted += len(delete)
        if last:
            sync.report.queries = walk.queries_sent
            sync.step = SyncStep.AWAIT_DONE
            self._send(SyncDone(sync.epoch, self.store.state.version))

    def _on_done(self, sync: _Sync, sender: int, message: SyncDone, now_ns: int) -> None:
        if sender not in sync.followers or sender in sync.done:
            self.counters["stale"] += 1
            return
        sync.done[sender] = message.version
        if len(sync.done) < len(sync.followers):
            return
        versions = [s.version for n, s in sync.states.items() if n not in sync.followers]
        self._finish_sync(now_ns, max(versions + list(sync.done.values())))

    def _finish_sync(self, now_ns: int, version: int | None) -> None:
        """At the same point of the order on every member: adopt one version,
        apply the ops held meanwhile, then send the queued submits."""
        state = self.store.state
        # Alone, a node keeps its version and its dirty marker: its tree may
        # be a partial patch, which must not win against a clean peer later.
        adopt = version is not None and len(self.members) > 1
        if adopt and version is not None and version != state.version:
            if version < state.version:
                raise InvariantError(f"resync would lower the version {state.version} "
                                     f"to {version}")
            state.version = version
            self.store.apply_patch((), ())  # persists the head with the version
            self.applied_seq += 1
        if adopt and self.store.dirty:
            self.store.set_dirty(False)
        sync = self.sync
        states = sync.states if sync is not None else {}
        term = max([s.term for s in states.values()] + [self.store.term])
        term += 1 if self.quorate else 0
        if term != self.store.term:
            self.store.set_term(term)  # persisted before any op of the new term
        replaced = sync is not None and sync.report is not None \
            and self.nodeid in sync.report.followers
        for request_id, code in self._unsure.items():
            # Kept for sure only if this quorate view's tree is this node's own.
            self._complete(request_id, code if self.quorate and not replaced else errno.EIO)
        self._unsure.clear()
        self.tracker.rebuild(state.locks(), now_ns)
        report = self.sync.report if self.sync is not None else None
        self.phase = Phase.SYNCED
        self._period = sync.epoch if sync is not None else None
        self._position = 0
        self._acks = {}
        self.sync = None
        self.counters["syncs"] += 1
        if report is not None:
            self.last_sync = report
            if report.followers:
                self._log("info" if not report.repair else "warning",
                          f"resync done: leader {report.leader}, updated "
                          f"{list(report.followers)}, {report.fetched} entries copied, "
                          f"{report.deleted} deleted, {report.wire_bytes} bytes")
            if report.leader == self.nodeid and self.clusterlog:
                newest = sorted(self.clusterlog.values(), key=lambda r: (r.time, r.uid))
                self._send(LogMsg(tuple(newest[-CLUSTERLOG_SHOWN:])))
        held, self._held = self._held, []
        for sender, message in held:
            self._apply_op(sender, message, now_ns)
        waiting, self._waiting = self._waiting, []
        for item in waiting:
            if self.quorate:
                self._send_op(item.request_id, item.payload)
            else:
                self._complete(item.request_id, errno.EACCES)
        self._next_verify_ns = now_ns + self.config.verify_interval_ns


def choose_leader(states: Mapping[int, StateMsg]) -> int:
    """The member whose tree wins: clean (no unfinished resync) first, then the
    highest term (quorate resyncs in its history: a side cut off from the
    quorate history loses even if it applied more), then the highest version,
    then the digest most members hold, then the lowest nodeid."""
    clean = [n for n, s in states.items() if not s.flags & STATE_DIRTY] or list(states)
    holders: dict[int, int] = {}
    for state in states.values():
        holders[state.digest] = holders.get(state.digest, 0) + 1
    return max(clean, key=lambda n: (states[n].term, states[n].version,
                                     holders[states[n].digest], -n))
