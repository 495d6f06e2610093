# The Totem single-ring protocol core: token, total order, membership, EVS.
#
# Sans-I/O: the core is fed packets, submitted messages, `now_ns` and timer
# expiry, and produces packets (dest nodeid, bytes), events and the next
# deadline. It reads no clock, does no I/O and uses no randomness, so the same
# inputs always produce the same outputs (the deterministic simulator relies
# on this). The contract is src/corral/totem/_core.pyi; the protocol is
# described in docs/totem.md.
#
# Layout of this extension:
# - codec.pxi: packet layouts, bounds-checked decoders, encoders.
# - buffer.pxi: the power-of-two ring of frames indexed by seq.
# - this file: the state machine (operational token handling, membership
#   gather/commit/recovery, extended virtual synchrony delivery).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc
from libc.string cimport memcpy

from corral.errors import DecodeError, InvariantError, UsageError

include "codec.pxi"
include "buffer.pxi"

BROADCAST = 0
EV_DELIVER = 1
EV_CONFIG = 2
CONF_TRANSITIONAL = 1
CONF_REGULAR = 2
PROTOCOL_VERSION = VERSION

STATE_INITIAL = 0
STATE_OPERATIONAL = 1
STATE_GATHER = 2
STATE_COMMIT = 3
STATE_RECOVERY = 4
STATE_STOPPED = 5

PACKET_TOKEN = PKT_TOKEN
PACKET_MCAST = PKT_MCAST
PACKET_JOIN = PKT_JOIN
PACKET_COMMIT = PKT_COMMIT
PACKET_MERGE_DETECT = PKT_MERGE_DETECT
PACKET_TOKEN_HOLD_CANCEL = PKT_HOLD_CANCEL
MCAST_HEADER_SIZE = MCAST_HEADER_BYTES
MAX_RTR_ENTRIES = MAX_RTR
RING_FRAMES_MAX = RING_FRAMES

cdef enum:
    S_INITIAL = 0
    S_OPERATIONAL = 1
    S_GATHER = 2
    S_COMMIT = 3
    S_RECOVERY = 4
    S_STOPPED = 5

    # Timers, fired in this order when several are due.
    T_IMMEDIATE = 0
    T_TOKEN_LOSS = 1
    T_TOKEN_RETRANSMIT = 2
    T_HOLD = 3
    T_MERGE = 4
    T_JOIN = 5
    T_CONSENSUS = 6
    N_TIMERS = 7

    # Send queue bounds: submit() returns False beyond either.
    SEND_QUEUE_MESSAGES_MAX = 16384
    SEND_QUEUE_BYTES_MAX = 16 * 1024 * 1024
    # Packets addressed to this node are handled in-process, at most this many
    # per API call (a singleton ring passes the token to itself).
    LOOPBACK_PER_CALL_MAX = 4096
    # A fragment shorter than this is not worth starting in a nearly full frame.
    FRAGMENT_MIN_BYTES = 64
    # Copies of the leave announcement (JOIN with the leave flag).
    LEAVE_COPIES = 2

SEND_QUEUE_MESSAGES_LIMIT = SEND_QUEUE_MESSAGES_MAX
SEND_QUEUE_BYTES_LIMIT = SEND_QUEUE_BYTES_MAX

cdef uint64_t FRESH_RING_SEQ = 0xFFFFFFFFFFFFFFFFULL

_STATE_NAMES = {
    S_INITIAL: "initial",
    S_OPERATIONAL: "operational",
    S_GATHER: "gather",
    S_COMMIT: "commit",
    S_RECOVERY: "recovery",
    S_STOPPED: "stopped",
}

# Stats counters: names in index order.
STAT_NAMES = (
    "packets_in_token", "packets_in_mcast", "packets_in_join", "packets_in_commit",
    "packets_in_merge_detect", "packets_in_token_hold_cancel",
    "packets_out_token", "packets_out_mcast", "packets_out_join", "packets_out_commit",
    "packets_out_merge_detect", "packets_out_token_hold_cancel",
    "dropped_malformed", "dropped_foreign_ring", "dropped_duplicate_token",
    "dropped_duplicate_mcast", "dropped_own", "dropped_wrong_state", "dropped_no_room",
    "retransmits_sent", "retransmits_requested", "token_retransmits",
    "token_rotations", "tokens_processed", "token_holds", "hold_cancels_sent",
    "memberships_formed", "gather_entered", "token_losses", "consensus_timeouts",
    "fail_recv_self_exclusions", "merge_detects_sent", "messages_submitted",
    "messages_delivered", "bytes_delivered", "frames_sent", "fragments_dropped",
    "submit_rejected", "recovery_frames_sent", "old_ring_messages_recovered",
)
cdef enum:
    ST_IN_BASE = 0          # + packet type - 1
    ST_OUT_BASE = 6         # + packet type - 1
    ST_MALFORMED = 12
    ST_FOREIGN = 13
    ST_DUP_TOKEN = 14
    ST_DUP_MCAST = 15
    ST_OWN = 16
    ST_WRONG_STATE = 17
    ST_NO_ROOM = 18
    ST_RTX_SENT = 19
    ST_RTX_REQUESTED = 20
    ST_TOKEN_RTX = 21
    ST_ROTATIONS = 22
    ST_TOKENS = 23
    ST_HOLDS = 24
    ST_HOLD_CANCELS = 25
    ST_MEMBERSHIPS = 26
    ST_GATHER = 27
    ST_TOKEN_LOSS = 28
    ST_CONSENSUS_TIMEOUT = 29
    ST_FAIL_RECV = 30
    ST_MERGE_DETECT = 31
    ST_SUBMITTED = 32
    ST_DELIVERED = 33
    ST_BYTES_DELIVERED = 34
    ST_FRAMES_SENT = 35
    ST_FRAGMENTS_DROPPED = 36
    ST_SUBMIT_REJECTED = 37
    ST_RECOVERY_FRAMES = 38
    ST_OLD_RECOVERED = 39
    N_STATS = 40


def state_name(state: int) -> str:
    return _STATE_NAMES.get(state, f"unknown({state})")


cdef class _Reassembly:
    """One sender's partially received fragmented message."""
    cdef bytearray data
    cdef uint32_t total
    cdef uint32_t next_offset



cdef inline int64_t _min64(int64_t a, int64_t b) noexcept:
    return a if a < b else b


cdef bytes _plain_old_frame(bytes packet):
    """An old-ring frame as it is re-sent (encapsulated) in recovery.

    A frame that was itself recovery traffic of the old ring (encapsulated: it
    carries a message of the ring before) has nothing of the old ring to
    deliver, and encapsulation nests one level only; it goes out as an empty
    plain frame with the same header (ring rep, seq, epoch, seq number, origin),
    which fills its place in the old ring's sequence."""
    cdef bytes out
    cdef uchar* q
    if not (<const uchar*>PyBytes_AS_STRING(packet))[HEADER_BYTES + 12] & MCAST_FLAG_ENCAPSULATED:
        return packet
    out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(packet), MCAST_HEADER_BYTES)
    q = <uchar*>PyBytes_AS_STRING(out)
    q[HEADER_BYTES + 12] = 0
    wr_u32(q + HEADER_BYTES + 13, 0)
    return out


