"""The HTTPS join API on port 8006, in the shapes of the reference's /api2/json.

Served by corrald on its configured link addresses only, with the node
certificate. Bounded header and body sizes and a read timeout. A connection
carries one request, unless the request was authenticated, answered with 200
and asked to keep the connection (HTTP/1.1 without `Connection: close`): then
it stays open for the next request up to KEEPALIVE_IDLE_S idle (a migration
source keeps one open to its target so the hand-over needs no new TLS
handshake). Connections are closed after any error status, as the reference.

    GET    /api2/json/cluster/config/apiversion      -> 1 (no auth)
    POST   /api2/json/access/ticket                  username, password -> ticket, CSRF token
    GET    /api2/json/cluster/config/join            join info (nodelist with pve_fp, totem)
    GET    /api2/json/cluster/config/nodes           nodelist entries
    GET    /api2/json/cluster/config/corosync        the config text (other nodes only,
                                                      see catchup.py)
    POST   /api2/json/cluster/config/nodes/{node}    add a node (see Daemon.add_node)
    DELETE /api2/json/cluster/config/nodes/{node}    remove an offline node
    ...                                               the daemon's routers (see Router):
                                                      guests and tasks in guestapi.py

Authentication: a ticket (cookie or `Authorization: PVEAuthCookie=<ticket>`,
plus the `CSRFPreventionToken` header on non-GET), or, for adding a node
only, a one-time join token in `Authorization: CorralJoinToken=<token>`.
Replies: `{"data": ...}`; errors carry `message` (and `errors` for 400), the
reason phrase is the first line of the message, as in the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.cluster.credentials import ADMIN_USER, Tickets, TokenError, check_password
from corral.errors import CorralError

log = logging.getLogger("corral.daemon")

API_VERSION = 1
PREFIX = "/api2/json"
MAX_HEADER_BYTES = 16384
MAX_BODY_BYTES = 65536
READ_TIMEOUT_S = 10.0
KEEPALIVE_IDLE_S = 60.0
MAX_REQUESTS_PER_CONNECTION = 10000
MAX_CONNECTIONS = 32
AUTH_FAIL_DELAY_S = 0.5


class ApiError(CorralError):
    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


class ApiBackend(Protocol):
    """What the API needs from the daemon."""

    def join_info(self) -> dict[str, Any]: ...
    def config_nodes(self) -> list[dict[str, Any]]: ...
    async def add_node(self, node: str, params: dict[str, str], peer_ip: str) -> dict[str, Any]: ...
    async def delete_node(self, node: str) -> None: ...
    def admin_hash(self) -> str | None: ...
    def check_join_token(self, token: str) -> str: ...
    def consume_join_token(self, digest: str) -> None: ...
    def restore_join_token(self, digest: str) -> None: ...
    def node_auth(self, header: str) -> int | None: ...
    def corosync_conf(self) -> dict[str, Any]: ...
    def api_routers(self) -> list[Router]: ...


Handler = Callable[["Request", str], Awaitable[Any]]
# (handler, who may call it: none|node|admin|node-or-admin|admin-or-token, argument)
Route = tuple[Handler, str, str]


class Router(Protocol):
    """A part of the daemon that serves some paths (guests, status): `route` returns the
    handler for a method and path (without /api2/json), or None when not its path.
    Handlers raise ApiError for refusals; their return value is the reply's `data`."""

    def route(self, method: str, path: str) -> Route | None: ...


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    peer_ip: str = ""
    user: str | None = None
    token_digest: str | None = None
    keep_alive: bool = False          # the client asked to keep the connection open
    authenticated: bool = False


