# C-level interface of the configuration-tree index (ext/cfs/_tree.pyx).
#
# Other Cython modules (the FUSE front, the resync walker) may cimport these
# classes to read entry fields without Python attribute lookups.

from libc.stdint cimport uint32_t, uint64_t


cdef class Entry:
    cdef readonly uint64_t ino
    cdef readonly str name
    cdef readonly bint is_dir
    cdef readonly uint64_t size
    cdef readonly uint64_t mtime
    cdef readonly uint64_t version
    cdef readonly uint32_t writer
    # Order-independent sum of the file's chunk digests (files only).
    cdef readonly uint64_t content_sum
    # xxh3_64 of the UTF-8 name; buckets the children in the digest walk.
    cdef readonly uint64_t name_hash
    # The digest of this entry as its parent sees it (name, type, meta, content).
    cdef readonly uint64_t entry_hash
    # Directories: wrapping sum of the children's entry hashes.
    cdef readonly uint64_t child_sum
    cdef readonly Entry parent
    cdef dict children
    # Sorted child names, or None (sort on the next listing). Changes made while
    # the list exists wait in pending_add/pending_del and are merged into it on
    # the next listing in O(n + k log k), so neither creating nor listing is
    # ever quadratic.
    cdef list sorted_names
    cdef set pending_add
    cdef set pending_del


cdef class Tree:
    cdef readonly Entry root
    cdef dict by_ino
    cdef readonly uint64_t total_bytes
    cdef readonly uint64_t max_ino

    cdef void _rehash_up(self, Entry entry)
    cdef Entry _new_entry(self, str name, uint64_t ino, bint is_dir, uint64_t size,
                          uint64_t mtime, uint64_t version, uint32_t writer,
                          uint64_t content_sum)
