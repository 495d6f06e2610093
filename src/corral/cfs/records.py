"""Key and value layout of the configuration tree in a key-value store.

    b"h"                                -> head: global version u64, writer u32,
                                           mtime u64, store format u32
    b"m" + ino (u64 BE)                 -> one entry's metadata (META below) + name
    b"c" + ino (u64 BE) + index (u32 BE) -> one content chunk of CHUNK_SIZE bytes
                                           (the last chunk of a file may be shorter)

Big-endian inode and chunk numbers keep each file's chunks adjacent and in
order, so a read is one short range scan. Directories have no chunks.
A file of size s has exactly ceil(s / CHUNK_SIZE) chunks, all present: this
canonical form makes the content digest independent of how it was written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

from corral.errors import DecodeError

# (ino, parent ino, name, is_dir, size, mtime, version, writer, content_sum):
# what Tree.bulk_load takes.
Record = tuple[int, int, str, bool, int, int, int, int, int]

STORE_FORMAT = 1
HEAD_KEY = b"h"
META_PREFIX = b"m"
CHUNK_PREFIX = b"c"
HEAD = struct.Struct("<QIQI")
META = struct.Struct("<QQIQIQB")
_INO = struct.Struct(">Q")
_CHUNK = struct.Struct(">QI")


def meta_key(ino: int) -> bytes:
    return META_PREFIX + _INO.pack(ino)


def chunk_key(ino: int, index: int) -> bytes:
    return CHUNK_PREFIX + _CHUNK.pack(ino, index)


def chunk_prefix(ino: int) -> bytes:
    return CHUNK_PREFIX + _INO.pack(ino)


def parse_chunk_key(key: bytes) -> tuple[int, int]:
    if len(key) != 13 or key[:1] != CHUNK_PREFIX:
        raise DecodeError("not a chunk key")
    ino, index = _CHUNK.unpack_from(key, 1)
    return int(ino), int(index)


def ino_of_meta_key(key: bytes) -> int:
    if len(key) != 9 or key[:1] != META_PREFIX:
        raise DecodeError("not a metadata key")
    return int(_INO.unpack_from(key, 1)[0])


def chunk_digest(index: int, chunk: bytes) -> int:
    """One chunk's contribution to its file's content sum; the index is the
    seed, so moving bytes between chunks changes the digest."""
    return int(xxhash.xxh3_64_intdigest(chunk, seed=index))


@dataclass(frozen=True, slots=True)
class Head:
    version: int
    writer: int
    mtime: int

    def pack(self) -> bytes:
        return HEAD.pack(self.version, self.writer, self.mtime, STORE_FORMAT)

    @classmethod
    def unpack(cls, value: bytes) -> Head:
        if len(value) != HEAD.size:
            raise DecodeError("head record of the wrong size")
        version, writer, mtime, store_format = HEAD.unpack(value)
        if store_format != STORE_FORMAT:
            raise DecodeError(f"store format {store_format}, expected {STORE_FORMAT}")
        return cls(version, writer, mtime)


def pack_meta(parent: int, version: int, writer: int, mtime: int, size: int,
              content_sum: int, is_dir: bool, name: str) -> bytes:
    return META.pack(parent, version, writer, mtime, size, content_sum, is_dir) + name.encode(
        "utf-8", "surrogateescape"
    )


def unpack_meta_items(items: Iterable[tuple[object, object]]) -> list[Record]:
    """Bulk form of unpack_meta over (key, value) pairs from a range scan
    (the load path: one tight loop for 100,000+ records)."""
    out: list[Record] = []
    unpack_from = META.unpack_from
    header = META.size
    for key, value in items:
        if not (isinstance(key, bytes) and isinstance(value, bytes)) or len(key) != 9 \
                or len(value) < header:
            raise DecodeError("malformed metadata record")
        parent, version, writer, mtime, size, content_sum, is_dir = unpack_from(value, 0)
        out.append((int.from_bytes(key[1:], "big"), parent,
                    value[header:].decode("utf-8", "surrogateescape"), bool(is_dir), size,
                    mtime, version, writer, content_sum))
    return out


def unpack_meta(ino: int, value: bytes) -> Record:
    """The tree's bulk-load record for one stored entry."""
    if len(value) < META.size:
        raise DecodeError("metadata record too short")
    parent, version, writer, mtime, size, content_sum, is_dir = META.unpack_from(value, 0)
    name = value[META.size:].decode("utf-8", "surrogateescape")
    return (ino, parent, name, bool(is_dir), size, mtime, version, writer, content_sum)