class ApiServer:
    def __init__(self, backend: ApiBackend, addresses: list[str], port: int,
                 cert_path: str, key_path: str) -> None:
        self.backend = backend
        self.addresses = addresses
        self.port = port
        self.cert_path = cert_path
        self.key_path = key_path
        self.tickets = Tickets()
        self._servers: list[asyncio.AbstractServer] = []
        self._connections = 0
        self.context = self._make_context()

    def _make_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def reload_certificate(self) -> None:
        """New connections use the certificate now on disk (after updatecerts)."""
        self.context.load_cert_chain(self.cert_path, self.key_path)

    async def start(self) -> None:
        for address in self.addresses:
            server = await asyncio.start_server(self._serve, address, self.port, limit=MAX_HEADER_BYTES,
                                                ssl=self.context, reuse_address=True,
                                                ssl_handshake_timeout=READ_TIMEOUT_S)
            self._servers.append(server)
        log.info("join API listening on %s port %d", ", ".join(self.addresses), self.port)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()

    # ---- connection handling ---------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections += 1
        try:
            peer = writer.get_extra_info("peername")
            first = b""
            for count in range(MAX_REQUESTS_PER_CONNECTION):
                if count:
                    first = await _first_byte(reader, KEEPALIVE_IDLE_S)
                    if not first:
                        break
                request = await asyncio.wait_for(_read_request(reader, first), READ_TIMEOUT_S)
                request.peer_ip = str(peer[0]) if peer else ""
                status, body = await self._handle(request)
                keep = request.keep_alive and request.authenticated and status == 200
                _write_response(writer, status, body, keep)
                await writer.drain()
                if not keep:
                    break
        except ApiError as error:
            _write_response(writer, error.status, _error_body(error))
            with contextlib.suppress(Exception):
                await writer.drain()
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("API: connection from %s failed", writer.get_extra_info("peername"))
        finally:
            self._connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        route = self._route(request)
        if route is None:
            raise ApiError(501, f"Method '{request.method} {request.path}' not implemented")
        handler, needs, argument = route
        await self._authenticate(request, needs)
        try:
            data = await handler(request, argument)
        except ApiError:
            raise
        except CorralError as error:
            raise ApiError(500, str(error)) from None
        except Exception:
            log.exception("API: %s %s failed", request.method, request.path)
            raise ApiError(500, "internal error (see the corrald log)") from None
        return 200, {"data": data}

    def _route(self, request: Request) -> Route | None:
        path = request.path.removeprefix(PREFIX)
        method = request.method
        if path == "/cluster/config/apiversion" and method == "GET":
            return self._apiversion, "none", ""
        if path == "/access/ticket" and method == "POST":
            return self._ticket, "none", ""
        if path == "/cluster/config/join" and method == "GET":
            return self._join_info, "admin", ""
        if path == "/cluster/config/corosync" and method == "GET":
            return self._corosync, "node", ""
        if path == "/cluster/config/nodes" and method == "GET":
            return self._nodes, "admin", ""
        if path.startswith("/cluster/config/nodes/"):
            node = urllib.parse.unquote(path.removeprefix("/cluster/config/nodes/"))
            if "/" in node or not node:
                return None
            if method == "POST":
                return self._add_node, "admin-or-token", node
            if method == "DELETE":
                return self._delete_node, "admin", node
        for router in self.backend.api_routers():
            route = router.route(method, path)
            if route is not None:
                return route
        return None

    async def _authenticate(self, request: Request, needs: str) -> None:
        if needs == "none":
            return
        authorization = request.headers.get("authorization", "")
        now_s = time.time()
        if needs == "node" or (needs == "node-or-admin" and
                                authorization.startswith("CorralNode=")):
            if self.backend.node_auth(authorization) is None:
                await asyncio.sleep(AUTH_FAIL_DELAY_S)
                raise ApiError(401, "authentication failure")
            request.authenticated = True
            return
        if authorization.startswith("CorralJoinToken=") and needs == "admin-or-token":
            try:
                request.token_digest = self.backend.check_join_token(
                    authorization.removeprefix("CorralJoinToken="))
            except TokenError as error:
                await asyncio.sleep(AUTH_FAIL_DELAY_S)
                raise ApiError(401, str(error)) from None
            request.authenticated = True
            return
        ticket = _ticket_from(request.headers)
        user = None
        if ticket is not None:
            user = self.tickets.verify(ticket, request.headers.get("csrfpreventiontoken"),
                                       now_s, need_csrf=request.method != "GET")
        if user != ADMIN_USER:
            await asyncio.sleep(AUTH_FAIL_DELAY_S)
            raise ApiError(401, "authentication failure" if ticket else "No ticket")
        request.user = user
        request.authenticated = True

    # ---- handlers --------------------------------------------------------------

    async def _apiversion(self, request: Request, _: str) -> int:
        return API_VERSION

    async def _ticket(self, request: Request, _: str) -> dict[str, str]:
        username = request.params.get("username", "")
        realm = request.params.get("realm")
        if realm and "@" not in username:
            username = f"{username}@{realm}"
        stored = self.backend.admin_hash()
        password = request.params.get("password", "")
        ok = username == ADMIN_USER and stored is not None and \
            await asyncio.get_running_loop().run_in_executor(None, check_password, password, stored)
        if not ok:
            await asyncio.sleep(AUTH_FAIL_DELAY_S)
            raise ApiError(401, "authentication failure")
        ticket, csrf = self.tickets.issue(username, time.time())
        return {"username": username, "ticket": ticket, "CSRFPreventionToken": csrf}

    async def _join_info(self, request: Request, _: str) -> dict[str, Any]:
        return self.backend.join_info()

    async def _corosync(self, request: Request, _: str) -> dict[str, Any]:
        return self.backend.corosync_conf()

    async def _nodes(self, request: Request, _: str) -> list[dict[str, Any]]:
        return self.backend.config_nodes()

    async def _add_node(self, request: Request, node: str) -> dict[str, Any]:
        if request.params.get("apiversion") not in (None, str(API_VERSION)):
            raise ApiError(400, "Parameter verification failed.",
                           {"apiversion": f"unsupported join API version (ours: {API_VERSION})"})
        digest = request.token_digest
        if digest is not None:
            # Taken now (no await since the check): a second request with the same
            # token is refused even while this add is in flight; given back on failure.
            self.backend.consume_join_token(digest)
        try:
            return await self.backend.add_node(node, request.params, request.peer_ip)
        except BaseException:
            if digest is not None:
                self.backend.restore_join_token(digest)
            raise

    async def _delete_node(self, request: Request, node: str) -> None:
        await self.backend.delete_node(node)


