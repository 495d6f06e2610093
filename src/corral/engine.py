"""`corral engine`: run one Totem node (transport + TotemNode, plus CPG when present).

    corral engine --config corosync.conf --nodeid N --keyfile K --state-dir D
                  [--ipc-socket PATH] [--log-deliveries FILE] [--load RATE:SIZE]
                  [--stats-interval S]
    corral engine --generate-key PATH [--key-bytes N]
    corral engine --print-status --state-dir D

Logs membership changes as corosync does ("A new membership (1.e) was formed.
Members joined: 2 3", "Members[3]: 1 2 3") and message rates every
`--stats-interval` seconds. SIGTERM or SIGINT: leave the ring gracefully, exit 0.
`state_dir/status.json` is rewritten every second (ring, members, links,
counters) for tools and tests.

Test/benchmark options: `--load RATE:SIZE` submits RATE messages per second of
SIZE bytes (at least LOAD_HEADER.size) carrying (nodeid, counter, send time);
`--log-deliveries FILE` writes one line per delivered load message,
`D <sender> <life> <counter>` (life changes when the sender restarts), and one per
regular configuration, `C <rep>.<seq hex>
<members,...>`, so streams of different nodes can be compared for total order.
Load messages start with LOAD_MAGIC, a byte no CPG message starts with, so the
CPG service never sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from corral.corosync_conf import ClusterConfig, parse
from corral.errors import ConfigError, CorralError
from corral.totem import auth
from corral.totem.config import TotemTimers
from corral.totem.node import TotemNode
from corral.totem.transport import UdpTransport

log = logging.getLogger("corral.engine")

LOAD_MAGIC = 0xB7
# magic, sender nodeid, sender life (low 32 bits of its incarnation ms), counter, send time ns
LOAD_HEADER = struct.Struct(">BIIQQ")
EV_DELIVER, EV_CONFIG, CONF_REGULAR = 0, 1, 1  # replaced by the core's values below
LOAD_TICK_S = 0.01
STATUS_INTERVAL_S = 1.0
DEFAULT_KEYFILE = "/etc/corosync/authkey"


def _core_constants() -> None:
    global EV_DELIVER, EV_CONFIG, CONF_REGULAR
    from corral.totem import _core

    EV_DELIVER, EV_CONFIG = _core.EV_DELIVER, _core.EV_CONFIG
    CONF_REGULAR = _core.CONF_REGULAR


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="corral engine", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="corosync.conf")
    parser.add_argument("--nodeid", type=int, help="this node's nodeid in the nodelist")
    parser.add_argument("--keyfile", help=f"cluster key (default: totem.keyfile or {DEFAULT_KEYFILE})")
    parser.add_argument("--state-dir", help="directory for ringid_<nodeid> and status.json "
                        "(default: system.state_dir of the config)")
    parser.add_argument("--ipc-socket", help="unix socket of the CPG IPC server")
    parser.add_argument("--log-deliveries", metavar="FILE")
    parser.add_argument("--load", metavar="RATE:SIZE", help="messages/s and bytes each")
    parser.add_argument("--stats-interval", type=float, default=5.0, metavar="S")
    parser.add_argument("--generate-key", metavar="PATH", help="write a new key file and exit")
    parser.add_argument("--print-status", action="store_true",
                        help="print the links and ring of the engine using --state-dir, and exit")
    parser.add_argument("--key-bytes", type=int, default=auth.KEY_DEFAULT_BYTES)
    args = parser.parse_args(argv)
    if args.print_status:
        required: tuple[str, ...] = ("state_dir",)
    elif args.generate_key is None:
        required = ("config", "nodeid")
    else:
        required = ()
    if required:
        missing = [f"--{n.replace('_', '-')}" for n in required if getattr(args, n) is None]
        if missing:
            parser.error(f"missing {', '.join(missing)}")
    if args.load is not None:
        args.load_rate, args.load_size = parse_load(args.load)
    return args


def parse_load(text: str) -> tuple[float, int]:
    try:
        rate_text, size_text = text.split(":")
        rate, size = float(rate_text), int(size_text)
    except ValueError:
        raise ConfigError("--load", f"expected RATE:SIZE, got {text!r}") from None
    if not 0 < rate <= 1_000_000 or not LOAD_HEADER.size <= size <= 1 << 20:
        raise ConfigError("--load", f"rate must be in (0, 1e6], size in [{LOAD_HEADER.size}, 1 MiB]")
    return rate, size


def ring_text(ring_id: tuple[int, int]) -> str:
    """corosync prints ring ids as '<representative>.<seq in hex>'."""
    return f"{ring_id[0]:x}.{ring_id[1]:x}"


def next_incarnation(state_dir: str, nodeid: int) -> int:
    """Wall-clock ns, but always above the last one used (durably recorded)."""
    path = os.path.join(state_dir, f"incarnation_{nodeid}")
    previous = 0
    with contextlib.suppress(FileNotFoundError, ValueError):
        with open(path, encoding="ascii") as handle:
            previous = int(handle.read().strip())
    incarnation = max(time.time_ns(), previous + 1)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="ascii") as handle:
        handle.write(f"{incarnation}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return incarnation


# corosync hands knet totem packets of up to 64 KiB (knet fragments them into
# path-MTU datagrams); Corral's knet transport leaves fragmentation to the
# kernel's IP layer. Largest value TotemConfig accepts; see docs/transport.md.
KNET_DEFAULT_NETMTU = 65_000


def totem_timers(config: ClusterConfig, config_path: str | None) -> TotemTimers:
    """The core's timers; netmtu defaults to KNET_DEFAULT_NETMTU for transport knet.

    An explicit `totem.netmtu` wins, and `transport: udpu` keeps the
    1500-byte-MTU default (corosync does the same)."""
    timers = config.totem.timers(len(config.nodes))
    if config_path is None:
        return timers
    with open(config_path, encoding="utf-8") as handle:
        totem = parse(handle.read(), config_path).section("totem")
    options = totem.options if totem is not None else {}
    if "netmtu" in options or options.get("transport", "knet") != "knet":
        return timers
    return dataclasses.replace(timers, netmtu=KNET_DEFAULT_NETMTU)


class Engine:
    """One node process: wiring, logs, load generation and delivery records."""

    def __init__(self, args: argparse.Namespace, config: ClusterConfig, key: bytes) -> None:
        self.args = args
        self.config = config
        self.nodeid: int = args.nodeid
        config.node(self.nodeid)  # fails early with a clear error if absent
        os.makedirs(args.state_dir, exist_ok=True)
        nodeids = [n.nodeid for n in config.nodes]
        incarnation = next_incarnation(args.state_dir, self.nodeid)
        self.auth = auth.PacketAuthenticator(key, config.cluster_name, self.nodeid,
                                             incarnation, nodeids, encrypt=config.encrypt)
        self.transport = UdpTransport(config, self.nodeid, self.auth)
        self.transport.on_link_change = self._on_link_change
        timers = totem_timers(config, args.config)
        self.node = TotemNode(self.nodeid, timers, self.transport, args.state_dir)
        self.node.add_batch_listener(self._on_events)
        self.members: tuple[int, ...] = ()
        self.deliveries: TextIO | None = None
        self.delivered = 0
        self.load_sent = 0
        self.latency_sum_ns = 0
        self.latency_count = 0
        self.cpg: Any = None
        self.ipc: Any = None
        self.stop_requested = asyncio.Event()

    # ---- events --------------------------------------------------------------

    def _on_link_change(self, peer: Any) -> None:
        log.info("link %d to node %d is %s", peer.linknumber, peer.nodeid, peer.state.value)

    def _on_events(self, events: list[tuple[Any, ...]]) -> None:
        if events[0][0] == EV_DELIVER and self.deliveries is None and self.args.load is None:
            # TotemNode hands deliveries in runs (a configuration event comes
            # alone), and without a delivery log or own load, load messages only
            # count: no per-message work.
            self.delivered += len(events)
            return
        for event in events:
            if event[0] == EV_DELIVER:
                self.delivered += 1
                payload = event[2]
                if len(payload) >= LOAD_HEADER.size and payload[0] == LOAD_MAGIC:
                    self._on_load(payload)
            elif event[0] == EV_CONFIG:
                self._on_config(event)

    def _on_load(self, payload: bytes) -> None:
        _magic, origin, life, counter, sent_ns = LOAD_HEADER.unpack_from(payload)
        if self.deliveries is not None:
            self.deliveries.write(f"D {origin} {life} {counter}\n")
        if origin == self.nodeid:
            self.latency_sum_ns += time.monotonic_ns() - sent_ns
            self.latency_count += 1

    def _on_config(self, event: tuple[Any, ...]) -> None:
        _kind, conf_kind, ring_id, members, joined, left = event[:6]
        if conf_kind != CONF_REGULAR:
            return
        text = f"A new membership ({ring_text(ring_id)}) was formed."
        if joined:
            text += " Members joined: " + " ".join(map(str, joined))
        if left:
            text += " Members left: " + " ".join(map(str, left))
        log.info(text)
        log.info("Members[%d]: %s", len(members), " ".join(map(str, members)))
        self.members = tuple(members)
        if self.deliveries is not None:
            self.deliveries.write(f"C {ring_text(ring_id)} {','.join(map(str, members))}\n")
            self.deliveries.flush()

    # ---- tasks ---------------------------------------------------------------

    async def _generate_load(self, rate: float, size: int) -> None:
        """Submit `rate` messages per second, catching up after backpressure."""
        padding = bytes(size - LOAD_HEADER.size)
        life = (self.auth.incarnation // 1_000_000) & 0xFFFF_FFFF
        loop = asyncio.get_running_loop()
        start_s = loop.time()
        while True:
            due = int((loop.time() - start_s) * rate)
            while self.load_sent < due:
                header = LOAD_HEADER.pack(LOAD_MAGIC, self.nodeid, life, self.load_sent + 1,
                                          time.monotonic_ns())
                if not self.node.submit(header + padding):
                    await self.node.wait_writable()
                    continue
                self.load_sent += 1
            await asyncio.sleep(LOAD_TICK_S)

    async def _report(self) -> None:
        """Periodic log line with rates; status.json every second."""
        interval_s = self.args.stats_interval
        last = (time.monotonic(), 0, 0)
        next_log_s = last[0] + interval_s
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self.write_status()
            if self.deliveries is not None:
                self.deliveries.flush()
            now_s = time.monotonic()
            if now_s < next_log_s:
                continue
            next_log_s = now_s + interval_s
            elapsed_s = now_s - last[0]
            delivered_rate = (self.delivered - last[1]) / elapsed_s
            sent_rate = (self.load_sent - last[2]) / elapsed_s
            latency = (self.latency_sum_ns / self.latency_count / 1e6) if self.latency_count else 0
            self.latency_sum_ns = self.latency_count = 0
            log.info("rates: delivered %.0f msg/s, load sent %.0f msg/s, self-delivery latency "
                     "%.2f ms, members %s", delivered_rate, sent_rate, latency,
                     " ".join(map(str, self.members)) or "-")
            last = (now_s, self.delivered, self.load_sent)

    def write_status(self) -> None:
        status = self.node.status()
        status.update(delivered=self.delivered, load_sent=self.load_sent, pid=os.getpid())
        if self.cpg is not None:
            status["cpg"] = self.cpg.stats()
        path = os.path.join(self.args.state_dir, "status.json")
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(status, handle, default=str)
        os.replace(path + ".tmp", path)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_requested.set)
        if self.args.log_deliveries:
            self.deliveries = open(self.args.log_deliveries, "a", encoding="ascii")
        await self._start_cpg()
        await self.node.start()
        log.info("node %d started (cluster %s, %d nodes, %d link(s), %s)", self.nodeid,
                 self.config.cluster_name, len(self.config.nodes), len(self.config.links),
                 "aes-256-gcm" if self.config.encrypt else "blake2b mac")
        tasks = [asyncio.create_task(self._report())]
        if self.args.load is not None:
            tasks.append(asyncio.create_task(
                self._generate_load(self.args.load_rate, self.args.load_size)))
        stopped = asyncio.create_task(self.node.wait_stopped())
        requested = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait([stopped, requested], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        status = 0
        failure = stopped.exception() if stopped.done() else None
        if self.ipc is not None:
            await self.ipc.close()
        if self.cpg is not None:
            await self.cpg.close()
        if failure is not None:
            log.error("node failed: %r", failure)
            status = 1
        else:
            log.info("leaving the ring")
            try:
                await self.node.stop()
            except Exception as error:
                log.error("node failed while leaving: %r", error)
                status = 1
        requested.cancel()
        if stopped.done():
            stopped.exception()  # retrieved: it is logged above or below, not by asyncio
        else:
            stopped.cancel()
        self.write_status()
        if self.deliveries is not None:
            self.deliveries.close()
        return status

    async def _start_cpg(self) -> None:
        """Attach the CPG service (written in parallel) if this tree has it."""
        try:
            from corral.cpg.service import CpgService
        except ImportError:
            if self.args.ipc_socket:
                log.warning("--ipc-socket given but corral.cpg.service is not available")
            return
        self.cpg = CpgService(_CpgView(self.node))
        log.info("CPG service started")
        if self.args.ipc_socket:
            from corral.cpg.ipc import CpgIpcServer

            self.ipc = CpgIpcServer(self.cpg, self.args.ipc_socket)
            await self.ipc.start()
            log.info("CPG IPC server listening on %s", self.args.ipc_socket)


class _CpgView:
    """The node as the CPG service sees it: without the engine's load messages."""

    def __init__(self, node: TotemNode) -> None:
        self.node = node
        self.nodeid = node.nodeid

    def submit(self, payload: bytes) -> bool:
        return self.node.submit(payload)

    async def wait_writable(self) -> None:
        await self.node.wait_writable()

    def add_listener(self, callback: Callable[[tuple[object, ...]], None]) -> None:
        def filtered(event: tuple[object, ...]) -> None:
            if event[0] == EV_DELIVER and _is_load(event[2]):
                return
            callback(event)

        self.node.add_listener(filtered)

    def add_batch_listener(self, callback: Callable[[list[tuple[object, ...]]], None]) -> None:
        deliver, magic, header_bytes = EV_DELIVER, LOAD_MAGIC, LOAD_HEADER.size

        def filtered(events: list[tuple[Any, ...]]) -> None:
            # _is_load inlined: this runs for every delivered message.
            kept = [event for event in events
                    if event[0] != deliver or not (type(event[2]) is bytes
                                                   and len(event[2]) >= header_bytes
                                                   and event[2][0] == magic)]
            if kept:
                callback(kept)

        self.node.add_batch_listener(filtered)


