"""Packet codec: round trips (hypothesis) and hostile input.

Every packet type is encoded and decoded back; then each valid packet is fed
whole, truncated at every length, with trailing garbage, and random bytes are
fed, both to `decode_packet` (must raise DecodeError, never crash) and to a
running core (must count the packet as malformed and drop it).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import DecodeError
from corral.totem import _core
from corral.totem._core import (
    MAX_RTR_ENTRIES,
    PACKET_COMMIT,
    PACKET_JOIN,
    PACKET_MCAST,
    PACKET_MERGE_DETECT,
    PACKET_TOKEN,
    PACKET_TOKEN_HOLD_CANCEL,
    PROTOCOL_VERSION,
    TotemCore,
    decode_packet,
    encode_packet,
    encode_records,
)
from corral.totem.config import TotemConfig

u32 = st.integers(min_value=1, max_value=2**32 - 1)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
nodeid_lists = st.lists(u32, max_size=20, unique=True).map(lambda xs: tuple(sorted(xs)))


def header(ptype: int) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"type": st.just(ptype), "sender": u32, "ring_rep": u32, "ring_seq": u64,
         "ring_epoch": u64}
    )


tokens = st.tuples(
    header(PACKET_TOKEN),
    st.fixed_dictionaries({
        "token_seq": u64, "seq": u64, "aru": u64, "aru_addr": st.integers(0, 2**32 - 1),
        "fcc": st.integers(0, 2**32 - 1), "backlog": st.integers(0, 2**32 - 1),
        "retrans_flg": st.integers(0, 1),
        "rtr": st.lists(u64, max_size=MAX_RTR_ENTRIES).map(tuple),
    }),
)
mcasts = st.tuples(
    header(PACKET_MCAST),
    st.fixed_dictionaries({
        "seq": st.integers(1, 2**64 - 1), "origin": u32, "flags": st.just(0),
        "body": st.lists(st.binary(max_size=200), max_size=5).map(encode_records),
    }),
)
joins = st.tuples(
    header(PACKET_JOIN),
    st.fixed_dictionaries({
        "flags": st.integers(0, 1), "join_ring_seq": u64, "proc": nodeid_lists,
        "failed": nodeid_lists,
    }),
)
slots = st.tuples(u32, u64, u64, u64, u64, u64, st.integers(0, 1))


@st.composite
def commits(draw: st.DrawFn) -> tuple[dict, dict]:
    members = draw(st.lists(u32, min_size=1, max_size=12, unique=True).map(lambda x: tuple(sorted(x))))
    head = draw(header(PACKET_COMMIT))
    head["ring_rep"] = members[0]
    body = {
        "hop": draw(st.integers(0, 2 * len(members))),
        "members": members,
        "slots": tuple(draw(slots) for _ in members),
    }
    return head, body


bare = st.tuples(
    st.one_of(header(PACKET_MERGE_DETECT), header(PACKET_TOKEN_HOLD_CANCEL)), st.just({})
)
any_packet = st.one_of(tokens, mcasts, joins, commits(), bare)


@settings(max_examples=300, deadline=None)
@given(any_packet)
def test_round_trip(parts: tuple[dict, dict]) -> None:
    fields = {**parts[0], **parts[1]}
    data = encode_packet(fields)
    assert data[2] == PROTOCOL_VERSION
    assert decode_packet(data) == fields


def _samples() -> list[bytes]:
    rng = random.Random(7)
    ring = {"ring_rep": 1, "ring_seq": 8, "ring_epoch": 77}
    out = [
        encode_packet({"type": PACKET_TOKEN, "sender": 2, **ring, "token_seq": 5, "seq": 9,
                       "aru": 7, "aru_addr": 3, "fcc": 4, "backlog": 1, "retrans_flg": 0,
                       "rtr": (8, 9)}),
        encode_packet({"type": PACKET_MCAST, "sender": 2, **ring, "seq": 3, "origin": 2,
                       "flags": 0, "body": encode_records([b"hello", b"", rng.randbytes(40)])}),
        encode_packet({"type": PACKET_JOIN, "sender": 2, **ring, "flags": 0,
                       "join_ring_seq": 8, "proc": (1, 2, 3), "failed": (3,)}),
        encode_packet({"type": PACKET_COMMIT, "sender": 2, **ring, "hop": 1,
                       "members": (1, 2), "slots": ((1, 4, 5, 0, 0, 0, 1), (0, 0, 0, 0, 0, 0, 0))}),
        encode_packet({"type": PACKET_MERGE_DETECT, "sender": 2, **ring}),
        encode_packet({"type": PACKET_TOKEN_HOLD_CANCEL, "sender": 2, **ring}),
    ]
    inner = out[1]
    out.append(encode_packet({"type": PACKET_MCAST, "sender": 3, "ring_rep": 1, "ring_seq": 12,
                              "seq": 1, "origin": 3, "flags": 1, "body": inner}))
    return out


def _started_core() -> TotemCore:
    core = TotemCore(1, TotemConfig(token=1000).timers(3))
    core.start(0)
    core.pop_outbox()
    return core


@pytest.mark.parametrize("packet", _samples(), ids=lambda p: f"type{p[3]}")
def test_whole_decodes_and_truncations_fail(packet: bytes) -> None:
    decode_packet(packet)
    core = _started_core()
    for length in range(len(packet)):
        with pytest.raises(DecodeError):
            decode_packet(packet[:length])
        before = core.stats()["dropped_malformed"]
        core.receive(1, packet[:length])
        assert core.stats()["dropped_malformed"] == before + 1, length


@pytest.mark.parametrize("packet", _samples(), ids=lambda p: f"type{p[3]}")
def test_trailing_garbage_is_malformed(packet: bytes) -> None:
    core = _started_core()
    for garbage in (b"\x00", b"\x00" * 5, b"\xff" * 3, bytes(range(40))):
        with pytest.raises(DecodeError):
            decode_packet(packet + garbage)
        core.receive(1, packet + garbage)
    assert core.stats()["dropped_malformed"] == 4


def test_wrong_version_and_magic() -> None:
    packet = _samples()[0]
    for bad in (packet[:2] + b"\x02" + packet[3:], b"\x00\x00" + packet[2:],
                packet[:3] + b"\x09" + packet[4:]):
        with pytest.raises(DecodeError):
            decode_packet(bad)


def test_fragment_record_bounds_checked() -> None:
    ring = {"type": PACKET_MCAST, "sender": 2, "ring_rep": 1, "ring_seq": 8, "ring_epoch": 3, "seq": 1,
            "origin": 2, "flags": 0}
    # offset + length beyond the total, a zero-length fragment, an unknown record kind
    for body in (b"\x01" + (10).to_bytes(4, "little") + (8).to_bytes(4, "little")
                 + (4).to_bytes(4, "little") + b"abcd",
                 b"\x01" + (10).to_bytes(4, "little") + bytes(8),
                 b"\x07abc"):
        with pytest.raises(DecodeError):
            decode_packet(encode_packet({**ring, "body": body}))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode_packet(data)
    except DecodeError:
        pass


def test_random_mutations_counted_by_core() -> None:
    rng = random.Random(11)
    core = _started_core()
    samples = _samples()
    fed = 0
    for _ in range(3000):
        packet = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            packet[rng.randrange(len(packet))] = rng.randrange(256)
        core.receive(2, bytes(packet))
        fed += 1
    stats = core.stats()
    handled = sum(stats[k] for k in stats if k.startswith("packets_in_")) + stats["dropped_malformed"] + stats["dropped_own"]
    # Every packet fed is accounted for (loopback packets the core sent itself
    # during membership changes are counted as received too).
    assert handled >= fed
    assert stats["dropped_malformed"] > 1000


def test_module_constants() -> None:
    assert _core.MAX_RTR_ENTRIES == 30
    assert _core.RING_FRAMES_MAX == 16384
    assert _core.state_name(_core.STATE_OPERATIONAL) == "operational"