cdef class TotemCore:
    """One node's Totem protocol state machine (see _core.pyi for the contract)."""

    cdef readonly uint32_t nodeid
    # Effective timers (ns) and limits, copied from TotemTimers.
    cdef int64_t token_ns, token_retransmit_ns, hold_ns, join_ns, consensus_ns, merge_ns
    cdef int64_t fail_recv_const, seqno_unchanged_const, miss_count_const
    cdef int64_t max_messages, window_size
    cdef Py_ssize_t netmtu, frame_body_max

    cdef int _state
    cdef int64_t _now
    cdef int64_t _deadlines[N_TIMERS]
    cdef uint64_t _stats[N_STATS]

    # The current ring (during RECOVERY: the ring being installed).
    cdef uint32_t _ring_rep
    cdef uint64_t _ring_seq
    cdef uint64_t _ring_epoch
    cdef tuple _members
    cdef uint32_t _next_node
    cdef uint32_t _prev_node
    cdef frozenset _member_set
    cdef bint _is_rep
    cdef uint64_t _highest_ring_seq
    cdef object _persist_seq
    cdef FrameBuffer _buf
    # The last ring this node was operational in (the EVS "old" configuration).
    cdef FrameBuffer _old_buf
    cdef uint32_t _old_rep
    cdef uint64_t _old_seq
    cdef uint64_t _old_epoch
    cdef tuple _old_members

    # Token handling.
    cdef uint64_t _my_token_seq
    cdef uint64_t _prev_token_aru
    cdef uint64_t _last_arrival_seq
    cdef int64_t _unchanged
    cdef int64_t _fail_recv_count
    cdef uint64_t _fail_recv_aru
    cdef int64_t _prev_sent
    cdef int64_t _prev_backlog
    cdef bytes _token_copy
    cdef uint32_t _token_dest
    cdef bint _held
    cdef TokenS _held_token
    cdef bint _hold_cancel_pending
    cdef bint _hold_cancel_sent
    cdef bint _resume_pending

    # Recovery.
    cdef list _recovery_queue
    cdef Py_ssize_t _recovery_head
    cdef bint _retrans_set_by_me
    cdef int64_t _flag_clear_visits
    cdef uint64_t _install_seq
    cdef int64_t _install_visits
    cdef tuple _trans
    cdef bint _token_originated

    # Gather / commit.
    cdef set _proc
    cdef set _failed
    cdef dict _joins
    cdef set _leavers
    cdef bint _join_dirty
    cdef bint _commit_created
    cdef tuple _commit_members
    cdef uint64_t _commit_seq
    cdef uint64_t _commit_epoch
    cdef tuple _my_commit_slot

    # Send queue: a list used as a FIFO from _sq_head; _head_offset is how much
    # of the head message went out already as fragments.
    cdef list _sq
    cdef Py_ssize_t _sq_head
    cdef Py_ssize_t _sq_bytes
    cdef Py_ssize_t _head_offset

    cdef dict _reassembly
    cdef list _outbox
    cdef list _events
    cdef list _loopback
    cdef tuple _last_leavers
    cdef bytearray _frame_store
    cdef uchar* _frame

    def __init__(self, nodeid: int, timers, ring_seq: int = 0) -> None:
        cdef int i
        if not 0 < nodeid <= 0xFFFFFFFF:
            raise UsageError(f"nodeid {nodeid} out of range")
        if ring_seq < 0:
            raise UsageError("ring_seq must be >= 0")
        self.nodeid = nodeid
        self.token_ns = timers.token_ns
        self.token_retransmit_ns = timers.token_retransmit_ns
        self.hold_ns = timers.hold_ns
        self.join_ns = timers.join_ns
        self.consensus_ns = timers.consensus_ns
        self.merge_ns = timers.merge_ns
        self.fail_recv_const = timers.fail_recv_const
        self.seqno_unchanged_const = timers.seqno_unchanged_const
        self.miss_count_const = timers.miss_count_const
        self.max_messages = timers.max_messages
        self.window_size = timers.window_size
        self.netmtu = timers.netmtu
        # Room is left for the encapsulation header, so a frame re-sent during
        # recovery still fits in netmtu.
        self.frame_body_max = self.netmtu - 2 * MCAST_HEADER_BYTES
        if self.frame_body_max < 2 * FRAGMENT_MIN_BYTES:
            raise UsageError(f"netmtu {self.netmtu} too small")
        self._frame_store = bytearray(self.netmtu)
        self._frame = <uchar*>PyByteArray_AS_STRING(self._frame_store)
        self._state = S_INITIAL
        self._now = 0
        for i in range(N_TIMERS):
            self._deadlines[i] = -1
        for i in range(N_STATS):
            self._stats[i] = 0
        self._ring_rep = 0
        self._ring_seq = ring_seq
        self._ring_epoch = 0
        self._old_epoch = 0
        self._commit_epoch = 0
        self._highest_ring_seq = ring_seq
        self._members = ()
        self._member_set = frozenset()
        self._persist_seq = None
        self._buf = FrameBuffer()
        self._old_buf = FrameBuffer()
        self._old_rep = nodeid
        self._old_seq = FRESH_RING_SEQ
        self._old_members = (nodeid,)
        self._token_copy = None
        self._recovery_queue = []
        self._trans = ()
        self._proc = set()
        self._failed = set()
        self._joins = {}
        self._leavers = set()
        self._commit_members = ()
        self._my_commit_slot = ()
        self._sq = []
        self._sq_head = 0
        self._sq_bytes = 0
        self._head_offset = 0
        self._reassembly = {}
        self._outbox = []
        self._events = []
        self._loopback = []
        self._last_leavers = ()

    # -- public API ------------------------------------------------------------

    def start(self, int64_t now_ns) -> None:
        if self._state != S_INITIAL:
            raise UsageError(f"start() in state {state_name(self._state)}")
        self._now = now_ns
        self._gather_enter(0)
        self._after_input()

    def receive(self, int64_t now_ns, packet) -> None:
        if type(packet) is not bytes:
            packet = bytes(packet)
        self._now = now_ns
        if self._state == S_STOPPED or self._state == S_INITIAL:
            self._stats[ST_WRONG_STATE] += 1
            return
        self._dispatch(<bytes>packet, False)
        self._after_input()

    def submit(self, payload) -> bool:
        cdef Py_ssize_t count
        if self._state == S_STOPPED:
            raise UsageError("submit() on a stopped core")
        if type(payload) is not bytes:
            payload = bytes(payload)
        if PyBytes_GET_SIZE(payload) > MESSAGE_BYTES_MAX:
            raise UsageError(f"message of {len(payload)} bytes exceeds {MESSAGE_BYTES_MAX}")
        count = len(self._sq) - self._sq_head
        if (count >= SEND_QUEUE_MESSAGES_MAX
                or self._sq_bytes + PyBytes_GET_SIZE(payload) > SEND_QUEUE_BYTES_MAX):
            self._stats[ST_SUBMIT_REJECTED] += 1
            return False
        self._sq.append(payload)
        self._sq_bytes += PyBytes_GET_SIZE(payload)
        self._stats[ST_SUBMITTED] += 1
        if count == 0 and self._state == S_OPERATIONAL:
            self._wake_idle_ring()
        return True

    def tick(self, int64_t now_ns) -> None:
        cdef int i
        self._now = now_ns
        if self._state == S_STOPPED or self._state == S_INITIAL:
            return
        for i in range(N_TIMERS):
            if 0 <= self._deadlines[i] <= now_ns:
                self._deadlines[i] = -1
                self._fire(i)
                if self._state == S_STOPPED:
                    return
        self._after_input()

    def leave(self, int64_t now_ns) -> None:
        cdef int i
        cdef bytes packet
        self._now = now_ns
        if self._state == S_STOPPED:
            return
        if self._state != S_INITIAL:
            others = tuple(sorted((set(self._members) | self._proc) - {self.nodeid}))
            packet = encode_join(self.nodeid, self._ring_rep, self._ring_seq, self._ring_epoch,
                                 JOIN_FLAG_LEAVE,
                                 self._highest_ring_seq, others, (self.nodeid,))
            for i in range(LEAVE_COPIES):
                self._send(BROADCAST, packet, PKT_JOIN)
        self._state = S_STOPPED
        for i in range(N_TIMERS):
            self._deadlines[i] = -1
        self._loopback = []
        self._held = False

    def next_deadline_ns(self) -> int:
        cdef int i
        cdef int64_t best = -1
        if self._loopback:
            return self._now
        for i in range(N_TIMERS):
            if self._deadlines[i] >= 0 and (best < 0 or self._deadlines[i] < best):
                best = self._deadlines[i]
        return best

    def pop_outbox(self) -> list:
        out = self._outbox
        self._outbox = []
        return out

    def pop_events(self) -> list:
        out = self._events
        self._events = []
        return out

    def take_ring_seq_to_persist(self):
        out = self._persist_seq
        self._persist_seq = None
        return out

    def last_leavers(self) -> tuple:
        return self._last_leavers

    @property
    def state(self) -> int:
        return self._state

    @property
    def ring_id(self) -> tuple:
        return (self._ring_rep, self._ring_seq)

    @property
    def ring_epoch(self) -> int:
        return self._ring_epoch

    @property
    def members(self) -> tuple:
        return self._members

    @property
    def send_queue_len(self) -> int:
        return len(self._sq) - self._sq_head

    @property
    def send_queue_room(self) -> int:
        return SEND_QUEUE_MESSAGES_MAX - (len(self._sq) - self._sq_head)

    @property
    def send_queue_bytes(self) -> int:
        return self._sq_bytes

    @property
    def held(self) -> bool:
        return self._held

    def stats(self) -> dict:
        cdef int i
        return {STAT_NAMES[i]: self._stats[i] for i in range(N_STATS)}

    # -- plumbing ----------------------------------------------------------------

    cdef int _send(self, uint32_t dest, bytes packet, int ptype) except -1:
        self._stats[ST_OUT_BASE + ptype - 1] += 1
        if dest == self.nodeid:
            self._loopback.append(packet)
        else:
            self._outbox.append((dest, packet))
        return 0

    cdef int _after_input(self) except -1:
        cdef Py_ssize_t budget = LOOPBACK_PER_CALL_MAX
        cdef list batch
        while True:
            if self._state == S_GATHER:
                self._check_consensus()
            if self._join_dirty:
                self._join_dirty = False
                if self._state == S_GATHER:
                    self._send_join()
            if not self._loopback or budget <= 0 or self._state == S_STOPPED:
                break
            batch = self._loopback
            self._loopback = []
            for packet in batch:
                budget -= 1
                self._dispatch(<bytes>packet, True)
        IF CORRAL_DEBUG:
            self._check_invariants()
        return 0

    cdef int _dispatch(self, bytes packet, bint from_self) except -1:
        cdef const uchar* p = <const uchar*>PyBytes_AS_STRING(packet)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(packet)
        cdef Reader r
        cdef Header h
        r.p = p
        r.n = n
        r.off = 0
        r.bad = 0
        if decode_header(&r, &h) < 0:
            self._stats[ST_MALFORMED] += 1
            return 0
        if h.sender == self.nodeid and not from_self:
            self._stats[ST_OWN] += 1
            return 0
        if h.type == PKT_MCAST:
            self._on_mcast(packet, p, n)
        elif h.type == PKT_TOKEN:
            self._on_token(p, n)
        elif h.type == PKT_JOIN:
            self._on_join(p, n)
        elif h.type == PKT_COMMIT:
            self._on_commit(p, n)
        elif h.type == PKT_MERGE_DETECT:
            self._on_merge_detect(&h, p, n)
        else:
            self._on_hold_cancel(&h, p, n)
        return 0

    cdef int _fire(self, int timer) except -1:
        if timer == T_IMMEDIATE:
            if self._hold_cancel_pending:
                self._hold_cancel_pending = False
                if self._state == S_OPERATIONAL and self._members:
                    self._stats[ST_HOLD_CANCELS] += 1
                    self._send(self._members[0], encode_bare(
                        PKT_HOLD_CANCEL, self.nodeid, self._ring_rep, self._ring_seq,
                        self._ring_epoch),
                        PKT_HOLD_CANCEL)
            if self._resume_pending:
                self._resume_pending = False
                if self._held:
                    self._resume_held()
        elif timer == T_TOKEN_LOSS:
            if self._state in (S_OPERATIONAL, S_COMMIT, S_RECOVERY):
                self._stats[ST_TOKEN_LOSS] += 1
                self._gather_enter(0)
        elif timer == T_TOKEN_RETRANSMIT:
            if self._token_copy is not None and self._state in (S_OPERATIONAL, S_COMMIT,
                                                                S_RECOVERY):
                self._stats[ST_TOKEN_RTX] += 1
                self._send(self._token_dest, self._token_copy, self._token_copy[3])
                self._deadlines[T_TOKEN_RETRANSMIT] = self._now + self.token_retransmit_ns
        elif timer == T_HOLD:
            if self._held:
                self._resume_held()
        elif timer == T_MERGE:
            if self._state == S_OPERATIONAL and self._is_rep:
                self._stats[ST_MERGE_DETECT] += 1
                self._send(BROADCAST, encode_bare(PKT_MERGE_DETECT, self.nodeid, self._ring_rep,
                                                  self._ring_seq, self._ring_epoch),
                           PKT_MERGE_DETECT)
        elif timer == T_JOIN:
            if self._state == S_GATHER:
                self._join_dirty = True
                self._deadlines[T_JOIN] = self._now + self.join_ns
        elif timer == T_CONSENSUS:
            if self._state == S_GATHER:
                self._consensus_timeout()
        return 0

    IF CORRAL_DEBUG:
        cdef int _check_invariants(self) except -1:
            cdef FrameBuffer b
            for b in (self._buf, self._old_buf):
                if not (b.low <= b.aru <= b.high) or b.delivered > b.aru:
                    raise InvariantError(
                        f"buffer order low={b.low} aru={b.aru} high={b.high} "
                        f"delivered={b.delivered}")
            if list(self._members) != sorted(set(self._members)):
                raise InvariantError(f"members not sorted: {self._members}")
            if self._state == S_OPERATIONAL and self.nodeid not in self._members:
                raise InvariantError("operational without being a member")
            if self.nodeid in self._failed:
                raise InvariantError("this node is in its own failed set")
            if self._sq_bytes < 0 or self._sq_head > len(self._sq):
                raise InvariantError("send queue accounting")
            return 0

    # -- operational: the regular token ------------------------------------------

    cdef int _on_token(self, const uchar* p, Py_ssize_t n) except -1:
        cdef TokenS t
        if decode_token(p, n, &t) < 0:
            self._stats[ST_MALFORMED] += 1
            return 0
        self._stats[ST_IN_BASE + PKT_TOKEN - 1] += 1
        if self._state != S_OPERATIONAL and self._state != S_RECOVERY:
            self._stats[ST_WRONG_STATE] += 1
            return 0
        # The sender check also guards against a reused ring id (a node that
        # lost its persisted ring seq): the old incarnation's ring order differs.
        if (t.ring_rep != self._ring_rep or t.ring_seq != self._ring_seq
                or t.ring_epoch != self._ring_epoch or t.sender != self._prev_node):
            self._stats[ST_FOREIGN] += 1
            return 0
        return self._token_arrived(&t)

    cdef int _token_arrived(self, TokenS* t) except -1:
        if t.token_seq <= self._my_token_seq:
            self._stats[ST_DUP_TOKEN] += 1
            return 0
        self._my_token_seq = t.token_seq
        self._deadlines[T_TOKEN_RETRANSMIT] = -1
        self._token_copy = None
        self._deadlines[T_TOKEN_LOSS] = self._now + self.token_ns
        self._stats[ST_TOKENS] += 1
        if self._is_rep:
            self._stats[ST_ROTATIONS] += 1
            if self._should_hold(t):
                # Idle ring: keep the token until the hold timer, a hold-cancel
                # or local data, instead of spinning it at full speed.
                self._held_token = t[0]
                self._held = True
                self._stats[ST_HOLDS] += 1
                self._deadlines[T_HOLD] = self._now + self.hold_ns
                self._deadlines[T_TOKEN_LOSS] = -1
                return 0
        return self._process_token(t)

    cdef bint _should_hold(self, TokenS* t):
        return (self._state == S_OPERATIONAL
                and t.seq == self._last_arrival_seq
                and self._unchanged >= self.seqno_unchanged_const
                and len(self._sq) == self._sq_head
                and t.rtr_count == 0
                and t.aru == t.seq
                and self._buf.aru == t.seq)

    cdef int _resume_held(self) except -1:
        cdef TokenS t = self._held_token
        self._held = False
        self._deadlines[T_HOLD] = -1
        self._deadlines[T_TOKEN_LOSS] = self._now + self.token_ns
        return self._process_token(&t)

    cdef int _wake_idle_ring(self) except -1:
        """New data on a ring that may be holding its token: get it moving."""
        if self._held:
            self._resume_pending = True
            self._deadlines[T_IMMEDIATE] = self._now
        elif (not self._is_rep and self._unchanged >= self.seqno_unchanged_const
                and not self._hold_cancel_sent):
            self._hold_cancel_sent = True
            self._hold_cancel_pending = True
            self._deadlines[T_IMMEDIATE] = self._now
        return 0

    cdef int _process_token(self, TokenS* t) except -1:
        """Steps 3-12 of a token visit: free, retransmit, request, send, forward, deliver."""
        cdef FrameBuffer buf = self._buf
        cdef int64_t allowed, sent, backlog, value
        cdef bint install = False
        if t.seq == self._last_arrival_seq:
            self._unchanged += 1
        else:
            self._unchanged = 0
        self._last_arrival_seq = t.seq
        self._hold_cancel_sent = False
        buf.free_up_to(t.aru if t.aru < self._prev_token_aru else self._prev_token_aru)
        self._prev_token_aru = t.aru
        allowed = self._allowance(t)
        sent = self._retransmit(t, &allowed)
        self._request_missing(t)
        if self._state == S_RECOVERY:
            sent += self._send_recovery(t, allowed)
        else:
            sent += self._send_new(t, allowed)
        backlog = self._backlog_frames()
        value = <int64_t>t.fcc + sent - self._prev_sent
        t.fcc = <uint32_t>(value if value > 0 else 0)
        self._prev_sent = sent
        value = <int64_t>t.backlog + backlog - self._prev_backlog
        t.backlog = <uint32_t>(value if value > 0 else 0)
        self._prev_backlog = backlog
        if buf.aru < t.aru or t.aru_addr == self.nodeid or t.aru_addr == 0:
            t.aru = buf.aru
            t.aru_addr = 0 if t.aru == t.seq else self.nodeid
        if self._failed_to_receive(t):
            return 0
        if self._state == S_RECOVERY:
            install = self._recovery_progress(t)
        t.token_seq += 1
        t.sender = self.nodeid
        self._forward_token(t)
        if self._is_rep and self._state == S_OPERATIONAL:
            if self._unchanged > 0:
                if self._deadlines[T_MERGE] < 0:
                    self._deadlines[T_MERGE] = self._now + self.merge_ns
            else:
                self._deadlines[T_MERGE] = -1
        if install:
            self._operational_enter()
        self._deliver()
        return 0

    cdef int64_t _allowance(self, TokenS* t):
        cdef int64_t allowed = self.max_messages
        cdef int64_t room = self.window_size - <int64_t>t.fcc
        cdef int64_t total, share
        if room < allowed:
            allowed = room
        if allowed < 0:
            allowed = 0
        total = <int64_t>t.backlog + self._backlog_frames() - self._prev_backlog
        if total > 0 and self._prev_backlog > 0:
            share = self.window_size * self._prev_backlog // total
            if 0 < share < allowed:
                allowed = share
        return allowed

    cdef int64_t _retransmit(self, TokenS* t, int64_t* allowed) except -1:
        cdef FrameBuffer buf = self._buf
        cdef int i, kept = 0
        cdef int64_t sent = 0
        cdef uint64_t s
        for i in range(t.rtr_count):
            s = t.rtr[i]
            if s <= t.aru:
                continue
            if allowed[0] > 0 and buf.has(s):
                self._send(BROADCAST, <bytes>buf.packet(s), PKT_MCAST)
                self._stats[ST_RTX_SENT] += 1
                allowed[0] -= 1
                sent += 1
            else:
                t.rtr[kept] = s
                kept += 1
        t.rtr_count = kept
        return sent

    cdef int _request_missing(self, TokenS* t) except -1:
        cdef FrameBuffer buf = self._buf
        cdef uint64_t s, end
        cdef Py_ssize_t idx
        cdef int i
        cdef bint listed
        if t.seq <= buf.aru:
            return 0
        end = t.seq
        if end - buf.aru >= RING_FRAMES:
            end = buf.aru + RING_FRAMES - 1
        s = buf.aru
        while s < end:
            s += 1
            if buf.has(s):
                continue
            idx = s & RING_MASK
            if buf.miss[idx] < 0xFFFF:
                buf.miss[idx] += 1
            if buf.miss[idx] < self.miss_count_const or t.rtr_count >= MAX_RTR:
                continue
            listed = False
            for i in range(t.rtr_count):
                if t.rtr[i] == s:
                    listed = True
                    break
            if not listed:
                t.rtr[t.rtr_count] = s
                t.rtr_count += 1
                self._stats[ST_RTX_REQUESTED] += 1
        return 0

    cdef inline bint _room_for(self, TokenS* t, uint64_t seq):
        # Overflow guard: every member must still have a free slot for seq.
        return seq - self._buf.low < RING_FRAMES and seq - t.aru < RING_FRAMES

    cdef int64_t _send_new(self, TokenS* t, int64_t allowed) except -1:
        cdef int64_t sent = 0
        cdef uint64_t seq
        cdef object packet
        while allowed > 0 and self._sq_head < len(self._sq):
            seq = t.seq + 1
            if not self._room_for(t, seq):
                break
            packet = self._build_frame(seq)
            if packet is None:
                break
            t.seq = seq
            self._buf.store(seq, packet, self.nodeid, 0)
            self._send(BROADCAST, <bytes>packet, PKT_MCAST)
            self._stats[ST_FRAMES_SENT] += 1
            sent += 1
            allowed -= 1
        return sent

    cdef int64_t _send_recovery(self, TokenS* t, int64_t allowed) except -1:
        cdef int64_t sent = 0
        cdef uint64_t seq
        cdef bytes inner, packet
        cdef Py_ssize_t n
        while allowed > 0 and self._recovery_head < len(self._recovery_queue):
            seq = t.seq + 1
            if not self._room_for(t, seq):
                break
            inner = <bytes>self._recovery_queue[self._recovery_head]
            self._recovery_queue[self._recovery_head] = None
            self._recovery_head += 1
            n = PyBytes_GET_SIZE(inner)
            packet = PyBytes_FromStringAndSize(NULL, MCAST_HEADER_BYTES + n)
            wr_mcast_header(<uchar*>PyBytes_AS_STRING(packet), self.nodeid, self._ring_rep,
                            self._ring_seq, self._ring_epoch, seq, self.nodeid,
                            MCAST_FLAG_ENCAPSULATED, n)
            memcpy(<uchar*>PyBytes_AS_STRING(packet) + MCAST_HEADER_BYTES,
                   PyBytes_AS_STRING(inner), n)
            t.seq = seq
            self._buf.store(seq, packet, self.nodeid, MCAST_FLAG_ENCAPSULATED)
            self._send(BROADCAST, packet, PKT_MCAST)
            self._stats[ST_RECOVERY_FRAMES] += 1
            sent += 1
            allowed -= 1
        return sent

    cdef int64_t _backlog_frames(self):
        cdef Py_ssize_t count = len(self._sq) - self._sq_head
        if count == 0:
            return 0
        return (self._sq_bytes - self._head_offset + REC_WHOLE_HEADER * count) // \
            self.frame_body_max + 1

    cdef object _build_frame(self, uint64_t seq):
        """Pack queued messages into one frame (fragmenting a large one)."""
        cdef uchar* q = self._frame
        cdef Py_ssize_t start = MCAST_HEADER_BYTES
        cdef Py_ssize_t end = MCAST_HEADER_BYTES + self.frame_body_max
        cdef Py_ssize_t pos = start
        cdef Py_ssize_t mlen, chunk, avail
        cdef bytes msg
        while self._sq_head < len(self._sq):
            msg = <bytes>self._sq[self._sq_head]
            mlen = PyBytes_GET_SIZE(msg)
            if self._head_offset == 0 and REC_WHOLE_HEADER + mlen <= end - pos:
                q[pos] = REC_WHOLE
                wr_u32(q + pos + 1, <uint32_t>mlen)
                memcpy(q + pos + REC_WHOLE_HEADER, PyBytes_AS_STRING(msg), mlen)
                pos += REC_WHOLE_HEADER + mlen
                self._pop_head(mlen)
                continue
            if self._head_offset == 0 and REC_WHOLE_HEADER + mlen <= self.frame_body_max:
                break
            avail = end - pos - REC_FRAG_HEADER
            if avail < FRAGMENT_MIN_BYTES and pos > start:
                break
            chunk = mlen - self._head_offset
            if chunk > avail:
                chunk = avail
            q[pos] = REC_FRAG
            wr_u32(q + pos + 1, <uint32_t>mlen)
            wr_u32(q + pos + 5, <uint32_t>self._head_offset)
            wr_u32(q + pos + 9, <uint32_t>chunk)
            memcpy(q + pos + REC_FRAG_HEADER, PyBytes_AS_STRING(msg) + self._head_offset, chunk)
            pos += REC_FRAG_HEADER + chunk
            self._head_offset += chunk
            if self._head_offset < mlen:
                break
            self._pop_head(mlen)
        if pos == start:
            return None
        wr_mcast_header(q, self.nodeid, self._ring_rep, self._ring_seq, self._ring_epoch, seq,
                        self.nodeid, 0,
                        <uint32_t>(pos - start))
        return PyBytes_FromStringAndSize(<char*>q, pos)

    cdef inline void _pop_head(self, Py_ssize_t mlen):
        self._sq[self._sq_head] = None
        self._sq_head += 1
        self._sq_bytes -= mlen
        self._head_offset = 0
        if self._sq_head >= 4096 and 2 * self._sq_head >= len(self._sq):
            del self._sq[:self._sq_head]
            self._sq_head = 0

    cdef bint _failed_to_receive(self, TokenS* t) except -1:
        """fail_recv_const: this node keeps holding the aru back; exclude itself."""
        if t.aru_addr == self.nodeid and t.aru == self._fail_recv_aru and t.aru != t.seq:
            self._fail_recv_count += 1
        else:
            self._fail_recv_count = 0
        self._fail_recv_aru = t.aru
        if self._fail_recv_count < self.fail_recv_const:
            return False
        self._stats[ST_FAIL_RECV] += 1
        members = self._members
        self._gather_enter(0)
        self._failed = set(members) - {self.nodeid}
        self._proc |= self._failed
        return True

    cdef int _forward_token(self, TokenS* t) except -1:
        cdef bytes packet = encode_token(t)
        self._token_copy = packet
        self._token_dest = self._next_node
        self._send(self._next_node, packet, PKT_TOKEN)
        self._deadlines[T_TOKEN_RETRANSMIT] = self._now + self.token_retransmit_ns
        return 0

    # -- messages ----------------------------------------------------------------

    cdef int _on_mcast(self, bytes packet, const uchar* p, Py_ssize_t n) except -1:
        cdef McastS m
        cdef int stored
        if decode_mcast(p, n, &m, 0) < 0:
            self._stats[ST_MALFORMED] += 1
            return 0
        self._stats[ST_IN_BASE + PKT_MCAST - 1] += 1
        if (m.ring_rep == self._ring_rep and m.ring_seq == self._ring_seq
                and m.ring_epoch == self._ring_epoch) and (
                self._state == S_OPERATIONAL or self._state == S_RECOVERY) and (
                m.sender in self._member_set and m.origin in self._member_set):
            stored = self._buf.store(m.seq, packet, m.origin, m.flags)
            if stored == 0:
                self._stats[ST_DUP_MCAST] += 1
                return 0
            if stored < 0:
                self._stats[ST_NO_ROOM] += 1
                return 0
            if m.flags & MCAST_FLAG_ENCAPSULATED and self._state == S_RECOVERY:
                self._store_encapsulated(packet, &m)
            self._deliver()
            return 0
        if (m.ring_rep == self._old_rep and m.ring_seq == self._old_seq
                and m.ring_epoch == self._old_epoch and not (m.flags & MCAST_FLAG_ENCAPSULATED) and self._state == S_GATHER):
            # A late frame of the old ring: keep it for recovery. Only in
            # GATHER: once this node has reported what it holds (its commit
            # slot), it must not deliver anything its peers were not told of.
            if self._old_buf.store(m.seq, packet, m.origin, m.flags) <= 0:
                self._stats[ST_DUP_MCAST] += 1
            return 0
        self._stats[ST_FOREIGN] += 1
        if self._state == S_OPERATIONAL and m.ring_seq >= self._ring_seq:
            # Another ring is alive next to ours: merge with it.
            self._gather_enter(m.sender)
        return 0

    cdef int _store_encapsulated(self, bytes packet, McastS* m) except -1:
        cdef bytes inner = packet[m.body_off:m.body_off + m.body_len]
        cdef McastS im
        if decode_mcast(<const uchar*>PyBytes_AS_STRING(inner), m.body_len, &im, 1) < 0:
            return 0
        if (im.ring_rep != self._old_rep or im.ring_seq != self._old_seq
                or im.ring_epoch != self._old_epoch):
            return 0
        if self._old_buf.store(im.seq, inner, im.origin, 0) == 1:
            self._stats[ST_OLD_RECOVERED] += 1
        return 0

    cdef int _deliver(self) except -1:
        """Deliver the contiguous prefix of the current ring (agreed order)."""
        cdef FrameBuffer buf = self._buf
        cdef uint64_t s
        cdef Py_ssize_t idx
        while buf.delivered < buf.aru:
            s = buf.delivered + 1
            idx = s & RING_MASK
            if buf.flags[idx] & MCAST_FLAG_ENCAPSULATED:
                # Recovery traffic: its content went to the old ring's buffer.
                buf.delivered = s
                continue
            if self._state != S_OPERATIONAL:
                break
            buf.delivered = s
            self._deliver_frame(<bytes>buf.packets[idx], buf.origins[idx])
        return 0

    cdef int _deliver_old_ring(self) except -1:
        cdef FrameBuffer buf = self._old_buf
        cdef Py_ssize_t idx
        while buf.delivered < buf.aru:
            buf.delivered += 1
            idx = buf.delivered & RING_MASK
            if buf.flags[idx] & MCAST_FLAG_ENCAPSULATED:
                # The old ring's own recovery traffic: nothing of that ring to deliver.
                continue
            self._deliver_frame(<bytes>buf.packets[idx], buf.origins[idx])
        return 0

    cdef int _deliver_old_ring_past_gaps(self, set trans) except -1:
        """In the transitional configuration: old-ring frames held past a gap
        nobody could fill, if their sender moves on with us (every member of
        the transitional set holds the same frames after recovery)."""
        cdef FrameBuffer buf = self._old_buf
        cdef Py_ssize_t idx
        cdef uint64_t s = buf.delivered
        while s < buf.high:
            s += 1
            idx = s & RING_MASK
            if (buf.seqs[idx] == s and buf.origins[idx] in trans
                    and not (buf.flags[idx] & MCAST_FLAG_ENCAPSULATED)):
                self._deliver_frame(<bytes>buf.packets[idx], buf.origins[idx])
        buf.delivered = buf.aru
        return 0

    cdef int _deliver_frame(self, bytes packet, uint32_t origin) except -1:
        cdef const uchar* p = <const uchar*>PyBytes_AS_STRING(packet)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(packet)
        cdef Py_ssize_t off = MCAST_HEADER_BYTES
        cdef uint32_t length, total, offset
        cdef bytes payload
        # The body was validated when the frame was received.
        while off < n:
            if p[off] == REC_WHOLE:
                length = ld_u32(p + off + 1)
                off += REC_WHOLE_HEADER
                payload = PyBytes_FromStringAndSize(<const char*>(p + off), length)
                off += length
                self._events.append((EV_DELIVER, origin, payload))
                self._stats[ST_DELIVERED] += 1
                self._stats[ST_BYTES_DELIVERED] += length
            else:
                total = ld_u32(p + off + 1)
                offset = ld_u32(p + off + 5)
                length = ld_u32(p + off + 9)
                off += REC_FRAG_HEADER
                self._reassemble(origin, total, offset, p + off, length)
                off += length
        return 0

    cdef int _reassemble(self, uint32_t origin, uint32_t total, uint32_t offset,
                         const uchar* data, uint32_t length) except -1:
        cdef _Reassembly r
        if offset == 0:
            r = _Reassembly()
            r.data = bytearray(total)
            r.total = total
            r.next_offset = 0
            self._reassembly[origin] = r
        else:
            r = self._reassembly.get(origin)
            if r is None or r.total != total or r.next_offset != offset:
                # A continuation without its start (joined mid-message, or the
                # start belonged to a configuration that ended): drop it.
                self._stats[ST_FRAGMENTS_DROPPED] += 1
                if r is not None:
                    del self._reassembly[origin]
                return 0
        memcpy(<uchar*>PyByteArray_AS_STRING(r.data) + offset, data, length)
        r.next_offset = offset + length
        if r.next_offset == total:
            del self._reassembly[origin]
            self._events.append((EV_DELIVER, origin, bytes(r.data)))
            self._stats[ST_DELIVERED] += 1
            self._stats[ST_BYTES_DELIVERED] += total
        return 0

    cdef int _on_hold_cancel(self, Header* h, const uchar* p, Py_ssize_t n) except -1:
        if n != BARE_BYTES:
            self._stats[ST_MALFORMED] += 1
            return 0
        h.ring_epoch = ld_u64(p + HEADER_BYTES)
        self._stats[ST_IN_BASE + PKT_HOLD_CANCEL - 1] += 1
        if (h.ring_rep != self._ring_rep or h.ring_seq != self._ring_seq
                or h.ring_epoch != self._ring_epoch):
            self._stats[ST_FOREIGN] += 1
            return 0
        if self._held:
            self._resume_held()
        return 0

    cdef int _on_merge_detect(self, Header* h, const uchar* p, Py_ssize_t n) except -1:
        if n != BARE_BYTES:
            self._stats[ST_MALFORMED] += 1
            return 0
        h.ring_epoch = ld_u64(p + HEADER_BYTES)
        self._stats[ST_IN_BASE + PKT_MERGE_DETECT - 1] += 1
        if self._state != S_OPERATIONAL:
            return 0
        if (h.ring_rep == self._ring_rep and h.ring_seq == self._ring_seq
                and h.ring_epoch == self._ring_epoch):
            return 0
        if h.sender in self._members and h.ring_seq < self._ring_seq:
            return 0
        self._stats[ST_FOREIGN] += 1
        self._gather_enter(h.sender)
        return 0

    # -- membership: gather ------------------------------------------------------

    cdef int _gather_enter(self, uint32_t extra) except -1:
        """Enter (or restart) GATHER: all transitions into GATHER go through here."""
        cdef FrameBuffer swap
        if self._state == S_OPERATIONAL:
            # The ring we leave becomes the old configuration of EVS.
            swap = self._old_buf
            self._old_buf = self._buf
            self._buf = swap
            self._old_rep = self._ring_rep
            self._old_seq = self._ring_seq
            self._old_epoch = self._ring_epoch
            self._old_members = self._members
            self._proc = set(self._members)
            self._failed = set()
            self._joins = {}
        elif self._state == S_COMMIT or self._state == S_RECOVERY:
            self._proc |= set(self._commit_members)
        elif self._state == S_INITIAL:
            self._proc = set()
            self._failed = set()
        self._proc.add(self.nodeid)
        if extra:
            self._proc.add(extra)
        # Agreement is per gather round: stale JOINs (possibly from a node
        # that has died since) must not make a consensus.
        self._joins = {}
        self._state = S_GATHER
        self._held = False
        self._resume_pending = False
        self._hold_cancel_pending = False
        self._token_copy = None
        self._deadlines[T_TOKEN_LOSS] = -1
        self._deadlines[T_TOKEN_RETRANSMIT] = -1
        self._deadlines[T_HOLD] = -1
        self._deadlines[T_MERGE] = -1
        self._deadlines[T_JOIN] = self._now + self.join_ns
        self._deadlines[T_CONSENSUS] = self._now + self.consensus_ns
        self._join_dirty = True
        self._commit_created = False
        self._stats[ST_GATHER] += 1
        return 0

    cdef int _send_join(self) except -1:
        cdef uint64_t seq = self._highest_ring_seq
        if self._ring_seq > seq:
            seq = self._ring_seq
        self._send(BROADCAST, encode_join(self.nodeid, self._ring_rep, self._ring_seq,
                                          self._ring_epoch, 0, seq,
                                          sorted(self._proc), sorted(self._failed)), PKT_JOIN)
        return 0

    cdef int _on_join(self, const uchar* p, Py_ssize_t n) except -1:
        j = decode_join(p, n)
        if j is None:
            self._stats[ST_MALFORMED] += 1
            return 0
        self._stats[ST_IN_BASE + PKT_JOIN - 1] += 1
        sender, _, _, flags, join_ring_seq, proc, failed, _ = j
        if join_ring_seq > self._highest_ring_seq:
            self._highest_ring_seq = join_ring_seq
        if flags & JOIN_FLAG_LEAVE:
            return self._on_leave(sender)
        if self._state == S_OPERATIONAL:
            if sender in self._members and join_ring_seq < self._ring_seq:
                return 0  # a late copy from the gather that formed this ring
            if self.nodeid in failed:
                return 0
            self._gather_enter(0)
        elif self._state == S_COMMIT or self._state == S_RECOVERY:
            if set(proc) <= self._proc and set(failed) <= self._failed:
                return 0
            if self.nodeid in failed:
                return 0
            self._gather_enter(0)
        elif self._state != S_GATHER:
            return 0
        return self._join_process(sender, proc, failed)

    cdef int _join_process(self, uint32_t sender, tuple proc, tuple failed) except -1:
        cdef set their_proc = set(proc)
        cdef set their_failed = set(failed)
        cdef set new_proc, new_failed
        if their_proc == self._proc and their_failed == self._failed:
            self._joins[sender] = (proc, failed)
            return 0
        if sender in self._failed:
            return 0
        self._joins[sender] = (proc, failed)
        if their_proc <= self._proc and their_failed <= self._failed:
            return 0
        new_proc = self._proc | their_proc
        new_proc.add(sender)
        if self.nodeid in their_failed:
            # It thinks we failed: treat it as failed, as corosync does.
            new_failed = self._failed | {sender}
        else:
            new_failed = self._failed | their_failed
        new_proc |= new_failed
        if len(new_proc) > MEMBERS_MAX:
            # Bounded membership: a JOIN that would grow the ring past
            # MAX_MEMBERS is ignored (its sender stays outside this ring).
            self._stats[ST_WRONG_STATE] += 1
            return 0
        if new_proc != self._proc or new_failed != self._failed:
            self._proc = new_proc
            self._failed = new_failed
            self._gather_enter(0)
            self._joins[sender] = (proc, failed)
        return 0

    cdef int _on_leave(self, uint32_t sender) except -1:
        """A graceful leave: exclude the sender now instead of waiting for timeouts."""
        if self._state == S_OPERATIONAL:
            if sender not in self._members:
                return 0
            self._leavers.add(sender)
            self._gather_enter(0)
        elif self._state == S_GATHER or self._state == S_COMMIT or self._state == S_RECOVERY:
            if sender not in self._proc and sender not in self._commit_members:
                return 0
            if sender in self._failed and self._state == S_GATHER:
                return 0
            self._leavers.add(sender)
            self._gather_enter(0)
        else:
            return 0
        self._proc.add(sender)
        self._failed.add(sender)
        self._joins.pop(sender, None)
        return 0

    cdef tuple _my_sets(self):
        return (tuple(sorted(self._proc)), tuple(sorted(self._failed)))

    cdef int _check_consensus(self) except -1:
        cdef tuple mine
        if self._commit_created:
            return 0
        active = sorted(self._proc - self._failed)
        mine = self._my_sets()
        for nodeid in active:
            if nodeid != self.nodeid and self._joins.get(nodeid) != mine:
                return 0
        if active[0] == self.nodeid:
            self._create_commit(tuple(active))
        return 0

    cdef int _consensus_timeout(self) except -1:
        """Nodes that did not agree in time are moved to the failed set."""
        cdef tuple mine = self._my_sets()
        self._stats[ST_CONSENSUS_TIMEOUT] += 1
        for nodeid in sorted(self._proc - self._failed):
            if nodeid != self.nodeid and self._joins.get(nodeid) != mine:
                self._failed.add(nodeid)
        self._gather_enter(0)
        return 0

    # -- membership: commit and recovery -----------------------------------------

    cdef int _create_commit(self, tuple active) except -1:
        cdef uint64_t seq = self._highest_ring_seq
        if self._ring_seq > seq:
            seq = self._ring_seq
        if self._old_seq != FRESH_RING_SEQ and self._old_seq > seq:
            seq = self._old_seq
        seq += 4
        self._highest_ring_seq = seq
        self._commit_created = True
        slots = tuple([(0, 0, 0, 0, 0, 0, 0)] * len(active))
        # The epoch tells this ring from an earlier one with the same (rep, seq),
        # possible when a node lost its persisted ring seq.
        epoch = <uint64_t>self._now
        self._send(self.nodeid, encode_commit(self.nodeid, self.nodeid, seq, epoch, 0, active,
                                              slots), PKT_COMMIT)
        return 0

    cdef int _on_commit(self, const uchar* p, Py_ssize_t n) except -1:
        c = decode_commit(p, n)
        if c is None:
            self._stats[ST_MALFORMED] += 1
            return 0
        self._stats[ST_IN_BASE + PKT_COMMIT - 1] += 1
        sender, rep, seq, hop, members, slots, epoch = c
        count = len(members)
        if self.nodeid not in members:
            self._stats[ST_WRONG_STATE] += 1
            return 0
        index = members.index(self.nodeid)
        if seq > self._highest_ring_seq:
            self._highest_ring_seq = seq
        if hop < count:
            return self._commit_first_rotation(rep, seq, epoch, hop, members, slots, index)
        if hop < 2 * count:
            return self._commit_second_rotation(rep, seq, epoch, hop, members, slots, index)
        if (index != 0 or self._state != S_RECOVERY or self._token_originated
                or rep != self._ring_rep or seq != self._ring_seq or epoch != self._ring_epoch):
            self._stats[ST_WRONG_STATE] += 1
            return 0
        return self._originate_token()

    cdef int _commit_first_rotation(self, uint32_t rep, uint64_t seq, uint64_t epoch, int hop,
                                    tuple members, tuple slots, int index) except -1:
        if (members[hop] != self.nodeid or self._state != S_GATHER
                or set(members) != self._proc - self._failed or seq <= self._ring_seq):
            self._stats[ST_WRONG_STATE] += 1
            return 0
        filled = list(slots)
        self._my_commit_slot = (self._old_rep, self._old_seq, self._old_epoch, self._old_buf.aru,
                                self._old_buf.delivered, self._old_buf.high, 1)
        filled[index] = self._my_commit_slot
        self._state = S_COMMIT
        self._commit_members = members
        self._commit_seq = seq
        self._commit_epoch = epoch
        self._ring_seq = seq
        self._ring_epoch = epoch
        self._ring_rep = rep
        # Persist, then send: the new ring seq must be durable before this
        # commit token leaves (the caller takes it before popping the outbox).
        self._persist_seq = seq
        self._deadlines[T_JOIN] = -1
        self._deadlines[T_CONSENSUS] = -1
        self._deadlines[T_TOKEN_LOSS] = self._now + self.token_ns
        return self._forward_commit(rep, seq, epoch, hop + 1, members, tuple(filled), index)

    cdef int _commit_second_rotation(self, uint32_t rep, uint64_t seq, uint64_t epoch, int hop,
                                     tuple members, tuple slots, int index) except -1:
        if (members[hop - len(members)] != self.nodeid or self._state != S_COMMIT
                or seq != self._commit_seq or epoch != self._commit_epoch
                or members != self._commit_members
                or slots[index] != self._my_commit_slot):
            # A stale commit token: another round (or a previous incarnation
            # of this node, after a lost ring-seq file) filled our slot.
            self._stats[ST_WRONG_STATE] += 1
            return 0
        for slot in slots:
            if not slot[6]:
                self._stats[ST_MALFORMED] += 1
                return 0
        self._recovery_enter(rep, seq, epoch, members, slots)
        self._deadlines[T_TOKEN_LOSS] = self._now + self.token_ns
        return self._forward_commit(rep, seq, epoch, hop + 1, members, slots, index)

    cdef int _forward_commit(self, uint32_t rep, uint64_t seq, uint64_t epoch, int hop,
                             tuple members, tuple slots, int index) except -1:
        cdef uint32_t dest = members[(index + 1) % len(members)]
        cdef bytes packet = encode_commit(self.nodeid, rep, seq, epoch, hop, members, slots)
        self._token_copy = packet
        self._token_dest = dest
        self._send(dest, packet, PKT_COMMIT)
        self._deadlines[T_TOKEN_RETRANSMIT] = self._now + self.token_retransmit_ns
        return 0

    cdef int _recovery_enter(self, uint32_t rep, uint64_t seq, uint64_t epoch, tuple members,
                             tuple slots) except -1:
        cdef int i
        cdef uint64_t low
        cdef uint64_t s
        cdef bint need = False
        self._ring_rep = rep
        self._ring_seq = seq
        self._ring_epoch = epoch
        self._members = members
        i = members.index(self.nodeid)
        self._next_node = members[(i + 1) % len(members)]
        self._prev_node = members[(i + len(members) - 1) % len(members)]
        self._member_set = frozenset(members)
        self._is_rep = i == 0
        self._buf.reset()
        self._my_token_seq = 0
        self._prev_token_aru = 0
        self._last_arrival_seq = 0
        self._unchanged = 0
        self._fail_recv_count = 0
        self._fail_recv_aru = 0
        self._prev_sent = 0
        self._prev_backlog = 0
        self._token_originated = False
        self._retrans_set_by_me = False
        self._flag_clear_visits = 0
        self._install_seq = 0
        self._install_visits = 0
        trans = []
        trans_slots = []
        for i in range(len(members)):
            if (slots[i][0] == self._old_rep and slots[i][1] == self._old_seq
                    and slots[i][2] == self._old_epoch):
                trans.append(members[i])
                trans_slots.append(slots[i])
        self._trans = tuple(trans)
        # Old-ring messages above the lowest aru of the transitional members
        # are re-sent (encapsulated) unless every one of them holds the same.
        if not trans_slots:
            raise InvariantError("commit token without this node's own slot")
        low = min([slot[3] for slot in trans_slots])
        for slot in trans_slots:
            if slot[3] != low or slot[5] != low:
                need = True
        self._recovery_queue = []
        self._recovery_head = 0
        if need and len(trans) > 1:
            s = low
            while s < self._old_buf.high:
                s += 1
                if self._old_buf.has(s):
                    self._recovery_queue.append(_plain_old_frame(self._old_buf.packet(s)))
        self._state = S_RECOVERY
        return 0

    cdef int _originate_token(self) except -1:
        """The representative starts the first regular token of the new ring."""
        cdef TokenS t
        self._token_originated = True
        t.sender = self.nodeid
        t.ring_rep = self._ring_rep
        t.ring_seq = self._ring_seq
        t.ring_epoch = self._ring_epoch
        t.token_seq = 1
        t.seq = 0
        t.aru = 0
        t.aru_addr = 0
        t.fcc = 0
        t.backlog = 0
        t.retrans_flg = 0
        t.rtr_count = 0
        return self._token_arrived(&t)

    cdef bint _recovery_progress(self, TokenS* t) except -1:
        """retrans_flg / install_seq rules; True when this node may go operational."""
        if self._recovery_head < len(self._recovery_queue):
            t.retrans_flg = 1
            self._retrans_set_by_me = True
        elif t.retrans_flg and self._retrans_set_by_me:
            t.retrans_flg = 0
            self._retrans_set_by_me = False
        if t.retrans_flg:
            self._flag_clear_visits = 0
            self._install_visits = 0
            return False
        self._flag_clear_visits += 1
        if self._flag_clear_visits == 2:
            self._install_seq = t.seq
        if (self._flag_clear_visits >= 3 and t.aru >= self._install_seq
                and self._buf.aru >= self._install_seq):
            self._install_visits += 1
        return self._install_visits >= 2

    cdef int _operational_enter(self) except -1:
        """EVS: old-ring messages, then TRANSITIONAL, then REGULAR, then new ones."""
        ring = (self._ring_rep, self._ring_seq)
        self._deliver_old_ring()
        trans = self._trans
        left = tuple(sorted(set(self._old_members) - set(trans)))
        self._events.append((EV_CONFIG, CONF_TRANSITIONAL, ring, trans, (), left))
        self._deliver_old_ring_past_gaps(set(trans))
        # A fragmented message whose start belonged to the old configuration
        # can never complete; its sender starts it again in the new ring.
        self._reassembly = {}
        joined = tuple(sorted(set(self._members) - set(trans)))
        self._events.append((EV_CONFIG, CONF_REGULAR, ring, self._members, joined, left))
        self._last_leavers = tuple(sorted(set(left) & self._leavers))
        self._leavers = set()
        self._old_buf.reset()
        self._old_rep = self._ring_rep
        self._old_seq = self._ring_seq
        self._old_epoch = self._ring_epoch
        self._old_members = self._members
        self._proc = set()
        self._failed = set()
        self._joins = {}
        self._commit_members = ()
        self._recovery_queue = []
        self._recovery_head = 0
        self._head_offset = 0
        self._state = S_OPERATIONAL
        self._stats[ST_MEMBERSHIPS] += 1
        return 0
