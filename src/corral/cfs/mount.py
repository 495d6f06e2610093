"""Mounting the configuration filesystem: stale-mount cleanup, the serving
coroutine and a small command line for manual use and tests.

    await run_mount(backend, "/etc/corral")      # returns after unmount

`run_mount` cleans a stale mount left by a crashed daemon (stat fails with
ENOTCONN: lazy unmount), creates the mountpoint if missing, mounts with
pyfuse3 in asyncio mode, serves until `stop` is set or SIGTERM/SIGINT
arrives, and unmounts cleanly.

    python -m corral.cfs.mount --store DIR --mountpoint PATH --local --nodename N

serves a store in local mode (`--read-only` serves it as a node without
quorum would). `--ready-file F` writes F once the mount answers (tests).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import types
from collections import deque
from pathlib import Path
from typing import Any

import pyfuse3
import pyfuse3.asyncio

from corral.cfs.backend import CfsBackend
from corral.cfs.fuse import CfsOperations

log = logging.getLogger(__name__)

DEFAULT_MOUNTPOINT = "/etc/corral"
MNT_DETACH = 2
# Worker tasks reading /dev/fuse: enough that a long listing or a slow
# apply never holds up every other request.
FUSE_TASKS_MIN = 4
FUSE_TASKS_MAX = 64
# How often the mount looks for a quorum change (cached modes depend on it).
QUORUM_POLL_S = 0.2


class _HandoverLock:
    """The lock pyfuse3's workers take around "wait until /dev/fuse is
    readable" (it stands in for trio.Lock). asyncio.Lock re-checks every
    waiter on each acquire and wakes through a second future; this one hands
    the lock straight to the next waiter on release, so a request costs one
    wake-up, not two. Only used from the event loop's thread."""

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if not self._locked:
            self._locked = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed over, then cancelled: pass it on
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the lock stays taken, now by the waiter
                return
        self._locked = False


