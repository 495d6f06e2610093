"""The Corral side of cpgbench: the same benchmark client, over Corral's CPG Unix socket.

    python bench/corral_client.py bench --socket PATH --nodes N --senders S [--send]
        --size B --duration-ms D [--rate R] [--timeout-ms T] [--settle-ms MS] [--group NAME]
    python bench/corral_client.py watch --socket PATH [--group NAME] [--file ENGINE_LOG]
    python bench/corral_client.py watch-log --file ENGINE_LOG

`bench` and `watch` do what bench/peers/corosync/cpgbench.c does against
corosync, with the same message format (little-endian u32 magic, u32 flags,
u32 nodeid, u32 reserved, u64 seq, u64 CLOCK_MONOTONIC send time, zero
padding), the same counters and the same JSON result fields, so the harness
treats both systems alike. Flow control: where cpgbench sleeps 100 us on
CS_ERR_TRY_AGAIN, this client awaits the library's own backpressure.

`watch-log` (and `watch --file LOG` when no CPG socket appears within 15 s) is
the fallback membership watcher for an engine without the IPC server: it
follows the engine's log and stamps each "Members[N]: ..." line
with the monotonic time at which it was read (polled every 2 ms).

This file is run as a script inside a node's network namespace, so it imports
only the standard library and `corral`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import struct
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.cpg.core import CpgError
from corral.cpg.events import ConfChg, CpgEvent, Deliver, TotemConfChg
from corral.cpg.ipc import CpgClient, CpgClientHandle

MSG_MAGIC = 0x43524C42  # "CRLB"
FLAG_END = 1
HEADER = struct.Struct("<IIIIQQ")
# Latency samples kept per run; past this the sample is the first MAX_SAMPLES.
MAX_SAMPLES = 8_000_000
LOG_POLL_S = 0.002
# mcasts a sender keeps in flight (see Pipeline): by default as many as fit in
# WINDOW_BYTES, at least MIN_WINDOW and at most MAX_WINDOW.
WINDOW_BYTES = 256 * 1024
MIN_WINDOW = 32
MAX_WINDOW = 4096
CONNECT_RETRY_S = 0.05
# How long to wait for the engine's CPG socket to appear.
CONNECT_TIMEOUT_S = 15.0
# How long a finished run waits for a sender still inside mcast.
SENDER_GRACE_S = 2.0
# Past timeout + this, a run reports what it counted even if a library call hangs.
WATCHDOG_EXTRA_S = 5.0
MEMBERSHIP_LINE = re.compile(r"A new membership \(([0-9a-f]+\.[0-9a-f]+)\) was formed")
MEMBERS_LINE = re.compile(r"Members\[(\d+)\]:((?: \d+)*)")


async def open_group(socket_path: str, group: str, timeout_s: float,
                     callback: Callable[[CpgEvent], None] | None = None,
                     ) -> tuple[CpgClient, CpgClientHandle]:
    """Connect to the engine's CPG socket (waiting for it to appear) and join `group`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = await CpgClient.connect(socket_path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(CONNECT_RETRY_S)
    handle = await client.join(group, callback=callback)
    return client, handle


@dataclass
class Stats:
    """What the delivery side counts; mirrors `struct stats` in cpgbench.c."""

    my_nodeid: int
    members: int = 0
    ends: int = 0
    msgs: int = 0
    delivered_bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    gaps: int = 0
    dups: int = 0
    bad: int = 0
    totem_confchgs: int = 0
    cpg_confchgs: int = 0
    next_seq: dict[int, int] = field(default_factory=dict)
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    connection_lost: bool = False

    def deliver(self, nodeid: int, payload: bytes, now_ns: int) -> None:
        if len(payload) < HEADER.size:
            self.bad += 1
            return
        magic, flags, sender, _reserved, seq, send_ns = HEADER.unpack_from(payload)
        if magic != MSG_MAGIC or sender != nodeid:
            self.bad += 1
            return
        if flags & FLAG_END:
            self.ends += 1
            return
        expected = self.next_seq.get(nodeid, 0)
        if seq > expected:
            self.gaps += seq - expected
        elif seq < expected:
            self.dups += 1
        self.next_seq[nodeid] = seq + 1
        if self.msgs == 0:
            self.first_ns = now_ns
        self.last_ns = now_ns
        self.msgs += 1
        self.delivered_bytes += len(payload)
        if nodeid == self.my_nodeid and len(self.latencies_ns) < MAX_SAMPLES:
            self.latencies_ns.append(now_ns - send_ns)


