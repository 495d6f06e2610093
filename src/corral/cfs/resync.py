"""The digest walk: find exactly what differs between two nodes' trees.

Protocol (sans-I/O; the caller carries the messages):

1. The requester compares the source's root digest with its own; equal
   means nothing to do.
2. It sends rounds of `Query(path, depth, prefix)`. `depth` nibbles of a
   child's name hash (`prefix`) select a range of one directory's children.
   The source answers each with `answer()`:
   - `Buckets`: the range has more than `leaf_max` children; here are the 16
     sums of entry hashes per next nibble. The requester queries only the
     nibbles whose sums differ from its own.
   - `Entries`: (name, is_dir, entry_hash) for every child in the range. The
     requester deletes names the source lacks, fetches names it lacks or
     whose type or file content differs, and descends into directories on
     both sides whose hashes differ.
   - `Missing`: the source has no directory there (it changed meanwhile).
   Every answer carries the queried directory's mtime and writer, so a
   directory that differs only in its own metadata is fixed too (a lock
   directory's writer is its holder).
3. The source sends `PatchItem`s for the fetched paths (a whole subtree for
   a directory the requester lacks); the requester applies deletions, then
   items, with `CfsState.apply_patch`, as one atomic batch.

Cost: a directory of n children with k differences costs about
k * log16(n / leaf_max) bucket answers of 16 sums plus k small entry
answers, so the bytes sent grow with the differences, not with the tree.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from corral.cfs._tree import Entry, Tree
from corral.errors import DecodeError

LEAF_MAX = 16
NIBBLES_MAX = 16
# Bounds on decoded walk messages.
PATH_MAX_BYTES = 4096
ENTRIES_MAX = 1 << 20
DATA_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Query:
    path: str
    depth: int = 0
    prefix: int = 0


@dataclass(frozen=True, slots=True)
class Buckets:
    path: str
    depth: int
    prefix: int
    dir_mtime: int
    dir_writer: int
    sums: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Entries:
    path: str
    depth: int
    prefix: int
    dir_mtime: int
    dir_writer: int
    entries: tuple[tuple[str, bool, int], ...]


@dataclass(frozen=True, slots=True)
class Missing:
    path: str


Answer = Buckets | Entries | Missing


@dataclass(frozen=True, slots=True)
class PatchItem:
    """One entry copied from the source: a directory (content None) or a file."""

    path: str
    is_dir: bool
    mtime: int
    writer: int
    content: bytes | None = None


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def answer(tree: Tree, query: Query, leaf_max: int = LEAF_MAX) -> Answer:
    """The source side: describe one range of one directory."""
    directory = tree.lookup(query.path)
    if directory is None or not directory.is_dir or not 0 <= query.depth <= NIBBLES_MAX:
        return Missing(query.path)
    count = tree.range_count(directory, query.depth, query.prefix)
    if count > leaf_max and query.depth < NIBBLES_MAX:
        sums, _ = tree.bucket_sums(directory, query.depth, query.prefix)
        return Buckets(query.path, query.depth, query.prefix, directory.mtime,
                       directory.writer, tuple(sums))
    entries = tuple(tree.range_entries(directory, query.depth, query.prefix))
    return Entries(query.path, query.depth, query.prefix, directory.mtime, directory.writer,
                   entries)


@dataclass(slots=True)
class ResyncWalk:
    """The requester side. Feed each round's answers; collect `fetch`
    (source paths to copy, directories as whole subtrees), `delete` (local
    paths to remove) and `touch_dirs` (directories whose own mtime or writer
    differs, with the source's values)."""

    tree: Tree
    fetch: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    touch_dirs: list[tuple[str, int, int]] = field(default_factory=list)
    queries_sent: int = 0

    def start(self, source_digest: int) -> list[Query]:
        if source_digest == self.tree.digest:
            return []
        return self._ask([Query("")])

    def _ask(self, queries: list[Query]) -> list[Query]:
        self.queries_sent += len(queries)
        return queries

    def feed(self, answers: Iterable[Answer]) -> list[Query]:
        """Compare one round of answers; returns the next round's queries."""
        queries: list[Query] = []
        for item in answers:
            if isinstance(item, Missing):
                continue
            local = self.tree.lookup(item.path)
            if local is None or not local.is_dir:
                # Cannot happen for queries we made; refetch the directory whole.
                self.fetch.append(item.path)
                continue
            if item.depth == 0 and item.path and \
                    (item.dir_mtime, item.dir_writer) != (local.mtime, local.writer):
                self.touch_dirs.append((item.path, item.dir_mtime, item.dir_writer))
            if isinstance(item, Buckets):
                queries += self._compare_buckets(local, item)
            else:
                queries += self._compare_entries(local, item)
        return self._ask(queries)

    def _compare_buckets(self, local: Entry, item: Buckets) -> list[Query]:
        mine, _ = self.tree.bucket_sums(local, item.depth, item.prefix)
        return [
            Query(item.path, item.depth + 1, (item.prefix << 4) | nibble)
            for nibble in range(16)
            if mine[nibble] != item.sums[nibble]
        ]

    def _compare_entries(self, local: Entry, item: Entries) -> list[Query]:
        mine = {name: (is_dir, digest)
                for name, is_dir, digest in self.tree.range_entries(local, item.depth, item.prefix)}
        queries: list[Query] = []
        for name, is_dir, digest in item.entries:
            path = _join(item.path, name)
            have = mine.pop(name, None)
            if have is None or have[0] != is_dir:
                self.fetch.append(path)
            elif have[1] != digest:
                if is_dir:
                    queries.append(Query(path))
                else:
                    self.fetch.append(path)
        for name in sorted(mine):
            self.delete.append(_join(item.path, name))
        return queries


def run_walk(requester: Tree, source: Tree, leaf_max: int = LEAF_MAX,
             rounds_max: int = 64) -> tuple[ResyncWalk, int]:
    """Run a whole walk in-process (tests, simulator); returns the walk and
    the encoded bytes both ways, as they would cross the network."""
    walk = ResyncWalk(requester)
    queries = walk.start(source.digest)
    wire_bytes = 8
    for _round in range(rounds_max):
        if not queries:
            return walk, wire_bytes
        wire_bytes += len(encode_queries(queries))
        answers = [answer(source, query, leaf_max) for query in queries]
        wire_bytes += len(encode_answers(answers))
        queries = walk.feed(answers)
    raise RuntimeError("digest walk did not converge")


def build_patch(tree: Tree, paths: Sequence[str],
                read_file: Callable[[str], bytes]) -> list[PatchItem]:
    """The source side of the fetch: items for each path, parents first."""
    items: list[PatchItem] = []
    for path in paths:
        entry = tree.lookup(path)
        if entry is None:
            continue
        if not entry.is_dir:
            items.append(PatchItem(path, False, entry.mtime, entry.writer, read_file(path)))
            continue
        for sub_path, sub in _walk_from(tree, entry, path):
            content = None if sub.is_dir else read_file(sub_path)
            items.append(PatchItem(sub_path, sub.is_dir, sub.mtime, sub.writer, content))
    return items


def _walk_from(tree: Tree, top: Entry, top_path: str) -> list[tuple[str, Entry]]:
    out: list[tuple[str, Entry]] = []
    stack = [(top_path, top)]
    while stack:
        path, entry = stack.pop()
        out.append((path, entry))
        if entry.is_dir:
            for name in reversed(tree.sorted_names(entry)):
                child = entry.get_child(name)
                assert child is not None
                stack.append((_join(path, name), child))
    return out


# ------------------------------------------------------------------ encoding

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ANSWER_HEAD = struct.Struct("<BBQQI")
_ITEM_HEAD = struct.Struct("<BQI")
_KIND_MISSING, _KIND_BUCKETS, _KIND_ENTRIES = 0, 1, 2


class _Reader:
    """Bounds-checked reads from a buffer; a short buffer is a DecodeError."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, size: int) -> memoryview:
        if size < 0 or self.pos + size > len(self.data):
            raise DecodeError("walk message truncated")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size))

    def text(self) -> str:
        (size,) = self.unpack(_U16)
        if size > PATH_MAX_BYTES:
            raise DecodeError("path over its bound")
        return bytes(self.take(size)).decode("utf-8", "surrogateescape")

    def count(self, bound: int) -> int:
        (value,) = self.unpack(_U32)
        if value > bound:
            raise DecodeError("count over its bound")
        return value

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError("trailing bytes after walk message")


def _text(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    return _U16.pack(len(raw)) + raw


def encode_queries(queries: Sequence[Query]) -> bytes:
    parts = [_U32.pack(len(queries))]
    for query in queries:
        parts += [_text(query.path), _U8.pack(query.depth), _U64.pack(query.prefix)]
    return b"".join(parts)


def decode_queries(data: bytes) -> list[Query]:
    reader = _Reader(data)
    out = []
    for _ in range(reader.count(ENTRIES_MAX)):
        path = reader.text()
        (depth,) = reader.unpack(_U8)
        (prefix,) = reader.unpack(_U64)
        if depth > NIBBLES_MAX:
            raise DecodeError("walk depth over its bound")
        out.append(Query(path, depth, prefix))
    reader.finish()
    return out


def encode_answers(answers: Sequence[Answer]) -> bytes:
    parts = [_U32.pack(len(answers))]
    for item in answers:
        if isinstance(item, Missing):
            parts += [_ANSWER_HEAD.pack(_KIND_MISSING, 0, 0, 0, 0), _text(item.path)]
        elif isinstance(item, Buckets):
            parts += [_ANSWER_HEAD.pack(_KIND_BUCKETS, item.depth, item.prefix, item.dir_mtime,
                                        item.dir_writer),
                      _text(item.path), struct.pack("<16Q", *item.sums)]
        else:
            parts += [_ANSWER_HEAD.pack(_KIND_ENTRIES, item.depth, item.prefix, item.dir_mtime,
                                        item.dir_writer),
                      _text(item.path), _U32.pack(len(item.entries))]
            for name, is_dir, digest in item.entries:
                parts += [_text(name), _U8.pack(is_dir), _U64.pack(digest)]
    return b"".join(parts)


def decode_answers(data: bytes) -> list[Answer]:
    reader = _Reader(data)
    out: list[Answer] = []
    for _ in range(reader.count(ENTRIES_MAX)):
        kind, depth, prefix, dir_mtime, dir_writer = reader.unpack(_ANSWER_HEAD)
        path = reader.text()
        if depth > NIBBLES_MAX:
            raise DecodeError("walk depth over its bound")
        if kind == _KIND_MISSING:
            out.append(Missing(path))
        elif kind == _KIND_BUCKETS:
            sums = struct.unpack("<16Q", reader.take(128))
            out.append(Buckets(path, depth, prefix, dir_mtime, dir_writer, sums))
        elif kind == _KIND_ENTRIES:
            entries = []
            for _ in range(reader.count(ENTRIES_MAX)):
                name = reader.text()
                (is_dir,) = reader.unpack(_U8)
                (digest,) = reader.unpack(_U64)
                entries.append((name, bool(is_dir), digest))
            out.append(Entries(path, depth, prefix, dir_mtime, dir_writer, tuple(entries)))
        else:
            raise DecodeError(f"unknown walk answer kind {kind}")
    reader.finish()
    return out


def encode_patch(items: Sequence[PatchItem]) -> bytes:
    parts = [_U32.pack(len(items))]
    for item in items:
        parts += [_ITEM_HEAD.pack(item.is_dir, item.mtime, item.writer), _text(item.path)]
        if not item.is_dir:
            content = item.content or b""
            parts += [_U32.pack(len(content)), content]
    return b"".join(parts)


def decode_patch(data: bytes) -> list[PatchItem]:
    reader = _Reader(data)
    out = []
    for _ in range(reader.count(ENTRIES_MAX)):
        is_dir, mtime, writer = reader.unpack(_ITEM_HEAD)
        path = reader.text()
        content = None
        if not is_dir:
            content = bytes(reader.take(reader.count(DATA_MAX_BYTES)))
        out.append(PatchItem(path, bool(is_dir), mtime, writer, content))
    reader.finish()
    return out
