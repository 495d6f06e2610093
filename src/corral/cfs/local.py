"""Local mode (like `pmxcfs -l`): a CfsBackend that applies every operation
straight to this node's store, with no replication and quorum forced on.

It exists for two uses: recovering a single node whose cluster is gone (the
only safe way to edit the tree without quorum, on ONE node only: a node that
changed its tree in local mode raises its version and will win, or lose,
wholesale at the next resync), and tests of the FUSE front against a real
store. Starting it logs a warning saying so.

Operations are applied on the event loop, one at a time, in submission
order, so the apply step sees them in one total order as on a cluster.
`read_only=True` serves the tree as a node without quorum does: every
mutation fails with EACCES and nothing changes (tests and inspection).

Lock expiry works as on a cluster, judged by this node's monotonic clock:
`utime(lock, 0)` fails with EACCES and, if the lock incarnation was first
seen longer ago than the expiry (120 s unless datacenter.cfg's `ha-timing`
says otherwise, see locks.py), removes it (the reference does this inline
in local mode too).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from corral.cfs import virtual
from corral.cfs.locks import ExpirySetting, LockTracker
from corral.cfs.ops import Op
from corral.cfs.state import Outcome, UnlockRequested
from corral.cfs.store import GroupCommit, Store

log = logging.getLogger(__name__)

# Writer id of local-mode changes (the reference writes with writer 0 too).
LOCAL_WRITER = 0
CLUSTERLOG_KEPT = 500


class LocalBackend:
    """CfsBackend for local mode: quorate, applies in place, no peers."""

    def __init__(self, store: Store, nodename: str, *, read_only: bool = False,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns,
                 wall_clock_s: Callable[[], float] = time.time) -> None:
        self._store = store
        self._commit = GroupCommit(store)  # one fsync for writers waiting together
        self._nodename = nodename
        self._read_only = read_only
        self._monotonic_ns = monotonic_ns
        self.starttime = int(wall_clock_s())
        self.locks = LockTracker()
        self.lock_expiry = ExpirySetting()
        self.locks.rebuild(store.state.locks(), monotonic_ns())
        # Local mode keeps its own cluster log (recovery notes); bounded.
        self.clusterlog: deque[virtual.LogEntry] = deque(maxlen=CLUSTERLOG_KEPT)
        self.ops_applied = 0
        self._listeners: list[Callable[[Op], None]] = []
        for problem in store.load_problems:
            log.warning("cfs store: %s", problem)
        if read_only:
            log.warning("cfs: serving %s READ-ONLY (as without quorum)", store.path)
        else:
            log.warning("cfs: LOCAL MODE on node %s: quorum forced, no replication; "
                        "never run local mode on more than one node of a cluster", nodename)

    def add_change_listener(self, callback: Callable[[Op], None]) -> None:
        """Be told of operations applied here that did not come through
        `submit` (the expiry unlocks below), so caches can be dropped."""
        self._listeners.append(callback)

    @property
    def store(self) -> Store:
        return self._store

    @property
    def nodename(self) -> str:
        return self._nodename

    def quorate(self) -> bool:
        return not self._read_only

    async def submit(self, op: Op) -> int:
        """Apply `op` now and return its errno once it is persisted per the
        store's durability (group commit of the fsyncs under FSYNC)."""
        outcome = self._commit.write(op, writer=LOCAL_WRITER, quorate=not self._read_only)
        self.ops_applied += 1
        self._follow_locks(outcome)
        await self._commit.durable()
        return outcome.errno

    def _follow_locks(self, outcome: Outcome) -> None:
        if not outcome.effects:
            return
        now_ns = self._monotonic_ns()
        for request in self.locks.follow(outcome.effects, now_ns):
            self._judge_unlock(request, now_ns)

    def _judge_unlock(self, request: UnlockRequested, now_ns: int) -> None:
        if not self.locks.is_expired(request.path, request.checksum, now_ns,
                                     self._lock_expiry_ns()):
            return
        unlock = Op.unlock(request.path, request.checksum)
        unlocked = self._store.apply(unlock, writer=LOCAL_WRITER, quorate=True)
        if unlocked.ok:
            log.info("cfs: expired lock %s removed", request.path)
            for listener in self._listeners:
                listener(unlock)
        self.locks.follow(unlocked.effects, now_ns)

    def _lock_expiry_ns(self) -> int:
        problem = self.lock_expiry.follow(self._store.state.tree, self._store.read_file)
        if problem is not None:
            log.warning("cfs: %s", problem)
        return self.lock_expiry.expiry_ns

    def virtual_file(self, name: str) -> bytes | None:
        state = self._store.state
        if name == ".members":
            return virtual.render_members(self._nodename, state.version, None)
        if name == ".vmlist":
            return virtual.render_vmlist(state.guests_version, state.guest_list())
        if name == ".version":
            return virtual.render_version(self.starttime, 1, state.guests_version,
                                          state.observed, {})
        if name == ".clusterlog":
            return virtual.render_clusterlog(self.clusterlog)
        return None