@dataclass
class SendResult:
    sent: int = 0
    start_ns: int = 0
    end_ns: int = 0
    finished: bool = False
    error: str | None = None


def percentile_us(sorted_ns: list[int], fraction: float) -> float:
    if not sorted_ns:
        return -1.0
    rank = min(int(fraction * len(sorted_ns)), len(sorted_ns) - 1)
    return sorted_ns[rank] / 1000.0


def result_record(args: argparse.Namespace, stats: Stats, sending: SendResult,
                  members_ok: bool, client_start_ns: int,
                  cpu_start_s: float = 0.0) -> dict[str, Any]:
    span_s = (stats.last_ns - stats.first_ns) / 1e9 if stats.msgs > 1 else 0.0
    latencies = sorted(stats.latencies_ns)
    blocked = args.send and not sending.finished
    send_end = time.monotonic_ns() if blocked else sending.end_ns
    return {
        "system": "corral", "nodeid": stats.my_nodeid, "sender": bool(args.send),
        "size": args.size, "rate_target": args.rate, "duration_ms": args.duration_ms,
        "msgs": stats.msgs, "bytes": stats.delivered_bytes, "span_s": span_s,
        "msgs_per_s": stats.msgs / span_s if span_s else 0.0,
        "mb_per_s": stats.delivered_bytes / span_s / 1e6 if span_s else 0.0,
        "sent": sending.sent,
        "send_s": (send_end - sending.start_ns) / 1e9 if sending.start_ns else 0.0,
        "try_again": 0, "latency_samples": len(latencies),
        "latency_us_p50": percentile_us(latencies, 0.50),
        "latency_us_p99": percentile_us(latencies, 0.99),
        "latency_us_max": latencies[-1] / 1000.0 if latencies else 0.0,
        "gaps": stats.gaps, "dups": stats.dups, "bad": stats.bad, "ends": stats.ends,
        "complete": stats.ends >= args.senders, "members_ok": members_ok,
        "connection_lost": stats.connection_lost,
        "totem_confchgs": stats.totem_confchgs, "cpg_confchgs": stats.cpg_confchgs,
        "send_error": sending.error, "sender_blocked": blocked,
        "window": args.window or auto_window(args.size),
        "client_start_ns": client_start_ns, "send_start_ns": sending.start_ns,
        "first_ns": stats.first_ns, "last_ns": stats.last_ns,
        # CPU (user + system) of this client from its connection to now.
        "cpu_s": time.process_time() - cpu_start_s if cpu_start_s else 0.0,
    }


class Pipeline:
    """Keeps up to `window` mcasts in flight on one handle.

    cpg_mcast_joined hands a message to corosync's IPC ring and returns
    without waiting for an answer (flow control aside). CpgClientHandle.
    mcast_nowait is the same: it queues the request at once (order kept) and
    returns a future of the node's answer; this keeps at most `window` of
    those futures open, waiting for the oldest when the window is full.
    The default window is counted in bytes (`auto_window`): a bounded IPC
    buffer the sender fills without waiting for each answer, as
    cpg_mcast_joined fills corosync's, so the pipeline depth does not depend
    on how quickly a loaded machine schedules the answers.
    """

    def __init__(self, handle: CpgClientHandle, window: int) -> None:
        self.handle = handle
        self.window = window
        self.in_flight: collections.deque[asyncio.Future[None]] = collections.deque()

    async def send(self, data: bytes) -> None:
        while self.in_flight and self.in_flight[0].done():
            self.in_flight.popleft().result()  # raises the first refusal
        if len(self.in_flight) >= self.window:
            await self.in_flight.popleft()
        self.in_flight.append(self.handle.mcast_nowait(data))

    async def drain(self) -> None:
        while self.in_flight:
            await self.in_flight.popleft()


