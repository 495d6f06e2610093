"""The replicated backend of the configuration filesystem (asyncio shell).

    backend = ReplicatedBackend(store, cpg_service, quorum_service, "pve1",
                                node_names={1: "pve1", 2: "pve2"}, cluster_name="prod")
    await backend.start()                  # joins the CPG group `corral-cfs`
    code = await backend.submit(Op.mkdir("nodes/pve1", mtime))   # errno, 0 = applied
    backend.virtual_file(".members")       # generated files
    backend.log(pri=6, tag="cfs", msg="...")   # replicated cluster log
    await backend.stop()

It runs one `ReplicaCore` (corral.cfs.replica_core) on a CPG handle. Events
are fed synchronously from the CPG callback, so the store is changed at the
exact point of the delivery order the core sees. Multicasts go out in order
through one sender task (CPG may push back). Durability is a group commit:
open the store with `Durability.PROCESS` so the per-op writes skip their
fsync. Once per loop iteration in which this node applied one of its own
ops, one `store.sync()` starts in a worker thread, while the ACK round of
those ops runs; a completion is released only when the core confirmed it
(every member applied the op) and a sync covering the op's apply finished,
whichever comes last. A failure of the store or
of the core stops the backend: every pending and later submit gets EIO and
the node leaves the group (the others see it go); restart the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import statistics
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from corral.cfs import virtual
from corral.cfs.ops import Op
from corral.cfs.replica_core import (
    Action,
    Applied,
    Complete,
    LogLine,
    Multicast,
    Phase,
    ReplicaConfig,
    ReplicaCore,
)
from corral.cfs.resync import PatchItem
from corral.cfs.state import CfsState, Outcome
from corral.cfs.store import Durability, Store
from corral.cpg.events import ConfChg, CpgEvent, Deliver, TotemConfChg
from corral.cpg.service import CpgHandle, CpgService
from corral.errors import UsageError

log = logging.getLogger("corral.cfs.replication")

GROUP = "corral-cfs"
MARKER_SUFFIX = ".resync"
TERM_SUFFIX = ".term"
_NS_PER_S = 1_000_000_000
# An own OP's request id sits after the 4-byte header and the origin (replica_core's wire).
_OP_TYPE_BYTE = 1
_OP_REQUEST = struct.Struct("<4xIQ")
STAGE_SAMPLES = 2048
STAGES = ("queue", "order", "apply", "acks", "durable_wait", "answer", "total")


def _fsync_dir(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_term(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{path}: not a number ({text[:20]!r}); delete it to reset") from None


class SubmitTimings:
    """Where a replicated submit spends its time, on this node's clock (the
    newest `STAGE_SAMPLES` submits that changed the tree), in `status()`:

    - queue: submit to the multicast handed to CPG (the send task's turn);
    - order: handed to CPG to its delivery here (Totem ordering);
    - apply: the core handling that delivery (store apply included);
    - acks: delivered to confirmed (the other members' ACKs arrived);
    - durable_wait: confirmed to the covering WAL sync done (0 when the
      sync, started at the apply, ended before the ACK round did);
    - answer: total minus the rest (loop turns until the waiter is resolved);
    - total: submit to answer. `fsync` is each WAL sync's own duration."""

    def __init__(self) -> None:
        self._open: dict[int, list[int]] = {}
        self._durable_ns = 0  # when the newest WAL sync finished
        self.samples: dict[str, deque[int]] = {
            name: deque(maxlen=STAGE_SAMPLES) for name in (*STAGES, "fsync")}

    def begin(self, request_id: int, now_ns: int) -> None:
        if len(self._open) < 2 * STAGE_SAMPLES:
            self._open[request_id] = [now_ns, 0, 0, 0, 0]

    def mark(self, request_id: int, index: int, now_ns: int) -> None:
        marks = self._open.get(request_id)
        if marks is not None and not marks[index]:
            marks[index] = now_ns

    def end(self, request_id: int, code: int, now_ns: int) -> None:
        marks = self._open.pop(request_id, None)
        if marks is None or code or not all(marks):
            return  # refused or failed ops skip some stages
        submit_ns, sent_ns, delivered_ns, applied_ns, confirmed_ns = marks
        stages = (sent_ns - submit_ns, delivered_ns - sent_ns, applied_ns - delivered_ns,
                  confirmed_ns - applied_ns)
        for name, value in zip(STAGES, stages, strict=False):
            self.samples[name].append(value)
        durable_ns = max(self._durable_ns, confirmed_ns)
        self.samples["durable_wait"].append(durable_ns - confirmed_ns)
        self.samples["answer"].append(now_ns - durable_ns)
        self.samples["total"].append(now_ns - submit_ns)

    def durable(self, now_ns: int) -> None:
        self._durable_ns = now_ns

    def summary(self) -> dict[str, object]:
        """p50 and mean per stage in microseconds (the means add up to the
        total's; the medians need not), and the number of samples."""
        out: dict[str, object] = {"count": len(self.samples["total"])}
        for name, values in self.samples.items():
            if values:
                out[f"{name}_p50_us"] = round(statistics.median(values) / 1000, 1)
                out[f"{name}_mean_us"] = round(statistics.fmean(values) / 1000, 1)
        return out


class ReplicatedStore:
    """A Store plus the durable "resync in progress" marker the core needs:
    a file next to the store directory, created (and fsynced) before a
    resync patch touches the tree and removed once the resync finished."""

    def __init__(self, store: Store, marker: str | os.PathLike[str] | None = None) -> None:
        self.store = store
        self.marker = Path(marker) if marker is not None else Path(str(store.path) + MARKER_SUFFIX)
        self._dirty = self.marker.exists()
        self.term_file = Path(str(store.path) + TERM_SUFFIX)
        self._term = _read_term(self.term_file)

    @property
    def state(self) -> CfsState:
        return self.store.state

    @property
    def dirty(self) -> bool:
        return self._dirty

    def set_dirty(self, flag: bool) -> None:
        if flag:
            with open(self.marker, "wb") as handle:
                handle.write(b"resync in progress\n")
                handle.flush()
                os.fsync(handle.fileno())
        else:
            self.store.sync()  # the finished resync is durable before the marker goes
            self.marker.unlink(missing_ok=True)
        _fsync_dir(self.marker.parent)
        self._dirty = flag

    @property
    def term(self) -> int:
        return self._term

    def set_term(self, term: int) -> None:
        """Durably replace the term file (temp file, fsync, rename, fsync dir)."""
        temporary = self.term_file.with_name(self.term_file.name + ".tmp")
        with open(temporary, "w", encoding="ascii") as handle:
            handle.write(f"{term}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.term_file)
        _fsync_dir(self.term_file.parent)
        self._term = term

    def apply_group(self, ops: Sequence[tuple[Op, int]], *, quorate: bool) -> list[Outcome]:
        return self.store.apply_group(ops, quorate=quorate)

    def apply_patch(self, delete: Sequence[str], items: Sequence[PatchItem],
                    touch_dirs: Sequence[tuple[str, int, int]] = ()) -> None:
        self.store.apply_patch(delete, items, touch_dirs)

    def read_file(self, path: str) -> bytes:
        return self.store.read_file(path)


class ReplicatedBackend:
    """CfsBackend over a process group; see the module doc."""

    def __init__(
        self,
        store: Store,
        cpg: CpgService,
        quorum: Any,
        nodename: str,
        *,
        config: ReplicaConfig | None = None,
        group: str = GROUP,
        cluster_name: str = "corral",
        config_version: int = 0,
        node_names: Mapping[int, str] | None = None,
        node_ips: Mapping[int, str] | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        wall_s: Callable[[], float] = time.time,
    ) -> None:
        """`quorum` is a QuorumService (its `quorate()` and `subscribe()` are
        used) or a plain callable returning whether this node is quorate."""
        self._store = store
        self.rstore = ReplicatedStore(store)
        self.cpg = cpg
        self._quorum_source = quorum
        self._nodename = nodename
        self.group = group
        self.cluster_name = cluster_name
        self.config_version = config_version
        self.node_names = dict(node_names or {})
        self.node_ips = dict(node_ips or {})
        self._clock_ns = clock_ns
        self._wall_s = wall_s
        self.starttime = int(wall_s())
        # vmid, node -> runtime fields for `.vmlist` (set by corrald's status broadcast)
        self.guest_runtime: virtual.GuestRuntime | None = None
        self.rrd_lines: Callable[[], list[str]] | None = None      # `.rrd`, likewise
        self.core = ReplicaCore(cpg.nodeid, nodename, self.rstore, config,
                                quorate=self._quorum_of())
        self.ring_members: tuple[int, ...] = ()
        self.clinfo_version = 0
        self._handle: CpgHandle | None = None
        self._futures: dict[int, asyncio.Future[int]] = {}
        self._next_request = 0
        self._outbox: deque[bytes] = deque()
        self._outbox_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline_ns: int | None = None
        self._completions: list[Complete] = []  # confirmed, waiting for a covering sync
        self._sync_scheduled = False
        self._syncing = False
        self._synced_seq = 0  # the core's applied_seq covered by the last finished sync
        self._ack_turn = False  # an ACK went out in this loop turn
        self._sending = False  # the send task is inside mcast (pushed back)
        self.timings = SubmitTimings()
        self._unsubscribe: Callable[[], None] | None = None
        self._listeners: list[Callable[[Op], None]] = []
        self.failed: BaseException | None = None

    # ------------------------------------------------------------ CfsBackend

    @property
    def store(self) -> Store:
        return self._store

    @property
    def nodename(self) -> str:
        return self._nodename

    def quorate(self) -> bool:
        return self.core.quorate and self.failed is None

    async def submit(self, op: Op) -> int:
        """Apply `op` cluster-wide; returns its errno once applied (and durable)
        locally: EACCES without quorum, EAGAIN if a resync outlasted the bound,
        EIO if the backend failed."""
        if self.failed is not None or self._handle is None:
            return errno.EIO
        self._next_request += 1
        request_id = self._next_request
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        self.timings.begin(request_id, self._clock_ns())
        self._guarded(lambda now: self._quorum_input(now)
                      + self.core.submit(op, request_id, now))
        return await future

    def virtual_file(self, name: str) -> bytes | None:
        state = self._store.state
        if name == ".members":
            return virtual.render_members(self._nodename, self.clinfo_version, self._cluster())
        if name == ".vmlist":
            return virtual.render_vmlist(state.guests_version, state.guest_list(),
                                         self.guest_runtime)
        if name == ".rrd":
            return virtual.render_rrd(self.rrd_lines() if self.rrd_lines is not None else [])
        if name == ".version":
            return virtual.render_version(self.starttime, self.clinfo_version,
                                          state.guests_version, state.observed, {})
        if name == ".clusterlog":
            entries = [virtual.LogEntry(r.uid, r.time, r.pri, r.tag, r.pid, r.node, r.user, r.msg)
                       for r in self.core.log_entries()]
            return virtual.render_clusterlog(entries)
        return None

    def add_change_listener(self, callback: Callable[[Op], None]) -> None:
        """Be told (on the event loop, after the store changed) of every change
        that did not come through this node's `submit`: other nodes' ops,
        UNLOCKs, and resync patches (as unlink / truncate / set_mtime ops of
        the same paths), so the FUSE front can drop cached names and attributes."""
        self._listeners.append(callback)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._handle is not None:
            raise UsageError("replicated backend already started")
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        subscribe = getattr(self._quorum_source, "subscribe", None)
        if subscribe is not None:
            self._unsubscribe = subscribe(lambda _change: self._guarded(self._quorum_input))
        self._handle = await self.cpg.join(self.group, callback=self._on_event)

    async def wait_synced(self, timeout_s: float = 30) -> None:
        """Return once this node is a synced member of the group (for tests and start-up)."""
        deadline = time.monotonic() + timeout_s
        while self.core.phase is not Phase.SYNCED:
            if self.failed is not None:
                raise self.failed
            if time.monotonic() > deadline:
                raise TimeoutError("cfs replica did not sync in time")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Leave the group; pending submits fail (EAGAIN queued, EIO in flight)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._timer is not None:
            self._timer.cancel()
        if self._handle is not None and not self._handle.closed and self.failed is None:
            await self._drain_outbox()
            try:
                await asyncio.wait_for(self._handle.leave(), 5)
            except (TimeoutError, Exception):
                self._handle.close()
        self._apply(self.core.fail_all())
        for _ in range(500):
            if not self._syncing:
                break
            await asyncio.sleep(0.01)
        completions, self._completions = self._completions, []
        if self.failed is None and self._store.durability is Durability.PROCESS:
            self._store.sync()
            self._synced_seq = self.core.applied_seq
        self._resolve(completions)
        if self._sender is not None:
            self._sender.cancel()

    def log(self, pri: int, tag: str, msg: str, *, user: str = "root@pam",
            pid: int | None = None) -> None:
        """Add an entry to the replicated cluster log (`.clusterlog`)."""
        now_s = int(self._wall_s())
        self._guarded(lambda _now: self.core.log(now_s, pri, tag, msg, user=user,
                                                 pid=os.getpid() if pid is None else pid))

    def status(self) -> dict[str, object]:
        report = self.core.last_sync
        return {
            "phase": self.core.phase.value,
            "members": list(self.core.members),
            "quorate": self.core.quorate,
            "version": self._store.state.version,
            "digest": f"{self._store.state.tree.digest:016x}",
            "counters": dict(self.core.counters),
            "submit_stages": self.timings.summary(),
            "last_sync": None if report is None else {
                "leader": report.leader, "followers": list(report.followers),
                "bytes": report.wire_bytes, "fetched": report.fetched,
                "deleted": report.deleted, "repair": report.repair},
        }

    # ------------------------------------------------------------ internals

    def _cluster(self) -> virtual.ClusterInfo:
        online = set(self.ring_members or self.cpg.core.ring_members)
        ids = sorted(set(self.node_names) | online)
        nodes = [virtual.ClusterNode(self.node_names.get(n, f"node{n}"), n,
                                     n in online, self.node_ips.get(n, ""))
                 for n in ids]
        return virtual.ClusterInfo(self.cluster_name, self.config_version, self.quorate(), nodes)

    def _quorum_of(self) -> bool:
        source = self._quorum_source
        if callable(source):
            return bool(source())
        value = source.quorate  # QuorumService: a property (or a method)
        return bool(value() if callable(value) else value)

    def _quorum_input(self, now_ns: int) -> list[Action]:
        quorate = self._quorum_of()
        if quorate == self.core.quorate:
            return []
        return self.core.quorum_changed(quorate, now_ns)

    def _on_event(self, event: CpgEvent) -> None:
        if isinstance(event, TotemConfChg):
            self.ring_members = tuple(event.members)
            self.clinfo_version += 1
            self._guarded(self._quorum_input)
        elif isinstance(event, Deliver):
            request_id = self._own_op(event.nodeid, event.payload)
            if request_id:
                self.timings.mark(request_id, 2, self._clock_ns())
            self._guarded(lambda now: self._quorum_input(now)
                          + self.core.deliver(event.nodeid, event.payload, now))
            if request_id:
                self.timings.mark(request_id, 3, self._clock_ns())
        elif isinstance(event, ConfChg):
            members = [m.nodeid for m in event.members]
            self._guarded(lambda now: self._quorum_input(now) + self.core.confchg(members, now))

    def _own_op(self, sender: int, payload: bytes) -> int:
        """The request id of this node's own OP message, else 0 (timings only)."""
        if sender != self.cpg.nodeid or len(payload) < _OP_REQUEST.size \
                or payload[3] != _OP_TYPE_BYTE:
            return 0
        return int(_OP_REQUEST.unpack_from(payload)[1])

    def _guarded(self, step: Callable[[int], list[Action]]) -> None:
        if self.failed is not None:
            return
        try:
            self._apply(step(self._clock_ns()))
        except Exception as error:
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        log.critical("cfs replication stopped: %s; restart the node", error)
        self.failed = error
        for future in self._futures.values():
            if not future.done():
                future.set_result(errno.EIO)
        self._futures.clear()
        if self._handle is not None:
            self._handle.close()

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Multicast):
                self._multicast(action.payload)
            elif isinstance(action, Complete):
                self.timings.mark(action.request_id, 4, self._clock_ns())
                self._completions.append(action)
            elif isinstance(action, LogLine):
                self._log_line(action)
            elif isinstance(action, Applied):
                for listener in self._listeners:
                    try:
                        listener(action.op)
                    except Exception:
                        log.exception("cfs: a change listener raised")
        if self._completions or self.core.durable_wanted > self._synced_seq:
            self._schedule_sync()
        if self.core.ack_due and not self._ack_turn:
            # The first ACK of a loop turn goes out now, inside the delivery
            # callback, so it can leave with this node's next token visit;
            # ops delivered later in the same turn get one cumulative ACK at
            # its end (_end_ack_turn): at most two per turn, not one per op.
            self._ack_turn = True
            asyncio.get_running_loop().call_soon(self._end_ack_turn)
            self._apply(self.core.flush_acks(self._clock_ns()))
        self._arm_timer()

    def _end_ack_turn(self) -> None:
        self._ack_turn = False
        self._guarded(self.core.flush_acks)

    def _multicast(self, payload: bytes) -> None:
        """Hand `payload` to CPG now if nothing is queued before it (saves the
        send task's loop turn); else queue it behind the others, in order."""
        handle = self._handle
        if not self._outbox and not self._sending and handle is not None \
                and not handle.closed and self.failed is None \
                and handle.service.client_try_mcast(handle.client_id, handle.group, payload):
            request_id = self._own_op(self.cpg.nodeid, payload)
            if request_id:
                self.timings.mark(request_id, 1, self._clock_ns())
            return
        self._outbox.append(payload)
        self._outbox_ready.set()

    def _log_line(self, line: LogLine) -> None:
        level = {"info": logging.INFO, "warning": logging.WARNING}.get(line.level, logging.ERROR)
        log.log(level, "cfs: %s", line.text)
        if line.level != "info" and self.core.members[:1] == (self.core.nodeid,):
            # Repairs and protocol errors go to the cluster log once (lowest member).
            now_s = int(self._wall_s())
            self._outbox.extend(
                a.payload for a in self.core.log(now_s, 4, "pmxcfs", line.text)
                if isinstance(a, Multicast))
            self._outbox_ready.set()

    def _schedule_sync(self) -> None:
        if not self._sync_scheduled and not self._syncing:
            self._sync_scheduled = True
            asyncio.get_running_loop().call_soon(self._sync_step)

    def _sync_step(self) -> None:
        """Group commit, once per loop iteration: release the completions a
        finished sync already covers; if any completion or any own op applied
        since (still in its ACK round) is not covered, start one WAL sync in a
        worker thread (the loop keeps applying deliveries meanwhile). It
        covers every change applied before it began."""
        self._sync_scheduled = False
        if self._syncing or self.failed is not None:
            return
        if self._store.durability is not Durability.PROCESS:
            self._synced_seq = self.core.applied_seq  # every apply was synced itself
        ready = [c for c in self._completions if c.applied_seq <= self._synced_seq]
        if ready:
            self._completions = [c for c in self._completions
                                 if c.applied_seq > self._synced_seq]
            self._resolve(ready)
        wanted = max([self.core.durable_wanted, *(c.applied_seq for c in self._completions)])
        if wanted <= self._synced_seq:
            return
        covered = self.core.applied_seq
        self._syncing = True
        began_ns = self._clock_ns()
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._store.sync))
        task.add_done_callback(lambda done: self._synced(done, covered, began_ns))

    def _synced(self, done: asyncio.Task[None], covered: int, began_ns: int) -> None:
        self._syncing = False
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        if error is not None:
            self._fail(error)
            return
        now_ns = self._clock_ns()
        self.timings.samples["fsync"].append(now_ns - began_ns)
        self.timings.durable(now_ns)
        self._synced_seq = max(self._synced_seq, covered)
        self._sync_scheduled = False
        self._sync_step()

    def _resolve(self, completions: list[Complete]) -> None:
        for completion in completions:
            future = self._futures.pop(completion.request_id, None)
            if future is not None and not future.done():
                future.set_result(completion.errno)
            self.timings.end(completion.request_id, completion.errno, self._clock_ns())

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline_ns()
        if self._timer is not None:
            if deadline == self._timer_deadline_ns:
                return  # unchanged (the common case): no new loop timer per event
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            return
        delay_s = max(0.0, (deadline - self._clock_ns()) / _NS_PER_S)
        self._timer_deadline_ns = deadline
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._guarded(self.core.timer)

    async def _send_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox and self._handle is not None and self.failed is None:
                payload = self._outbox.popleft()
                self._sending = True
                try:
                    await self._handle.mcast(payload)
                except Exception as error:
                    self._fail(error)
                    return
                finally:
                    self._sending = False
                request_id = self._own_op(self.cpg.nodeid, payload)
                if request_id:
                    self.timings.mark(request_id, 1, self._clock_ns())

    async def _drain_outbox(self, timeout_s: float = 5) -> None:
        deadline = time.monotonic() + timeout_s
        while self._outbox and time.monotonic() < deadline and self.failed is None:
            await asyncio.sleep(0.005)
