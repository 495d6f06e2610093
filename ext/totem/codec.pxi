# Totem wire codec: fixed little-endian layouts, every read bounds-checked.
#
# Every packet starts with the 20-byte common header:
#   magic u16 | version u8 | type u8 | sender u32 | ring_rep u32 | ring_seq u64
# and carries a ring epoch u64 (the representative's now_ns when it created the
# ring): right after the header for JOIN, COMMIT, MERGE_DETECT and
# TOKEN_HOLD_CANCEL, after the fixed fields for the token and MCAST (so the
# fields tools read at fixed offsets keep their place). The epoch makes a ring's
# identity unique even when a node lost its persisted ring seq and a
# (rep, seq) pair comes round again.
# followed by a type-specific part (see docs/totem.md for the full layout).
# Decoders never read past `n`: a short, over-long or inconsistent buffer makes
# them return -1, which the core counts as `dropped_malformed`. Trailing bytes
# after a complete packet are malformed too, so garbage cannot hide in a packet.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy

ctypedef unsigned char uchar

cdef enum:
    MAGIC = 0x7C05
    VERSION = 1
    HEADER_BYTES = 20
    BARE_BYTES = HEADER_BYTES + 8
    PKT_TOKEN = 1
    PKT_MCAST = 2
    PKT_JOIN = 3
    PKT_COMMIT = 4
    PKT_MERGE_DETECT = 5
    PKT_HOLD_CANCEL = 6
    PKT_TYPE_MAX = 6
    # Token: header + token_seq, seq, aru (u64) + aru_addr, fcc, backlog (u32)
    # + retrans_flg u8 + rtr_count u8, then rtr_count u64 sequence numbers.
    # + ring_epoch u64.
    TOKEN_FIXED_BYTES = HEADER_BYTES + 8 + 8 + 8 + 4 + 4 + 4 + 1 + 1 + 8
    MAX_RTR = 30
    # MCAST: header + seq u64 + origin u32 + flags u8 + body_len u32, then body.
    # + ring_epoch u64.
    MCAST_HEADER_BYTES = HEADER_BYTES + 8 + 4 + 1 + 4 + 8
    MCAST_FLAG_ENCAPSULATED = 1
    # Body records: kind u8; WHOLE: len u32 + data; FRAG: total u32, offset u32,
    # len u32 + data.
    REC_WHOLE = 0
    REC_FRAG = 1
    REC_WHOLE_HEADER = 5
    REC_FRAG_HEADER = 13
    JOIN_FLAG_LEAVE = 1
    # Commit slot: old_rep u32, old_seq u64, old_epoch u64, old_aru u64,
    # high_delivered u64, high_received u64, filled u8.
    COMMIT_SLOT_BYTES = 4 + 8 + 8 + 8 + 8 + 8 + 1
    MEMBERS_MAX = 256
    MESSAGE_BYTES_MAX = (1 << 20) | (1 << 16)


cdef struct Header:
    uint16_t magic
    uint8_t version
    uint8_t type
    uint32_t sender
    uint32_t ring_rep
    uint64_t ring_seq
    uint64_t ring_epoch


cdef struct TokenS:
    uint32_t sender
    uint32_t ring_rep
    uint64_t ring_seq
    uint64_t ring_epoch
    uint64_t token_seq
    uint64_t seq
    uint64_t aru
    uint32_t aru_addr
    uint32_t fcc
    uint32_t backlog
    uint8_t retrans_flg
    uint8_t rtr_count
    uint64_t rtr[MAX_RTR]


cdef struct McastS:
    uint32_t sender
    uint32_t ring_rep
    uint64_t ring_seq
    uint64_t ring_epoch
    uint64_t seq
    uint32_t origin
    uint8_t flags
    Py_ssize_t body_off
    Py_ssize_t body_len


cdef struct Reader:
    const uchar* p
    Py_ssize_t n
    Py_ssize_t off
    int bad


cdef inline uint8_t rd_u8(Reader* r) noexcept nogil:
    if r.n - r.off < 1:
        r.bad = 1
        return 0
    cdef uint8_t v = r.p[r.off]
    r.off += 1
    return v


cdef inline uint16_t rd_u16(Reader* r) noexcept nogil:
    if r.n - r.off < 2:
        r.bad = 1
        return 0
    cdef const uchar* q = r.p + r.off
    r.off += 2
    return <uint16_t>q[0] | (<uint16_t>q[1] << 8)


