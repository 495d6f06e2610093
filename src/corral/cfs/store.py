"""RocksDB persistence of the configuration tree (through rocksdict).

One applied operation is ONE RocksDB write batch: the changed content
chunks, the changed entry records and the head record (global version,
writer, mtime) go in together, so a crash leaves either all of an operation
or none of it. The in-memory index is rebuilt from the entry records at
open; content stays on disk and is read per chunk.

Durability (the rule: an acknowledged operation is never lost):
- The write-ahead log is always on; every batch is written to it before
  `apply` returns.
- `Durability.FSYNC` (the default) also sets `WriteOptions.sync`, so each
  batch is fsync'ed before `apply` returns: acknowledged writes survive
  power loss.
- `Durability.PROCESS` skips the fsync: the WAL record is in the kernel's
  page cache when `apply` returns, which survives `kill -9` of the daemon but
  not a power cut. Use it only where replication on other nodes is the
  durability.
- Group commit: `apply_group(ops)` writes each op as its own batch without
  a sync and then syncs the WAL once (under FSYNC) before returning; the
  caller acknowledges the ops after that. Same guarantee, one fsync per
  group instead of one per op. `GroupCommit` does the same for callers on
  an event loop that submit one op at a time (local mode): each op is
  written at once, a WAL sync runs in a worker thread, and every op applied
  before that sync began is answered when it returns, while the loop keeps
  applying the ops that arrive meanwhile for the next sync.
- WAL recovery mode is point-in-time: a torn tail record after a crash is
  dropped, never half-applied.

Other settings: LZ4 compression, 16 MiB memtables, a 64 MiB block cache
with a Bloom filter (most reads are point reads of chunks and records),
level compaction with dynamic level sizes (lowest space amplification).
"""

from __future__ import annotations

import asyncio
import enum
import os
import struct
from collections import deque
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import rocksdict
import xxhash

from corral.cfs import records, rules
from corral.cfs.ops import Op
from corral.cfs.resync import PatchItem
from corral.cfs.state import CfsState, Mutation, Outcome
from corral.errors import DecodeError, InvariantError, UsageError

BACKUP_MAGIC = b"CRLCFSB1"
_BACKUP_RECORD = struct.Struct("<II")
_BACKUP_TRAILER = struct.Struct("<QQ")
_RESTORE_BATCH_BYTES = 4 * 1024 * 1024
_READ_ALL_BYTES = 1 << 40


class Durability(enum.Enum):
    FSYNC = "fsync"
    PROCESS = "process"


def _options() -> rocksdict.Options:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_compression_type(rocksdict.DBCompressionType.lz4())
    options.set_write_buffer_size(16 * 1024 * 1024)
    options.set_max_write_buffer_number(2)
    options.set_level_compaction_dynamic_level_bytes(True)
    options.set_max_background_jobs(2)
    options.set_keep_log_file_num(2)
    options.set_wal_recovery_mode(rocksdict.DBRecoveryMode.point_in_time())
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(rocksdict.Cache(64 * 1024 * 1024))
    table.set_bloom_filter(10, False)
    options.set_block_based_table_factory(table)
    options.enable_statistics()
    return options


