"""Wire format of the messages quorum services exchange in the `corral-quorum` group.

Every message is fixed-size, big-endian, and starts with a 4-byte header:
magic `b"CQ"`, version (1), type. Two types exist:

NODEINFO (type 1, 40 bytes): what a node announces about itself after every
membership change and whenever one of its values changes.

    magic[2] version u8 type u8 | nodeid u32 | ring_rep u32 | ring_seq u64
    | votes u32 | expected_votes u32 | flags u16 | config_flags u16
    | config_expected_votes u32 | lms_window_ms u32

SET_EXPECTED (type 2, 24 bytes): `expected N` issued on `nodeid`, applied by
every member when delivered (total order makes every node apply it at the same
point in the stream).

    magic[2] version u8 type u8 | nodeid u32 | ring_rep u32 | ring_seq u64
    | expected_votes u32

`decode()` checks the length before reading, then every field against its
bounds; anything else raises `DecodeError` and the core drops and counts it. A
different version is refused rather than guessed at: mixed versions need a
new type, not a silent reinterpretation.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from corral.errors import DecodeError
from corral.quorum.config import LMS_WINDOW_MS_BOUNDS, MAX_EXPECTED_VOTES, MAX_VOTES_PER_NODE

MAGIC = b"CQ"
VERSION = 1

_HEADER = struct.Struct(">2sBB")
_NODEINFO = struct.Struct(">2sBBIIQIIHHII")
_SET_EXPECTED = struct.Struct(">2sBBIIQI")
MAX_MESSAGE_BYTES = max(_NODEINFO.size, _SET_EXPECTED.size)


class MessageType(enum.IntEnum):
    NODEINFO = 1
    SET_EXPECTED = 2


class NodeFlag(enum.IntFlag):
    """State a node announces about itself."""

    QUORATE = 1
    WAITING_FOR_ALL = 2
    LEAVING = 4


class ConfigFlag(enum.IntFlag):
    """The features a node runs with: its view of the configuration."""

    TWO_NODE = 1
    WAIT_FOR_ALL = 2
    LAST_MAN_STANDING = 4
    AUTO_TIE_BREAKER = 8
    ALLOW_DOWNSCALE = 16
    EXPECTED_VOTES_TRACKING = 32


_NODE_FLAGS_MASK = int(NodeFlag.QUORATE | NodeFlag.WAITING_FOR_ALL | NodeFlag.LEAVING)
_CONFIG_FLAGS_MASK = 63


@dataclass(frozen=True, slots=True)
class NodeInfo:
    nodeid: int
    ring_id: tuple[int, int]
    votes: int
    expected_votes: int
    flags: NodeFlag
    config_flags: ConfigFlag
    config_expected_votes: int
    lms_window_ms: int

    def encode(self) -> bytes:
        return _NODEINFO.pack(
            MAGIC, VERSION, MessageType.NODEINFO, self.nodeid, self.ring_id[0], self.ring_id[1],
            self.votes, self.expected_votes, int(self.flags), int(self.config_flags),
            self.config_expected_votes, self.lms_window_ms,
        )


@dataclass(frozen=True, slots=True)
class SetExpected:
    nodeid: int
    ring_id: tuple[int, int]
    expected_votes: int

    def encode(self) -> bytes:
        return _SET_EXPECTED.pack(
            MAGIC, VERSION, MessageType.SET_EXPECTED, self.nodeid, self.ring_id[0],
            self.ring_id[1], self.expected_votes,
        )


Message = NodeInfo | SetExpected


def decode(data: bytes) -> Message:
    """Parse one message; raise `DecodeError` for anything short, long or out of bounds."""
    if len(data) < _HEADER.size:
        raise DecodeError(f"quorum message of {len(data)} bytes is shorter than its header")
    magic, version, kind = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("not a quorum message (bad magic)")
    if version != VERSION:
        raise DecodeError(f"unsupported quorum message version {version}")
    if kind == MessageType.NODEINFO:
        return _decode_nodeinfo(data)
    if kind == MessageType.SET_EXPECTED:
        return _decode_set_expected(data)
    raise DecodeError(f"unknown quorum message type {kind}")


def _check_length(data: bytes, layout: struct.Struct, name: str) -> None:
    if len(data) != layout.size:
        raise DecodeError(f"{name} is {len(data)} bytes, expected {layout.size}")


def _check_nodeid(nodeid: int) -> None:
    if nodeid == 0:
        raise DecodeError("nodeid 0 is reserved")


def _decode_nodeinfo(data: bytes) -> NodeInfo:
    _check_length(data, _NODEINFO, "NODEINFO")
    fields = _NODEINFO.unpack(data)
    (nodeid, rep, seq, votes, expected, flags, config_flags, config_expected, window) = fields[3:]
    _check_nodeid(nodeid)
    if votes > MAX_VOTES_PER_NODE:
        raise DecodeError(f"votes {votes} exceed {MAX_VOTES_PER_NODE}")
    for name, value in (("expected_votes", expected), ("config_expected_votes", config_expected)):
        if not 1 <= value <= MAX_EXPECTED_VOTES:
            raise DecodeError(f"{name} {value} is outside [1, {MAX_EXPECTED_VOTES}]")
    if flags & ~_NODE_FLAGS_MASK or config_flags & ~_CONFIG_FLAGS_MASK:
        raise DecodeError("unknown flag bits")
    low, high = LMS_WINDOW_MS_BOUNDS
    if not low <= window <= high:
        raise DecodeError(f"lms_window_ms {window} is outside [{low}, {high}]")
    return NodeInfo(
        nodeid, (rep, seq), votes, expected, NodeFlag(flags), ConfigFlag(config_flags),
        config_expected, window,
    )


def _decode_set_expected(data: bytes) -> SetExpected:
    _check_length(data, _SET_EXPECTED, "SET_EXPECTED")
    nodeid, rep, seq, expected = _SET_EXPECTED.unpack(data)[3:]
    _check_nodeid(nodeid)
    if not 1 <= expected <= MAX_EXPECTED_VOTES:
        raise DecodeError(f"expected_votes {expected} is outside [1, {MAX_EXPECTED_VOTES}]")
    return SetExpected(nodeid, (rep, seq), expected)