def _is_load(payload: object) -> bool:
    return isinstance(payload, bytes) and len(payload) >= LOAD_HEADER.size and \
        payload[0] == LOAD_MAGIC


def format_status(status: dict[str, Any]) -> str:
    """Links and ring in the shape of `corosync-cfgtool -s` plus the ring line."""
    ring = status.get("ring_id") or (0, 0)
    members = " ".join(map(str, status.get("members") or ()))
    lines = [
        f"Local node ID {status.get('nodeid')}, transport udp (corral)",
        f"Ring ID: {ring_text((int(ring[0]), int(ring[1])))}  State: {status.get('state')}  "
        f"Members[{len(status.get('members') or ())}]: {members}",
    ]
    rows = sorted(status.get("links") or [], key=lambda r: (r["link"], r["nodeid"]))
    for link in sorted({row["link"] for row in rows}):
        lines.append(f"LINK ID {link} udp")
        for row in (r for r in rows if r["link"] == link):
            if row["state"] == "localhost":
                lines.append(f"\taddr\t= {row['address']}")
                lines.append("\tstatus:")
        for row in (r for r in rows if r["link"] == link):
            state = {"localhost": "localhost", "up": "connected"}.get(row["state"], "disconnected")
            rtt = f" (rtt {row['rtt_ms']} ms)" if row.get("rtt_ms") is not None and \
                row["state"] == "up" else ""
            lines.append(f"\t\tnodeid: {row['nodeid']:>3}:\t{state}{rtt}")
    drops = {k: v for k, v in (status.get("transport_stats") or {}).items()
             if (k.startswith("drop_") or "dropped" in k) and v}
    lines.append("Dropped packets: " + (", ".join(f"{k}={v}" for k, v in sorted(drops.items()))
                                        or "none"))
    return "\n".join(lines)