def _ticket_from(headers: dict[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    if authorization.startswith("PVEAuthCookie="):
        return urllib.parse.unquote(authorization.removeprefix("PVEAuthCookie="))
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == "PVEAuthCookie":
            return urllib.parse.unquote(value)
    return None


async def _first_byte(reader: asyncio.StreamReader, idle_s: float) -> bytes:
    """The first byte of the next request on a kept-alive connection; b"" on EOF or
    after `idle_s` without one."""
    try:
        return await asyncio.wait_for(reader.read(1), idle_s)
    except (TimeoutError, ConnectionError, ssl.SSLError):
        return b""


async def _read_request(reader: asyncio.StreamReader, first: bytes = b"") -> Request:
    try:
        head = first + await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ApiError(400, "request header too large") from None
    if len(head) > MAX_HEADER_BYTES:
        raise ApiError(400, "request header too large")
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise ApiError(400, "bad request line") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    parsed = urllib.parse.urlsplit(target)
    params = dict(urllib.parse.parse_qsl(parsed.query))
    try:
        length = int(headers.get("content-length", "0") or 0)
    except ValueError:
        raise ApiError(400, "bad Content-Length") from None
    if not 0 <= length <= MAX_BODY_BYTES:
        raise ApiError(400, "request body too large")
    body = await reader.readexactly(length) if length else b""
    if body:
        params.update(_parse_body(body, headers.get("content-type", "")))
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" or (version == "HTTP/1.1" and connection != "close")
    return Request(method.upper(), parsed.path, headers, params, keep_alive=keep_alive)


def _parse_body(body: bytes, content_type: str) -> dict[str, str]:
    if content_type.startswith("application/json"):
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiError(400, "malformed JSON body") from None
        if not isinstance(data, dict):
            raise ApiError(400, "JSON body must be an object")
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _error_body(error: ApiError) -> dict[str, Any]:
    body: dict[str, Any] = {"data": None, "message": error.message + "\n"}
    if error.errors:
        body["errors"] = error.errors
    return body


def _write_response(writer: asyncio.StreamWriter, status: int, body: dict[str, Any],
                    keep_alive: bool = False) -> None:
    payload = json.dumps(body).encode()
    reason = "OK" if status == 200 else str(body.get("message", "error")).splitlines()[0][:200]
    reason = reason.replace("\r", " ").replace("\n", " ") or "error"
    head = (f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/json;charset=UTF-8\r\n"
            "Server: corrald\r\nCache-Control: max-age=0\r\nPragma: no-cache\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    writer.write(head.encode("latin-1") + payload)
