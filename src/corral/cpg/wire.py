"""The CPG messages carried as Totem payloads: encoding and bounds-checked decoding.

Layout (all integers big-endian):

    magic "CG" | version u8 (= WIRE_VERSION) | kind u8 | body

    JOIN      group_len u8 | group | pid u32
    LEAVE     group_len u8 | group | pid u32 | reason u8 (LEAVE or PROCDOWN)
    MCAST     group_len u8 | group | pid u32 | payload (the rest of the message)
    JOINLIST  ring_rep u32 | ring_seq u64 | count u16 | count * (group_len u8 | group | pid u32)

The magic lets CPG share the Totem stream with other services (votequorum
uses "CQ"): a payload without it is `ForeignPayload`, not CPG's to judge.
Every read checks the remaining length first; a short, oversized or otherwise
malformed message raises `DecodeError` (the core counts and drops it). Trailing
bytes after a fixed-size body are malformed too, so a message has exactly one
reading.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

from corral.cpg.events import Reason
from corral.errors import DecodeError

WIRE_MAGIC = b"CG"
WIRE_VERSION = 1
# corosync's CPG_MAX_NAME_LENGTH.
MAX_GROUP_NAME_BYTES = 128
# Largest application payload of one CPG message; Totem takes 1 MiB + 64 KiB.
MAX_PAYLOAD_BYTES = 1 << 20
# Processes one node may have in groups at once (its joinlist entries).
MAX_ENTRIES_PER_NODE = 1024

_HEADER = struct.Struct(">2sBB")
_PID = struct.Struct(">I")
_PID_REASON = struct.Struct(">IB")
_JOINLIST_HEAD = struct.Struct(">IQH")


class ForeignPayload(DecodeError):
    """The payload does not start with the CPG magic: another service's message."""


class Kind(enum.IntEnum):
    JOIN = 1
    LEAVE = 2
    MCAST = 3
    JOINLIST = 4


@dataclass(frozen=True, slots=True)
class JoinMsg:
    group: bytes
    pid: int


@dataclass(frozen=True, slots=True)
class LeaveMsg:
    group: bytes
    pid: int
    reason: int


@dataclass(frozen=True, slots=True)
class McastMsg:
    group: bytes
    pid: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class JoinlistMsg:
    ring_id: tuple[int, int]
    entries: tuple[tuple[bytes, int], ...]


WireMsg = JoinMsg | LeaveMsg | McastMsg | JoinlistMsg


def check_group_name(group: bytes) -> None:
    """Raise ValueError unless `group` is a usable group name (1..128 bytes)."""
    if not isinstance(group, bytes | bytearray):
        raise ValueError("group name must be bytes")
    if not 1 <= len(group) <= MAX_GROUP_NAME_BYTES:
        raise ValueError(f"group name must be 1..{MAX_GROUP_NAME_BYTES} bytes")


def _group(group: bytes) -> bytes:
    return bytes((len(group),)) + group


def encode_join(group: bytes, pid: int) -> bytes:
    return _HEADER.pack(WIRE_MAGIC, WIRE_VERSION, Kind.JOIN) + _group(group) + _PID.pack(pid)


def encode_leave(group: bytes, pid: int, reason: int) -> bytes:
    return _HEADER.pack(WIRE_MAGIC, WIRE_VERSION, Kind.LEAVE) + _group(group) + _PID_REASON.pack(pid, reason)


def encode_mcast(group: bytes, pid: int, payload: bytes) -> bytes:
    return b"".join(
        (_HEADER.pack(WIRE_MAGIC, WIRE_VERSION, Kind.MCAST), _group(group), _PID.pack(pid), payload)
    )


def encode_joinlist(ring_id: tuple[int, int], entries: list[tuple[bytes, int]]) -> bytes:
    if len(entries) > MAX_ENTRIES_PER_NODE:
        raise ValueError("joinlist too long")
    parts = [
        _HEADER.pack(WIRE_MAGIC, WIRE_VERSION, Kind.JOINLIST),
        _JOINLIST_HEAD.pack(ring_id[0], ring_id[1], len(entries)),
    ]
    for group, pid in entries:
        parts.append(_group(group))
        parts.append(_PID.pack(pid))
    return b"".join(parts)


class Reader:
    """Reads a buffer front to back; every read checks the length first."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n_bytes: int) -> bytes:
        end = self.pos + n_bytes
        if end > len(self.buf):
            raise DecodeError(f"short message: need {end} bytes, have {len(self.buf)}")
        chunk = self.buf[self.pos:end]
        self.pos = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def group(self) -> bytes:
        (length,) = self.take(1)
        if not 1 <= length <= MAX_GROUP_NAME_BYTES:
            raise DecodeError(f"group name length {length} out of bounds")
        return self.take(length)

    def rest(self) -> bytes:
        chunk = self.buf[self.pos:]
        self.pos = len(self.buf)
        return chunk

    def finish(self) -> None:
        if self.pos != len(self.buf):
            raise DecodeError(f"{len(self.buf) - self.pos} trailing bytes")


def decode(buf: bytes) -> WireMsg:
    """Decode one CPG message; raises DecodeError for anything malformed."""
    if bytes(buf[:2]) != WIRE_MAGIC:
        raise ForeignPayload("not a CPG message")
    reader = Reader(bytes(buf))
    _magic, version, kind = reader.unpack(_HEADER)
    if version != WIRE_VERSION:
        raise DecodeError(f"unknown CPG wire version {version}")
    message: WireMsg
    if kind == Kind.JOIN:
        group = reader.group()
        (pid,) = reader.unpack(_PID)
        message = JoinMsg(group, pid)
    elif kind == Kind.LEAVE:
        group = reader.group()
        pid, reason = reader.unpack(_PID_REASON)
        if reason not in (Reason.LEAVE, Reason.PROCDOWN):
            raise DecodeError(f"leave reason {reason} not allowed")
        message = LeaveMsg(group, pid, reason)
    elif kind == Kind.MCAST:
        group = reader.group()
        (pid,) = reader.unpack(_PID)
        payload = reader.rest()
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise DecodeError("payload too large")
        message = McastMsg(group, pid, payload)
    elif kind == Kind.JOINLIST:
        message = _decode_joinlist(reader)
    else:
        raise DecodeError(f"unknown CPG message kind {kind}")
    reader.finish()
    return message


def _decode_joinlist(reader: Reader) -> JoinlistMsg:
    rep, seq, count = reader.unpack(_JOINLIST_HEAD)
    if count > MAX_ENTRIES_PER_NODE:
        raise DecodeError(f"joinlist of {count} entries exceeds {MAX_ENTRIES_PER_NODE}")
    entries: list[tuple[bytes, int]] = []
    seen: set[tuple[bytes, int]] = set()
    for _ in range(count):
        group = reader.group()
        (pid,) = reader.unpack(_PID)
        if (group, pid) in seen:
            raise DecodeError("duplicate joinlist entry")
        seen.add((group, pid))
        entries.append((group, pid))
    return JoinlistMsg((rep, seq), tuple(entries))


__all__ = [
    "MAX_ENTRIES_PER_NODE",
    "MAX_GROUP_NAME_BYTES",
    "MAX_PAYLOAD_BYTES",
    "WIRE_MAGIC",
    "WIRE_VERSION",
    "ForeignPayload",
    "JoinMsg",
    "JoinlistMsg",
    "Kind",
    "LeaveMsg",
    "McastMsg",
    "Reader",
    "WireMsg",
    "check_group_name",
    "decode",
    "encode_join",
    "encode_joinlist",
    "encode_leave",
    "encode_mcast",
]