def print_status(state_dir: str) -> int:
    path = os.path.join(state_dir, "status.json")
    try:
        with open(path, encoding="utf-8") as handle:
            status = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        print(f"corral engine: cannot read {path}: {error}", file=sys.stderr)
        return 2
    print(format_status(status))
    return 0


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s.%(msecs)03d [{args.nodeid or '-'}] %(levelname)s %(message)s",
        datefmt="%b %d %H:%M:%S",
    )
    if args.print_status:
        return print_status(args.state_dir)
    try:
        if args.generate_key is not None:
            auth.write_key_file(args.generate_key, args.key_bytes)
            return 0
        config = ClusterConfig.from_file(args.config)
        args.state_dir = args.state_dir or config.system.get("state_dir")
        if not args.state_dir:
            raise ConfigError("--state-dir", "not given and no system.state_dir in the config")
        key = auth.read_key_file(args.keyfile or config.keyfile or DEFAULT_KEYFILE)
        _core_constants()
        engine = Engine(args, config, key)
    except (CorralError, OSError) as error:
        print(f"corral engine: {error}", file=sys.stderr)
        return 2
    import uvloop

    try:
        return int(uvloop.run(engine.run()))
    except CorralError as error:  # e.g. the configured address is not on this host
        print(f"corral engine: {error}", file=sys.stderr)
        return 2
