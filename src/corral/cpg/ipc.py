"""The local CPG API for other processes: a Unix-socket server in the node
process and the asyncio client library `CpgClient`.

Frames (both directions; integers big-endian):

    length u32 (bytes that follow, at most MAX_FRAME_BYTES)
    version u8 (= IPC_VERSION) | type u8 | request_id u32 | body

Requests carry a request id the reply echoes; pushed events carry 0.

    JOIN            group                          -> REPLY status
    LEAVE           group                          -> REPLY status
    MCAST           flags u8 | group | payload     -> REPLY status (TRY_AGAIN without WAIT)
    MEMBERSHIP_GET  group                          -> REPLY status | member list
    LOCAL_GET       -                              -> REPLY status | nodeid u32 | pid u32
    FINALIZE        -                              -> REPLY status, then the server closes

    group = len u8 (1..128) | bytes;  member list = count u16 | count * (nodeid u32 | pid u32 | reason u8)
    DELIVER         group | nodeid u32 | pid u32 | payload
    CONFCHG         group | members | left | joined
    TOTEM_CONFCHG   ring_rep u32 | ring_seq u64 | count u16 | count * nodeid u32

Status codes are `ErrorCode` (corosync's cs_error_t numbers). A request that
does not parse, or that the core refuses, gets an error reply and changes
nothing; a frame over the size bound is skipped and answered with TOO_BIG.
The client's pid comes from SO_PEERCRED, not from the client. Each connection's
outbound queue is bounded in bytes (frames queued in one loop iteration go out
in one write; a slow client's socket is drained by a writer task), and a
client that lets the queue exceed its bound is disconnected (its groups see
PROCDOWN) with a logged error.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from corral.cpg import wire
from corral.cpg.core import CpgError, ErrorCode
from corral.cpg.events import ConfChg, CpgEvent, Deliver, Member, TotemConfChg
from corral.cpg.service import CpgService, group_name
from corral.errors import DecodeError

log = logging.getLogger("corral.cpg.ipc")

IPC_VERSION = 1
MAX_FRAME_BYTES = wire.MAX_PAYLOAD_BYTES + 4096
# Bytes a server keeps queued for one client before disconnecting it.
DEFAULT_CLIENT_QUEUE_BYTES = 16 << 20
MAX_IPC_CLIENTS = 256
# Events a client-library handle buffers before it stops reading the socket.
DEFAULT_CLIENT_EVENT_LIMIT = 4096
FLAG_WAIT = 1
# How long a closing connection may take to flush what is queued for it.
FLUSH_GRACE_S = 1.0
_READ_CHUNK_BYTES = 256 * 1024

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BBI")
_MEMBER = struct.Struct(">IIB")
_COUNT = struct.Struct(">H")
_NODE_PID = struct.Struct(">II")
_RING = struct.Struct(">IQH")
_NODEID = struct.Struct(">I")
_STATUS = struct.Struct(">B")
_FLAGS = struct.Struct(">B")
# length | version | type | request id | group length: a DELIVER frame's head.
_DELIVER_HEAD = struct.Struct(">IBBIB")
# DELIVER bytes besides group and payload, counted by the length field.
_DELIVER_FIXED_BYTES = _HEADER.size + 1 + _NODE_PID.size


class MsgType(enum.IntEnum):
    JOIN = 1
    LEAVE = 2
    MCAST = 3
    MEMBERSHIP_GET = 4
    LOCAL_GET = 5
    FINALIZE = 6
    REPLY = 64
    DELIVER = 65
    CONFCHG = 66
    TOTEM_CONFCHG = 67


REQUEST_TYPES = frozenset(
    {MsgType.JOIN, MsgType.LEAVE, MsgType.MCAST, MsgType.MEMBERSHIP_GET,
     MsgType.LOCAL_GET, MsgType.FINALIZE}
)


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    request_id: int
    body: bytes


@dataclass(frozen=True, slots=True)
class OversizeFrame:
    """A frame over MAX_FRAME_BYTES, skipped; only its header was kept."""

    type: int
    request_id: int


# ---------------------------------------------------------------- codec


def encode_frame(msg_type: int, request_id: int, body: bytes = b"") -> bytes:
    header = _HEADER.pack(IPC_VERSION, msg_type, request_id)
    return _LENGTH.pack(len(header) + len(body)) + header + body


def _group(group: bytes) -> bytes:
    return bytes((len(group),)) + group


def split_mcast(body: bytes) -> tuple[int, bytes, bytes]:
    """A MCAST request body as (flags, group, payload); DecodeError if malformed.

    Sliced directly rather than through wire.Reader: this runs per message."""
    length = body[1] if len(body) >= 2 else 0
    if not 1 <= length <= wire.MAX_GROUP_NAME_BYTES or len(body) < 2 + length:
        raise DecodeError(f"bad MCAST request: {len(body)} bytes, group length {length}")
    return body[0], body[2:2 + length], body[2 + length:]


def encode_members(members: tuple[Member, ...]) -> bytes:
    return _COUNT.pack(len(members)) + b"".join(_MEMBER.pack(*m) for m in members)


def encode_deliver(event: Deliver) -> bytes:
    group = event.group
    head = _DELIVER_HEAD.pack(_DELIVER_FIXED_BYTES + len(group) + len(event.payload),
                              IPC_VERSION, MsgType.DELIVER, 0, len(group))
    return b"".join((head, group, _NODE_PID.pack(event.nodeid, event.pid), event.payload))


def encode_event(event: CpgEvent) -> bytes:
    if isinstance(event, Deliver):
        return encode_deliver(event)
    if isinstance(event, ConfChg):
        body = b"".join(
            (_group(event.group), encode_members(event.members),
             encode_members(event.left), encode_members(event.joined))
        )
        return encode_frame(MsgType.CONFCHG, 0, body)
    body = _RING.pack(event.ring_id[0], event.ring_id[1], len(event.members)) + b"".join(
        _NODEID.pack(n) for n in event.members
    )
    return encode_frame(MsgType.TOTEM_CONFCHG, 0, body)


def decode_members(reader: wire.Reader) -> tuple[Member, ...]:
    (count,) = reader.unpack(_COUNT)
    return tuple(Member(*reader.unpack(_MEMBER)) for _ in range(count))


def decode_event(frame: Frame) -> CpgEvent:
    """Decode a pushed event frame; raises DecodeError when malformed."""
    reader = wire.Reader(frame.body)
    event: CpgEvent
    if frame.type == MsgType.DELIVER:
        group = reader.group()
        nodeid, pid = reader.unpack(_NODE_PID)
        event = Deliver(group, nodeid, pid, reader.rest())
    elif frame.type == MsgType.CONFCHG:
        group = reader.group()
        members, left, joined = (decode_members(reader) for _ in range(3))
        event = ConfChg(group, members, left, joined)
    elif frame.type == MsgType.TOTEM_CONFCHG:
        rep, seq, count = reader.unpack(_RING)
        nodes = tuple(reader.unpack(_NODEID)[0] for _ in range(count))
        event = TotemConfChg((rep, seq), nodes)
    else:
        raise DecodeError(f"not an event frame: type {frame.type}")
    reader.finish()
    return event


class FrameDecoder:
    """Splits a byte stream into frames; feed any chunking, even one byte at a time.

    A frame over MAX_FRAME_BYTES is skipped without being buffered and reported
    as OversizeFrame; a wrong version raises DecodeError (the stream cannot be
    trusted after it)."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._skip_bytes = 0
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[Frame | OversizeFrame]:
        buf = self._buf
        buf += data
        out: list[Frame | OversizeFrame] = []
        # Parse at an offset and trim once: deleting each frame from the front
        # of the buffer would make a large read quadratic.
        pos = 0
        try:
            while True:
                if self._skip_bytes:
                    dropped = min(self._skip_bytes, len(buf) - pos)
                    pos += dropped
                    self._skip_bytes -= dropped
                    if self._skip_bytes:
                        return out
                if len(buf) - pos < _LENGTH.size + _HEADER.size:
                    return out
                (length,) = _LENGTH.unpack_from(buf, pos)
                version, msg_type, request_id = _HEADER.unpack_from(buf, pos + _LENGTH.size)
                if version != IPC_VERSION:
                    raise DecodeError(f"unknown CPG IPC version {version}")
                if length < _HEADER.size:
                    raise DecodeError(f"frame length {length} below header size")
                if length > self._max:
                    out.append(OversizeFrame(msg_type, request_id))
                    self._skip_bytes = _LENGTH.size + length
                    continue
                end = pos + _LENGTH.size + length
                if len(buf) < end:
                    return out
                out.append(Frame(msg_type, request_id,
                                 bytes(buf[pos + _LENGTH.size + _HEADER.size:end])))
                pos = end
        finally:
            del buf[:pos]