cdef inline uint32_t ld_u32(const uchar* q) noexcept nogil:
    return (<uint32_t>q[0] | (<uint32_t>q[1] << 8) | (<uint32_t>q[2] << 16)
            | (<uint32_t>q[3] << 24))


cdef inline uint64_t ld_u64(const uchar* q) noexcept nogil:
    return <uint64_t>ld_u32(q) | (<uint64_t>ld_u32(q + 4) << 32)


cdef inline uint32_t rd_u32(Reader* r) noexcept nogil:
    if r.n - r.off < 4:
        r.bad = 1
        return 0
    cdef uint32_t v = ld_u32(r.p + r.off)
    r.off += 4
    return v


cdef inline uint64_t rd_u64(Reader* r) noexcept nogil:
    if r.n - r.off < 8:
        r.bad = 1
        return 0
    cdef uint64_t v = ld_u64(r.p + r.off)
    r.off += 8
    return v


cdef inline void wr_u16(uchar* q, uint16_t v) noexcept nogil:
    q[0] = v & 0xFF
    q[1] = (v >> 8) & 0xFF


cdef inline void wr_u32(uchar* q, uint32_t v) noexcept nogil:
    q[0] = v & 0xFF
    q[1] = (v >> 8) & 0xFF
    q[2] = (v >> 16) & 0xFF
    q[3] = (v >> 24) & 0xFF


cdef inline void wr_u64(uchar* q, uint64_t v) noexcept nogil:
    wr_u32(q, <uint32_t>(v & 0xFFFFFFFFULL))
    wr_u32(q + 4, <uint32_t>(v >> 32))


cdef inline void wr_header(uchar* q, uint8_t ptype, uint32_t sender, uint32_t rep,
                           uint64_t ring_seq) noexcept nogil:
    wr_u16(q, MAGIC)
    q[2] = VERSION
    q[3] = ptype
    wr_u32(q + 4, sender)
    wr_u32(q + 8, rep)
    wr_u64(q + 12, ring_seq)


cdef int decode_header(Reader* r, Header* h) noexcept nogil:
    h.magic = rd_u16(r)
    h.version = rd_u8(r)
    h.type = rd_u8(r)
    h.sender = rd_u32(r)
    h.ring_rep = rd_u32(r)
    h.ring_seq = rd_u64(r)
    h.ring_epoch = 0
    if r.bad or h.magic != MAGIC or h.version != VERSION:
        return -1
    if h.type < 1 or h.type > PKT_TYPE_MAX or h.sender == 0:
        return -1
    return 0


cdef int decode_token(const uchar* p, Py_ssize_t n, TokenS* t) noexcept nogil:
    cdef Reader r
    cdef Header h
    cdef int i
    r.p = p
    r.n = n
    r.off = 0
    r.bad = 0
    if decode_header(&r, &h) < 0 or h.type != PKT_TOKEN:
        return -1
    t.sender = h.sender
    t.ring_rep = h.ring_rep
    t.ring_seq = h.ring_seq
    t.token_seq = rd_u64(&r)
    t.seq = rd_u64(&r)
    t.aru = rd_u64(&r)
    t.aru_addr = rd_u32(&r)
    t.fcc = rd_u32(&r)
    t.backlog = rd_u32(&r)
    t.retrans_flg = rd_u8(&r)
    t.rtr_count = rd_u8(&r)
    t.ring_epoch = rd_u64(&r)
    if r.bad or t.rtr_count > MAX_RTR or t.retrans_flg > 1:
        return -1
    for i in range(t.rtr_count):
        t.rtr[i] = rd_u64(&r)
    if r.bad or r.off != n:
        return -1
    return 0


cdef Py_ssize_t token_size(TokenS* t) noexcept nogil:
    return TOKEN_FIXED_BYTES + 8 * t.rtr_count


cdef void encode_token_into(TokenS* t, uchar* q) noexcept nogil:
    cdef int i
    cdef uchar* b = q + HEADER_BYTES
    wr_header(q, PKT_TOKEN, t.sender, t.ring_rep, t.ring_seq)
    wr_u64(b, t.token_seq)
    wr_u64(b + 8, t.seq)
    wr_u64(b + 16, t.aru)
    wr_u32(b + 24, t.aru_addr)
    wr_u32(b + 28, t.fcc)
    wr_u32(b + 32, t.backlog)
    b[36] = t.retrans_flg
    b[37] = t.rtr_count
    wr_u64(b + 38, t.ring_epoch)
    for i in range(t.rtr_count):
        wr_u64(q + TOKEN_FIXED_BYTES + 8 * i, t.rtr[i])


