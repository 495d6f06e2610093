"""The deterministic apply step of the configuration tree (sans-I/O).

`CfsState.apply(op, writer=..., quorate=..., reader=...)` checks an operation
against the rules and, if it passes, changes the in-memory index and returns
the key-value mutations that make the change durable. The caller (the store,
or a test's dict) writes those mutations as ONE atomic batch. Every node that
applies the same operations to the same prior state gets the same errnos,
the same tree and byte-identical mutations. A rejected operation (errno != 0)
changes nothing and returns no mutations.

Content lives outside the index, in fixed-size chunks (see records.py). The
state reads the few chunks an operation touches through `reader`, which the
store implements over RocksDB and tests implement over a dict. Nothing here
reads a clock, a socket or a file: mtimes come in the operation, quorum and
the writer's nodeid come from the caller.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import xxhash

from corral.cfs import records, rules
from corral.cfs._tree import Entry, Tree
from corral.cfs.ops import Op, OpKind
from corral.cfs.resync import PatchItem
from corral.errors import InvariantError

CHUNK_SIZE = rules.CHUNK_SIZE
_MASK64 = (1 << 64) - 1
_LOCK_FIELDS = struct.Struct("<IQ")

Mutation = tuple[bytes, bytes | None]


class ChunkReader(Protocol):
    """Point reads of stored values; None for a missing key."""

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...


@dataclass(frozen=True, slots=True)
class UnlockRequested:
    """Someone asked for an expired lock to go: the lowest nodeid checks its
    first-seen time and, if the lock is older than LOCK_EXPIRY_NS, sends UNLOCK."""

    path: str
    checksum: int


@dataclass(frozen=True, slots=True)
class LockChanged:
    """A lock was taken or refreshed (checksum) or released (checksum None)."""

    path: str
    checksum: int | None


Effect = UnlockRequested | LockChanged


@dataclass(slots=True)
class Outcome:
    errno: int
    mutations: list[Mutation] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.errno == 0


@dataclass(frozen=True, slots=True)
class Guest:
    node: str
    kind: str
    path: str


def lock_checksum(path: str, entry: Entry) -> int:
    """Identifies one incarnation of a lock: changes when it is refreshed or
    re-taken, equal on every node that holds the same lock."""
    data = path.encode("utf-8", "surrogateescape") + _LOCK_FIELDS.pack(
        entry.writer, entry.entry_hash
    )
    return int(xxhash.xxh3_64_intdigest(data))


def _fail(code: int) -> Outcome:
    return Outcome(code)


class CfsState:
    """One node's configuration tree: index, guest list, version counters."""

    def __init__(self, limits: rules.Limits | None = None, *, debug_checks: bool = False) -> None:
        self.limits = limits or rules.Limits()
        # Debug flavour: recompute every digest from scratch after each
        # successful operation (O(tree) per op; tests and simulator only).
        self.debug_checks = debug_checks
        self.tree = Tree()
        self.version = 1
        self.writer = 0
        self.mtime = 0
        self.guests: dict[int, Guest] = {}
        self.quarantined: dict[str, int] = {}
        self.guests_version = 0
        self.observed: dict[str, int] = {}

    # ------------------------------------------------------------ loading

    def load(self, head: records.Head | None, recs: Sequence[records.Record]) -> list[str]:
        """Rebuild from stored records; returns human-readable problems found."""
        if head is not None:
            self.version, self.writer, self.mtime = head.version, head.writer, head.mtime
        problems = [f"inode {ino}: {reason} (left out)" for ino, reason in self.tree.bulk_load(recs)]
        self.version = max(self.version, self.tree.max_ino)
        problems += self.rebuild_guests()
        for path in rules.OBSERVED_PATHS:
            entry = self.tree.lookup(path)
            if entry is not None:
                self.observed[path] = entry.version
        return problems

    def rebuild_guests(self) -> list[str]:
        """Rebuild the guest list from the tree. When two configs claim one
        VMID, the older one (lower inode) keeps it and the other is
        quarantined: left in place, out of the guest list, and writes to it
        fail with EEXIST until the conflict is resolved by unlink or rename."""
        self.guests = {}
        self.quarantined = {}
        problems = []
        for _ino, vmid, guest in sorted(self._guest_candidates()):
            holder = self.guests.get(vmid)
            if holder is None:
                self.guests[vmid] = guest
                continue
            self.quarantined[guest.path] = vmid
            problems.append(f"duplicate VMID {vmid}: {guest.path} quarantined, {holder.path} kept")
        self.guests_version += 1
        return problems

    def _guest_candidates(self) -> list[tuple[int, int, Guest]]:
        # Only nodes/<node>/<kind>/<id>.conf can be a guest config: look
        # there instead of matching every path in the tree.
        out: list[tuple[int, int, Guest]] = []
        nodes = self.tree.lookup("nodes")
        if nodes is None or not nodes.is_dir:
            return out
        for node in nodes.children_unsorted():
            if not node.is_dir or not rules.is_node_name(node.name):
                continue
            for kind_dir, kind in rules.GUEST_TYPES.items():
                directory = node.get_child(kind_dir)
                if directory is None or not directory.is_dir:
                    continue
                prefix = f"nodes/{node.name}/{kind_dir}/"
                for entry in directory.children_unsorted():
                    vmid = None if entry.is_dir else rules.guest_file_vmid(entry.name)
                    if vmid is not None:
                        out.append((entry.ino, vmid, Guest(node.name, kind, prefix + entry.name)))
        return out

    # ------------------------------------------------------------- reading

    def read(self, path: str, offset: int, size: int, reader: ChunkReader) -> tuple[int, bytes]:
        """(0, bytes) or (errno, b"") for a read of up to `size` bytes."""
        entry = self.tree.lookup(path) if rules.path_error(path) == 0 else None
        if entry is None:
            return errno.ENOENT, b""
        if entry.is_dir:
            return errno.EISDIR, b""
        end = min(entry.size, offset + size)
        if offset >= end:
            return 0, b""
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        chunks = self._chunks_at(reader, entry, list(range(first, last + 1)))
        data = b"".join(chunks)
        start = offset - first * CHUNK_SIZE
        return 0, data[start:start + end - offset]

    def guest_list(self) -> list[tuple[int, str, str, int]]:
        """(vmid, node, kind, version of the config) for every registered guest."""
        out = []
        for vmid in sorted(self.guests):
            guest = self.guests[vmid]
            entry = self.tree.lookup(guest.path)
            out.append((vmid, guest.node, guest.kind, entry.version if entry else 0))
        return out

    # ------------------------------------------------------------- applying

    def apply(self, op: Op, *, writer: int, quorate: bool, reader: ChunkReader) -> Outcome:
        """Apply one operation delivered in total order; see the module doc."""
        if not quorate:
            return _fail(errno.EACCES)
        kind = op.kind
        code = _path_error(op.path)
        if not code and kind == _RENAME:
            code = _path_error(op.path2)
        if code:
            return _fail(code)
        outcome = _HANDLERS[kind](self, op, writer, reader)
        if self.debug_checks and outcome.mutations and not self.tree.check():
            raise InvariantError(f"tree digests wrong after {op.kind.name} {op.path!r}")
        return outcome

    def statfs(self, block_size: int = 4096) -> tuple[int, int, int, int]:
        """(blocks, free blocks, inodes, free inodes) for statfs: the real,
        enforced limits; free counts never go negative."""
        blocks = self.limits.total_size_max_bytes // block_size
        used_blocks = -(-self.tree.total_bytes // block_size)
        inodes = self.limits.inodes_max
        return blocks, max(0, blocks - used_blocks), inodes, max(0, inodes - self.tree.count)

    def _next_version(self, writer: int, mtime: int) -> int:
        # Inode numbers are versions at creation, so the version must stay
        # ahead of every inode, including ones a resync brought in.
        self.version = max(self.version, self.tree.max_ino) + 1
        self.writer = writer
        self.mtime = mtime
        return self.version

    def _head(self) -> Mutation:
        # records.Head(...).pack() without the intermediate object (every op).
        return _HEAD_KEY, _pack_head(self.version, self.writer, self.mtime, _STORE_FORMAT)

    @staticmethod
    def _meta(entry: Entry) -> Mutation:
        # records.meta_key + records.pack_meta, inlined: this runs for
        # nearly every op; test_records_pinned holds the bytes equal.
        parent = entry.parent
        if parent is None:
            raise InvariantError("the root has no stored record")
        return _pack_meta_key(_META_PREFIX, entry.ino), _pack_meta(
            parent.ino, entry.version, entry.writer, entry.mtime, entry.size,
            entry.content_sum, entry.is_dir,
        ) + entry.name.encode("utf-8", "surrogateescape")

    def _touch_observed(self, *paths: str) -> None:
        for path in paths:
            if path in _OBSERVED:
                self.observed[path] = self.version

    def _parent_of(self, path: str) -> tuple[int, Entry | None, str]:
        head, name = rules.split_parent(path)
        parent = self.tree.lookup(head)
        if parent is None:
            return errno.ENOENT, None, name
        if not parent.is_dir:
            return errno.ENOTDIR, None, name
        return 0, parent, name

    def _guest_conflict(self, path: str, allowed_source: str | None = None) -> bool:
        """True if `path` is a guest config whose VMID another node or type holds."""
        config = rules.guest_config(path)
        if config is None:
            return False
        holder = self.guests.get(config.vmid)
        if holder is None or (holder.node, holder.kind) == (config.node, config.kind):
            return False
        # A guest's own config may move to another node or type (migration).
        return holder.path != allowed_source

    def _register_guest(self, path: str) -> None:
        config = rules.guest_config(path)
        if config is None:
            return
        holder = self.guests.get(config.vmid)
        if holder is not None and holder.path == path:
            return
        if holder is not None or self.quarantined:
            # Another config of this id exists: only possible with duplicates
            # from a load or resync, or mid-migration after a promotion.
            self._settle_vmid(config.vmid, path)
            return
        self.guests[config.vmid] = Guest(config.node, config.kind, path)
        self.guests_version += 1

    def _unregister_guest(self, path: str) -> None:
        config = rules.guest_config(path)
        dropped = self.quarantined.pop(path, None) is not None
        if config is None:
            return
        holder = self.guests.get(config.vmid)
        if holder is not None and holder.path == path:
            del self.guests[config.vmid]
            self.guests_version += 1
            dropped = True
        if dropped and config.vmid in self.quarantined.values():
            self._settle_vmid(config.vmid)

    def _settle_vmid(self, vmid: int, extra: str | None = None) -> None:
        """With duplicates of `vmid` present, the oldest config (lowest inode)
        holds the id and the others stay quarantined: the same answer a
        reload (rebuild_guests) gives, so restarted and running nodes agree."""
        paths = {p for p, v in self.quarantined.items() if v == vmid}
        holder = self.guests.get(vmid)
        if holder is not None:
            paths.add(holder.path)
        if extra is not None:
            paths.add(extra)
        found = []
        for path in paths:
            entry = self.tree.lookup(path)
            config = rules.guest_config(path)
            if entry is not None and not entry.is_dir and config is not None:
                found.append((entry.ino, path, config))
        for path in paths:
            self.quarantined.pop(path, None)
        self.guests.pop(vmid, None)
        for index, (_ino, path, config) in enumerate(sorted(found)):
            if index == 0:
                self.guests[vmid] = Guest(config.node, config.kind, path)
            else:
                self.quarantined[path] = vmid
        self.guests_version += 1

    # -- create / mkdir

    def _create(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        return self._make(op, writer, is_dir=False)

    def _mkdir(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        return self._make(op, writer, is_dir=True)

    def _make(self, op: Op, writer: int, is_dir: bool) -> Outcome:
        path = op.path
        if not path or rules.is_root_virtual(path):
            return _fail(errno.EEXIST)
        code, parent, name = self._parent_of(path)
        if parent is None:
            return _fail(code)
        existing = parent.get_child(name)
        if existing is not None:
            if is_dir or op.excl:
                return _fail(errno.EEXIST)
            return _fail(errno.EISDIR) if existing.is_dir else Outcome(0)
        if not is_dir and self._guest_conflict(path):
            return _fail(errno.EEXIST)
        if self.tree.count >= self.limits.inodes_max:
            return _fail(errno.ENOSPC)
        version = self._next_version(writer, op.mtime)
        entry = self.tree.add(parent, name, version, is_dir, op.mtime, version, writer)
        outcome = Outcome(0, [self._meta(entry), self._head()])
        if is_dir and rules.is_lock_path(path):
            outcome.effects.append(LockChanged(path, lock_checksum(path, entry)))
        if not is_dir:
            self._register_guest(path)
        self._touch_observed(path)
        return outcome

    # -- write / truncate

    def _file_for_update(self, path: str) -> tuple[int, Entry | None]:
        if rules.is_root_virtual(path):
            return errno.EIO, None
        entry = self.tree.lookup(path)
        if entry is None:
            return errno.ENOENT, None
        if entry.is_dir:
            return errno.EISDIR, None
        if self._guest_conflict(path):
            return errno.EEXIST, None
        return 0, entry

    def _write(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        code, entry = self._file_for_update(op.path)
        if entry is None:
            return _fail(code)
        if op.appends:
            # Resolved here, in the total order, so every node picks the same end.
            op = Op.write(op.path, entry.size, op.data, op.mtime)
        end = op.arg + len(op.data)
        if end > self.limits.file_size_max_bytes:
            return _fail(errno.EFBIG)
        new_size = max(entry.size, end)
        if self.tree.total_bytes + new_size - entry.size > self.limits.total_size_max_bytes:
            return _fail(errno.ENOSPC)
        if not op.data:
            return Outcome(0)
        return self._rewrite(op, writer, reader, entry, new_size, min(op.arg, entry.size), end)

    def _truncate(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        code, entry = self._file_for_update(op.path)
        if entry is None:
            return _fail(code)
        new_size = op.arg
        if new_size > self.limits.file_size_max_bytes:
            return _fail(errno.EFBIG)
        if self.tree.total_bytes + new_size - entry.size > self.limits.total_size_max_bytes:
            return _fail(errno.ENOSPC)
        low, high = sorted((entry.size, new_size))
        return self._rewrite(op, writer, reader, entry, new_size, low, max(high, low + 1))

    def _rewrite(self, op: Op, writer: int, reader: ChunkReader, entry: Entry,
                 new_size: int, low: int, high: int) -> Outcome:
        """Rebuild the chunks overlapping bytes [low, high) of the new layout
        and drop the chunks past the new end; only those are read or written."""
        ino = entry.ino
        old_count = -(-entry.size // CHUNK_SIZE)
        new_count = -(-new_size // CHUNK_SIZE)
        first = low // CHUNK_SIZE
        stop = min((high - 1) // CHUNK_SIZE + 1, new_count)
        if first == 0 and stop == new_count:
            # Every chunk of the new content is rebuilt (O_TRUNC, a write
            # from 0 over the whole file): the digest is the sum over the
            # new chunks, so old chunks are read only where some of their
            # bytes stay, and dropped ones not at all.
            old_indexes = [i for i in range(min(stop, old_count))
                           if not _overwrites(op, i, new_size)]
            total = 0
            subtract = False
        else:
            # The old chunks the rebuild overlaps, then the ones past the new end.
            old_indexes = [*range(first, min(stop, old_count)), *range(new_count, old_count)]
            total = entry.content_sum
            subtract = True
        old_chunks: dict[int, bytes] = {}
        if old_indexes:
            for index, chunk in zip(old_indexes, self._chunks_at(reader, entry, old_indexes),
                                    strict=True):
                old_chunks[index] = chunk
                if subtract:
                    total -= _chunk_digest(chunk, index)
        mutations: list[Mutation] = []
        for index in range(first, stop):
            chunk = _build_chunk(old_chunks.get(index, b""), index, new_size, op)
            total += _chunk_digest(chunk, index)
            mutations.append((_pack_chunk_key(_CHUNK_PREFIX, ino, index), chunk))
        for index in range(new_count, old_count):
            mutations.append((_pack_chunk_key(_CHUNK_PREFIX, ino, index), None))
        version = self._next_version(writer, op.mtime)
        self.tree.set_content(entry, new_size, total & _MASK64, op.mtime, version, writer)
        mutations += [self._meta(entry), self._head()]
        self._register_guest(op.path)
        self._touch_observed(op.path)
        return Outcome(0, mutations)

    def _chunks_at(self, reader: ChunkReader, entry: Entry, indexes: list[int]) -> list[bytes]:
        if not indexes:
            return []
        values = reader.get_many([records.chunk_key(entry.ino, i) for i in indexes])
        if any(value is None for value in values):
            raise InvariantError(f"inode {entry.ino}: a content chunk is missing")
        return [bytes(value) for value in values if value is not None]

    # -- unlink / rmdir

    def _unlink(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        if rules.is_root_virtual(op.path):
            return _fail(errno.EACCES)
        entry = self.tree.lookup(op.path) if op.path else None
        if entry is None:
            return _fail(errno.EISDIR if not op.path else errno.ENOENT)
        if entry.is_dir:
            return _fail(errno.EISDIR)
        self._next_version(writer, op.mtime)
        mutations = self._drop_file(entry, op.path)
        mutations.append(self._head())
        self._touch_observed(op.path)
        return Outcome(0, mutations)

    def _drop_file(self, entry: Entry, path: str) -> list[Mutation]:
        count = -(-entry.size // CHUNK_SIZE)
        mutations: list[Mutation] = [(records.chunk_key(entry.ino, i), None) for i in range(count)]
        mutations.append((records.meta_key(entry.ino), None))
        self.tree.remove(entry)
        self._unregister_guest(path)
        return mutations

    def _rmdir(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        if not op.path:
            return _fail(errno.EBUSY)
        if rules.is_root_virtual(op.path):
            return _fail(errno.EACCES)
        entry = self.tree.lookup(op.path)
        if entry is None:
            return _fail(errno.ENOENT)
        if not entry.is_dir:
            return _fail(errno.ENOTDIR)
        if entry.child_count:
            return _fail(errno.ENOTEMPTY)
        self._next_version(writer, op.mtime)
        self.tree.remove(entry)
        outcome = Outcome(0, [(records.meta_key(entry.ino), None), self._head()])
        if rules.is_lock_path(op.path):
            outcome.effects.append(LockChanged(op.path, None))
        return outcome

    # -- rename

    def _rename(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        src, dst = op.path, op.path2
        code, source, parent, name = self._rename_check(src, dst)
        if code:
            return _fail(code)
        if src == dst:
            return Outcome(0)
        assert source is not None and parent is not None
        target = parent.get_child(name)
        version = self._next_version(writer, op.mtime)
        mutations: list[Mutation] = []
        if target is not None:
            if target.is_dir:
                self.tree.remove(target)
                mutations.append((records.meta_key(target.ino), None))
            else:
                mutations += self._drop_file(target, dst)
        self.tree.move(source, parent, name, version, writer)
        mutations += [self._meta(source), self._head()]
        if not source.is_dir:
            self._unregister_guest(src)
            self._register_guest(dst)
        self._touch_observed(src, dst)
        return Outcome(0, mutations)

    def _rename_check(self, src: str, dst: str) -> tuple[int, Entry | None, Entry | None, str]:
        """(errno, source, destination parent, destination name); checks only,
        no changes. The entries are returned so the rename looks them up once."""
        code = self._rename_error(src, dst)
        if code:
            return code, None, None, ""
        source = self.tree.lookup(src)
        if source is None:
            return errno.ENOENT, None, None, ""
        code, parent, name = self._parent_of(dst)
        if parent is None:
            return code, None, None, ""
        if src == dst:
            return 0, source, parent, name
        target = parent.get_child(name)
        if source.is_dir:
            return self._dir_rename_error(source, parent, target), source, parent, name
        if target is not None and target.is_dir:
            return errno.EISDIR, None, None, ""
        if self._guest_conflict(dst, allowed_source=src):
            return errno.EEXIST, None, None, ""
        return 0, source, parent, name

    @staticmethod
    def _rename_error(src: str, dst: str) -> int:
        """The errno a rename fails with before any lookup, or 0."""
        if not src or not dst:
            return errno.EBUSY
        if rules.is_root_virtual(src) or rules.is_root_virtual(dst):
            return errno.EACCES
        if rules.is_lock_path(src) or rules.is_lock_path(dst):
            return errno.EACCES
        return 0

    @staticmethod
    def _dir_rename_error(source: Entry, parent: Entry, target: Entry | None) -> int:
        # Only empty directories move: this keeps the guest list simple, as
        # in the reference.
        if source.child_count:
            return errno.ENOTEMPTY
        if target is not None:
            if not target.is_dir:
                return errno.ENOTDIR
            if target.child_count:
                return errno.ENOTEMPTY
        up: Entry | None = parent
        while up is not None:
            if up is source:
                return errno.EINVAL
            up = up.parent
        return 0

    # -- mtime and locks

    def _set_mtime(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        if not op.path or rules.is_root_virtual(op.path):
            return _fail(errno.EACCES)
        entry = self.tree.lookup(op.path)
        if entry is None:
            return _fail(errno.ENOENT)
        if entry.is_dir and rules.is_lock_path(op.path):
            return self._touch_lock(op, writer, entry)
        version = self._next_version(writer, op.mtime)
        self.tree.set_meta(entry, op.mtime, version, writer)
        self._touch_observed(op.path)
        return Outcome(0, [self._meta(entry), self._head()])

    def _touch_lock(self, op: Op, writer: int, entry: Entry) -> Outcome:
        """mtime 0 asks for an expired lock's removal (and fails, as in the
        reference); any other mtime refreshes the lock, allowed only to the
        node that wrote it last and never backwards."""
        checksum = lock_checksum(op.path, entry)
        if op.mtime == 0:
            return Outcome(errno.EACCES, effects=[UnlockRequested(op.path, checksum)])
        if writer != entry.writer or op.mtime < entry.mtime:
            return _fail(errno.EACCES)
        version = self._next_version(writer, op.mtime)
        self.tree.set_meta(entry, op.mtime, version, writer)
        refreshed = LockChanged(op.path, lock_checksum(op.path, entry))
        return Outcome(0, [self._meta(entry), self._head()], [refreshed])

    def _unlock_request(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        entry = self.tree.lookup(op.path)
        if entry is None or not entry.is_dir or not rules.is_lock_path(op.path):
            return _fail(errno.ENOENT)
        return Outcome(0, effects=[UnlockRequested(op.path, op.arg)])

    def _unlock(self, op: Op, writer: int, reader: ChunkReader) -> Outcome:
        """Remove a lock if it is still the incarnation the request saw."""
        entry = self.tree.lookup(op.path)
        if entry is None or not entry.is_dir or not rules.is_lock_path(op.path):
            return _fail(errno.ENOENT)
        if lock_checksum(op.path, entry) != op.arg:
            return _fail(errno.ESTALE)
        if entry.child_count:
            return _fail(errno.ENOTEMPTY)
        self._next_version(writer, op.mtime)
        self.tree.remove(entry)
        return Outcome(0, [(records.meta_key(entry.ino), None), self._head()],
                       [LockChanged(op.path, None)])


    # ------------------------------------------------------------- resync

    def locks(self) -> dict[str, int]:
        """Every held lock with its checksum (for LockTracker.rebuild)."""
        directory = self.tree.lookup(rules.LOCK_DIR)
        if directory is None or not directory.is_dir:
            return {}
        out = {}
        for entry in self.tree.readdir(directory, 0, directory.child_count):
            if entry.is_dir:
                path = f"{rules.LOCK_DIR}/{entry.name}"
                out[path] = lock_checksum(path, entry)
        return out

    def apply_patch(self, delete: Sequence[str], items: Sequence[PatchItem],
                    touch_dirs: Sequence[tuple[str, int, int]] = ()) -> list[Mutation]:
        """Make this tree equal the source's where the digest walk found
        differences; bypasses the rules (the source already applied them).
        Returns the mutations, to be written as one atomic batch."""
        mutations: list[Mutation] = []
        for path in delete:
            mutations += self._sync_delete(path)
        for item in items:
            mutations += self._sync_put(item)
        for path, mtime, writer in touch_dirs:
            entry = self.tree.lookup(path)
            if entry is not None and entry.is_dir and entry.parent is not None:
                version = self._next_version(writer, mtime)
                self.tree.set_meta(entry, mtime, version, writer)
                mutations.append(self._meta(entry))
        mutations.append(self._head())
        self.rebuild_guests()
        for path in rules.OBSERVED_PATHS:
            found = self.tree.lookup(path)
            if found is not None:
                self.observed[path] = max(self.observed.get(path, 0), found.version)
        return mutations

    def _sync_delete(self, path: str) -> list[Mutation]:
        top = self.tree.lookup(path) if path else None
        if top is None:
            return []
        doomed = [top]
        index = 0
        while index < len(doomed):
            entry = doomed[index]
            if entry.is_dir:
                doomed += self.tree.readdir(entry, 0, entry.child_count)
            index += 1
        mutations: list[Mutation] = []
        for entry in reversed(doomed):
            count = -(-entry.size // CHUNK_SIZE) if not entry.is_dir else 0
            mutations += [(records.chunk_key(entry.ino, i), None) for i in range(count)]
            mutations.append((records.meta_key(entry.ino), None))
            self.tree.remove(entry)
        return mutations

    def _sync_put(self, item: PatchItem) -> list[Mutation]:
        mutations: list[Mutation] = []
        existing = self.tree.lookup(item.path)
        if existing is not None and existing.is_dir != item.is_dir:
            mutations += self._sync_delete(item.path)
            existing = None
        version = self._next_version(item.writer, item.mtime)
        if existing is None:
            code, parent, name = self._parent_of(item.path)
            if parent is None:
                raise InvariantError(f"resync patch: no parent for {item.path} ({code})")
            existing = self.tree.add(parent, name, version, item.is_dir, item.mtime, version,
                                     item.writer)
            old_count = 0
        else:
            old_count = -(-existing.size // CHUNK_SIZE)
        if item.is_dir:
            self.tree.set_meta(existing, item.mtime, version, item.writer)
            return [*mutations, self._meta(existing)]
        content = item.content or b""
        total = 0
        for index in range(-(-len(content) // CHUNK_SIZE)):
            chunk = content[index * CHUNK_SIZE:(index + 1) * CHUNK_SIZE]
            total += records.chunk_digest(index, chunk)
            mutations.append((records.chunk_key(existing.ino, index), chunk))
        new_count = -(-len(content) // CHUNK_SIZE)
        mutations += [(records.chunk_key(existing.ino, i), None) for i in range(new_count, old_count)]
        self.tree.set_content(existing, len(content), total & _MASK64, item.mtime, version,
                              item.writer)
        mutations.append(self._meta(existing))
        return mutations


def _overwrites(op: Op, index: int, new_size: int) -> bool:
    """True if `op` is a write that replaces every byte of new chunk `index`."""
    if op.kind != _WRITE:
        return False
    start = index * CHUNK_SIZE
    return op.arg <= start and op.arg + len(op.data) >= min(start + CHUNK_SIZE, new_size)


def _build_chunk(old: bytes, index: int, new_size: int, op: Op) -> bytes:
    """Chunk `index` of the new content: the old bytes cut or zero-extended to
    the new length, with the write's data laid over them."""
    start = index * CHUNK_SIZE
    length = min(CHUNK_SIZE, new_size - start)
    if op.kind == _WRITE:
        low, high = max(op.arg, start), min(op.arg + len(op.data), start + length)
        if low == start and high == start + length:
            return op.data[low - op.arg:high - op.arg]
        buffer = bytearray(old[:length])
        buffer.extend(bytes(length - len(buffer)))
        if low < high:
            buffer[low - start:high - start] = op.data[low - op.arg:high - op.arg]
        return bytes(buffer)
    if len(old) >= length:
        return old[:length]
    return old + bytes(length - len(old))


_OBSERVED = frozenset(rules.OBSERVED_PATHS)
_RENAME = OpKind.RENAME
_WRITE = OpKind.WRITE
# records.chunk_digest and records.chunk_key, inlined (same bytes, see
# test_records_pinned): the content path runs them once per chunk.
_chunk_digest = xxhash.xxh3_64_intdigest
_CHUNK_PREFIX = records.CHUNK_PREFIX
_pack_chunk_key = struct.Struct(">cQI").pack
_path_error = rules.path_error
_HEAD_KEY = records.HEAD_KEY
_STORE_FORMAT = records.STORE_FORMAT
_pack_head = records.HEAD.pack
_META_PREFIX = records.META_PREFIX
_pack_meta_key = struct.Struct(">cQ").pack
_pack_meta = records.META.pack
_HANDLERS = {
    OpKind.CREATE: CfsState._create,
    OpKind.WRITE: CfsState._write,
    OpKind.TRUNCATE: CfsState._truncate,
    OpKind.MKDIR: CfsState._mkdir,
    OpKind.RMDIR: CfsState._rmdir,
    OpKind.UNLINK: CfsState._unlink,
    OpKind.RENAME: CfsState._rename,
    OpKind.SET_MTIME: CfsState._set_mtime,
    OpKind.UNLOCK_REQUEST: CfsState._unlock_request,
    OpKind.UNLOCK: CfsState._unlock,
}