class Store:
    """A node's configuration tree on disk plus its in-memory state."""

    def __init__(self, path: str | os.PathLike[str], *, limits: rules.Limits | None = None,
                 durability: Durability = Durability.FSYNC) -> None:
        self.path = Path(path)
        self.options = _options()
        self.db = rocksdict.Rdict(str(self.path), self.options)
        self._write_options = rocksdict.WriteOptions()
        self._write_options.sync = durability is Durability.FSYNC
        self._no_sync = rocksdict.WriteOptions()
        self._no_sync.sync = False
        self.durability = durability
        self.state = CfsState(limits)
        self.load_problems = self._load()
        self.failed = False

    # ------------------------------------------------------------- loading

    def _load(self) -> list[str]:
        head_value = self.db.get(records.HEAD_KEY)
        head = records.Head.unpack(head_value) if head_value is not None else None
        bound = rocksdict.ReadOptions()
        bound.set_iterate_upper_bound(bytes([records.META_PREFIX[0] + 1]))
        recs = records.unpack_meta_items(
            self.db.items(from_key=records.META_PREFIX, read_opt=bound))
        return self.state.load(head, recs)

    # ------------------------------------------------------------- reading

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if len(keys) == 1:
            return [self.db.get(keys[0])]
        values = self.db.get(list(keys))
        if not isinstance(values, list):
            raise InvariantError("RocksDB multi-get returned no list")
        return values

    def read(self, path: str, offset: int, size: int) -> tuple[int, bytes]:
        return self.state.read(path, offset, size, self)

    def read_file(self, path: str) -> bytes:
        code, data = self.state.read(path, 0, _READ_ALL_BYTES, self)
        if code:
            raise FileNotFoundError(code, os.strerror(code), path)
        return data

    # ------------------------------------------------------------- writing

    def apply(self, op: Op, *, writer: int, quorate: bool) -> Outcome:
        """Apply one delivered operation and persist it before returning."""
        if self.failed:
            raise InvariantError("store failed earlier; restart the daemon")
        outcome = self.state.apply(op, writer=writer, quorate=quorate, reader=self)
        if outcome.mutations:
            self._write(outcome.mutations)
        return outcome

    def apply_unsynced(self, op: Op, *, writer: int, quorate: bool) -> Outcome:
        """Apply one operation and write its batch to the WAL without a sync,
        whatever the durability: acknowledge it only after `sync()` (or a
        later `apply`) returned (GroupCommit does that)."""
        if self.failed:
            raise InvariantError("store failed earlier; restart the daemon")
        outcome = self.state.apply(op, writer=writer, quorate=quorate, reader=self)
        if outcome.mutations:
            self._write(outcome.mutations, self._no_sync)
        return outcome

    def apply_group(self, ops: Sequence[tuple[Op, int]], *, quorate: bool) -> list[Outcome]:
        """Group commit: apply (op, writer) pairs in order, each still its own
        atomic batch, with one WAL sync for the group (under FSYNC) before
        returning. Acknowledge the ops only after this returns."""
        if self.failed:
            raise InvariantError("store failed earlier; restart the daemon")
        outcomes = []
        for op, writer in ops:
            outcome = self.state.apply(op, writer=writer, quorate=quorate, reader=self)
            if outcome.mutations:
                self._write(outcome.mutations, self._no_sync)
            outcomes.append(outcome)
        if self.durability is Durability.FSYNC:
            self.sync()
        return outcomes

    def apply_patch(self, delete: Sequence[str], items: Sequence[PatchItem],
                    touch_dirs: Sequence[tuple[str, int, int]] = ()) -> None:
        """Persist a resync patch as one atomic batch."""
        self._write(self.state.apply_patch(delete, items, touch_dirs))

    def _write(self, mutations: list[Mutation],
               options: rocksdict.WriteOptions | None = None) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in mutations:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        try:
            self.db.write(batch, options or self._write_options)
        except Exception as error:
            # Memory is already ahead of disk: refuse everything from now on.
            self.failed = True
            raise InvariantError(f"RocksDB write failed: {error}") from error

    def sync(self) -> None:
        """fsync the WAL: everything applied so far survives power loss."""
        try:
            self.db.flush_wal(True)
        except Exception as error:
            self.failed = True
            raise InvariantError(f"RocksDB WAL sync failed: {error}") from error

    # --------------------------------------------------------- maintenance

    def verify(self) -> list[str]:
        """Check every stored chunk against the index: each file has exactly
        its chunks, of the right lengths, summing to its content digest, and
        no chunk belongs to an unknown inode. Returns the problems found."""
        problems: list[str] = []
        sums: dict[int, int] = {}
        counts: dict[int, int] = {}
        bound = rocksdict.ReadOptions()
        bound.set_iterate_upper_bound(bytes([records.CHUNK_PREFIX[0] + 1]))
        tree = self.state.tree
        for raw_key, raw_value in self.db.items(from_key=records.CHUNK_PREFIX, read_opt=bound):
            ino, index = records.parse_chunk_key(_raw(raw_key))
            value = _raw(raw_value)
            entry = tree.get(ino)
            expected = 0 if entry is None else min(
                rules.CHUNK_SIZE, entry.size - index * rules.CHUNK_SIZE)
            if entry is None or entry.is_dir or len(value) != expected:
                problems.append(f"inode {ino} chunk {index}: unexpected ({len(value)} bytes)")
                continue
            sums[ino] = (sums.get(ino, 0) + records.chunk_digest(index, value)) & ((1 << 64) - 1)
            counts[ino] = counts.get(ino, 0) + 1
        for path, entry in tree.walk():
            if entry.is_dir:
                continue
            if counts.get(entry.ino, 0) != -(-entry.size // rules.CHUNK_SIZE):
                problems.append(f"{path}: chunk count does not match size {entry.size}")
            elif sums.get(entry.ino, 0) != entry.content_sum:
                problems.append(f"{path}: content does not match its digest")
        return problems

    def flush(self) -> None:
        """Write memtables to SST files (used before measuring disk usage)."""
        self.db.flush(True)

    def compact(self) -> None:
        self.db.compact_range(None, None)

    def property_int(self, name: str) -> int:
        value = self.db.property_int_value(name)
        return int(value) if value is not None else 0

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------- backup / restore

    def backup(self, file_path: str | os.PathLike[str]) -> int:
        """Write a consistent online snapshot of every key to `file_path`
        (atomically: temp file, fsync, rename). Returns the record count.
        Writers may keep applying operations meanwhile."""
        target = Path(file_path)
        temp = target.with_name(target.name + ".tmp")
        digest = xxhash.xxh3_64()
        count = 0
        snapshot = self.db.snapshot()
        with open(temp, "wb") as out:
            out.write(BACKUP_MAGIC)
            for raw_key, raw_value in snapshot.items():
                key, value = _raw(raw_key), _raw(raw_value)
                record = _BACKUP_RECORD.pack(len(key), len(value)) + key + value
                digest.update(record)
                out.write(record)
                count += 1
            out.write(_BACKUP_TRAILER.pack(count, digest.intdigest()))
            out.flush()
            os.fsync(out.fileno())
        del snapshot
        os.replace(temp, target)
        return count

    @staticmethod
    def restore(file_path: str | os.PathLike[str], db_path: str | os.PathLike[str]) -> int:
        """Create a new store at `db_path` (which must not exist) from a backup
        file, after checking its checksum. Returns the record count."""
        if Path(db_path).exists():
            raise UsageError(f"{db_path} exists; restore only into a new directory")
        data = Path(file_path).read_bytes()
        pairs = _parse_backup(data)
        db = rocksdict.Rdict(str(db_path), _options())
        try:
            sync = rocksdict.WriteOptions()
            sync.sync = True
            batch = rocksdict.WriteBatch(raw_mode=True)
            pending = 0
            for key, value in pairs:
                batch.put(key, value)
                pending += len(key) + len(value)
                if pending >= _RESTORE_BATCH_BYTES:
                    db.write(batch, sync)
                    batch = rocksdict.WriteBatch(raw_mode=True)
                    pending = 0
            db.write(batch, sync)
        finally:
            db.close()
        return len(pairs)


class GroupCommit:
    """Group commit of WAL syncs for one store, used from one event loop.

    `await commit.apply(op, writer=..., quorate=...)` applies `op` at once
    (memory and an unsynced WAL write, so later ops see it) and returns its
    outcome once a WAL sync that began after the write has finished
    (`write` and `durable` are the two halves, for callers that act on the
    outcome before waiting). One
    sync at a time runs in a worker thread (RocksDB releases the GIL while
    it waits for the disk); ops applied meanwhile wait for the next one, so
    N writers waiting together cost one fsync, not N. A failed op (no
    mutation) also waits while earlier ops are unsynced: its errno may rest
    on them. Under `Durability.PROCESS` it is `store.apply`, answered at once.
    A failed sync marks the store failed and raises InvariantError in every
    waiter, as a failed synced write does."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.syncs = 0  # WAL syncs run (tests, benchmarks)
        self._applied = 0  # ops written to the WAL so far
        self._synced = 0  # ops covered by a finished sync
        self._syncing = False
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def write(self, op: Op, *, writer: int, quorate: bool) -> Outcome:
        """Apply `op` now (memory and an unsynced WAL write under FSYNC; a
        plain `store.apply` under PROCESS); answer its caller only after
        `durable()` returned."""
        store = self.store
        if store.durability is not Durability.FSYNC:
            return store.apply(op, writer=writer, quorate=quorate)
        outcome = store.apply_unsynced(op, writer=writer, quorate=quorate)
        if outcome.mutations:
            self._applied += 1
        return outcome

    async def durable(self) -> None:
        """Return once everything `write` wrote so far is synced."""
        covered = self._applied
        if covered <= self._synced:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((covered, waiter))
        self._start_sync()
        await waiter

    async def apply(self, op: Op, *, writer: int, quorate: bool) -> Outcome:
        """`write` then `durable`."""
        outcome = self.write(op, writer=writer, quorate=quorate)
        await self.durable()
        return outcome

    def _start_sync(self) -> None:
        if self._syncing or not self._waiters:
            return
        self._syncing = True
        self.syncs += 1
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.store.sync))
        task.add_done_callback(partial(self._sync_done, self._applied))

    def _sync_done(self, covered: int, task: asyncio.Task[None]) -> None:
        self._syncing = False
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        if error is not None:
            self.store.failed = True
            while self._waiters:
                _, waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(InvariantError(f"RocksDB WAL sync failed: {error}"))
            return
        self._synced = max(self._synced, covered)
        while self._waiters and self._waiters[0][0] <= covered:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        self._start_sync()


def _raw(value: object) -> bytes:
    # The database runs in raw mode: keys and values are always bytes.
    if not isinstance(value, bytes):
        raise InvariantError("non-bytes value in a raw-mode database")
    return value


def _parse_backup(data: bytes) -> list[tuple[bytes, bytes]]:
    if data[:len(BACKUP_MAGIC)] != BACKUP_MAGIC:
        raise DecodeError("not a Corral cfs backup")
    if len(data) < len(BACKUP_MAGIC) + _BACKUP_TRAILER.size:
        raise DecodeError("backup truncated")
    body_end = len(data) - _BACKUP_TRAILER.size
    count, checksum = _BACKUP_TRAILER.unpack_from(data, body_end)
    if xxhash.xxh3_64_intdigest(data[len(BACKUP_MAGIC):body_end]) != checksum:
        raise DecodeError("backup checksum mismatch")
    pairs = []
    pos = len(BACKUP_MAGIC)
    while pos < body_end:
        if pos + _BACKUP_RECORD.size > body_end:
            raise DecodeError("backup record truncated")
        key_len, value_len = _BACKUP_RECORD.unpack_from(data, pos)
        pos += _BACKUP_RECORD.size
        if pos + key_len + value_len > body_end:
            raise DecodeError("backup record truncated")
        pairs.append((data[pos:pos + key_len], data[pos + key_len:pos + key_len + value_len]))
        pos += key_len + value_len
    if len(pairs) != count:
        raise DecodeError("backup record count mismatch")
    return pairs
