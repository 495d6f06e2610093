"""A small asyncio QMP client: connect, negotiate capabilities, run commands, see events.

One command is in flight at a time (QMP answers in order; an `id` per command guards
against confusing replies). Events that arrive between replies are kept in a bounded
queue. Every wait has a timeout so a wedged QEMU cannot hang the caller.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

MAX_LINE_BYTES = 16 * 1024 * 1024      # QMP replies (query-* lists) stay far below this
MAX_PENDING_EVENTS = 256
DEFAULT_TIMEOUT_S = 10.0


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the connection failed."""


class QmpClient:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_PENDING_EVENTS)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 0
        self._lock = asyncio.Lock()

    async def connect(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """Open the socket, read the greeting and leave capabilities-negotiation mode."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE_BYTES), timeout_s)
        except (TimeoutError, OSError) as exc:
            raise QmpError(f"cannot connect to QMP socket {self.socket_path}: {exc}") from None
        greeting = await self._read_message(timeout_s)
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")
        await self.command("qmp_capabilities", timeout_s=timeout_s)
        return dict(greeting["QMP"])

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = None

    async def __aenter__(self) -> QmpClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _read_message(self, timeout_s: float) -> dict[str, Any]:
        if self._reader is None:
            raise QmpError("not connected")
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout_s)
        except TimeoutError:
            raise QmpError(f"QMP timeout after {timeout_s} s") from None
        except (OSError, ValueError) as exc:
            raise QmpError(f"QMP read failed: {exc}") from None
        if not line:
            raise QmpError("QMP connection closed by QEMU")
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise QmpError(f"QMP sent invalid JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QmpError("QMP message is not an object")
        return message

    def _keep_event(self, message: dict[str, Any]) -> None:
        if self.events.full():        # drop the oldest: recent events matter most
            self.events.get_nowait()
        self.events.put_nowait(message)

    async def command(self, name: str, /, timeout_s: float = DEFAULT_TIMEOUT_S,
                      **arguments: Any) -> Any:
        """Run one QMP command and return its `return` value (QmpError on `error`)."""
        if self._writer is None:
            raise QmpError("not connected")
        async with self._lock:
            self._next_id += 1
            command_id = f"corral-{self._next_id}"
            request: dict[str, Any] = {"execute": name, "id": command_id}
            if arguments:
                request["arguments"] = arguments
            try:
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
            except OSError as exc:
                raise QmpError(f"QMP write failed: {exc}") from None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                message = await self._read_message(max(0.001, deadline - loop.time()))
                if "event" in message:
                    self._keep_event(message)
                    continue
                if message.get("id") != command_id:
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QmpError(f"{name}: {error.get('class')}: {error.get('desc')}")
                return message.get("return")

    async def wait_event(self, name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """Wait for the next event called `name` (queued ones first)."""
        while not self.events.empty():
            event = self.events.get_nowait()
            if event.get("event") == name:
                return event
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with self._lock:
            while True:
                message = await self._read_message(max(0.001, deadline - loop.time()))
                if message.get("event") == name:
                    return message
                if "event" in message:
                    self._keep_event(message)
