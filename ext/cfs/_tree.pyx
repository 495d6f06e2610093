# The configuration-tree index: every entry's metadata in memory, with an
# order-independent digest per directory that is kept current on each change.
#
# Why this shape:
# - Each entry hashes its name, type, mtime, size and content (files) or its
#   subtree digest (directories) into a 64-bit `entry_hash`. A directory sums
#   its children's hashes with wrapping 64-bit addition, so the result does not
#   depend on insertion order, and a change below costs one subtraction and
#   one addition per ancestor: O(depth), never O(tree size).
# - The mixing is murmur3's 64-bit finaliser over fields; names are hashed once
#   with xxh3_64 when an entry is created or renamed. Neither is cryptographic:
#   the digests detect divergence between honest nodes, they do not defend
#   against an adversary who can write files.
# - Versions are deliberately not part of the digest: two nodes that reached the
#   same content through different operation orders compare equal. A directory's
#   writer is: a lock directory's writer is its holder (only the holder may
#   refresh it, and the lock's checksum names it), so two nodes that disagree on
#   it must compare unequal and be repaired by a resync.
# - readdir keeps a sorted name list per directory, built lazily once
#   (O(n log n)) and then kept by binary insertion, so a listing of 270,000
#   entries is one sort plus paging, never the quadratic append of the reference.
# - The digest walk buckets a directory's children by the top nibbles of their
#   name hash, so two nodes can narrow a large directory down to the differing
#   entries in O(log16 n) request rounds of 16 sums each.
#
# This module does no I/O and reads no clock.

from bisect import bisect_left

from libc.stdint cimport uint32_t, uint64_t

import xxhash

cdef object _name_digest = xxhash.xxh3_64_intdigest

cdef uint64_t K_MTIME = <uint64_t>0x9E3779B97F4A7C15ULL
cdef uint64_t K_SIZE = <uint64_t>0xC2B2AE3D27D4EB4FULL
cdef uint64_t K_COUNT = <uint64_t>0x165667B19E3779F9ULL
cdef uint64_t TAG_FILE = <uint64_t>0x46494C45ULL
cdef uint64_t TAG_DIR = <uint64_t>0x44495245ULL
cdef uint64_t K_WRITER = <uint64_t>0xD6E8FEB86659FD93ULL

ROOT_INO = 1
NIBBLES_MAX = 16


cdef inline uint64_t _fmix64(uint64_t k) noexcept nogil:
    k ^= k >> 33
    k *= <uint64_t>0xff51afd7ed558ccdULL
    k ^= k >> 33
    k *= <uint64_t>0xc4ceb9fe1a85ec53ULL
    k ^= k >> 33
    return k


cdef inline uint64_t _dir_digest(Entry entry):
    cdef uint64_t count = len(entry.children)
    return _fmix64(entry.child_sum ^ _fmix64(count + K_COUNT))


cdef inline uint64_t _file_digest(uint64_t size, uint64_t content_sum) noexcept nogil:
    return _fmix64(_fmix64(size + K_SIZE) ^ content_sum)


cdef uint64_t _hash_entry(Entry entry):
    cdef uint64_t h = entry.name_hash ^ (TAG_DIR if entry.is_dir else TAG_FILE)
    h = _fmix64(h + entry.mtime * K_MTIME)
    if entry.is_dir:
        h = _fmix64(h ^ _dir_digest(entry) ^ ((<uint64_t>entry.writer + 1) * K_WRITER))
    else:
        h = _fmix64(h ^ _file_digest(entry.size, entry.content_sum))
    return h


def file_digest(uint64_t size, uint64_t content_sum):
    """The content digest of a file from its size and chunk-digest sum."""
    return _file_digest(size, content_sum)


def name_hash(str name):
    """xxh3_64 of the UTF-8 name (surrogateescape), as the index uses it."""
    return _name_digest(name.encode("utf-8", "surrogateescape"))


cdef inline void _note_added(Entry parent, str name):
    # A name removed and re-added before the next listing is already in the
    # sorted list: cancel the removal instead of adding it twice.
    if parent.pending_del is not None and name in parent.pending_del:
        parent.pending_del.discard(name)
        return
    if parent.pending_add is None:
        parent.pending_add = set()
    parent.pending_add.add(name)


cdef inline void _note_removed(Entry parent, str name):
    if parent.pending_add is not None and name in parent.pending_add:
        parent.pending_add.discard(name)
        return
    if parent.pending_del is None:
        parent.pending_del = set()
    parent.pending_del.add(name)


