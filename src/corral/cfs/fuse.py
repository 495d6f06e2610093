"""The FUSE front of the configuration filesystem (pyfuse3, asyncio mode).

Reads are served from the local store (`backend.store`); every mutation is
turned into one `Op` and handed to `await backend.submit(op)`, which returns
once the operation is applied locally with the errno every node got. That
errno is raised as `FUSEError`, so callers see exactly the apply step's
contract (docs/cfs.md) plus the FUSE-only ones below.

Choices (see docs/fuse.md for the reasons):
- Each `write()` request is ONE operation and returns only once applied.
  libfuse 3 negotiates max_write = 1 MiB (256 pages), so a write() of up to
  that size is one operation (rejected whole on EFBIG/ENOSPC); larger ones
  are split by the kernel.
- O_APPEND: a write through an append handle is an append op (`Op.append`):
  its offset is the end of the file when the op is applied, in the total
  order, so appends from any number of nodes at once each land whole, once.
  The kernel's offset is ignored (it comes from a cached size that another
  node's append can make stale).
- Content is never cached by the kernel (`direct_io`, as the reference):
  every read asks the store, so other nodes' writes are seen at once.
  Names and attributes are cached for `cache_timeout_s`: by default 10 s
  when the backend has a change feed (every change not made through this
  mount is reported and dropped from the kernel's caches at once, and a
  quorum change drops every remembered inode's attributes, modes depend on
  it), 1 s (the libfuse default the reference runs with) without one.
  Changes made through this mount update the kernel's cache immediately.
  Failed lookups are never cached. The root and its links show the time of
  the last change anywhere: their attributes are cached for 1 s at most.
- Inode numbers are the tree's (root 1); the root's virtual entries (the
  symlinks and generated files) use fixed numbers from 2**63 up, which the
  tree never reaches.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3

from corral.cfs import records, rules
from corral.cfs._tree import ROOT_INO, Entry, Tree
from corral.cfs.backend import CfsBackend
from corral.cfs.ops import Op, OpKind
from corral.cfs.store import Durability
from corral.errors import InvariantError

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
CHUNK_SIZE = rules.CHUNK_SIZE
VIRTUAL_INO_BASE = 1 << 63
# Generated root files this front serves (.rrd and .debug are not provided yet).
SERVED_FILES = (".clusterlog", ".members", ".rrd", ".version", ".vmlist")
# Root symlinks and the path under nodes/<this node> they point to.
SYMLINK_TARGETS = {"local": "", "qemu-server": "/qemu-server", "lxc": "/lxc",
                   "openvz": "/openvz"}
# Entries fetched from the tree per readdir request (the kernel's buffer
# holds fewer; the rest is fetched again on the next request).
READDIR_PAGE = 256
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
# Inode numbers handed to the kernel whose names are remembered, so a name
# replaced underneath (by another node) still resolves (see _entry).
RECENT_INOS_MAX = 65536
# Directories whose children's modes are remembered (cleared when full).
MODE_CACHE_MAX = 4096
# What xattr requests answer: ENOSYS, which callers see as ENOTSUP
# (rules.SETXATTR_ERRNO) and after which the kernel stops sending them.
_XATTR_REPLY = errno.ENOSYS if rules.SETXATTR_ERRNO == errno.ENOTSUP else rules.SETXATTR_ERRNO
# Kernel cache of names and attributes, seconds: with a change feed (other
# nodes' changes invalidated at once) and without one.
FEED_CACHE_TIMEOUT_S = 10.0
NO_FEED_CACHE_TIMEOUT_S = 1.0
# The root's mtime (and its links') is the last change anywhere: no
# invalidation per operation, so a short cache instead.
ROOT_ATTR_TIMEOUT_S = 1.0
# Cookies before the first real entry: "." is 1, ".." is 2.
_DOT_COOKIES = 2


def www_data_gid() -> int:
    """The group the tree belongs to (the reference requires www-data)."""
    try:
        return grp.getgrnam("www-data").gr_gid
    except KeyError:
        return 33


@dataclass(slots=True)
class _Virtual:
    ino: int
    name: str
    target: bytes | None  # symlink target, None for a generated file


@dataclass(slots=True)
class _Handle:
    ino: int
    append: bool = False
    content: bytes | None = None  # snapshot of a generated file


@dataclass(slots=True)
class _DirHandle:
    ino: int
    # Where the last reply stopped, so the next request continues by name
    # (stable when entries come and go) instead of by position.
    next_cookie: int = -1
    last_name: str = ""


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    submitted: int = 0
    failed: dict[int, int] = field(default_factory=dict)


def _name(raw: bytes | str) -> str:
    # pyfuse3 passes bytes (its stub says str for rename's names).
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")


def _join(parent_path: str, name: str) -> str:
    return f"{parent_path}/{name}" if parent_path else name


class CfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers over a CfsBackend."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, backend: CfsBackend, *, cache_timeout_s: float | None = None,
                 gid: int | None = None) -> None:
        """`cache_timeout_s` None: FEED_CACHE_TIMEOUT_S if the backend offers a
        change feed, else NO_FEED_CACHE_TIMEOUT_S."""
        super().__init__()
        self.backend = backend
        self.gid = www_data_gid() if gid is None else gid
        self.counters = _Counters()
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self._recent: OrderedDict[int, tuple[int, str]] = OrderedDict()
        self._mode_cache: dict[tuple[str, bool], tuple[int, int]] = {}
        node_dir = f"nodes/{backend.nodename}"
        self._virtual: dict[str, _Virtual] = {}
        names = sorted([*SERVED_FILES, *SYMLINK_TARGETS])
        for index, name in enumerate(names):
            target = SYMLINK_TARGETS.get(name)
            link = None if target is None else (node_dir + target).encode()
            self._virtual[name] = _Virtual(VIRTUAL_INO_BASE + index, name, link)
        self._virtual_by_ino = {v.ino: v for v in self._virtual.values()}
        self.serving = False  # set while pyfuse3 has a session (init .. close)
        # A backend that applies other nodes' operations may offer a change
        # feed (optional, duck-typed: `add_change_listener(callback)`); the
        # front then drops the kernel's cached names and attributes for them.
        register = getattr(backend, "add_change_listener", None)
        if callable(register):
            register(self.applied_elsewhere)
        if cache_timeout_s is None:
            cache_timeout_s = FEED_CACHE_TIMEOUT_S if callable(register) \
                else NO_FEED_CACHE_TIMEOUT_S
        self.cache_timeout_s = cache_timeout_s
        self._root_timeout_s = min(cache_timeout_s, ROOT_ATTR_TIMEOUT_S)
        self._quorate_seen = backend.quorate()

    def init(self) -> None:
        self.serving = True

    # ----------------------------------------------- other nodes' changes

    def applied_elsewhere(self, op: Op) -> None:
        """Called on the event loop after `op` (from another node) was
        applied to the store: invalidate what the kernel may cache about it.
        Names go through pyfuse3's notify thread (invalidate_entry must not
        run inside a request); attributes are dropped at once."""
        if not self.serving:
            return
        if op.kind in (OpKind.WRITE, OpKind.TRUNCATE, OpKind.SET_MTIME):
            self._invalidate_path_attrs(op.path)
        elif op.kind in (OpKind.UNLINK, OpKind.RMDIR, OpKind.UNLOCK):
            self._invalidate_name(op.path)
        elif op.kind == OpKind.RENAME:
            self._invalidate_name(op.path)
            self._invalidate_name(op.path2)
            self._invalidate_path_attrs(op.path2)
        # CREATE and MKDIR: nothing cached (failed lookups never are).

    def check_quorum(self) -> int:
        """Call often (mount.py: every 0.2 s): when quorum came or went, every
        mode shown changes (0640 <-> 0440, the root links' write bit PVE
        probes), so drop the attributes of the root, its entries and every
        inode remembered as handed to the kernel. Returns how many."""
        quorate = self.backend.quorate()
        if quorate == self._quorate_seen:
            return 0
        self._quorate_seen = quorate
        if not self.serving:
            return 0
        inos = [ROOT_INO, *self._virtual_by_ino, *self._recent]
        for ino in inos:
            self._invalidate_attrs(ino)
        log.info("cfs: quorum %s: cached attributes of %d inodes dropped",
                 "regained" if quorate else "lost", len(inos))
        return len(inos)

    def _invalidate_path_attrs(self, path: str) -> None:
        entry = self.tree.lookup(path)
        if entry is not None:
            self._invalidate_attrs(entry.ino)

    def _invalidate_name(self, path: str) -> None:
        parent_path, name = rules.split_parent(path)
        parent = self.tree.lookup(parent_path)
        if parent is not None and name:
            pyfuse3.invalidate_entry_async(
                pyfuse3.InodeT(parent.ino),
                pyfuse3.FileNameT(name.encode("utf-8", "surrogateescape")),
                ignore_enoent=True)

    @staticmethod
    def _invalidate_attrs(ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(pyfuse3.InodeT(ino), attr_only=True)
        except OSError:
            pass  # the kernel does not know this inode: nothing cached

    # ------------------------------------------------------------ helpers

    @property
    def tree(self) -> Tree:
        return self.backend.store.state.tree

    def _entry(self, ino: int) -> Entry:
        entry = self.tree.get(ino)
        if entry is None:
            # Another node may have replaced the file (temp + rename over it)
            # while the kernel still caches the old inode for this name:
            # answer for whatever now lives at the name, as a path-based
            # filesystem (the reference) would.
            known = self._recent.get(ino)
            parent = self.tree.get(known[0]) if known is not None else None
            if known is not None and parent is not None and parent.is_dir:
                entry = parent.get_child(known[1])
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _remember(self, ino: int, parent_ino: int, name: str) -> None:
        """Note the name the kernel knows `ino` by (bounded, oldest dropped)."""
        recent = self._recent
        recent[ino] = (parent_ino, name)
        if len(recent) > RECENT_INOS_MAX:
            recent.popitem(last=False)

    def _path(self, ino: int) -> str:
        return self.tree.path_of(self._entry(ino))

    def _child_path(self, parent_ino: int, raw_name: bytes | str) -> str:
        parent = self._entry(parent_ino)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return _join(self.tree.path_of(parent), _name(raw_name))

    async def _submit(self, op: Op) -> None:
        self.counters.submitted += 1
        code = await self.backend.submit(op)
        if code:
            self.counters.failed[code] = self.counters.failed.get(code, 0) + 1
            raise pyfuse3.FUSEError(code)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _fill(self, attr: pyfuse3.EntryAttributes, entry: Entry, path: str,
              quorate: bool, modes: tuple[int, int] | None = None) -> None:
        """Set `attr` from `entry`; `modes` (directory, file), when the caller
        knows them for a whole directory's children, saves deriving them."""
        if modes is None:
            attr.st_mode = pyfuse3.ModeT(self._mode(path, entry.is_dir, quorate))
        else:
            attr.st_mode = pyfuse3.ModeT(modes[0] if entry.is_dir else modes[1])
        if entry.is_dir:
            attr.st_nlink = 2
            size = 0
        else:
            attr.st_nlink = 1
            size = entry.size
        attr.st_ino = pyfuse3.InodeT(entry.ino)
        attr.st_size = size
        attr.st_blocks = -(-size // 512)
        if entry.ino != ROOT_INO:
            mtime = entry.mtime
        else:
            # The root has no stored record: show the time of the last change.
            mtime = self.backend.store.state.mtime
            attr.attr_timeout = self._root_timeout_s
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = mtime * 1_000_000_000

    def _mode(self, path: str, is_dir: bool, quorate: bool) -> int:
        """st_mode of a tree entry: rules.mode_of, remembered per parent
        directory (deriving it costs more than the rest of a getattr)."""
        parent = path.rpartition("/")[0]
        modes = self._mode_cache.get((parent, quorate))
        if modes is None:
            modes = self._child_modes(parent, quorate) if path else None
            if modes is None:
                kind = stat.S_IFDIR if is_dir else stat.S_IFREG
                return kind | rules.mode_of(path, is_dir, quorate)
            if len(self._mode_cache) >= MODE_CACHE_MAX:
                self._mode_cache.clear()
            self._mode_cache[(parent, quorate)] = modes
        return modes[0] if is_dir else modes[1]

    @staticmethod
    def _child_modes(dir_path: str, quorate: bool) -> tuple[int, int] | None:
        """The modes every child of `dir_path` has, or None where they differ
        by name (the root holds priv/, nodes/<n> holds priv/)."""
        parts = dir_path.split("/")
        if not dir_path or (len(parts) == 2 and parts[0] == "nodes"):
            return None
        sample = f"{dir_path}/_"
        return (stat.S_IFDIR | rules.mode_of(sample, True, quorate),
                stat.S_IFREG | rules.mode_of(sample, False, quorate))

    def _attrs(self, entry: Entry, path: str | None = None) -> pyfuse3.EntryAttributes:
        attr = self._blank_attrs()
        self._fill(attr, entry, self.tree.path_of(entry) if path is None else path,
                   self.backend.quorate())
        return attr

    def _blank_attrs(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_uid = 0
        attr.st_gid = self.gid
        attr.st_blksize = BLOCK_SIZE
        attr.entry_timeout = self.cache_timeout_s
        attr.attr_timeout = self.cache_timeout_s
        return attr

    def _virtual_content(self, item: _Virtual) -> bytes:
        content = self.backend.virtual_file(item.name)
        return b"" if content is None else content

    def _virtual_attrs(self, item: _Virtual) -> pyfuse3.EntryAttributes:
        attr = self._blank_attrs()
        attr.st_ino = pyfuse3.InodeT(item.ino)
        attr.st_nlink = 1
        kind = stat.S_IFLNK if item.target is not None else stat.S_IFREG
        attr.st_mode = pyfuse3.ModeT(kind | rules.mode_of(item.name, False,
                                                          self.backend.quorate()))
        attr.st_size = len(item.target) if item.target is not None else \
            len(self._virtual_content(item))
        attr.st_blocks = -(-attr.st_size // 512)
        if item.target is not None:
            # Links show the time of the tree's last change (the root's).
            mtime_ns = self.backend.store.state.mtime * 1_000_000_000
            attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = mtime_ns
        # Generated files keep mtime 0, as in the reference.
        # Generated content changes underneath: never cache its attributes.
        attr.attr_timeout = 0 if item.target is None else self._root_timeout_s
        return attr

    # ------------------------------------------------------------ lookups

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counters.requests += 1
        parent = self._entry(parent_inode)
        text = _name(name)
        if text == ".":
            return self._attrs(parent)
        if text == "..":
            return self._attrs(parent.parent or parent)
        if parent_inode == ROOT_INO and text in self._virtual:
            return self._virtual_attrs(self._virtual[text])
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = parent.get_child(text)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._remember(child.ino, parent.ino, text)
        return self._attrs(child, _join(self.tree.path_of(parent), text))

    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counters.requests += 1
        item = self._virtual_by_ino.get(inode)
        if item is not None:
            return self._virtual_attrs(item)
        attr = self._attrs(self._entry(inode))
        attr.st_ino = inode  # the number the kernel asked about, even if replaced
        return attr

    async def readlink(self, inode: pyfuse3.InodeT,
                       ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        item = self._virtual_by_ino.get(inode)
        if item is None or item.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileNameT(item.target)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # Inode numbers are never reused (they are tree versions), so there is
        # nothing to keep alive or free per lookup count.
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        blocks, free_blocks, inodes, free_inodes = self.backend.store.state.statfs(BLOCK_SIZE)
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = blocks
        data.f_bfree = data.f_bavail = free_blocks
        data.f_files = inodes
        data.f_ffree = data.f_favail = free_inodes
        data.f_namemax = rules.NAME_MAX_BYTES
        return data

    # ------------------------------------------------------------ listing

    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        entry = self._entry(inode)
        if not entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = _DirHandle(inode)
        return pyfuse3.FileHandleT(fh)

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        """One kernel buffer per request; cookies: 1 ".", 2 "..", then the
        root's virtual entries, then position + 1 in the tree's name order.
        A request that continues where the last one stopped resumes after
        the last name sent, so concurrent creates and deletes never make an
        entry appear twice or get skipped."""
        self.counters.requests += 1
        handle = self._dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        directory = self._entry(handle.ino)
        quorate = self.backend.quorate()
        cookie = start_id
        if cookie < _DOT_COOKIES and not self._reply_dots(directory, cookie, token):
            return
        cookie = max(cookie, _DOT_COOKIES)
        shown_virtual = len(self._virtual) if handle.ino == ROOT_INO else 0
        if cookie < _DOT_COOKIES + shown_virtual:
            cookie = self._reply_virtual(cookie, token)
            if cookie < _DOT_COOKIES + shown_virtual:
                return
        base = _DOT_COOKIES + shown_virtual
        # One request fills one kernel buffer (a page of entries) and the
        # handler never awaits meanwhile, so it runs for well under a
        # millisecond; other requests run between two pages of a listing.
        self._reply_entries(handle, directory, cookie, base, quorate, token)

    def _reply_dots(self, directory: Entry, cookie: int, token: pyfuse3.ReaddirToken) -> bool:
        parent = directory.parent or directory
        for index, (name, entry) in enumerate(((b".", directory), (b"..", parent))):
            if index < cookie:
                continue
            attr = self._attrs(entry)
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), attr, index + 1):
                return False
        return True

    def _reply_virtual(self, cookie: int, token: pyfuse3.ReaddirToken) -> int:
        items = list(self._virtual.values())
        while cookie - _DOT_COOKIES < len(items):
            item = items[cookie - _DOT_COOKIES]
            attr = self._virtual_attrs(item)
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(item.name.encode()), attr,
                                         cookie + 1):
                return cookie
            cookie += 1
        return cookie

    def _reply_entries(self, handle: _DirHandle, directory: Entry, cookie: int,
                       base: int, quorate: bool, token: pyfuse3.ReaddirToken) -> None:
        tree = self.tree
        dir_path = tree.path_of(directory)
        attr = self._blank_attrs()  # readdir_reply copies it: one object serves all
        modes = self._child_modes(dir_path, quorate)
        while True:
            if cookie == handle.next_cookie and handle.last_name:
                page = tree.readdir_after(directory, handle.last_name, READDIR_PAGE)
            else:
                page = tree.readdir(directory, cookie - base, READDIR_PAGE)
            if not page:
                return
            for entry in page:
                path = dir_path if modes is not None else _join(dir_path, entry.name)
                self._fill(attr, entry, path, quorate, modes)
                name = pyfuse3.FileNameT(entry.name.encode("utf-8", "surrogateescape"))
                if not pyfuse3.readdir_reply(token, name, attr, cookie + 1):
                    return
                self._remember(entry.ino, directory.ino, entry.name)
                cookie += 1
                handle.next_cookie = cookie
                handle.last_name = entry.name
            if len(page) < READDIR_PAGE:
                return

    # -------------------------------------------------------- open / read

    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.counters.requests += 1
        writing = bool(flags & _WRITE_FLAGS)
        item = self._virtual_by_ino.get(inode)
        if item is not None:
            if writing:
                raise pyfuse3.FUSEError(errno.EIO if item.target is None else errno.EACCES)
            return self._open_handle(_Handle(inode, content=self._virtual_content(item)))
        entry = self._entry(inode)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if writing and not self.backend.quorate():
            raise pyfuse3.FUSEError(errno.EACCES)
        if flags & os.O_TRUNC and writing:
            await self._submit(Op.truncate(self.tree.path_of(entry), 0, int(time.time())))
        return self._open_handle(_Handle(inode, append=bool(flags & os.O_APPEND)))

    def _open_handle(self, handle: _Handle) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._handles[fh] = handle
        # direct_io: every read comes here, so other nodes' writes are seen
        # at once and nothing stale sits in the page cache.
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True)

    async def create(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     mode: int, flags: int, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.counters.requests += 1
        path = self._child_path(parent_inode, name)
        now = int(time.time())
        await self._submit(Op.create(path, now, excl=bool(flags & os.O_EXCL)))
        entry = self.tree.lookup(path)
        if entry is None:  # removed by a later op before we got here
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & os.O_TRUNC and entry.size:
            await self._submit(Op.truncate(path, 0, now))
        self._remember(entry.ino, parent_inode, _name(name))
        info = self._open_handle(_Handle(entry.ino, append=bool(flags & os.O_APPEND)))
        return info, self._attrs(entry, path)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        self.counters.requests += 1
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.content is not None:
            return handle.content[off:off + size]
        entry = self._entry(handle.ino)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return self._read_chunks(entry, off, size)

    def _read_chunks(self, entry: Entry, off: int, size: int) -> bytes:
        """Bytes [off, off + size) of a file, read by inode from its stored
        chunks (the handle knows the entry: no path walk per read)."""
        end = min(entry.size, off + size)
        if off >= end:
            return b""
        first, last = off // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        keys = [records.chunk_key(entry.ino, index) for index in range(first, last + 1)]
        chunks = self.backend.store.get_many(keys)
        if any(chunk is None for chunk in chunks):
            raise InvariantError(f"inode {entry.ino}: a content chunk is missing")
        data = b"".join(chunk for chunk in chunks if chunk is not None)
        start = off - first * CHUNK_SIZE
        return data[start:start + end - off]

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        self.counters.requests += 1
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.content is not None:
            raise pyfuse3.FUSEError(errno.EIO)
        path = self._path(handle.ino)
        now_s = int(time.time())
        # O_APPEND: the kernel's offset comes from its cached size, which another
        # node's append can make stale; the apply step puts the data at the end.
        op = Op.append(path, buf, now_s) if handle.append else Op.write(path, off, buf, now_s)
        await self._submit(op)
        return len(buf)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        # Every write was applied before it returned: close() has nothing to
        # do. ENOSYS makes the kernel stop sending FLUSH at all (one request
        # less per close); close() still returns 0.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        store = self.backend.store
        if store.durability is Durability.PROCESS:
            store.sync()

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._handles.pop(fh, None)

    # ---------------------------------------------------------- mutations

    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counters.requests += 1
        item = self._virtual_by_ino.get(inode)
        path = item.name if item is not None else self._path(inode)
        if fields.update_mode:
            code = rules.chmod_error(path, attr.st_mode)
            if code:
                raise pyfuse3.FUSEError(code)
        if fields.update_uid or fields.update_gid:
            code = rules.chown_error(attr.st_uid if fields.update_uid else -1,
                                     attr.st_gid if fields.update_gid else -1, self.gid)
            if code:
                raise pyfuse3.FUSEError(code)
        if fields.update_size:
            await self._submit(Op.truncate(path, attr.st_size, int(time.time())))
        if fields.update_mtime:
            # utime(0) on a lock is the unlock request: the apply step fails
            # it with EACCES and removes the lock if it has expired.
            await self._submit(Op.set_mtime(path, max(0, attr.st_mtime_ns // 1_000_000_000)))
        return await self.getattr(inode, ctx)

    async def mkdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counters.requests += 1
        path = self._child_path(parent_inode, name)
        await self._submit(Op.mkdir(path, int(time.time())))
        entry = self.tree.lookup(path)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._remember(entry.ino, parent_inode, _name(name))
        return self._attrs(entry, path)

    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        self.counters.requests += 1
        await self._submit(Op.unlink(self._child_path(parent_inode, name), int(time.time())))

    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        self.counters.requests += 1
        await self._submit(Op.rmdir(self._child_path(parent_inode, name), int(time.time())))

    async def rename(self, parent_inode_old: pyfuse3.InodeT, name_old: str,
                     parent_inode_new: pyfuse3.InodeT, name_new: str,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.counters.requests += 1
        src = self._child_path(parent_inode_old, name_old)
        dst = self._child_path(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & pyfuse3.RENAME_NOREPLACE and (
                self.tree.lookup(dst) is not None or rules.is_root_virtual(dst)):
            raise pyfuse3.FUSEError(errno.EEXIST)
        await self._submit(Op.rename(src, dst, int(time.time())))

    # ------------------------------------------- what the tree never does

    async def symlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                      target: pyfuse3.FileNameT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(rules.SYMLINK_ERRNO)

    async def mknod(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int,
                    rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(rules.MKNOD_ERRNO)

    async def link(self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT,
                   new_name: pyfuse3.FileNameT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(rules.LINK_ERRNO)

    # xattrs: the tree stores none. The kernel maps ENOSYS to EOPNOTSUPP
    # (== ENOTSUP, the reference's errno) for the caller and then stops
    # asking, which matters for getxattr: every write() through a newly
    # opened file otherwise costs a "security.capability" request first.

    async def setxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(_XATTR_REPLY)

    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(_XATTR_REPLY)

    async def listxattr(self, inode: pyfuse3.InodeT,
                        ctx: pyfuse3.RequestContext) -> list[pyfuse3.XAttrNameT]:
        raise pyfuse3.FUSEError(_XATTR_REPLY)

    async def removexattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                          ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(_XATTR_REPLY)
