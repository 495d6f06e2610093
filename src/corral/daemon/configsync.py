"""Cluster config distribution and node heartbeats over the CPG group `corral-config`.

Until the replicated tree carries corosync.conf, the daemons hand the config to
each other here: when a member changes it (add, delnode), it multicasts the
new text; when anyone joins the group, every member multicasts its current
text; a daemon adopts a text with a higher `config_version` than its own (the
daemon validates it, writes the node-local copy and applies what it can).
CPG's total order makes every member see the same sequence of texts.

Every HEARTBEAT_INTERVAL_S each daemon also multicasts a heartbeat: its name,
software version, config_version and wall clock. Receivers keep the latest per
node; the clock offset is the sender's wall clock minus ours at delivery
(delivery takes a few ms, well below the flagging threshold).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral.cpg.events import ConfChg, CpgEvent, Deliver
from corral.cpg.service import CpgHandle, CpgService

log = logging.getLogger("corral.daemon")

GROUP = "corral-config"
HEARTBEAT_INTERVAL_S = 2.0
PUBLISH_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 256 * 1024


@dataclass
class PeerInfo:
    name: str
    software_version: str
    config_version: int
    clock_offset_ns: int
    seen_monotonic_ns: int


class ConfigSync:
    def __init__(self, cpg: CpgService, software_version: str, name: str,
                 current: Callable[[], tuple[int, str]],
                 adopt: Callable[[str], None]) -> None:
        self.cpg = cpg
        self.software_version = software_version
        self.name = name
        self.current = current  # -> (config_version, text)
        self.adopt = adopt      # called with a text whose version is higher than ours
        self.peers: dict[int, PeerInfo] = {}
        self._handle: CpgHandle | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._published: dict[int, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0

    async def start(self) -> None:
        self._handle = await self.cpg.join(GROUP, callback=self._on_event)
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in list(self._tasks):
            task.cancel()
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handle.leave(), 2.0)

    async def publish(self, text: str, version: int) -> None:
        """Multicast a new config and wait until it came back in the total order."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._published[version] = future
        try:
            await self._send({"t": "conf", "v": version, "text": text})
            await asyncio.wait_for(future, PUBLISH_TIMEOUT_S)
        finally:
            self._published.pop(version, None)

    # ---- sending ---------------------------------------------------------------

    async def _send(self, message: dict[str, object]) -> None:
        if self._handle is None:
            raise RuntimeError("config sync is not started")
        await self._handle.mcast(json.dumps(message).encode())

    def _send_soon(self, message: dict[str, object]) -> None:
        task = asyncio.get_running_loop().create_task(self._send_logged(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_logged(self, message: dict[str, object]) -> None:
        try:
            await self._send(message)
        except Exception as error:
            log.debug("config sync: send failed: %r", error)

    def _announce_config(self) -> None:
        version, text = self.current()
        self._send_soon({"t": "conf", "v": version, "text": text})

    def _send_heartbeat(self) -> None:
        version, _ = self.current()
        self._send_soon({"t": "hb", "name": self.name, "sw": self.software_version,
                         "cv": version, "wall_ns": time.time_ns()})

    async def _heartbeat_loop(self) -> None:
        while True:
            self._send_heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    # ---- receiving -------------------------------------------------------------

    def _on_event(self, event: CpgEvent) -> None:
        if isinstance(event, ConfChg):
            for member in event.left:
                self.peers.pop(member.nodeid, None)
            if event.joined:
                self._announce_config()
                self._send_heartbeat()  # newcomers learn our version and clock at once
        elif isinstance(event, Deliver):
            self._on_message(event.nodeid, event.payload)

    def _on_message(self, sender: int, payload: bytes) -> None:
        try:
            if len(payload) > MAX_MESSAGE_BYTES:
                raise ValueError("too large")
            message = json.loads(payload)
            kind = message["t"]
            if kind == "hb":
                self._on_heartbeat(sender, message)
            elif kind == "conf":
                self._on_config(sender, int(message["v"]), str(message["text"]))
        except (ValueError, KeyError, TypeError) as error:
            self.dropped += 1
            log.warning("config sync: bad message from node %d: %s", sender, error)

    def _on_heartbeat(self, sender: int, message: dict[str, object]) -> None:
        wall_ns = int(str(message["wall_ns"]))
        self.peers[sender] = PeerInfo(
            name=str(message["name"]), software_version=str(message["sw"]),
            config_version=int(str(message["cv"])), clock_offset_ns=wall_ns - time.time_ns(),
            seen_monotonic_ns=time.monotonic_ns(),
        )

    def _on_config(self, sender: int, version: int, text: str) -> None:
        own_version, own_text = self.current()
        if version > own_version:
            log.info("config sync: node %d has config_version %d (ours %d): adopting",
                     sender, version, own_version)
            try:
                self.adopt(text)
            except Exception as error:
                log.error("config sync: refusing config_version %d from node %d: %s",
                          version, sender, error)
        elif version == own_version and text != own_text:
            log.warning("config sync: node %d has a different config with the same "
                        "config_version %d; keeping ours", sender, version)
        if sender == self.cpg.nodeid:
            future = self._published.get(version)
            if future is not None and not future.done():
                future.set_result(None)
