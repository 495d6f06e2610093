"""The quorum group's message codec, and how the core treats bad messages.

Decoding is tested three ways (whole buffer, every prefix, trailing garbage), then
field by field against its bounds, then with random bytes (hypothesis): anything
but a well-formed message raises `DecodeError`. The core must drop and count
malformed, spoofed, stale and non-member messages without changing its state.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import DecodeError
from corral.quorum.config import QuorumConfig
from corral.quorum.core import QuorumCore
from corral.quorum.wire import (
    ConfigFlag,
    NodeFlag,
    NodeInfo,
    SetExpected,
    decode,
)

INFO = NodeInfo(2, (1, 0x2F), 1, 3, NodeFlag.QUORATE, ConfigFlag.WAIT_FOR_ALL, 3, 10_000)
SET = SetExpected(2, (1, 0x2F), 2)


@pytest.mark.parametrize("message", [INFO, SET])
def test_round_trip_and_every_prefix(message: NodeInfo | SetExpected) -> None:
    data = message.encode()
    assert decode(data) == message
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            decode(data[:cut])
    with pytest.raises(DecodeError):
        decode(data + b"\x00")


def test_sizes_are_fixed() -> None:
    assert len(INFO.encode()) == 40 and len(SET.encode()) == 24


def _patched(offset: int, fmt: str, value: int, data: bytes | None = None) -> bytes:
    buffer = bytearray(data or INFO.encode())
    struct.pack_into(fmt, buffer, offset, value)
    return bytes(buffer)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"XQ" + INFO.encode()[2:], "bad magic"),
        (_patched(2, ">B", 2), "unsupported quorum message version 2"),
        (_patched(3, ">B", 9), "unknown quorum message type 9"),
        (_patched(4, ">I", 0), "nodeid 0"),
        (_patched(20, ">I", 1001), "votes 1001"),
        (_patched(24, ">I", 0), "expected_votes 0"),
        (_patched(28, ">H", 0x80), "unknown flag bits"),
        (_patched(30, ">H", 0x100), "unknown flag bits"),
        (_patched(32, ">I", 0), "config_expected_votes 0"),
        (_patched(36, ">I", 0), "lms_window_ms 0"),
        (_patched(36, ">I", 3_600_001), "lms_window_ms 3600001"),
        (_patched(20, ">I", 0, SET.encode()), "expected_votes 0"),
    ],
)
def test_out_of_bounds_fields(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 39), st.integers(0, 255))
def test_single_byte_corruption_is_rejected_or_well_formed(position: int, value: int) -> None:
    buffer = bytearray(INFO.encode())
    buffer[position] = value
    try:
        decoded = decode(bytes(buffer))
    except DecodeError:
        return
    assert decoded.encode() == bytes(buffer)


def _core() -> QuorumCore:
    core = QuorumCore(QuorumConfig.from_options({}, {1: 1, 2: 1, 3: 1}), 1)
    core.membership_changed((1, 0x2F), [1, 2])
    return core


def test_core_drops_and_counts_bad_messages() -> None:
    core = _core()
    before = core.status()
    assert core.message_received(2, b"garbage") == []
    assert core.message_received(2, INFO.encode()[:-1]) == []
    assert core.message_received(3, INFO.encode()) == []  # claims to be node 2
    stale = NodeInfo(2, (1, 0x2B), 1, 9, NodeFlag(0), ConfigFlag(0), 3, 10_000)
    assert core.message_received(2, stale.encode()) == []
    stranger = NodeInfo(3, (1, 0x2F), 1, 9, NodeFlag(0), ConfigFlag(0), 3, 10_000)
    assert core.message_received(3, stranger.encode()) == []
    after = core.status()
    assert after.dropped == {"malformed": 2, "spoofed": 1, "stale": 1, "not_member": 1}
    assert (after.expected_votes, after.highest_expected, after.quorum, after.syncing) == (
        before.expected_votes, before.highest_expected, before.quorum, before.syncing
    )


def test_core_accepts_a_good_message_after_bad_ones() -> None:
    core = _core()
    core.message_received(2, b"\x00" * 40)
    good = NodeInfo(2, (1, 0x2F), 1, 3, NodeFlag(0), ConfigFlag(0), 3, 10_000)
    core.message_received(2, good.encode())
    assert core.quorate and core.status().total_votes == 2
