"""Cluster-wide runtime status over the CPG group `corral-status` (the reference's
pvestatd + pmxcfs kvstore), never through the replicated tree: status flows without
quorum and does not churn the tree.

Every STATUS_INTERVAL_S (10 s, as pvestatd) the daemon gathers its node's figures
(uptime, cpu, maxcpu, mem, maxmem, disk/maxdisk of the state dir's filesystem,
loadavg) and the runtime status of every local guest, and multicasts one report
(statuscore.encode_report, bounded). It also looks at the guest run dir every
WATCH_INTERVAL_S: when a QEMU started, exited or died (pid files and /proc), it reports
at once, so a start or stop shows on every node within a few seconds. When members
join the group, every member re-announces its latest report; reports of members that
left are dropped (statuscore.StatusTable). Gathering runs in a worker thread with its
own event loop: it reads guest configs from the tree, which is this daemon's own FUSE
mount, served by this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from typing import Any

from corral.cpg.events import ConfChg, CpgEvent, Deliver
from corral.cpg.service import CpgHandle, CpgService
from corral.daemon import statuscore
from corral.daemon.statuscore import NodeReport, ReportError, StatusTable
from corral.guests import netdev
from corral.guests.qemu import GuestManager

log = logging.getLogger("corral.daemon")

GROUP = "corral-status"
STATUS_INTERVAL_S = 10.0
WATCH_INTERVAL_S = 1.0
SEND_TIMEOUT_S = 5.0
GATHER_WARN_S = 5.0
_TAP_RE = re.compile(r"^(tap\d+i\d+|t\d+i\d+f\d)$")


class StatusBus:
    def __init__(self, cpg: CpgService, node: str, state_dir: str, tree_root: str,
                 run_dir: str, task_dir: str, interval_s: float = STATUS_INTERVAL_S) -> None:
        self.cpg = cpg
        self.node = node
        self.state_dir = state_dir
        self.tree_root = tree_root
        self.run_dir = run_dir
        self.task_dir = task_dir
        self.interval_s = interval_s
        self.table = StatusTable()
        self.dropped_bad = 0
        self.sent = 0
        self._seq = 0
        self._latest: bytes | None = None
        self._cpu_sample: tuple[int, int, int] | None = None
        self._handle: CpgHandle | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._handle = await self.cpg.join(GROUP, callback=self._on_event)
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._sends):
            task.cancel()
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handle.leave(), 2.0)

    def now_ns(self) -> int:
        return time.monotonic_ns()

    # ---- gathering and sending ------------------------------------------------------

    async def _run(self) -> None:
        last_sent_s = -self.interval_s
        last_seen: tuple[tuple[int, int, bool], ...] | None = None
        while True:
            seen = _run_dir_signature(self.run_dir)
            if seen != last_seen or time.monotonic() - last_sent_s >= self.interval_s:
                last_seen = seen
                last_sent_s = time.monotonic()
                try:
                    await self._gather_and_send()
                except Exception:
                    log.exception("status: gathering the report failed")
            self.table.expire(self.now_ns())
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), WATCH_INTERVAL_S)

    def poke(self) -> None:
        """Gather and send now (a caller that just changed a guest's state)."""
        self._wake.set()

    async def _gather_and_send(self) -> None:
        started = time.monotonic()
        guests, storages = await asyncio.to_thread(asyncio.run, self._guests())
        figures, loadavg = self._node_figures()
        self._seq += 1
        report = NodeReport(self.node, self._seq, figures, loadavg, guests, 0, storages)
        payload = statuscore.encode_report(report)
        if time.monotonic() - started > GATHER_WARN_S:
            log.warning("status: gathering took %.1f s", time.monotonic() - started)
        decoded = statuscore.decode_report(payload)
        if decoded.omitted:
            log.warning("status: %d guests left out of the report (over %d bytes)",
                        decoded.omitted, statuscore.MAX_REPORT_BYTES)
        self._latest = payload
        self.table.apply(self.cpg.nodeid, decoded, self.now_ns())   # no group needed
        self._send(payload)

    async def _guests(self) -> tuple[dict[int, dict[str, Any]], dict[str, dict[str, Any]]]:
        """This node's guests (status rows) and storages (space), read in a worker."""
        if not os.path.isdir(os.path.join(self.tree_root, "nodes", self.node)):
            return {}, {}
        manager = GuestManager(self.tree_root, self.node, self.run_dir, self.task_dir)
        guests = {row["vmid"]: row for row in await manager.list_guests()}
        storages: dict[str, dict[str, Any]] = {}
        try:
            config = manager.storages()
        except (OSError, ValueError) as error:
            log.debug("status: storage.cfg: %s", error)
            return guests, storages
        for name, storage in config.storages.items():
            if storage.disabled or (storage.nodes and self.node not in storage.nodes):
                continue
            row: dict[str, Any] = {"shared": int(storage.shared),
                                   "content": ",".join(storage.content), "active": 0}
            try:
                space = storage.free_space()
                row.update(disk=space["used"], maxdisk=space["total"], active=1)
            except OSError:
                pass             # its directory is missing: listed, but not available
            storages[name] = row
        return guests, storages

    def _node_figures(self) -> tuple[dict[str, float], tuple[float, float, float]]:
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = int(float(handle.read().split()[0]))
        with open("/proc/stat", encoding="ascii") as handle:
            ticks = statuscore.parse_cpu_ticks(handle.read())
        cpu, wait = statuscore.cpu_fractions(self._cpu_sample, ticks)
        self._cpu_sample = ticks
        with open("/proc/meminfo", encoding="ascii") as handle:
            memory = statuscore.parse_meminfo(handle.read())
        fs = os.statvfs(self.state_dir)
        figures: dict[str, float] = {
            "uptime": uptime, "cpu": cpu, "wait": wait, "maxcpu": os.cpu_count() or 1,
            "maxdisk": fs.f_blocks * fs.f_frsize,
            "disk": (fs.f_blocks - fs.f_bfree) * fs.f_frsize, **memory}
        figures["ctime"] = int(time.time())
        try:
            with open("/proc/self/net/dev", encoding="ascii") as handle:
                counters = netdev.parse_net_dev(handle.read())
        except OSError:
            counters = {}
        # the node's own traffic (as the reference: not loopback, not the guests' taps)
        own = [c for name, c in counters.items() if name != "lo" and not _TAP_RE.match(name)]
        figures["netin"] = sum(rx for rx, _ in own)
        figures["netout"] = sum(tx for _, tx in own)
        load = os.getloadavg()
        return figures, (round(load[0], 2), round(load[1], 2), round(load[2], 2))

    def _send(self, payload: bytes) -> None:
        if self._handle is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_logged(payload))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send_logged(self, payload: bytes) -> None:
        handle = self._handle
        if handle is None:
            return
        try:
            await asyncio.wait_for(handle.mcast(payload), SEND_TIMEOUT_S)
            self.sent += 1
        except Exception as error:
            log.info("status: broadcast failed (%r); the next report retries", error)

    # ---- receiving --------------------------------------------------------------------

    def _on_event(self, event: CpgEvent) -> None:
        if isinstance(event, ConfChg):
            self.table.membership(member.nodeid for member in event.members)
            if event.joined and self._latest is not None:
                self._send(self._latest)     # newcomers learn our status at once
        elif isinstance(event, Deliver):
            self._on_message(event.nodeid, event.payload)

    def _on_message(self, sender: int, payload: bytes) -> None:
        try:
            report = statuscore.decode_report(payload)
        except ReportError as error:
            self.dropped_bad += 1
            log.warning("status: dropped a report from node %d: %s", sender, error)
            return
        self.table.apply(sender, report, self.now_ns())

    # ---- views for the API and .vmlist ------------------------------------------------

    def rrd_lines(self) -> list[str]:
        self.table.expire(self.now_ns())
        return statuscore.rrd_lines(self.table)

    def guest_runtime(self, vmid: int, node: str) -> dict[str, Any]:
        return statuscore.vmlist_runtime(self.table, vmid, node, self.now_ns())

    def status(self) -> dict[str, Any]:
        now_ns = self.now_ns()
        return {"sent": self.sent, "dropped_bad": self.dropped_bad,
                "dropped_left": self.table.dropped_left,
                "dropped_expired": self.table.dropped_expired,
                "reports": {e.report.node: {"nodeid": e.nodeid, "seq": e.report.seq,
                                            "age_s": round((now_ns - e.received_ns) / 1e9, 1)}
                            for e in self.table.entries.values()}}


def _run_dir_signature(run_dir: str) -> tuple[tuple[int, int, bool], ...]:
    """(vmid, pid, alive) of every pid file: changes when a QEMU starts, exits or dies."""
    seen = []
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return ()
    for name in names:
        if not (name.endswith(".pid") and name[:-4].isdigit()):
            continue
        try:
            with open(os.path.join(run_dir, name), encoding="ascii") as handle:
                pid = int(handle.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        seen.append((int(name[:-4]), pid, pid > 0 and os.path.exists(f"/proc/{pid}")))
    return tuple(sorted(seen))