def auto_window(size: int) -> int:
    """mcasts in flight by default for `size`-byte messages."""
    return max(MIN_WINDOW, min(MAX_WINDOW, WINDOW_BYTES // size))


async def send_loop(handle: CpgClientHandle, args: argparse.Namespace,
                    result: SendResult) -> None:
    """Multicast for duration_ms (flat out or paced), then one END message."""
    loop = asyncio.get_running_loop()
    pipeline = Pipeline(handle, args.window or auto_window(args.size))
    padding = bytes(args.size - HEADER.size)
    period_s = 1.0 / args.rate if args.rate else 0.0
    result.start_ns = time.monotonic_ns()
    start_s = loop.time()
    stop_ns = result.start_ns + args.duration_ms * 1_000_000
    seq = 0
    try:
        while True:
            if period_s:
                delay_s = start_s + seq * period_s - loop.time()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
            now_ns = time.monotonic_ns()
            if now_ns >= stop_ns:
                break
            await pipeline.send(HEADER.pack(MSG_MAGIC, 0, handle.nodeid, 0, seq, now_ns) + padding)
            seq += 1
            result.sent = seq
        result.end_ns = time.monotonic_ns()
        await pipeline.send(HEADER.pack(MSG_MAGIC, FLAG_END, handle.nodeid, 0, seq,
                                        time.monotonic_ns()) + padding)
        await pipeline.drain()
    except (CpgError, ConnectionError, OSError) as error:
        result.error = str(error)
        result.end_ns = result.end_ns or time.monotonic_ns()
    result.finished = True


class BenchRun:
    """One `bench` run: the delivery callback and the waits around the sender."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stats = Stats(my_nodeid=0)
        self.sending = SendResult()
        self.members_reached = asyncio.Event()
        self.all_ended = asyncio.Event()
        self.cpu_start_s = 0.0

    def on_event(self, event: CpgEvent) -> None:
        """Called by the client library for every event, in delivery order."""
        stats = self.stats
        if isinstance(event, Deliver):
            stats.deliver(event.nodeid, event.payload, time.monotonic_ns())
            if stats.ends >= self.args.senders:
                self.all_ended.set()
        elif isinstance(event, ConfChg):
            stats.cpg_confchgs += 1
            stats.members = len(event.members)
            if stats.members >= self.args.nodes:
                self.members_reached.set()
        elif isinstance(event, TotemConfChg):
            stats.totem_confchgs += 1

    async def wait(self, event: asyncio.Event, client: CpgClient, deadline_s: float) -> bool:
        """Wait for event until the deadline (loop time) or until the connection drops."""
        loop = asyncio.get_running_loop()
        while not event.is_set():
            remaining_s = deadline_s - loop.time()
            if remaining_s <= 0 or client.closed:
                self.stats.connection_lost = client.closed
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining_s, 0.1))
        return True

    async def run(self) -> dict[str, Any]:
        """The run, bounded: past the timeout, report what was counted (like cpgbench)."""
        client_start_ns = time.monotonic_ns()
        try:
            return await asyncio.wait_for(self._run(client_start_ns),
                                          self.args.timeout_ms / 1000 + WATCHDOG_EXTRA_S)
        except (TimeoutError, FileNotFoundError, ConnectionRefusedError, CpgError) as error:
            record = result_record(self.args, self.stats, self.sending,
                                   self.members_reached.is_set(), client_start_ns)
            record["error"] = f"{type(error).__name__}: {error}" if str(error) else \
                f"{type(error).__name__}: the engine did not answer in time"
            return record

    async def _run(self, client_start_ns: int) -> dict[str, Any]:
        args = self.args
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + args.timeout_ms / 1000
        client, handle = await open_group(args.socket, args.group,
                                          min(args.timeout_ms / 1000, CONNECT_TIMEOUT_S),
                                          self.on_event)
        self.stats.my_nodeid = client.nodeid
        self.cpu_start_s = time.process_time()
        members_ok = await self.wait(self.members_reached, client, deadline_s)
        sender: asyncio.Task[None] | None = None
        if members_ok and args.send:
            await asyncio.sleep(args.settle_ms / 1000)
            sender = asyncio.create_task(send_loop(handle, args, self.sending))
        await self.wait(self.all_ended, client, deadline_s)
        if sender is not None and not sender.done():
            await asyncio.wait([sender], timeout=SENDER_GRACE_S)
        record = result_record(args, self.stats, self.sending, members_ok, client_start_ns,
                               self.cpu_start_s)
        if sender is not None:
            sender.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.close(), SENDER_GRACE_S)
        return record


async def run_watch(args: argparse.Namespace) -> bool:
    """Print membership events; False if the engine has no CPG socket (fall back to its log)."""
    try:
        _client, handle = await open_group(args.socket, args.group, CONNECT_TIMEOUT_S)
    except (FileNotFoundError, ConnectionRefusedError) as error:
        if not args.file:
            raise
        emit({"event": "fallback", "t_ns": time.monotonic_ns(), "reason": str(error)})
        return False
    emit({"event": "joined", "t_ns": time.monotonic_ns()})
    try:
        async for event in handle.events():
            now_ns = time.monotonic_ns()
            if isinstance(event, TotemConfChg):
                rep, seq = event.ring_id
                emit({"event": "ring", "t_ns": now_ns, "ring": f"{rep:x}.{seq:x}",
                      "members": list(event.members)})
            elif isinstance(event, ConfChg):
                emit({"event": "group", "t_ns": now_ns,
                      "members": [[m.nodeid, m.reason] for m in event.members],
                      "left": [[m.nodeid, m.reason] for m in event.left],
                      "joined": [[m.nodeid, m.reason] for m in event.joined]})
    except (CpgError, ConnectionError, OSError) as error:
        emit({"event": "exit", "t_ns": time.monotonic_ns(), "error": str(error)})
        return True
    emit({"event": "exit", "t_ns": time.monotonic_ns(), "error": None})
    return True


def follow_log(path: str) -> None:
    """Print a ring event for every 'Members[N]: ...' line appended to the engine log."""
    ring = "?"
    while True:
        try:
            handle = open(path, encoding="utf-8", errors="replace")
            break
        except FileNotFoundError:
            time.sleep(0.05)
    emit({"event": "joined", "t_ns": time.monotonic_ns()})
    buffer = ""
    with handle:
        while True:
            chunk = handle.read()
            if not chunk:
                time.sleep(LOG_POLL_S)
                continue
            now_ns = time.monotonic_ns()
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                found = MEMBERSHIP_LINE.search(line)
                if found:
                    ring = found.group(1)
                members = MEMBERS_LINE.search(line)
                if members:
                    emit({"event": "ring", "t_ns": now_ns, "ring": ring,
                          "members": [int(n) for n in members.group(2).split()]})


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="corral_client")
    parser.add_argument("mode", choices=("bench", "watch", "watch-log"))
    parser.add_argument("--socket", help="the engine's CPG IPC socket")
    parser.add_argument("--file", help="engine log to follow (watch-log)")
    parser.add_argument("--group", default=None)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--send", action="store_true")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--duration-ms", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=0)
    parser.add_argument("--timeout-ms", type=int, default=120_000)
    parser.add_argument("--settle-ms", type=int, default=500)
    parser.add_argument("--window", type=int, default=0,
                        help="mcasts in flight (1: wait for each reply; 0, the default: "
                        f"{WINDOW_BYTES // 1024} KiB worth, {MIN_WINDOW}..{MAX_WINDOW})")
    args = parser.parse_args(argv)
    if args.group is None:
        args.group = "bench-watch" if args.mode == "watch" else "bench"
    if args.mode in ("bench", "watch") and not args.socket:
        parser.error("--socket is required")
    if args.mode == "watch-log" and not args.file:
        parser.error("--file is required")
    if not 0 <= args.window <= MAX_WINDOW:
        parser.error(f"--window must be in [0, {MAX_WINDOW}]")
    if not HEADER.size <= args.size <= 1 << 20:
        parser.error(f"--size must be in [{HEADER.size}, 1 MiB]")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.mode == "watch-log":
        follow_log(args.file)
        return 0
    import uvloop

    if args.mode == "watch":
        if not uvloop.run(run_watch(args)):
            follow_log(args.file)
        return 0
    emit(uvloop.run(BenchRun(args).run()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