cdef bytes encode_token(TokenS* t):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, token_size(t))
    encode_token_into(t, <uchar*>PyBytes_AS_STRING(out))
    return out


cdef int validate_body(const uchar* p, Py_ssize_t n) noexcept nogil:
    """Check that the body is a whole number of well-formed records."""
    cdef Reader r
    cdef uint8_t kind
    cdef uint32_t length, total, offset
    r.p = p
    r.n = n
    r.off = 0
    r.bad = 0
    while r.off < n:
        kind = rd_u8(&r)
        if kind == REC_WHOLE:
            length = rd_u32(&r)
        elif kind == REC_FRAG:
            total = rd_u32(&r)
            offset = rd_u32(&r)
            length = rd_u32(&r)
            if (total > MESSAGE_BYTES_MAX or length == 0
                    or <uint64_t>offset + length > total):
                return -1
        else:
            return -1
        if r.bad or <uint64_t>(n - r.off) < length:
            return -1
        r.off += length
    return 0


cdef int decode_mcast(const uchar* p, Py_ssize_t n, McastS* m, int depth) noexcept nogil:
    cdef Reader r
    cdef Header h
    cdef McastS inner
    cdef uint32_t body_len
    r.p = p
    r.n = n
    r.off = 0
    r.bad = 0
    if decode_header(&r, &h) < 0 or h.type != PKT_MCAST:
        return -1
    m.sender = h.sender
    m.ring_rep = h.ring_rep
    m.ring_seq = h.ring_seq
    m.seq = rd_u64(&r)
    m.origin = rd_u32(&r)
    m.flags = rd_u8(&r)
    body_len = rd_u32(&r)
    m.ring_epoch = rd_u64(&r)
    if r.bad or m.seq == 0 or m.origin == 0 or m.flags > MCAST_FLAG_ENCAPSULATED:
        return -1
    if <uint64_t>(n - r.off) != body_len:
        return -1
    m.body_off = r.off
    m.body_len = body_len
    if m.flags & MCAST_FLAG_ENCAPSULATED:
        # One level only: an encapsulated old-ring message is a plain MCAST.
        if depth > 0:
            return -1
        return decode_mcast(p + r.off, body_len, &inner, 1)
    return validate_body(p + r.off, body_len)


cdef inline void wr_mcast_header(uchar* q, uint32_t sender, uint32_t rep, uint64_t ring_seq,
                                 uint64_t epoch, uint64_t seq, uint32_t origin, uint8_t flags,
                                 uint32_t body_len) noexcept nogil:
    cdef uchar* b = q + HEADER_BYTES
    wr_header(q, PKT_MCAST, sender, rep, ring_seq)
    wr_u64(b, seq)
    wr_u32(b + 8, origin)
    b[12] = flags
    wr_u32(b + 13, body_len)
    wr_u64(b + 17, epoch)


cdef int read_nodeid_list(Reader* r, list out, int sorted_strict) except -2:
    cdef uint16_t count = rd_u16(r)
    cdef uint32_t nodeid, previous = 0
    cdef int i
    if r.bad or count > MEMBERS_MAX:
        return -1
    for i in range(count):
        nodeid = rd_u32(r)
        if r.bad or nodeid == 0:
            return -1
        if sorted_strict and nodeid <= previous:
            return -1
        previous = nodeid
        out.append(nodeid)
    return 0


cdef object decode_join(const uchar* p, Py_ssize_t n):
    """(sender, ring_rep, ring_seq, flags, join_ring_seq, proc, failed, ring_epoch) or None."""
    cdef Reader r
    cdef Header h
    cdef list proc = []
    cdef list failed = []
    r.p = p
    r.n = n
    r.off = 0
    r.bad = 0
    if decode_header(&r, &h) < 0 or h.type != PKT_JOIN:
        return None
    h.ring_epoch = rd_u64(&r)
    cdef uint8_t flags = rd_u8(&r)
    cdef uint64_t join_ring_seq = rd_u64(&r)
    if r.bad or flags > JOIN_FLAG_LEAVE:
        return None
    if read_nodeid_list(&r, proc, 1) < 0 or read_nodeid_list(&r, failed, 1) < 0:
        return None
    if r.off != n:
        return None
    return (h.sender, h.ring_rep, h.ring_seq, flags, join_ring_seq, tuple(proc), tuple(failed),
            h.ring_epoch)