cdef class Entry:
    """One file or directory. Fields are read-only outside the index."""

    def __repr__(self):
        kind = "dir" if self.is_dir else "file"
        return f"<Entry {self.ino} {self.name!r} {kind} size={self.size} v={self.version}>"

    @property
    def child_count(self):
        return len(self.children) if self.children is not None else 0

    @property
    def digest(self):
        """Subtree digest (directory) or content digest (file)."""
        if self.is_dir:
            return _dir_digest(self)
        return _file_digest(self.size, self.content_sum)

    def get_child(self, str name):
        if self.children is None:
            return None
        return self.children.get(name)

    def children_unsorted(self):
        """The children in no particular order (cheaper than readdir)."""
        if self.children is None:
            return []
        return list(self.children.values())


cdef class Tree:
    """The in-memory index of one node's configuration tree."""

    def __cinit__(self):
        self.by_ino = {}
        self.total_bytes = 0
        self.root = self._new_entry("", ROOT_INO, True, 0, 0, 0, 0, 0)
        self.root.entry_hash = _hash_entry(self.root)
        self.by_ino[ROOT_INO] = self.root
        self.max_ino = ROOT_INO

    cdef Entry _new_entry(self, str name, uint64_t ino, bint is_dir, uint64_t size,
                          uint64_t mtime, uint64_t version, uint32_t writer,
                          uint64_t content_sum):
        cdef Entry entry = Entry.__new__(Entry)
        entry.ino = ino
        entry.name = name
        entry.is_dir = is_dir
        entry.size = size
        entry.mtime = mtime
        entry.version = version
        entry.writer = writer
        entry.content_sum = 0 if is_dir else content_sum
        entry.name_hash = _name_digest(name.encode("utf-8", "surrogateescape"))
        entry.child_sum = 0
        entry.parent = None
        entry.children = {} if is_dir else None
        entry.sorted_names = None
        entry.pending_add = None
        entry.pending_del = None
        return entry

    cdef void _rehash_up(self, Entry entry):
        # Recompute `entry`'s hash and carry the difference into every ancestor.
        cdef uint64_t old_hash, new_hash
        cdef Entry parent
        while entry is not None:
            old_hash = entry.entry_hash
            new_hash = _hash_entry(entry)
            entry.entry_hash = new_hash
            parent = entry.parent
            if parent is None or new_hash == old_hash:
                return
            parent.child_sum += new_hash - old_hash
            entry = parent

    # ----------------------------------------------------------------- lookup

    @property
    def count(self):
        """Number of entries, the root excluded."""
        return len(self.by_ino) - 1

    @property
    def digest(self):
        """Digest of the whole tree (the root directory's subtree digest)."""
        return _dir_digest(self.root)

    def get(self, uint64_t ino):
        return self.by_ino.get(ino)

    def lookup(self, str path):
        """The entry at `path` ("" is the root; components split on "/")."""
        cdef Entry entry = self.root
        cdef object child
        if not path:
            return entry
        for part in path.split("/"):
            if entry.children is None:
                return None
            child = entry.children.get(part)
            if child is None:
                return None
            entry = <Entry>child
        return entry

    def path_of(self, Entry entry):
        parts = []
        while entry.parent is not None:
            parts.append(entry.name)
            entry = entry.parent
        parts.reverse()
        return "/".join(parts)

    def sorted_names(self, Entry directory):
        """The children's names in code-point order (a shared list: do not modify)."""
        if directory.children is None:
            raise ValueError("not a directory")
        names = directory.sorted_names
        if names is None:
            directory.sorted_names = sorted(directory.children)
        elif directory.pending_add is not None or directory.pending_del is not None:
            removed = directory.pending_del
            if removed:
                names = [name for name in names if name not in removed]
            if directory.pending_add:
                # Timsort merges the two sorted runs in linear time.
                names.extend(sorted(directory.pending_add))
                names.sort()
            directory.sorted_names = names
            directory.pending_add = None
            directory.pending_del = None
        return directory.sorted_names

    def readdir(self, Entry directory, Py_ssize_t start, Py_ssize_t limit):
        """Up to `limit` children in name order starting at position `start`.

        The cookie of an entry is its position + 1. Entries added or removed
        between pages may shift positions (POSIX leaves that unspecified).
        """
        names = self.sorted_names(directory)
        children = directory.children
        if start < 0:
            start = 0
        return [children[name] for name in names[start:start + limit]]

    def readdir_after(self, Entry directory, str after, Py_ssize_t limit):
        """Up to `limit` children whose names sort after `after` (stable paging)."""
        names = self.sorted_names(directory)
        children = directory.children
        cdef Py_ssize_t start = bisect_left(names, after)
        if start < len(names) and names[start] == after:
            start += 1
        return [children[name] for name in names[start:start + limit]]

    # -------------------------------------------------------------- mutation

    def add(self, Entry parent, str name, uint64_t ino, bint is_dir, uint64_t mtime,
            uint64_t version, uint32_t writer, uint64_t size=0, uint64_t content_sum=0):
        """Insert a new entry under `parent`; the caller has checked the rules."""
        if parent.children is None:
            raise ValueError("parent is not a directory")
        if name in parent.children:
            raise ValueError(f"{name!r} exists")
        if ino in self.by_ino:
            raise ValueError(f"inode {ino} in use")
        cdef Entry entry = self._new_entry(name, ino, is_dir, size, mtime, version,
                                           writer, content_sum)
        entry.entry_hash = _hash_entry(entry)
        self._attach(parent, entry)
        self.by_ino[ino] = entry
        if ino > self.max_ino:
            self.max_ino = ino
        if not is_dir:
            self.total_bytes += size
        return entry

    def _attach(self, Entry parent, Entry entry):
        entry.parent = parent
        parent.children[entry.name] = entry
        if parent.sorted_names is not None:
            _note_added(parent, entry.name)
        parent.child_sum += entry.entry_hash
        self._rehash_up(parent)

    def _detach(self, Entry entry):
        cdef Entry parent = entry.parent
        del parent.children[entry.name]
        if parent.sorted_names is not None:
            _note_removed(parent, entry.name)
        parent.child_sum -= entry.entry_hash
        entry.parent = None
        self._rehash_up(parent)

    def remove(self, Entry entry):
        """Remove a file or an empty directory."""
        if entry.parent is None:
            raise ValueError("cannot remove the root")
        if entry.children:
            raise ValueError("directory not empty")
        self._detach(entry)
        del self.by_ino[entry.ino]
        if not entry.is_dir:
            self.total_bytes -= entry.size

    def move(self, Entry entry, Entry new_parent, str new_name, uint64_t version,
             uint32_t writer):
        """Rename `entry` to new_parent/new_name, which must be free."""
        if entry.parent is None:
            raise ValueError("cannot move the root")
        if new_parent.children is None or new_name in new_parent.children:
            raise ValueError("target exists or parent is not a directory")
        cdef Entry up = new_parent
        while up is not None:
            if up is entry:
                raise ValueError("cannot move a directory into itself")
            up = up.parent
        self._detach(entry)
        if new_name != entry.name:
            entry.name = new_name
            entry.name_hash = _name_digest(new_name.encode("utf-8", "surrogateescape"))
        entry.version = version
        entry.writer = writer
        entry.entry_hash = _hash_entry(entry)
        self._attach(new_parent, entry)

    def set_content(self, Entry entry, uint64_t size, uint64_t content_sum,
                    uint64_t mtime, uint64_t version, uint32_t writer):
        """A file's new size and content digest after a write or truncate."""
        if entry.is_dir:
            raise ValueError("not a file")
        self.total_bytes += size
        self.total_bytes -= entry.size
        entry.size = size
        entry.content_sum = content_sum
        entry.mtime = mtime
        entry.version = version
        entry.writer = writer
        self._rehash_up(entry)

    def set_meta(self, Entry entry, uint64_t mtime, uint64_t version, uint32_t writer):
        entry.mtime = mtime
        entry.version = version
        entry.writer = writer
        self._rehash_up(entry)

    # ------------------------------------------------------------- bulk load

    def bulk_load(self, records):
        """Build the index from stored records, in any order; returns the rejects.

        `records` yields (ino, parent_ino, name, is_dir, size, mtime, version,
        writer, content_sum). Hashes are computed once, bottom up, after
        linking. A record whose parent is missing or not a directory, whose
        name repeats in its directory (the lower inode wins), or that is not
        reachable from the root is returned as (ino, reason) and left out.
        """
        if self.by_ino.__len__() != 1:
            raise ValueError("bulk_load needs an empty tree")
        cdef Entry entry, parent
        pending = []
        rejects = []
        for rec in sorted(records):
            ino, parent_ino, name, is_dir, size, mtime, version, writer, content_sum = rec
            if ino == ROOT_INO or ino in self.by_ino:
                rejects.append((ino, "duplicate inode"))
                continue
            entry = self._new_entry(name, ino, is_dir, size, mtime, version, writer,
                                    content_sum)
            self.by_ino[ino] = entry
            pending.append((entry, parent_ino))
        for entry, parent_ino in pending:
            found = self.by_ino.get(parent_ino)
            if found is None or (<Entry>found).children is None:
                rejects.append((entry.ino, "missing parent"))
                continue
            parent = <Entry>found
            if entry.name in parent.children:
                rejects.append((entry.ino, "duplicate name"))
                continue
            entry.parent = parent
            parent.children[entry.name] = entry
        order = self._reachable_postorder()
        reachable = set()
        for entry in order:
            reachable.add(entry.ino)
        for ino in list(self.by_ino):
            if ino not in reachable:
                entry = self.by_ino.pop(ino)
                if entry.parent is not None and not any(r[0] == ino for r in rejects):
                    rejects.append((ino, "unreachable"))
        self._hash_all(order)
        return rejects

    def _reachable_postorder(self):
        cdef Entry entry
        order = []
        stack = [self.root]
        while stack:
            entry = stack.pop()
            order.append(entry)
            if entry.children:
                stack.extend(entry.children.values())
        order.reverse()
        return order

    def _hash_all(self, order):
        # Children come before parents in `order`, so each sum is complete
        # before its directory is hashed.
        cdef Entry entry
        self.total_bytes = 0
        for entry in order:
            entry.sorted_names = None
            entry.pending_add = None
            entry.pending_del = None
            entry.child_sum = 0
        for entry in order:
            entry.entry_hash = _hash_entry(entry)
            if entry.parent is not None:
                entry.parent.child_sum += entry.entry_hash
            if not entry.is_dir:
                self.total_bytes += entry.size
            if entry.ino > self.max_ino:
                self.max_ino = entry.ino

    def walk(self):
        """Every entry with its path, parents first, children in name order."""
        cdef Entry entry
        out = []
        stack = [("", self.root)]
        while stack:
            path, entry = stack.pop()
            out.append((path, entry))
            if entry.children:
                names = self.sorted_names(entry)
                prefix = path + "/" if path else ""
                for name in reversed(names):
                    stack.append((prefix + name, entry.children[name]))
        return out

    # ----------------------------------------------------------- digest walk

    def bucket_sums(self, Entry directory, int depth, uint64_t prefix):
        """The 16 sums of entry hashes of the children in the range (depth, prefix)
        split by the next nibble of their name hash, and the range's size."""
        cdef uint64_t sums[16]
        cdef Entry child
        cdef int shift_next = 60 - 4 * depth
        cdef Py_ssize_t count = 0
        cdef int i
        if depth < 0 or depth >= NIBBLES_MAX:
            raise ValueError("depth out of range")
        for i in range(16):
            sums[i] = 0
        for value in directory.children.values():
            child = <Entry>value
            if depth and (child.name_hash >> (64 - 4 * depth)) != prefix:
                continue
            sums[(child.name_hash >> shift_next) & 0xF] += child.entry_hash
            count += 1
        return [sums[i] for i in range(16)], count

    def range_entries(self, Entry directory, int depth, uint64_t prefix):
        """The children in the range (depth, prefix), sorted by name, as
        (name, is_dir, entry_hash)."""
        cdef Entry child
        out = []
        if depth < 0 or depth > NIBBLES_MAX:
            raise ValueError("depth out of range")
        for value in directory.children.values():
            child = <Entry>value
            if depth and (child.name_hash >> (64 - 4 * depth)) != prefix:
                continue
            out.append((child.name, child.is_dir, child.entry_hash))
        out.sort()
        return out

    def range_count(self, Entry directory, int depth, uint64_t prefix):
        cdef Entry child
        cdef Py_ssize_t count = 0
        if depth == 0:
            return len(directory.children)
        for value in directory.children.values():
            child = <Entry>value
            if (child.name_hash >> (64 - 4 * depth)) == prefix:
                count += 1
        return count

    def check(self):
        """Recompute every digest from scratch and compare (debug invariant)."""
        fresh = Tree()
        recs = []
        for path, entry in self.walk():
            if entry.parent is None:
                continue
            recs.append((entry.ino, entry.parent.ino, entry.name, entry.is_dir, entry.size,
                         entry.mtime, entry.version, entry.writer, entry.content_sum))
        rejects = fresh.bulk_load(recs)
        return not rejects and fresh.digest == self.digest and \
            fresh.total_bytes == self.total_bytes
