"""The quorum service inside the node process: a `QuorumCore` on top of CPG.

    quorum = QuorumService(cpg_service, QuorumConfig.from_cluster(cluster), state_dir)
    await quorum.start()                      # joins the group `corral-quorum`
    quorum.status()                           # QuorumStatus snapshot
    await quorum.set_expected(2)              # `expected 2`; ExpectedVotesRefused if nonsense
    unsubscribe = quorum.subscribe(callback)  # QuorateChanged / MembersChanged
    await quorum.wait_quorate()
    await quorum.stop()                       # announces a clean leave, leaves the group

What the shell does for the core:

- Totem ring changes reach the core from CPG's `TotemConfChg`; nodes whose
  quorum service left the group with reason LEAVE (or announced LEAVING) since
  the previous ring are passed as having left cleanly, the rest as failed.
- `Deliver`s of the group go to `message_received`; the core's `Send` effects
  are multicast in order by one sender task (CPG may push back).
- The last-man-standing timer is an `loop.call_later` at the core's deadline,
  re-armed after every input; time is `time.monotonic_ns()`.
- `PersistExpected` writes `<state_dir>/ev_tracking` (write to a temporary
  file, fsync, rename, fsync the directory) in a worker thread, then tells the
  core; the core does not become quorate on a value not yet on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from corral.cpg.events import ConfChg, CpgEvent, Deliver, Reason, TotemConfChg
from corral.cpg.service import CpgHandle, CpgService
from corral.errors import UsageError
from corral.quorum.config import MAX_EXPECTED_VOTES, QuorumConfig
from corral.quorum.core import (
    Effect,
    MembersChanged,
    PersistExpected,
    QuorateChanged,
    QuorumCore,
    QuorumStatus,
    Send,
)

log = logging.getLogger("corral.quorum")

GROUP = "corral-quorum"
EV_TRACKING_FILE = "ev_tracking"
# Messages waiting for CPG; the core sends a handful per membership change, so a
# backlog this deep means CPG is stuck, and old NODEINFOs are stale anyway.
MAX_OUTBOX = 1024
PERSIST_RETRY_S = 5

Subscriber = Callable[[QuorateChanged | MembersChanged], None]


def read_ev_tracking(state_dir: Path | None) -> int:
    """The persisted highest expected votes, 0 when absent; garbage is an error."""
    if state_dir is None:
        return 0
    path = state_dir / EV_TRACKING_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{path}: not a number ({text[:20]!r}); delete it to reset") from None
    if not 0 <= value <= MAX_EXPECTED_VOTES:
        raise UsageError(f"{path}: {value} is out of range; delete it to reset")
    return value


def write_ev_tracking(state_dir: Path, value: int) -> None:
    """Durably replace ev_tracking with `value`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / EV_TRACKING_FILE
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", encoding="ascii") as handle:
        handle.write(f"{value}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class QuorumService:
    """Runs one node's QuorumCore over the CPG group `corral-quorum`."""

    def __init__(
        self,
        cpg: CpgService,
        config: QuorumConfig,
        state_dir: Path | str | None = None,
    ) -> None:
        self.cpg = cpg
        self.config = config
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.core = QuorumCore(config, cpg.nodeid, read_ev_tracking(self.state_dir))
        self._handle: CpgHandle | None = None
        self._outbox: deque[bytes] = deque()
        self._outbox_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._persister: asyncio.Task[None] | None = None
        self._persist_queue: deque[int] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._subscribers: list[Subscriber] = []
        self._quorate_waiters: list[asyncio.Future[None]] = []
        self._left_cleanly: set[int] = set()
        self._drained: list[asyncio.Future[None]] = []
        self.dropped_sends = 0
        for warning in config.warnings:
            log.warning("quorum: %s", warning)

    # ------------------------------------------------------------------ API

    async def start(self) -> None:
        if self._handle is not None:
            raise UsageError("quorum service already started")
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        self._handle = await self.cpg.join(GROUP, callback=self._on_event)
        ring_id, members = self.cpg.core.ring_id, self.cpg.core.ring_members
        if self.cpg.nodeid in members and ring_id[1] > 0:
            # The ring formed before we joined: start from it.
            self._feed(self.core.membership_changed(ring_id, members, (), time.monotonic_ns()))

    async def stop(self) -> None:
        """Announce a clean leave, let it go out, leave the group."""
        if self._handle is None:
            return
        self._feed(self.core.leave())
        await self._drain_outbox()
        handle, self._handle = self._handle, None
        try:
            await handle.leave()
        except Exception:  # the node may be going down under us
            log.debug("quorum: leaving the group failed", exc_info=True)
        for task in (self._sender, self._persister):
            if task is not None:
                task.cancel()
        if self._timer is not None:
            self._timer.cancel()

    def status(self) -> QuorumStatus:
        return self.core.status()

    @property
    def quorate(self) -> bool:
        return self.core.quorate

    async def set_expected(self, expected_votes: int) -> None:
        """`expected N`: raises ExpectedVotesRefused for a nonsense value; otherwise the
        request is multicast and every member applies it when it is delivered."""
        self._feed(self.core.set_expected(expected_votes))
        await self._drain_outbox()

    def reconfigure(self, config: QuorumConfig) -> None:
        """Apply a changed `quorum { }` section or nodelist (see QuorumCore.reconfigure)."""
        for warning in config.warnings:
            log.warning("quorum: %s", warning)
        self.config = config
        self._feed(self.core.reconfigure(config))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback` on every quorate or membership change; returns an unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def wait_quorate(self) -> None:
        while not self.core.quorate:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._quorate_waiters.append(future)
            await future

    # ------------------------------------------------------------------ CPG input

    def _on_event(self, event: CpgEvent) -> None:
        if isinstance(event, Deliver):
            self._feed(self.core.message_received(event.nodeid, event.payload))
        elif isinstance(event, ConfChg):
            for member in event.left:
                if member.reason == Reason.LEAVE:
                    self._left_cleanly.add(member.nodeid)
            if event.joined:
                # A quorum service that joins the group late missed our NODEINFO for
                # this ring, and we cannot sync without its: announce again.
                self._feed(self.core.announce())
        elif isinstance(event, TotemConfChg):
            clean, self._left_cleanly = self._left_cleanly, set()
            clean -= set(event.members)
            self._feed(self.core.membership_changed(
                event.ring_id, event.members, clean, time.monotonic_ns()
            ))

    def _feed(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self._queue_send(effect.payload)
            elif isinstance(effect, PersistExpected):
                self._queue_persist(effect.expected_votes)
            else:
                self._publish(effect)
        self._arm_timer()

    def _publish(self, change: QuorateChanged | MembersChanged) -> None:
        if isinstance(change, QuorateChanged):
            log.info("quorum: %s", "quorate" if change.quorate else "NOT quorate")
            if change.quorate:
                waiters, self._quorate_waiters = self._quorate_waiters, []
                for future in waiters:
                    if not future.done():
                        future.set_result(None)
        else:
            log.info("quorum: members %s (ring %x.%x)", list(change.members), *change.ring_id)
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:
                log.exception("quorum: a subscriber raised")

    # ------------------------------------------------------------------ timer

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline_ns
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            return
        delay_s = max(0.0, (deadline - time.monotonic_ns()) / 1e9)
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._feed(self.core.timer_expired(time.monotonic_ns()))

    # ------------------------------------------------------------------ sending

    def _queue_send(self, payload: bytes) -> None:
        if len(self._outbox) >= MAX_OUTBOX:
            self._outbox.popleft()
            self.dropped_sends += 1
            log.error("quorum: %d messages wait for CPG; dropping the oldest", MAX_OUTBOX)
        self._outbox.append(payload)
        self._outbox_ready.set()

    async def _send_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            while self._outbox and self._handle is not None:
                payload = self._outbox[0]
                try:
                    await self._handle.mcast(payload)
                except Exception:
                    log.exception("quorum: multicast failed")
                if self._outbox and self._outbox[0] is payload:
                    self._outbox.popleft()
            if not self._outbox:
                self._outbox_ready.clear()
                for future in self._drain_waiters():
                    future.set_result(None)
            else:
                await asyncio.sleep(0)

    def _drain_waiters(self) -> list[asyncio.Future[None]]:
        waiters, self._drained = self._drained, []
        return [w for w in waiters if not w.done()]

    async def _drain_outbox(self) -> None:
        """Return once everything queued so far was handed to CPG."""
        if not self._outbox:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drained.append(future)
        self._outbox_ready.set()
        await future

    # ------------------------------------------------------------------ ev_tracking

    def _queue_persist(self, value: int) -> None:
        if self.state_dir is None:
            self._feed(self.core.persisted(value))  # nowhere to persist: tests, demos
            return
        self._persist_queue.append(value)
        if self._persister is None or self._persister.done():
            self._persister = asyncio.get_running_loop().create_task(self._persist_loop())

    async def _persist_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._persist_queue and self.state_dir is not None:
            value = max(self._persist_queue)
            try:
                await loop.run_in_executor(None, write_ev_tracking, self.state_dir, value)
            except OSError:
                # The core will not become quorate on an unwritten value: retry.
                log.exception("quorum: cannot write ev_tracking; retrying in %d s",
                              PERSIST_RETRY_S)
                await asyncio.sleep(PERSIST_RETRY_S)
                continue
            self._persist_queue = deque(v for v in self._persist_queue if v > value)
            self._feed(self.core.persisted(value))