cdef bytes encode_join(uint32_t sender, uint32_t rep, uint64_t ring_seq, uint64_t epoch,
                       uint8_t flags, uint64_t join_ring_seq, proc, failed):
    cdef Py_ssize_t n = BARE_BYTES + 1 + 8 + 2 + 4 * len(proc) + 2 + 4 * len(failed)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef uchar* q = <uchar*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t off
    wr_header(q, PKT_JOIN, sender, rep, ring_seq)
    wr_u64(q + HEADER_BYTES, epoch)
    q[BARE_BYTES] = flags
    wr_u64(q + BARE_BYTES + 1, join_ring_seq)
    off = BARE_BYTES + 9
    for seq_list in (proc, failed):
        wr_u16(q + off, <uint16_t>len(seq_list))
        off += 2
        for nodeid in seq_list:
            wr_u32(q + off, <uint32_t>nodeid)
            off += 4
    return out


cdef object decode_commit(const uchar* p, Py_ssize_t n):
    """(sender, ring_rep, ring_seq, hop, members, slots, ring_epoch) or None; a slot
    is (old_rep, old_seq, old_epoch, old_aru, high_delivered, high_received, filled)."""
    cdef Reader r
    cdef Header h
    cdef list members = []
    cdef list slots = []
    cdef int i
    r.p = p
    r.n = n
    r.off = 0
    r.bad = 0
    if decode_header(&r, &h) < 0 or h.type != PKT_COMMIT:
        return None
    h.ring_epoch = rd_u64(&r)
    cdef uint16_t hop = rd_u16(&r)
    if r.bad or read_nodeid_list(&r, members, 1) < 0:
        return None
    if len(members) == 0 or hop > 2 * len(members) or h.ring_rep != members[0]:
        return None
    for i in range(len(members)):
        slot = (rd_u32(&r), rd_u64(&r), rd_u64(&r), rd_u64(&r), rd_u64(&r), rd_u64(&r),
                rd_u8(&r))
        if r.bad or slot[6] > 1:
            return None
        slots.append(slot)
    if r.off != n:
        return None
    return (h.sender, h.ring_rep, h.ring_seq, hop, tuple(members), tuple(slots), h.ring_epoch)


cdef bytes encode_commit(uint32_t sender, uint32_t rep, uint64_t ring_seq, uint64_t epoch,
                         uint16_t hop, members, slots):
    cdef Py_ssize_t count = len(members)
    cdef Py_ssize_t n = BARE_BYTES + 2 + 2 + 4 * count + COMMIT_SLOT_BYTES * count
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef uchar* q = <uchar*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t off
    wr_header(q, PKT_COMMIT, sender, rep, ring_seq)
    wr_u64(q + HEADER_BYTES, epoch)
    wr_u16(q + BARE_BYTES, hop)
    wr_u16(q + BARE_BYTES + 2, <uint16_t>count)
    off = BARE_BYTES + 4
    for nodeid in members:
        wr_u32(q + off, <uint32_t>nodeid)
        off += 4
    for slot in slots:
        wr_u32(q + off, <uint32_t>slot[0])
        wr_u64(q + off + 4, <uint64_t>slot[1])
        wr_u64(q + off + 12, <uint64_t>slot[2])
        wr_u64(q + off + 20, <uint64_t>slot[3])
        wr_u64(q + off + 28, <uint64_t>slot[4])
        wr_u64(q + off + 36, <uint64_t>slot[5])
        q[off + 44] = <uint8_t>slot[6]
        off += COMMIT_SLOT_BYTES
    return out


cdef bytes encode_bare(uint8_t ptype, uint32_t sender, uint32_t rep, uint64_t ring_seq,
                       uint64_t epoch):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, BARE_BYTES)
    wr_header(<uchar*>PyBytes_AS_STRING(out), ptype, sender, rep, ring_seq)
    wr_u64(<uchar*>PyBytes_AS_STRING(out) + HEADER_BYTES, epoch)
    return out


# -- Python-level codec, for tests and tools (not used on the hot path) --------