class _FuseReadiness:
    """wait_readable for pyfuse3 in asyncio mode. pyfuse3.asyncio adds a
    reader before and removes it after every request: two epoll_ctl calls, a
    done-callback and a set per request. Here the reader stays registered
    while requests keep coming; only one task waits at a time (pyfuse3 holds
    its read lock around the wait). The next request usually arrives while
    the worker that will read it has not started waiting yet (the lock is
    handed over one loop iteration later), so a readiness report with nobody
    waiting is remembered and the next wait returns at once; a second such
    report unregisters the reader (level-triggered: it would spin)."""

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._watched: dict[int, asyncio.AbstractEventLoop] = {}
        self._ready: set[int] = set()
        # Waiters woken but not resumed yet: their request is still unread,
        # so a report meanwhile is not a new one.
        self._woken: set[int] = set()
        self._pollers: dict[int, select.poll] = {}

    async def wait_readable(self, fd: int) -> None:
        if fd in self._ready:
            # Reported readable with nobody waiting. The report may predate
            # a read in the same loop iteration, so look again (poll, no
            # wait: /dev/fuse is read blocking) before skipping the loop.
            self._ready.discard(fd)
            if self._poller(fd).poll(0):
                return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters[fd] = waiter
        if fd not in self._watched:
            loop.add_reader(fd, self._readable, fd)
            self._watched[fd] = loop
        try:
            await waiter
        finally:
            self._woken.discard(fd)
            if self._waiters.get(fd) is waiter:
                del self._waiters[fd]

    def _poller(self, fd: int) -> select.poll:
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        return poller

    def _readable(self, fd: int) -> None:
        waiter = self._waiters.pop(fd, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
                self._woken.add(fd)
        elif fd in self._woken:
            pass  # the woken reader has not read yet (level-triggered repeat)
        elif fd in self._ready:
            self.unwatch(fd)  # still unread: stop polling until someone waits
        else:
            self._ready.add(fd)

    def unwatch(self, fd: int) -> None:
        loop = self._watched.pop(fd, None)
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)

    def watched(self) -> list[int]:
        return list(self._watched)

    def notify_closing(self, fd: int) -> None:
        self.unwatch(fd)
        self._pollers.pop(fd, None)
        self._ready.discard(fd)
        self._woken.discard(fd)
        waiter = self._waiters.pop(fd, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(pyfuse3.asyncio.ClosedResourceError())


def _enable_fast_asyncio() -> _FuseReadiness:
    """Switch pyfuse3 to asyncio mode with the cheaper lock and readiness
    wait above (pyfuse3 looks everything up through its `trio` attribute;
    the rest is pyfuse3.asyncio's). Returns the readiness watcher, whose fd
    must be unwatched once the session is closed."""
    readiness = _FuseReadiness()
    shim: Any = types.ModuleType("corral_pyfuse3_asyncio")
    for name in dir(pyfuse3.asyncio):
        if not name.startswith("__"):
            setattr(shim, name, getattr(pyfuse3.asyncio, name))
    shim.Lock = _HandoverLock
    shim.wait_readable = readiness.wait_readable
    shim.notify_closing = readiness.notify_closing
    shim.lowlevel = shim.from_thread = shim
    pyfuse3.trio = shim  # type: ignore[attr-defined]
    return readiness


def mount_options(fsname: str = "corral") -> set[str]:
    """default_permissions: the kernel enforces the derived modes (so
    www-data reads what it may, only root writes); allow_other: other users
    see the tree at all."""
    return {f"fsname={fsname}", "subtype=corral", "default_permissions", "allow_other",
            "noatime"}


def is_stale(mountpoint: str | os.PathLike[str]) -> bool:
    """True if `mountpoint` is a dead FUSE mount (its daemon is gone). A stat alone
    can be answered from the kernel's attribute cache for a while after the daemon
    died (a quick restart after kill -9 then saw a live mount: EBUSY); statfs is
    never cached, so it reaches the dead connection and fails with ENOTCONN."""
    try:
        os.stat(mountpoint)
        os.statvfs(mountpoint)
    except OSError as error:
        return error.errno == errno.ENOTCONN
    return False


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def lazy_unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Detach a mount now (umount2 MNT_DETACH); falls back to `umount -l`."""
    path = os.fsencode(mountpoint)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(path, MNT_DETACH) == 0:
        return
    code = ctypes.get_errno()
    result = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise OSError(code, f"cannot unmount {mountpoint}: {result.stderr.strip()}")


def prepare_mountpoint(mountpoint: str | os.PathLike[str]) -> None:
    """Clean a stale mount, refuse a live one, create the directory if missing."""
    if is_stale(mountpoint):
        log.warning("cfs: stale mount at %s (daemon died): unmounting it", mountpoint)
        lazy_unmount(mountpoint)
    elif is_mounted(mountpoint):
        raise OSError(errno.EBUSY, f"{mountpoint} is already mounted")
    Path(mountpoint).mkdir(parents=True, exist_ok=True)


async def run_mount(backend: CfsBackend, mountpoint: str | os.PathLike[str] = DEFAULT_MOUNTPOINT,
                    *, stop: asyncio.Event | None = None,
                    cache_timeout_s: float | None = None,
                    ready: asyncio.Event | None = None, handle_signals: bool = True,
                    debug: bool = False) -> CfsOperations:
    """Mount `backend`'s tree at `mountpoint` and serve it until `stop` is set
    or SIGTERM/SIGINT arrives; unmount before returning. One mount per
    process (pyfuse3 keeps global session state)."""
    readiness = _enable_fast_asyncio()
    prepare_mountpoint(mountpoint)
    operations = CfsOperations(backend, cache_timeout_s=cache_timeout_s)
    options = mount_options()
    if debug:
        options.add("debug")
    pyfuse3.init(operations, os.fspath(mountpoint), options)
    log.info("cfs: mounted at %s (node %s)", mountpoint, backend.nodename)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, pyfuse3.terminate)
    watcher = None
    if stop is not None:
        watcher = asyncio.create_task(_terminate_on(stop))
    quorum_watch = asyncio.create_task(_watch_quorum(operations))
    unmount = True
    try:
        if ready is not None:
            ready.set()
        await pyfuse3.main(FUSE_TASKS_MIN, FUSE_TASKS_MAX)
    except BaseException:
        # An exception out of the request loop (a broken invariant) still
        # detaches the mount, so no stale mount blocks the next start.
        unmount = False
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
        quorum_watch.cancel()
        for signum in signals:
            loop.remove_signal_handler(signum)
        operations.serving = False
        for fd in readiness.watched():
            readiness.unwatch(fd)
        pyfuse3.close(unmount=unmount)
        if not unmount and is_mounted(mountpoint):
            lazy_unmount(mountpoint)
        log.info("cfs: unmounted %s", mountpoint)
    return operations


async def _watch_quorum(operations: CfsOperations) -> None:
    """Modes follow quorum: drop the kernel's cached attributes when it
    changes (CfsOperations.check_quorum)."""
    while True:
        await asyncio.sleep(QUORUM_POLL_S)
        try:
            operations.check_quorum()
        except Exception:
            log.exception("cfs: dropping cached attributes after a quorum change failed")


async def _terminate_on(stop: asyncio.Event) -> None:
    await stop.wait()
    pyfuse3.terminate()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m corral.cfs.mount",
                                     description="Mount a Corral configuration tree.")
    parser.add_argument("--store", required=True, help="store directory (RocksDB)")
    parser.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    parser.add_argument("--local", action="store_true",
                        help="local mode: quorum forced, no replication (recovery)")
    parser.add_argument("--read-only", action="store_true",
                        help="serve read-only, as a node without quorum")
    parser.add_argument("--nodename", default=socket.gethostname().split(".")[0])
    parser.add_argument("--durability", choices=("fsync", "process"), default="fsync")
    parser.add_argument("--cache-timeout", type=float, default=None,
                        help="seconds the kernel caches names and attributes "
                             "(default 10: local mode reports its own expiry unlocks)")
    parser.add_argument("--ready-file", help="written once the mount is up")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (uvloop: less CPU per request)")
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    from corral.cfs.local import LocalBackend
    from corral.cfs.store import Durability, Store

    with Store(args.store, durability=Durability(args.durability)) as store:
        backend = LocalBackend(store, args.nodename, read_only=args.read_only)
        ready = asyncio.Event()
        serving = asyncio.create_task(
            run_mount(backend, args.mountpoint, ready=ready, debug=args.debug,
                      cache_timeout_s=args.cache_timeout))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set() and args.ready_file:
            # pyfuse3.init mounted synchronously: the kernel answers now.
            Path(args.ready_file).write_text(f"{os.getpid()}\n")
        waiting.cancel()
        operations = await serving
        log.info("cfs: %d requests, %d operations submitted",
                 operations.counters.requests, operations.counters.submitted)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    if not args.local and not args.read_only:
        print("only --local (or --read-only) mounts are served by this command; "
              "the cluster daemon mounts with its replicated backend", file=sys.stderr)
        return 2
    try:
        if args.loop == "uvloop":
            import uvloop

            return uvloop.run(_serve(args))
        return asyncio.run(_serve(args))
    except OSError as error:
        print(f"mount failed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
