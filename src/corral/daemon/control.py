"""The control socket: one JSON object per line each way, root-only (0600).

Request `{"cmd": NAME, ...}`; reply `{"ok": true, "data": ...}` or
`{"ok": false, "error": TEXT}`. Handlers are async callables registered by
name; a handler raising `CorralError` becomes an error reply, anything else is
logged and answered with "internal error".

`request(path, cmd, **args)` is the synchronous client the CLI uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from corral.errors import CorralError

log = logging.getLogger("corral.daemon")

MAX_LINE_BYTES = 1 << 20
MAX_CLIENTS = 64
CLIENT_TIMEOUT_S = 30.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(CorralError):
    """The daemon refused a control request, or cannot be reached."""


class ControlRefused(ControlError):
    """The daemon answered and refused the request (nothing was changed)."""


class ControlServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path,
                                                           limit=MAX_LINE_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT_S)
                except (TimeoutError, ValueError, ConnectionError):
                    break
                if not line:
                    break
                reply = await self._dispatch(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._clients -= 1
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as error:
            return {"ok": False, "error": f"bad request: {error}"}
        handler = self.handlers.get(str(request.get("cmd")))
        if handler is None:
            return {"ok": False, "error": f"unknown command {request.get('cmd')!r}"}
        try:
            return {"ok": True, "data": await handler(request)}
        except CorralError as error:
            return {"ok": False, "error": str(error)}
        except Exception:
            log.exception("control: %s failed", request.get("cmd"))
            return {"ok": False, "error": "internal error (see the corrald log)"}


def request(path: str, cmd: str, timeout_s: float = 10.0, **args: Any) -> Any:
    """Send one request; the reply's data, or ControlError."""
    message = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(message)
            buffer = b""
            while not buffer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                if len(buffer) > MAX_LINE_BYTES:
                    raise ControlError("reply too large")
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"corrald is not running (no control socket at {path})") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path} (root only)") from None
    except OSError as error:
        raise ControlError(f"control socket {path}: {error}") from None
    try:
        reply = json.loads(buffer)
    except ValueError:
        raise ControlError("corrald closed the connection without a reply") from None
    if not reply.get("ok"):
        raise ControlRefused(str(reply.get("error")))
    return reply.get("data")