# ---------------------------------------------------------------- server


def peer_pid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return 0
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class _Connection:
    """One client connection on the server: its requests, and its bounded outbound queue."""

    def __init__(
        self, server: CpgIpcServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.service = server.service
        self.reader = reader
        self.writer = writer
        self.pid = peer_pid(writer)
        self.client_id = 0
        self.outbound: deque[bytes | Deliver] = deque()
        self.outbound_bytes = 0
        self._buffered_at_write = 0
        self.closed = False
        self._flush_scheduled = False
        self._draining = False
        self._wake: asyncio.Future[None] | None = None

    async def serve(self) -> None:
        self.client_id = self.service.open_client(self.pid, self.on_event)
        writer_task = asyncio.get_running_loop().create_task(self._write_loop())
        decoder = FrameDecoder()
        try:
            while not self.closed:
                data = await self.reader.read(_READ_CHUNK_BYTES)
                if not data:
                    break
                for frame in decoder.feed(data):
                    # Every request but a MCAST that must wait for room is
                    # answered synchronously, without a coroutine per request.
                    if not self._handle_now(frame) and isinstance(frame, Frame):
                        await self._handle_waiting(frame)
                    if self.closed:
                        break
        except (DecodeError, ConnectionError) as exc:
            log.warning("CPG IPC: dropping client pid %d: %s", self.pid, exc)
        finally:
            self.service.close_client(self.client_id)
            self.closed = True
            self._wake_writer()
            # Let queued replies (FINALIZE's) go out, but never wait on a client
            # that stopped reading.
            try:
                await asyncio.wait_for(writer_task, FLUSH_GRACE_S)
                self.writer.close()
            except (TimeoutError, asyncio.CancelledError):
                self.writer.transport.abort()

    # ------------------------------------------------------------ outbound

    def on_event(self, event: CpgEvent) -> None:
        if isinstance(event, Deliver):
            # Queued as is and encoded with the rest of this loop iteration's
            # frames in one pass when they are written out.
            size = _LENGTH.size + _DELIVER_FIXED_BYTES + len(event.group) + len(event.payload)
            self._enqueue(event, size)
        else:
            self.send(encode_event(event))

    def send(self, frame: bytes) -> None:
        self._enqueue(frame, len(frame))

    def _enqueue(self, item: bytes | Deliver, size: int) -> None:
        if self.closed:
            return
        limit = self.server.client_queue_bytes
        # The transport's buffer size is read once per written batch; it only
        # shrinks between batches, so a fresh look is needed only near the bound.
        if self.outbound_bytes + self._buffered_at_write + size > limit:
            self._buffered_at_write = self._buffered_bytes()
            queued_bytes = self.outbound_bytes + self._buffered_at_write
            if queued_bytes + size > limit:
                log.error(
                    "CPG IPC: client pid %d did not read %d queued bytes; disconnecting it",
                    self.pid, queued_bytes,
                )
                self.abort()
                return
        self.outbound.append(item)
        self.outbound_bytes += size
        if not self._flush_scheduled:
            # One write (a writev in the transport) per loop iteration for every
            # frame queued in it, without a task switch when the socket keeps up.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _buffered_bytes(self) -> int:
        """Bytes written but still in the transport's buffer (the client is slow)."""
        # asyncio and uvloop transports both have it; typeshed omits it on the base.
        return int(self.writer.transport.get_write_buffer_size())

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._draining or not self.outbound or self.writer.transport.is_closing():
            self._wake_writer()  # the write loop owns the socket while it drains
            return
        self._write_out()

    def _write_out(self) -> None:
        batch = [item if isinstance(item, bytes) else encode_deliver(item)
                 for item in self.outbound]
        self.outbound.clear()
        self.outbound_bytes = 0
        self.writer.writelines(batch)
        self._buffered_at_write = self._buffered_bytes()
        if self._buffered_at_write > 0:
            # The socket did not take everything: let the write loop wait for drain.
            self._draining = True
            self._wake_writer()

    def abort(self) -> None:
        self.closed = True
        self.service.close_client(self.client_id)
        self.outbound.clear()
        self.outbound_bytes = 0
        self.writer.transport.abort()
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _write_loop(self) -> None:
        """Drains a backed-up socket, and flushes what is left when the connection ends."""
        try:
            while True:
                if self._draining:
                    await self.writer.drain()
                    self._draining = False
                if self.outbound and not self.writer.transport.is_closing():
                    self._write_out()
                    continue
                if self.closed:
                    if self._buffered_bytes() > 0:
                        await self.writer.drain()
                    return
                self._wake = asyncio.get_running_loop().create_future()
                await self._wake
        except ConnectionError:
            self.closed = True

    # ------------------------------------------------------------ requests

    def _handle_now(self, frame: Frame | OversizeFrame) -> bool:
        """Answer `frame` now; False (nothing done) for a MCAST that must wait for room."""
        if isinstance(frame, OversizeFrame):
            self._reply(frame.request_id, ErrorCode.TOO_BIG)
            return True
        if frame.type not in REQUEST_TYPES:
            self._reply(frame.request_id, ErrorCode.MESSAGE_ERROR)
            return True
        try:
            result = self._dispatch(frame)
        except CpgError as exc:
            result = exc.code, b""
        except DecodeError:
            result = ErrorCode.INVALID_PARAM, b""
        if result is None:
            return False
        status, body = result
        self._reply(frame.request_id, status, body)
        if frame.type == MsgType.FINALIZE and status == ErrorCode.OK:
            self.closed = True
        return True

    async def _handle_waiting(self, frame: Frame) -> None:
        """A MCAST with the WAIT flag and no room now: wait for room, then answer."""
        _flags, group, payload = split_mcast(frame.body)
        try:
            await self.service.client_mcast(self.client_id, group, payload)
            status = ErrorCode.OK
        except CpgError as exc:
            status = exc.code
        self._reply(frame.request_id, status)

    def _dispatch(self, frame: Frame) -> tuple[ErrorCode, bytes] | None:
        if frame.type == MsgType.MCAST:
            flags, group, payload = split_mcast(frame.body)
            if self.service.client_try_mcast(self.client_id, group, payload):
                return ErrorCode.OK, b""
            if flags & FLAG_WAIT:
                return None
            return ErrorCode.TRY_AGAIN, b""
        reader = wire.Reader(frame.body)
        if frame.type in (MsgType.LOCAL_GET, MsgType.FINALIZE):
            reader.finish()
            if frame.type == MsgType.FINALIZE:
                return ErrorCode.OK, b""
            return ErrorCode.OK, _NODE_PID.pack(self.service.nodeid, self.pid)
        group = reader.group()
        reader.finish()
        if frame.type == MsgType.JOIN:
            self.service.client_join(self.client_id, group)
            return ErrorCode.OK, b""
        if frame.type == MsgType.LEAVE:
            self.service.client_leave(self.client_id, group)
            return ErrorCode.OK, b""
        return ErrorCode.OK, encode_members(self.service.members(group))

    def _reply(self, request_id: int, status: ErrorCode, body: bytes = b"") -> None:
        self.send(encode_frame(MsgType.REPLY, request_id, _STATUS.pack(status) + body))


class CpgIpcServer:
    """Serves CpgClient connections on a Unix socket (mode 0600, owner root)."""

    def __init__(
        self,
        service: CpgService,
        path: str | os.PathLike[str],
        *,
        client_queue_bytes: int = DEFAULT_CLIENT_QUEUE_BYTES,
        max_clients: int = MAX_IPC_CLIENTS,
    ) -> None:
        self.service = service
        self.path = os.fspath(path)
        self.client_queue_bytes = client_queue_bytes
        self.max_clients = max_clients
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a strict umask so the socket is never reachable by others,
        # not even between bind() and chmod().
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        if os.geteuid() == 0:
            os.chown(self.path, 0, 0)
        self._server = await asyncio.start_unix_server(
            self._on_connect, sock=sock, limit=MAX_FRAME_BYTES
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_clients:
            log.error("CPG IPC: refusing a client: %d clients connected", self.max_clients)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await _Connection(self, reader, writer).serve()
        except CpgError as exc:
            log.error("CPG IPC: cannot serve a client: %s", exc)
            writer.close()
        finally:
            self._connections.discard(task)


# ---------------------------------------------------------------- client library


class CpgClientHandle:
    """One group joined through a CpgClient; the same shape as CpgHandle."""

    def __init__(
        self, client: CpgClient, group: bytes, callback: Callable[[CpgEvent], None] | None
    ) -> None:
        self.client = client
        self.group = group
        self.nodeid = client.nodeid
        self.pid = client.pid
        self._callback = callback
        self._queue: deque[CpgEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._left: asyncio.Future[None] | None = None
        self._joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._members: tuple[Member, ...] = ()
        self.closed = False
        self.error: CpgError | None = None

    async def mcast(self, data: bytes, *, wait: bool = True) -> None:
        """Send `data`; waits on flow control, or raises CpgError(TRY_AGAIN) if not wait."""
        self._check_open()
        body = _FLAGS.pack(FLAG_WAIT if wait else 0) + _group(self.group) + bytes(data)
        await self.client._request(MsgType.MCAST, body)

    def mcast_nowait(self, data: bytes) -> asyncio.Future[None]:
        """Send `data` without waiting, like cpg_mcast_joined: the request is queued at
        once (order kept with other requests) and the returned future completes when
        the node accepted it (the node waits on its flow control first) or fails with
        CpgError. Callers bound how many they keep in flight."""
        self._check_open()
        body = _FLAGS.pack(FLAG_WAIT) + _group(self.group) + bytes(data)
        return self.client._request_nowait(MsgType.MCAST, body)

    async def leave(self) -> None:
        """Leave; returns once the own confchg (reason LEAVE) arrived."""
        self._check_open()
        self._left = asyncio.get_running_loop().create_future()
        await self.client._request(MsgType.LEAVE, _group(self.group))
        await self._left

    async def wait_joined(self) -> None:
        await self._joined

    def members(self) -> tuple[Member, ...]:
        """Members as of the latest confchg this handle received."""
        return self._members

    async def events(self) -> AsyncIterator[CpgEvent]:
        while True:
            if self._queue:
                event = self._queue.popleft()
                self._wake_space()
                yield event
                continue
            if self.closed:
                if self.error is not None:
                    raise self.error
                return
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def _put(self, event: CpgEvent) -> None:
        if self.closed:
            return  # after the own leave or a broken connection: nothing more
        if isinstance(event, ConfChg):
            self._note_change(event)
        if self._callback is not None:
            try:
                self._callback(event)
            except Exception:
                log.exception("CPG client: event callback of group %r raised", self.group)
        else:
            while len(self._queue) >= self.client.queue_limit and self.error is None:
                # Stop reading the socket: the server's bounded queue takes the pressure.
                self._space = asyncio.get_running_loop().create_future()
                await self._space
            if self.error is not None:
                return
            self._queue.append(event)
            self._wake()
        if self.closed and self._left is not None and not self._left.done():
            self._left.set_result(None)

    def _note_change(self, event: ConfChg) -> None:
        self._members = event.members
        me = (self.nodeid, self.pid)
        if any((m.nodeid, m.pid) == me for m in event.joined) and not self._joined.done():
            self._joined.set_result(None)
        if any((m.nodeid, m.pid) == me for m in event.left):
            self.closed = True
            self.client._handles.pop(self.group, None)

    def _finish(self, error: CpgError) -> None:
        if not self.closed:
            self.closed = True
            self.error = error
        for future in (self._left, self._joined):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # mark retrieved: nobody may be waiting
        self._wake_space()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _wake_space(self) -> None:
        if self._space is not None and not self._space.done():
            self._space.set_result(None)

    def _check_open(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise CpgError(ErrorCode.BAD_HANDLE, "handle is closed")


class CpgClient:
    """Async client of a node's CPG IPC socket."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, queue_limit: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.queue_limit = queue_limit
        self.nodeid = 0
        self.pid = 0
        self._next_request = 1
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._handles: dict[bytes, CpgClientHandle] = {}
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        self._unsent: list[bytes] = []
        self.closed = False

    @classmethod
    async def connect(
        cls, path: str | os.PathLike[str], *, queue_limit: int = DEFAULT_CLIENT_EVENT_LIMIT
    ) -> CpgClient:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path),
                                                            limit=MAX_FRAME_BYTES)
        client = cls(reader, writer, queue_limit)
        client.nodeid, client.pid = await client.local_get_with_pid()
        return client

    async def join(
        self, name: str | bytes, *, callback: Callable[[CpgEvent], None] | None = None
    ) -> CpgClientHandle:
        group = group_name(name)
        if group in self._handles:
            raise CpgError(ErrorCode.EXIST, f"already in group {group!r}")
        handle = CpgClientHandle(self, group, callback)
        self._handles[group] = handle
        try:
            await self._request(MsgType.JOIN, _group(group))
        except CpgError:
            self._handles.pop(group, None)
            raise
        return handle

    async def membership_get(self, name: str | bytes) -> tuple[Member, ...]:
        body = await self._request(MsgType.MEMBERSHIP_GET, _group(group_name(name)))
        reader = wire.Reader(body)
        members = decode_members(reader)
        reader.finish()
        return members

    async def local_get(self) -> int:
        """This node's id."""
        return (await self.local_get_with_pid())[0]

    async def local_get_with_pid(self) -> tuple[int, int]:
        nodeid, pid = _NODE_PID.unpack(await self._request(MsgType.LOCAL_GET, b""))
        return nodeid, pid

    async def finalize(self) -> None:
        """Close the connection; groups not left see this process as PROCDOWN."""
        if not self.closed:
            with contextlib.suppress(CpgError):
                await self._request(MsgType.FINALIZE, b"")
        await self.close()

    async def close(self) -> None:
        self.closed = True
        self._flush_requests()
        self._writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._task
        self._fail_all(CpgError(ErrorCode.BAD_HANDLE, "client closed"))

    def _send_request(self, msg_type: MsgType,
                      body: bytes) -> tuple[int, asyncio.Future[tuple[int, bytes]]]:
        """Queue one request frame; return its id and the future of (status, reply)."""
        if self.closed:
            raise CpgError(ErrorCode.BAD_HANDLE, "client closed")
        request_id = self._next_request
        self._next_request = (self._next_request + 1) & 0xFFFF_FFFF or 1
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        # Queued before any await: concurrent callers' requests (mcasts
        # pipelined by the benchmark client) reach the node in call order, and
        # all requests of one loop iteration leave in one write.
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._flush_requests)
        self._unsent.append(encode_frame(msg_type, request_id, body))
        return request_id, future

    @staticmethod
    def _reply_or_raise(msg_type: MsgType, status: int, reply: bytes) -> bytes:
        if status != ErrorCode.OK:
            code = ErrorCode(status) if status in ErrorCode._value2member_map_ else ErrorCode.LIBRARY
            raise CpgError(code, f"{msg_type.name} refused by the node")
        return reply

    async def _request(self, msg_type: MsgType, body: bytes) -> bytes:
        request_id, future = self._send_request(msg_type, body)
        try:
            await self._writer.drain()
            status, reply = await future
        finally:
            self._pending.pop(request_id, None)
        return self._reply_or_raise(msg_type, status, reply)

    def _request_nowait(self, msg_type: MsgType, body: bytes) -> asyncio.Future[None]:
        """Queue a request without waiting; the returned future completes with its
        answer (or the CpgError of a refusal, or the connection's error)."""
        request_id, future = self._send_request(msg_type, body)
        result: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(done: asyncio.Future[tuple[int, bytes]]) -> None:
            self._pending.pop(request_id, None)
            if result.done():
                return
            if done.cancelled():
                result.cancel()
            elif (error := done.exception()) is not None:
                result.set_exception(error)
            else:
                try:
                    self._reply_or_raise(msg_type, *done.result())
                except CpgError as refusal:
                    result.set_exception(refusal)
                else:
                    result.set_result(None)

        future.add_done_callback(settle)
        return result

    def _flush_requests(self) -> None:
        if self._unsent:
            frames, self._unsent = self._unsent, []
            if not self._writer.transport.is_closing():
                self._writer.writelines(frames)

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        error = CpgError(ErrorCode.LIBRARY, "connection to the node closed")
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK_BYTES)
                if not data:
                    break
                for frame in decoder.feed(data):
                    if isinstance(frame, Frame):
                        await self._on_frame(frame)
        except (DecodeError, ConnectionError) as exc:
            error = CpgError(ErrorCode.LIBRARY, f"connection to the node broken: {exc}")
        finally:
            self.closed = True
            self._writer.close()
            self._fail_all(error)

    async def _on_frame(self, frame: Frame) -> None:
        if frame.type == MsgType.REPLY:
            future = self._pending.get(frame.request_id)
            if future is not None and not future.done() and frame.body:
                future.set_result((frame.body[0], frame.body[1:]))
            return
        event = decode_event(frame)
        if isinstance(event, TotemConfChg):
            for handle in list(self._handles.values()):
                await handle._put(event)
            return
        target = self._handles.get(event.group)
        if target is not None:
            await target._put(event)

    def _fail_all(self, error: CpgError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for handle in list(self._handles.values()):
            handle._finish(error)
        self._handles.clear()
