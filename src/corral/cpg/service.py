"""The asyncio CPG API for code inside the node process, and the client plumbing
the IPC server shares.

    service = CpgService(node)            # node: see CpgNode
    handle = await service.join("pmxcfs")
    await handle.mcast(b"...")            # waits while Totem or the sync pushes back
    async for event in handle.events():   # Deliver, ConfChg, TotemConfChg
        ...
    await handle.leave()                  # returns once the own LEAVE confchg arrived

Every handle is one CPG client (one pid in one group). Its event queue is
bounded (`queue_limit`); a consumer that falls that far behind is disconnected
(the others see PROCDOWN) and its iterator raises `CpgError(NO_SPACE)`, rather
than letting memory grow. Nothing here polls: waiters sleep on futures that the
Totem listener or the writability of the node wakes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from corral.cpg.core import CpgCore, CpgError, ErrorCode
from corral.cpg.events import ConfChg, CpgEvent, Member
from corral.errors import UsageError

log = logging.getLogger("corral.cpg")

# Events one in-process handle may have waiting before it is disconnected.
DEFAULT_QUEUE_LIMIT = 4096
# Payloads handed to the service but not yet accepted by Totem; mcast waits above it.
PENDING_LIMIT = 256

EventSink = Callable[[CpgEvent], None]


class CpgNode(Protocol):
    """What the service needs from the node process (the engine's Totem shell)."""

    nodeid: int

    def submit(self, payload: bytes) -> bool:
        """Hand one payload to Totem; False when its send queue is full."""

    async def wait_writable(self) -> None:
        """Return once `submit` may succeed again."""

    def add_listener(self, callback: Callable[[tuple[object, ...]], None]) -> None:
        """Call `callback` with every Totem event tuple, in order.

        A node may also offer `add_batch_listener(callback)`, calling it with the
        list of events of one input (in order); the service prefers it."""


def group_name(name: str | bytes) -> bytes:
    return name.encode() if isinstance(name, str) else bytes(name)


class CpgService:
    """Drives one CpgCore from a node's Totem events; serves handles and IPC clients."""

    def __init__(self, node: CpgNode, *, pending_limit: int = PENDING_LIMIT) -> None:
        self.node = node
        self.nodeid = node.nodeid
        self.core = CpgCore(node.nodeid)
        self._pending_limit = pending_limit
        self._pending: deque[bytes] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._sinks: dict[int, EventSink] = {}
        self._handles: dict[int, CpgHandle] = {}
        self._next_client_id = 1
        self._room_waiters: list[asyncio.Future[None]] = []
        self._pumping = False
        self._pump_again = False
        self._batch_depth = 0
        self._batch_dirty = False
        self._unpumped = 0
        self._closed = False
        add_batch_listener = getattr(node, "add_batch_listener", None)
        if add_batch_listener is not None:
            # One call per Totem input (a token visit's deliveries) instead of one per event.
            add_batch_listener(self._on_totem_events)
        else:
            node.add_listener(self._on_totem_event)

    # ------------------------------------------------------------ user API

    async def join(
        self,
        name: str | bytes,
        *,
        pid: int | None = None,
        callback: EventSink | None = None,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> CpgHandle:
        """Join group `name` as process `pid` (default: this process). Events go to
        `callback` if given, else to `handle.events()`."""
        handle = CpgHandle(self, group_name(name), pid if pid is not None else os.getpid(),
                           callback, queue_limit)
        handle.client_id = self.open_client(handle.pid, handle._on_event)
        try:
            self.client_join(handle.client_id, handle.group)
        except CpgError:
            self.close_client(handle.client_id)
            raise
        self._handles[handle.client_id] = handle
        return handle

    def members(self, name: str | bytes) -> tuple[Member, ...]:
        return self.core.membership(group_name(name))

    def stats(self) -> dict[str, int]:
        stats = self.core.stats()
        stats["pending_to_totem"] = len(self._pending)
        stats["clients"] = len(self._sinks)
        return stats

    async def close(self) -> None:
        """Disconnect every client and stop the flusher (the node is shutting down)."""
        self._closed = True
        handles, self._handles = self._handles, {}
        for client_id in list(self._sinks):
            self.close_client(client_id)
        for handle in handles.values():
            handle._finish(CpgError(ErrorCode.LIBRARY, "CPG service closed"))
        if self._flusher is not None:
            self._flusher.cancel()
        self._wake_room()

    # ------------------------------------------------------------ client plumbing

    def open_client(self, pid: int, sink: EventSink) -> int:
        """Register a client whose events go to `sink` (called synchronously; it
        must not block). Returns its client id."""
        if self._closed:
            raise CpgError(ErrorCode.LIBRARY, "CPG service is closed")
        client_id = self._next_client_id
        self._next_client_id += 1
        self.core.add_client(client_id, pid)
        self._sinks[client_id] = sink
        return client_id

    def client_join(self, client_id: int, group: bytes) -> None:
        self.core.join(client_id, self.core.client_pid(client_id), group)
        self._pump()

    def client_leave(self, client_id: int, group: bytes) -> None:
        self.core.leave(client_id, group)
        self._pump()

    async def client_mcast(
        self, client_id: int, group: bytes, payload: bytes, *, wait: bool = True
    ) -> bool:
        """Multicast; with wait=False return False instead of waiting for room."""
        while True:
            if self.client_try_mcast(client_id, group, payload):
                return True
            if not wait:
                return False
            await self._wait_room()

    def client_try_mcast(self, client_id: int, group: bytes, payload: bytes) -> bool:
        """Multicast now if there is room (True), else False; never waits.

        The IPC server's per-request fast path: no coroutine per message."""
        if self._closed:
            raise CpgError(ErrorCode.LIBRARY, "CPG service is closed")
        if client_id not in self._sinks:
            raise CpgError(ErrorCode.BAD_HANDLE, "client is disconnected")
        if len(self._pending) + self._unpumped < self._pending_limit and self.core.mcast(
            client_id, group, payload
        ):
            if self._batch_depth:
                # Counted as pending until the pump hands it to Totem.
                self._unpumped += 1
                self._batch_dirty = True
            else:
                self._pump()
            return True
        return False

    def begin_batch(self) -> None:
        """Until the matching end_batch(), accepted mcasts are handed to Totem
        together (one pump) rather than one by one: the IPC server brackets
        each read of requests with these. Order is unchanged (the core queues
        them in call order); only the hand-off is later, within the same call."""
        self._batch_depth += 1

    def end_batch(self) -> None:
        self._batch_depth -= 1
        if self._batch_depth == 0 and self._batch_dirty:
            self._batch_dirty = False
            self._pump()

    def close_client(self, client_id: int) -> None:
        """The client is gone: groups it did not leave see it as PROCDOWN. Idempotent."""
        self._handles.pop(client_id, None)
        if self._sinks.pop(client_id, None) is None:
            return
        self.core.client_disconnected(client_id)
        self._pump()

    # ------------------------------------------------------------ engine side

    def _on_totem_event(self, event: tuple[object, ...]) -> None:
        self.core.totem_event(event)
        self._pump()

    def _on_totem_events(self, events: list[tuple[object, ...]]) -> None:
        self.core.totem_events(events)
        self._pump()

    def _pump(self) -> None:
        # A sink or node.submit may call back into the service; the flag turns
        # that re-entry into another round of the outer loop.
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        self._unpumped = 0
        core, sinks = self.core, self._sinks
        try:
            while True:
                self._pump_again = False
                outbox = core.pop_outbox()
                if outbox:
                    self._pending.extend(outbox)
                if self._pending:
                    self._submit_pending()
                for client_id, event in core.pop_events():
                    sink = sinks.get(client_id)
                    if sink is not None:
                        try:
                            sink(event)
                        except Exception:
                            # One broken client must not stop the node's Totem
                            # listener: log it and drop that client (PROCDOWN).
                            log.exception("CPG: event sink of client %d raised", client_id)
                            self.close_client(client_id)
                if not self._pump_again:
                    break
        finally:
            self._pumping = False
        if self._room_waiters:
            self._wake_room()

    def _submit_pending(self) -> None:
        while self._pending:
            try:
                accepted = self.node.submit(self._pending[0])
            except UsageError:
                log.exception("CPG: Totem refused a payload; dropping it")
                accepted = True
            if not accepted:
                if self._flusher is None or self._flusher.done():
                    self._flusher = asyncio.get_running_loop().create_task(self._flush_later())
                return
            self._pending.popleft()

    async def _flush_later(self) -> None:
        try:
            while self._pending and not self._closed:
                await self.node.wait_writable()
                self._pump()
        except UsageError as exc:
            # The node stopped: nothing will be sent any more; waiters learn it
            # from close() when the engine shuts the service down.
            log.warning("CPG: %d payloads not sent: %s", len(self._pending), exc)

    async def _wait_room(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.append(future)
        await future

    def _wake_room(self) -> None:
        # Waiters re-check their condition; a woken waiter with no room sleeps
        # again until the next Totem event or flush, so nothing spins.
        waiters, self._room_waiters = self._room_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)


class CpgHandle:
    """One process's membership of one group, inside the node process."""

    def __init__(
        self,
        service: CpgService,
        group: bytes,
        pid: int,
        callback: EventSink | None,
        queue_limit: int,
    ) -> None:
        if queue_limit < 1:
            raise UsageError("queue_limit must be at least 1")
        self.service = service
        self.group = group
        self.pid = pid
        self.nodeid = service.nodeid
        self.client_id = 0
        self._callback = callback
        self._queue: deque[CpgEvent] = deque()
        self._queue_limit = queue_limit
        self._waiter: asyncio.Future[None] | None = None
        self._left: asyncio.Future[None] | None = None
        self._joined = False
        self._joined_waiters: list[asyncio.Future[None]] = []
        self.closed = False
        self.error: CpgError | None = None

    async def mcast(self, data: bytes, *, wait: bool = True) -> None:
        """Send `data` to the group (the sender receives it too). Waits while the
        node pushes back; with wait=False raises CpgError(TRY_AGAIN) instead."""
        self._check_open()
        if not await self.service.client_mcast(self.client_id, self.group, bytes(data),
                                               wait=wait):
            raise CpgError(ErrorCode.TRY_AGAIN, "flow control: try again")

    async def leave(self) -> None:
        """Leave the group; returns once the own confchg (reason LEAVE) arrived."""
        self._check_open()
        self._left = asyncio.get_running_loop().create_future()
        self.service.client_leave(self.client_id, self.group)
        await self._left
        self.service.close_client(self.client_id)

    async def wait_joined(self) -> None:
        """Return once the own JOIN (or NODEUP at sync) confchg arrived."""
        while not self._joined:
            self._check_open()
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._joined_waiters.append(future)
            await future

    def members(self) -> tuple[Member, ...]:
        return self.service.members(self.group)

    def close(self) -> None:
        """Go away without leaving: the others see PROCDOWN."""
        if not self.closed:
            self.service.close_client(self.client_id)
            self._finish(None)

    async def events(self) -> AsyncIterator[CpgEvent]:
        """Events in order; ends after the own leave, raises if disconnected."""
        while True:
            if self._queue:
                yield self._queue.popleft()
                continue
            if self.closed:
                if self.error is not None:
                    raise self.error
                return
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    # ------------------------------------------------------------ from the service

    def _on_event(self, event: CpgEvent) -> None:
        if self.closed:
            return  # after the own leave, an overflow or close(): nothing more
        if isinstance(event, ConfChg):
            self._note_own_change(event)
        if self._callback is not None:
            try:
                self._callback(event)
            except Exception:
                log.exception("CPG: event callback of group %r raised", self.group)
        elif len(self._queue) >= self._queue_limit:
            log.error(
                "CPG: client pid %d in group %r did not read %d events; disconnecting it",
                self.pid, self.group, self._queue_limit,
            )
            self.service.close_client(self.client_id)
            self._finish(CpgError(ErrorCode.NO_SPACE, "event queue overflow: disconnected"))
            return
        else:
            self._queue.append(event)
        self._wake()
        if self.closed and self._left is not None and not self._left.done():
            self._left.set_result(None)

    def _note_own_change(self, event: ConfChg) -> None:
        me = (self.nodeid, self.pid)
        if any((m.nodeid, m.pid) == me for m in event.joined):
            self._joined = True
            for future in self._joined_waiters:
                if not future.done():
                    future.set_result(None)
            self._joined_waiters = []
        if any((m.nodeid, m.pid) == me for m in event.left):
            self.closed = True

    def _finish(self, error: CpgError | None) -> None:
        if not self.closed:
            self.error = error
        self.closed = True
        self._wake()
        for future in [self._left, *self._joined_waiters]:
            if future is not None and not future.done():
                future.set_exception(error or CpgError(ErrorCode.BAD_HANDLE, "handle closed"))
        self._joined_waiters = []

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _check_open(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise CpgError(ErrorCode.BAD_HANDLE, "handle is closed")
