"""`TotemNode`: the asyncio driver of one sans-I/O `TotemCore`.

It owns the clock (time.monotonic_ns), the core's single timer (loop timer
re-armed to `core.next_deadline_ns()` after every input), the durable ring
sequence number (`state_dir/ringid_<nodeid>`: written, fsynced and renamed
into place *before* any packet that depends on it leaves: persist, then
send), and the hand-off between the transport and the core:

- the transport hands over every packet received in one loop iteration as one
  batch; the node feeds them all to the core and then flushes the outbox and
  the events once (catch-up batching);
- `submit(payload) -> bool` queues an application message; False means the
  core's send queue is full, and `await wait_writable()` waits for room;
- `add_listener(callable)` receives every core event tuple
  (`EV_DELIVER`/`EV_CONFIG`, see `_core.pyi`) in order;
  `add_batch_listener(callable)` receives them as one list per input (a
  token visit's deliveries in one call), in order;
- `stop()` leaves the ring gracefully, flushes the leave packets, and closes
  the transport.

A listener that raises is a bug in the process: the exception stops the node
(`failed` is set and `wait_stopped()` re-raises it) rather than leaving the
application with a hole in its delivery stream.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from corral.errors import InvariantError, UsageError
from corral.totem.config import TotemTimers

# The core's delivery event kind (corral.totem._core.EV_DELIVER, fixed by its contract).
EV_DELIVER = 1
LAG_PROBE_INTERVAL_S = 0.1
LEAVE_DRAIN_S = 0.05

Listener = Callable[[tuple[Any, ...]], None]
BatchListener = Callable[[list[tuple[Any, ...]]], None]


class CoreLike(Protocol):
    """The part of `corral.totem._core.TotemCore` the driver uses."""

    nodeid: int

    def start(self, now_ns: int) -> None: ...
    def receive(self, now_ns: int, packet: bytes) -> None: ...
    def submit(self, payload: bytes) -> bool: ...
    def tick(self, now_ns: int) -> None: ...
    def leave(self, now_ns: int) -> None: ...
    def next_deadline_ns(self) -> int: ...
    def pop_outbox(self) -> list[tuple[int, bytes]]: ...
    def pop_events(self) -> list[tuple[object, ...]]: ...
    def take_ring_seq_to_persist(self) -> int | None: ...
    @property
    def state(self) -> int: ...
    @property
    def ring_id(self) -> tuple[int, int]: ...
    @property
    def members(self) -> tuple[int, ...]: ...
    @property
    def send_queue_room(self) -> int: ...
    def stats(self) -> dict[str, int]: ...


class TransportLike(Protocol):
    on_batch: Callable[[list[tuple[int, bytes]]], None]

    async def start(self) -> None: ...
    def close(self) -> None: ...
    def send(self, dest: int, payload: bytes) -> None: ...
    def link_status(self) -> list[dict[str, object]]: ...
    def stats(self) -> dict[str, int]: ...


CoreFactory = Callable[[int, TotemTimers, int], CoreLike]


def ring_seq_path(state_dir: str, nodeid: int) -> str:
    return os.path.join(state_dir, f"ringid_{nodeid}")


def load_ring_seq(state_dir: str, nodeid: int) -> int:
    """The persisted ring sequence number, 0 when there is none yet."""
    try:
        with open(ring_seq_path(state_dir, nodeid), encoding="ascii") as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        raise InvariantError(f"{ring_seq_path(state_dir, nodeid)} is corrupt: {text[:40]!r}")
    return int(text)


def store_ring_seq(state_dir: str, nodeid: int, ring_seq: int) -> None:
    """Write, fsync, rename, fsync the directory: on disk before returning."""
    path = ring_seq_path(state_dir, nodeid)
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{ring_seq}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def default_core_factory(nodeid: int, timers: TotemTimers, ring_seq: int) -> CoreLike:
    from corral.totem._core import TotemCore

    return TotemCore(nodeid, timers, ring_seq=ring_seq)


def state_name(state: int) -> str:
    try:
        from corral.totem._core import state_name as core_state_name

        return core_state_name(state)
    except (ImportError, ValueError, KeyError):
        return str(state)


class TotemNode:
    def __init__(
        self,
        nodeid: int,
        timers: TotemTimers,
        transport: TransportLike,
        state_dir: str,
        core_factory: CoreFactory = default_core_factory,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.nodeid = nodeid
        self.state_dir = state_dir
        self.transport = transport
        self.clock_ns = clock_ns
        os.makedirs(state_dir, exist_ok=True)
        self.core = core_factory(nodeid, timers, load_ring_seq(state_dir, nodeid))
        # In registration order: (True, batch listener) or (False, per-event listener).
        self._listeners: list[tuple[bool, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline_ns = -1
        self._flush_scheduled = False
        self._writable = asyncio.Event()
        self._stopped = asyncio.Event()
        self._lag_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: BaseException | None = None
        self.running = False
        self.counters = {
            "packets_in": 0, "packets_out": 0, "batches": 0, "events": 0,
            "ring_seq_writes": 0, "timer_fires": 0, "submit_rejected": 0,
        }
        self.lag = {"loop_lag_max_us": 0, "loop_lag_last_us": 0, "timer_late_max_us": 0}

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self.running:
            raise UsageError("node already started")
        self._loop = asyncio.get_running_loop()
        self.transport.on_batch = self._on_batch
        await self.transport.start()
        self.running = True
        self.core.start(self.clock_ns())
        self._after_input()
        self._lag_task = asyncio.create_task(self._probe_loop_lag())

    async def stop(self, leave: bool = True) -> None:
        """Leave the ring gracefully (unless `leave` is False), then close everything."""
        if not self.running:
            return
        if leave and self.failed is None:
            try:
                self.core.leave(self.clock_ns())
            except UsageError:
                pass  # already stopped: nothing to announce
            except BaseException as error:
                self._fail(error)
                raise
            self._after_input()
            await asyncio.sleep(LEAVE_DRAIN_S)  # let the leave packets reach the sockets
        if self.running:
            self._shutdown()

    def _shutdown(self) -> None:
        self.running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lag_task is not None:
            self._lag_task.cancel()
        self.transport.close()
        self._writable.set()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
        if self.failed is not None:
            raise self.failed

    # ---- application API -----------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append((False, listener))

    def add_batch_listener(self, listener: BatchListener) -> None:
        """`listener(events)` with the (non-empty) lists of events of each input, in order.

        An input's events come as runs of deliveries, each configuration event in
        a list of its own, and every listener (batch or not) gets each such run
        in registration order: so, as with per-event listeners only, a listener
        registered earlier has seen every configuration change up to the events
        a later one is handed, and none after them."""
        self._listeners.append((True, listener))

    def submit(self, payload: bytes) -> bool:
        if not self.running:
            raise UsageError("node is not running")
        accepted = self.core.submit(payload)
        if accepted:
            self._schedule_flush()
        else:
            self.counters["submit_rejected"] += 1
            self._writable.clear()
        return accepted

    async def wait_writable(self) -> None:
        """Return when the core's send queue has room again (or the node stopped).

        After a rejected submit this waits for the core to process at least one
        more input, even if `send_queue_room` counts free message slots: the
        core may have refused for its byte limit, and returning at once would
        make the caller spin."""
        while self.running and (not self._writable.is_set() or self.core.send_queue_room <= 0):
            self._writable.clear()
            await self._writable.wait()
        if not self.running:
            raise UsageError("node stopped")

    # ---- driving the core ----------------------------------------------------

    def _on_batch(self, batch: list[tuple[int, bytes]]) -> None:
        if not self.running:
            return
        now_ns = self.clock_ns()
        try:
            for _sender, packet in batch:
                self.core.receive(now_ns, packet)
        except BaseException as error:
            self._fail(error)
            raise
        self.counters["packets_in"] += len(batch)
        self.counters["batches"] += 1
        self._after_input()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline_ns = -1
        if not self.running:
            return
        now_ns = self.clock_ns()
        deadline_ns = self.core.next_deadline_ns()
        if deadline_ns >= 0:
            late_us = max(0, now_ns - deadline_ns) // 1000
            self.lag["timer_late_max_us"] = max(self.lag["timer_late_max_us"], late_us)
        self.counters["timer_fires"] += 1
        try:
            self.core.tick(now_ns)
        except BaseException as error:
            self._fail(error)
            raise
        self._after_input()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        if self.running:
            self._after_input()

    def _after_input(self) -> None:
        """Persist, then send, then deliver, then re-arm the timer."""
        try:
            ring_seq = self.core.take_ring_seq_to_persist()
            if ring_seq is not None:
                store_ring_seq(self.state_dir, self.nodeid, ring_seq)
                self.counters["ring_seq_writes"] += 1
            outbox = self.core.pop_outbox()
            for dest, packet in outbox:
                self.transport.send(dest, packet)
            self.counters["packets_out"] += len(outbox)
            self._dispatch(self.core.pop_events())
            self._arm_timer()
        except BaseException as error:
            self._fail(error)
            raise
        if self.core.send_queue_room > 0:
            self._writable.set()

    def _fail(self, error: BaseException) -> None:
        """A core or listener exception is a bug: stop rather than continue wrong."""
        if self.failed is None:
            self.failed = error
        if self.running:
            self._shutdown()

    def _dispatch(self, events: list[tuple[object, ...]]) -> None:
        if not events:
            return
        self.counters["events"] += len(events)
        start = 0
        for index, event in enumerate(events):
            if event[0] != EV_DELIVER:
                if index > start:
                    self._dispatch_run(events[start:index] if start or index < len(events)
                                       else events)
                self._dispatch_run([event])
                start = index + 1
        if start < len(events):
            self._dispatch_run(events[start:] if start else events)

    def _dispatch_run(self, events: list[tuple[object, ...]]) -> None:
        for batch, listener in self._listeners:
            if batch:
                listener(events)
            else:
                for event in events:
                    listener(event)

    def _arm_timer(self) -> None:
        deadline_ns = self.core.next_deadline_ns()
        if deadline_ns == self._timer_deadline_ns or not self.running:
            return
        if deadline_ns < 0 and self._timer is not None:
            # Nothing due: an armed timer may stay; firing early is harmless
            # (the core ticks, finds nothing due, and the timer is re-armed).
            return
        if self._timer is not None and 0 <= self._timer_deadline_ns <= deadline_ns:
            # The deadline moved later (every token visit pushes the token-loss
            # timer forward): keep the earlier timer instead of a cancel and a
            # new TimerHandle per packet; when it fires it re-arms.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline_ns = deadline_ns
        if deadline_ns < 0 or self._loop is None:
            return
        delay_s = max(0, deadline_ns - self.clock_ns()) / 1e9
        self._timer = self._loop.call_later(delay_s, self._on_timer)

    async def _probe_loop_lag(self) -> None:
        """How late the loop runs a 100 ms sleep: a loaded loop delays tokens too."""
        while True:
            before_ns = time.monotonic_ns()
            await asyncio.sleep(LAG_PROBE_INTERVAL_S)
            lag_us = max(0, time.monotonic_ns() - before_ns - int(LAG_PROBE_INTERVAL_S * 1e9))
            lag_us //= 1000
            self.lag["loop_lag_last_us"] = lag_us
            self.lag["loop_lag_max_us"] = max(self.lag["loop_lag_max_us"], lag_us)

    # ---- status --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "running": self.running,
            "state": state_name(self.core.state),
            "ring_id": self.core.ring_id,
            "members": self.core.members,
            "links": self.transport.link_status(),
            "core_stats": self.core.stats(),
            "transport_stats": self.transport.stats(),
            "node_stats": dict(self.counters),
            "lag": dict(self.lag),
        }