def decode_packet(data: bytes) -> dict:
    """Decode any packet into a dict; raise DecodeError if it is malformed."""
    cdef const uchar* p = <const uchar*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Reader r
    cdef Header h
    cdef TokenS t
    cdef McastS m
    r.p = p
    r.n = n
    r.off = 0
    r.bad = 0
    if decode_header(&r, &h) < 0:
        raise DecodeError("bad header")
    out = {"type": h.type, "sender": h.sender, "ring_rep": h.ring_rep, "ring_seq": h.ring_seq}
    if h.type == PKT_TOKEN:
        if decode_token(p, n, &t) < 0:
            raise DecodeError("bad token")
        out.update(ring_epoch=t.ring_epoch, token_seq=t.token_seq, seq=t.seq, aru=t.aru, aru_addr=t.aru_addr,
                   fcc=t.fcc, backlog=t.backlog, retrans_flg=t.retrans_flg,
                   rtr=tuple([t.rtr[i] for i in range(t.rtr_count)]))
    elif h.type == PKT_MCAST:
        if decode_mcast(p, n, &m, 0) < 0:
            raise DecodeError("bad mcast")
        out.update(ring_epoch=m.ring_epoch, seq=m.seq, origin=m.origin, flags=m.flags,
                   body=data[m.body_off:m.body_off + m.body_len])
    elif h.type == PKT_JOIN:
        j = decode_join(p, n)
        if j is None:
            raise DecodeError("bad join")
        out.update(ring_epoch=j[7], flags=j[3], join_ring_seq=j[4], proc=j[5], failed=j[6])
    elif h.type == PKT_COMMIT:
        c = decode_commit(p, n)
        if c is None:
            raise DecodeError("bad commit token")
        out.update(ring_epoch=c[6], hop=c[3], members=c[4], slots=c[5])
    elif n != BARE_BYTES:
        raise DecodeError("wrong length")
    else:
        out["ring_epoch"] = ld_u64(p + HEADER_BYTES)
    return out


def encode_packet(fields: dict) -> bytes:
    """Encode a dict shaped like decode_packet's result (tests and tools)."""
    cdef TokenS t
    cdef int i
    ptype = fields["type"]
    sender, rep, ring_seq = fields["sender"], fields["ring_rep"], fields["ring_seq"]
    epoch = fields.get("ring_epoch", 0)
    if ptype == PKT_TOKEN:
        t.sender, t.ring_rep, t.ring_seq, t.ring_epoch = sender, rep, ring_seq, epoch
        t.token_seq, t.seq, t.aru = fields["token_seq"], fields["seq"], fields["aru"]
        t.aru_addr, t.fcc, t.backlog = fields["aru_addr"], fields["fcc"], fields["backlog"]
        t.retrans_flg = fields["retrans_flg"]
        rtr = fields["rtr"]
        if len(rtr) > MAX_RTR:
            raise UsageError("rtr list longer than 30")
        t.rtr_count = len(rtr)
        for i in range(t.rtr_count):
            t.rtr[i] = rtr[i]
        return encode_token(&t)
    if ptype == PKT_MCAST:
        body = bytes(fields["body"])
        out = PyBytes_FromStringAndSize(NULL, MCAST_HEADER_BYTES + len(body))
        wr_mcast_header(<uchar*>PyBytes_AS_STRING(out), sender, rep, ring_seq, epoch, fields["seq"],
                        fields["origin"], fields["flags"], len(body))
        memcpy(<uchar*>PyBytes_AS_STRING(out) + MCAST_HEADER_BYTES,
               <const uchar*>PyBytes_AS_STRING(body), len(body))
        return out
    if ptype == PKT_JOIN:
        return encode_join(sender, rep, ring_seq, epoch, fields["flags"], fields["join_ring_seq"],
                           fields["proc"], fields["failed"])
    if ptype == PKT_COMMIT:
        return encode_commit(sender, rep, ring_seq, epoch, fields["hop"], fields["members"],
                             fields["slots"])
    if ptype in (PKT_MERGE_DETECT, PKT_HOLD_CANCEL):
        return encode_bare(ptype, sender, rep, ring_seq, epoch)
    raise UsageError(f"unknown packet type {ptype}")


def encode_records(messages: list) -> bytes:
    """A frame body holding each message as one WHOLE record (tests and tools)."""
    parts = []
    for message in messages:
        parts.append(bytes([REC_WHOLE]) + len(message).to_bytes(4, "little") + bytes(message))
    return b"".join(parts)
