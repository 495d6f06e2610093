# The sort/retransmit queue: a power-of-two ring of frames indexed by seq.
#
# A slot holds one whole MCAST packet (bytes), so retransmitting is re-sending
# the same object. `low` is the freed prefix (all members hold it: the safe
# threshold), `aru` the highest contiguous seq held, `high` the highest seq
# held and `delivered` the highest seq handed to the application.

from libc.stdlib cimport calloc, free
from libc.string cimport memset

cdef enum:
    RING_FRAMES = 16384
    RING_MASK = RING_FRAMES - 1


cdef class FrameBuffer:
    cdef uint64_t* seqs
    cdef uint32_t* origins
    cdef uint8_t* flags
    cdef uint16_t* miss
    cdef list packets
    cdef uint64_t low
    cdef uint64_t aru
    cdef uint64_t high
    cdef uint64_t delivered

    def __cinit__(self):
        self.seqs = <uint64_t*>calloc(RING_FRAMES, sizeof(uint64_t))
        self.origins = <uint32_t*>calloc(RING_FRAMES, sizeof(uint32_t))
        self.flags = <uint8_t*>calloc(RING_FRAMES, sizeof(uint8_t))
        self.miss = <uint16_t*>calloc(RING_FRAMES, sizeof(uint16_t))
        if not self.seqs or not self.origins or not self.flags or not self.miss:
            raise MemoryError()
        self.packets = [None] * RING_FRAMES

    def __dealloc__(self):
        free(self.seqs)
        free(self.origins)
        free(self.flags)
        free(self.miss)

    cdef void reset(self):
        memset(self.seqs, 0, RING_FRAMES * sizeof(uint64_t))
        memset(self.miss, 0, RING_FRAMES * sizeof(uint16_t))
        if self.high > 0:
            self.packets = [None] * RING_FRAMES
        self.low = 0
        self.aru = 0
        self.high = 0
        self.delivered = 0

    cdef inline bint has(self, uint64_t seq) noexcept:
        return seq != 0 and self.seqs[seq & RING_MASK] == seq

    cdef inline object packet(self, uint64_t seq):
        return self.packets[seq & RING_MASK]

    cdef int store(self, uint64_t seq, object packet, uint32_t origin,
                   uint8_t flags) except -2:
        """1 = stored, 0 = duplicate or stale, -1 = no room (slot still needed)."""
        cdef Py_ssize_t idx = seq & RING_MASK
        cdef uint64_t previous = self.seqs[idx]
        if seq <= self.aru or previous == seq:
            return 0
        if previous > seq:
            return 0
        # The slot's previous occupant may be overwritten once delivered here:
        # the sender only uses seq when seq - RING_FRAMES is below the token's
        # aru, so no member will ask for it again.
        if previous != 0 and previous > self.delivered:
            return -1
        if seq - self.aru >= RING_FRAMES:
            return -1
        self.seqs[idx] = seq
        self.origins[idx] = origin
        self.flags[idx] = flags
        self.miss[idx] = 0
        self.packets[idx] = packet
        if seq > self.high:
            self.high = seq
        while self.seqs[(self.aru + 1) & RING_MASK] == self.aru + 1:
            self.aru += 1
        return 1

    cdef void free_up_to(self, uint64_t seq):
        """Release frames up to seq (never past what is held and delivered here)."""
        cdef Py_ssize_t idx
        if seq > self.delivered:
            seq = self.delivered
        if seq > self.aru:
            seq = self.aru
        while self.low < seq:
            self.low += 1
            idx = self.low & RING_MASK
            if self.seqs[idx] == self.low:
                self.seqs[idx] = 0
                self.packets[idx] = None
