"""Operations on the configuration tree and their wire encoding.

An operation is what one node multicasts and every node applies in the same
order. It names paths, never inode numbers, because inode numbers are local
to a node once resyncs have happened. It carries the sender's mtime (whole
seconds) so every node stores the same metadata; the sender's nodeid comes
from the group layer, not from the encoding.

Wire format, version 1, little-endian, a fixed 28-byte header then the
variable parts:

    u8  format version (1)         u8  kind            u8 flags   u8 reserved (0)
    u64 mtime (seconds)            u64 argument (offset / size / lock checksum)
    (flags: 0x01 EXCL on a create, 0x02 APPEND on a write)
    u16 path length  u16 second path length (rename)   u32 data length (write)
    path bytes, second path bytes, data bytes

Paths are UTF-8 with surrogate escapes (any byte string the kernel hands us
round-trips). Decoding checks every length against the buffer and the bounds
below and rejects trailing bytes, unknown kinds, unknown flags and newer
format versions with `DecodeError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from corral.errors import DecodeError, UsageError

FORMAT_VERSION = 1
HEADER = struct.Struct("<BBBBQQHHI")
PATH_MAX_BYTES = 4096
# The largest write one operation may carry. It bounds a decoded message, not
# the file size limit (which is a configurable Limits value no larger than this).
DATA_MAX_BYTES = 16 * 1024 * 1024
FLAG_EXCL = 0x01
# A write at the end of the file as it is when the op is applied (O_APPEND).
# The offset cannot be chosen by the sender: another node's append may be
# ordered first. The argument must be 0.
FLAG_APPEND = 0x02
KNOWN_FLAGS = FLAG_EXCL | FLAG_APPEND


class OpKind(enum.IntEnum):
    CREATE = 1
    WRITE = 2
    TRUNCATE = 3
    MKDIR = 4
    RMDIR = 5
    UNLINK = 6
    RENAME = 7
    SET_MTIME = 8
    UNLOCK_REQUEST = 9
    UNLOCK = 10


@dataclass(frozen=True, slots=True)
class Op:
    """One operation. `arg` is the write offset, the truncate size or the lock
    checksum, depending on `kind`; unused fields stay at their defaults."""

    kind: OpKind
    path: str
    mtime: int = 0
    arg: int = 0
    path2: str = ""
    data: bytes = b""
    flags: int = 0

    @classmethod
    def create(cls, path: str, mtime: int, excl: bool = False) -> Op:
        return cls(OpKind.CREATE, path, mtime, flags=FLAG_EXCL if excl else 0)

    @classmethod
    def write(cls, path: str, offset: int, data: bytes, mtime: int) -> Op:
        return cls(OpKind.WRITE, path, mtime, arg=offset, data=bytes(data))

    @classmethod
    def append(cls, path: str, data: bytes, mtime: int) -> Op:
        return cls(OpKind.WRITE, path, mtime, data=bytes(data), flags=FLAG_APPEND)

    @classmethod
    def truncate(cls, path: str, size: int, mtime: int) -> Op:
        return cls(OpKind.TRUNCATE, path, mtime, arg=size)

    @classmethod
    def mkdir(cls, path: str, mtime: int) -> Op:
        return cls(OpKind.MKDIR, path, mtime)

    @classmethod
    def rmdir(cls, path: str, mtime: int = 0) -> Op:
        return cls(OpKind.RMDIR, path, mtime)

    @classmethod
    def unlink(cls, path: str, mtime: int = 0) -> Op:
        return cls(OpKind.UNLINK, path, mtime)

    @classmethod
    def rename(cls, src: str, dst: str, mtime: int = 0) -> Op:
        return cls(OpKind.RENAME, src, mtime, path2=dst)

    @classmethod
    def set_mtime(cls, path: str, mtime: int) -> Op:
        return cls(OpKind.SET_MTIME, path, mtime)

    @classmethod
    def unlock_request(cls, path: str, checksum: int) -> Op:
        return cls(OpKind.UNLOCK_REQUEST, path, arg=checksum)

    @classmethod
    def unlock(cls, path: str, checksum: int) -> Op:
        return cls(OpKind.UNLOCK, path, arg=checksum)

    @property
    def excl(self) -> bool:
        return bool(self.flags & FLAG_EXCL)

    @property
    def appends(self) -> bool:
        return bool(self.flags & FLAG_APPEND)


def encode(op: Op) -> bytes:
    """The wire form of `op`; raises UsageError for values out of bounds."""
    path = op.path.encode("utf-8", "surrogateescape")
    path2 = op.path2.encode("utf-8", "surrogateescape")
    if len(path) > PATH_MAX_BYTES or len(path2) > PATH_MAX_BYTES:
        raise UsageError("path too long to encode")
    if len(op.data) > DATA_MAX_BYTES:
        raise UsageError("write too large to encode")
    if not (0 <= op.mtime < 1 << 64 and 0 <= op.arg < 1 << 64):
        raise UsageError("mtime or argument out of range")
    if op.flags & ~KNOWN_FLAGS:
        raise UsageError("unknown flags")
    if op.flags & FLAG_APPEND and (op.kind != OpKind.WRITE or op.arg):
        raise UsageError("append flag on an operation that is not a write at offset 0")
    header = HEADER.pack(
        FORMAT_VERSION, int(op.kind), op.flags, 0, op.mtime, op.arg,
        len(path), len(path2), len(op.data),
    )
    return b"".join((header, path, path2, op.data))


def decode(buffer: bytes | bytearray | memoryview) -> Op:
    """Parse one operation; any malformed or hostile buffer raises DecodeError."""
    view = memoryview(buffer)
    if len(view) < HEADER.size:
        raise DecodeError("operation shorter than its header")
    version, kind, flags, reserved, mtime, arg, path_len, path2_len, data_len = (
        HEADER.unpack_from(view, 0)
    )
    if version != FORMAT_VERSION:
        raise DecodeError(f"operation format {version}, this node speaks {FORMAT_VERSION}")
    try:
        op_kind = OpKind(kind)
    except ValueError:
        raise DecodeError(f"unknown operation kind {kind}") from None
    if flags & ~KNOWN_FLAGS or reserved:
        raise DecodeError("unknown flags")
    if flags & FLAG_APPEND and (op_kind != OpKind.WRITE or arg):
        raise DecodeError("append flag on an operation that is not a write at offset 0")
    if path_len > PATH_MAX_BYTES or path2_len > PATH_MAX_BYTES or data_len > DATA_MAX_BYTES:
        raise DecodeError("length field over its bound")
    end = HEADER.size + path_len + path2_len + data_len
    if len(view) != end:
        raise DecodeError(f"operation length {len(view)}, header says {end}")
    start = HEADER.size
    path = bytes(view[start:start + path_len]).decode("utf-8", "surrogateescape")
    start += path_len
    path2 = bytes(view[start:start + path2_len]).decode("utf-8", "surrogateescape")
    start += path2_len
    data = bytes(view[start:end])
    return Op(op_kind, path, mtime, arg, path2, data, flags)
