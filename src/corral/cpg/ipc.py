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
    MCAST_ACK       last_request_id u32 | count u32   (request id 0)

A MCAST with flag ACK_BATCH (2) that the node accepts may be answered by a
MCAST_ACK instead of a REPLY: it stands for an OK REPLY to each of the `count`
requests with ids last_request_id - count + 1 .. last_request_id (mod 2**32),
all of which were ACK_BATCH MCASTs sent in that order. The server sends one
per run of accepted MCASTs it read in one go, before any other reply.

Status codes are `ErrorCode` (corosync's cs_error_t numbers). A request that
does not parse, or that the core refuses, gets an error reply and changes
nothing; a frame over the size bound is skipped and answered with TOO_BIG.
The client's pid comes from SO_PEERCRED, not from the client. Each connection's
outbound queue is bounded in bytes (frames queued in one loop iteration go out
in one write; what a slow client's socket does not take waits in the
transport), and a client that lets the queue exceed its bound is disconnected
(its groups see PROCDOWN) with a logged error.

Both ends are asyncio Protocols: what arrives is parsed and handled in
`data_received` (tens of thousands of small messages per second make a task
wake-up and a copy per read count), and a side that must wait (a MCAST with
WAIT and no room on the server; a full event queue in the client) pauses
reading until it can go on.
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
from typing import cast

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
# The client takes a MCAST_ACK for this MCAST: the server answers a run of
# accepted MCASTs with consecutive request ids in one frame instead of a
# REPLY each. Refusals are still REPLYs. Servers that do not know the flag
# simply send REPLYs, which the client accepts as well.
FLAG_ACK_BATCH = 2
# How long a closing connection may take to flush what is queued for it.
FLUSH_GRACE_S = 1.0

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BBI")
# length | version | type | request id: every frame's head.
_FRAME_HEAD = struct.Struct(">IBBI")
# A whole MCAST_ACK frame: head (request id 0) | last request id u32 | count u32.
_ACK_FRAME = struct.Struct(">IBBIII")
_ACK_BODY = struct.Struct(">II")
_ID_MASK = 0xFFFF_FFFF
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
# A queued DELIVER frame's size besides group and payload (length field included).
_DELIVER_QUEUED_BYTES = _LENGTH.size + _DELIVER_FIXED_BYTES


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
    MCAST_ACK = 68


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


def peer_pid(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return 0
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class _Connection(asyncio.Protocol):
    """One client connection on the server: its requests, and its bounded outbound queue.

    A Protocol rather than a stream pair: requests are parsed and answered in
    `data_received` itself, without a task wake-up per read, and everything
    queued for the client in one loop iteration leaves in one write."""

    def __init__(self, server: CpgIpcServer) -> None:
        self.server = server
        self.service = server.service
        self.transport: asyncio.WriteTransport | None = None
        self.pid = 0
        self.client_id = 0
        self.closed = False
        self.outbound: list[bytes | Deliver] = []
        self.outbound_bytes = 0
        self._buffered_at_write = 0
        self._flush_scheduled = False
        self._inbound = bytearray()
        self._skip_bytes = 0
        # A MCAST with WAIT and no room: reading pauses until it is answered.
        self._waiting: asyncio.Task[None] | None = None
        # Consecutive accepted MCASTs (flag ACK_BATCH) answered by one MCAST_ACK.
        self._ack_last = 0
        self._ack_count = 0
        self._grace: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.WriteTransport).
        self.transport = cast(asyncio.WriteTransport, transport)
        server = self.server
        if len(server._connections) >= server.max_clients:
            log.error("CPG IPC: refusing a client: %d clients connected", server.max_clients)
            self.closed = True
            transport.close()
            return
        self.pid = peer_pid(transport)
        try:
            self.client_id = self.service.open_client(self.pid, self.on_event)
        except CpgError as exc:
            log.error("CPG IPC: cannot serve a client: %s", exc)
            self.closed = True
            transport.close()
            return
        server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        if self.client_id:
            self.service.close_client(self.client_id)
        self.closed = True
        self.outbound.clear()
        if self._waiting is not None:
            self._waiting.cancel()
        if self._grace is not None:
            self._grace.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._waiting is None and not self._inbound:
            # The usual case: parse the chunk itself (request bodies are then
            # sliced once, from bytes) and keep only an incomplete tail.
            pos = self._process_buffer(data)
            if pos < len(data) and not self.closed:
                self._inbound += data[pos:]
            return
        self._inbound += data
        if self._waiting is None:
            self._process()

    def eof_received(self) -> bool:
        self._finish()
        return True  # close once the replies are flushed (see _finish)

    def _finish(self) -> None:
        """No more requests: flush what is queued, then close. Never wait long on
        a client that stopped reading."""
        if self.client_id:
            self.service.close_client(self.client_id)
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._write_out()
        transport.close()
        self._grace = self._loop.call_later(FLUSH_GRACE_S, transport.abort)

    def abort(self) -> None:
        self.closed = True
        if self.client_id:
            self.service.close_client(self.client_id)
        self.outbound.clear()
        self.outbound_bytes = 0
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ requests

    def _process(self) -> None:
        """Answer every complete request in the inbound buffer, in order."""
        pos = self._process_buffer(self._inbound)
        del self._inbound[:pos]

    def _process_buffer(self, buf: bytes | bytearray) -> int:
        """Answer the complete requests in buf, in order; how many bytes were used
        (all of them after a protocol error, which drops the client)."""
        pos = 0
        mcast = MsgType.MCAST
        service = self.service
        service.begin_batch()
        try:
            while not self.closed:
                if self._skip_bytes:
                    dropped = min(self._skip_bytes, len(buf) - pos)
                    pos += dropped
                    self._skip_bytes -= dropped
                    if self._skip_bytes:
                        break
                if len(buf) - pos < _FRAME_HEAD.size:
                    break
                length, version, msg_type, request_id = _FRAME_HEAD.unpack_from(buf, pos)
                if version != IPC_VERSION:
                    raise DecodeError(f"unknown CPG IPC version {version}")
                if length < _HEADER.size:
                    raise DecodeError(f"frame length {length} below header size")
                if length > MAX_FRAME_BYTES:
                    self._reply(request_id, ErrorCode.TOO_BIG)
                    self._skip_bytes = _LENGTH.size + length
                    continue
                end = pos + _LENGTH.size + length
                if len(buf) < end:
                    break
                body = bytes(buf[pos + _FRAME_HEAD.size:end])  # one copy if buf is bytes
                pos = end
                if msg_type == mcast:
                    if not self._mcast(request_id, body):
                        break  # waiting for room: reading is paused
                else:
                    self._request(Frame(msg_type, request_id, body))
        except DecodeError as exc:
            log.warning("CPG IPC: dropping client pid %d: %s", self.pid, exc)
            service.end_batch()
            self.abort()
            return len(buf)
        service.end_batch()
        self._flush_ack()
        return pos

    def _mcast(self, request_id: int, body: bytes) -> bool:
        """One MCAST request; False when it waits for room (reading paused)."""
        try:
            flags, group, payload = split_mcast(body)
        except DecodeError:
            self._reply(request_id, ErrorCode.INVALID_PARAM)
            return True
        try:
            accepted = self.service.client_try_mcast(self.client_id, group, payload)
        except CpgError as exc:
            self._reply(request_id, exc.code)
            return True
        if accepted:
            if flags & FLAG_ACK_BATCH:
                if self._ack_count and request_id != (self._ack_last + 1) & _ID_MASK:
                    self._flush_ack()
                self._ack_last = request_id
                self._ack_count += 1
            else:
                self._reply(request_id, ErrorCode.OK)
            return True
        if not flags & FLAG_WAIT:
            self._reply(request_id, ErrorCode.TRY_AGAIN)
            return True
        self._flush_ack()
        assert self.transport is not None
        self.transport.pause_reading()  # type: ignore[attr-defined]
        self._waiting = self._loop.create_task(self._wait_for_room(request_id, group, payload))
        return False

    async def _wait_for_room(self, request_id: int, group: bytes, payload: bytes) -> None:
        try:
            await self.service.client_mcast(self.client_id, group, payload)
            status = ErrorCode.OK
        except CpgError as exc:
            status = exc.code
        self._waiting = None
        if self.closed:
            return
        self._reply(request_id, status)
        assert self.transport is not None
        self.transport.resume_reading()  # type: ignore[attr-defined]
        self._process()

    def _flush_ack(self) -> None:
        if self._ack_count:
            self.send(_ACK_FRAME.pack(_ACK_FRAME.size - _LENGTH.size, IPC_VERSION,
                                      MsgType.MCAST_ACK, 0, self._ack_last, self._ack_count))
            self._ack_count = 0

    def _request(self, frame: Frame) -> None:
        """Any request but MCAST, answered at once."""
        if frame.type not in REQUEST_TYPES:
            self._reply(frame.request_id, ErrorCode.MESSAGE_ERROR)
            return
        try:
            status, body = self._dispatch(frame)
        except CpgError as exc:
            status, body = exc.code, b""
        except DecodeError:
            status, body = ErrorCode.INVALID_PARAM, b""
        self._reply(frame.request_id, status, body)
        if frame.type == MsgType.FINALIZE and status == ErrorCode.OK:
            self._finish()

    def _dispatch(self, frame: Frame) -> tuple[ErrorCode, bytes]:
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
        self._flush_ack()  # answers stay in request order
        self.send(encode_frame(MsgType.REPLY, request_id, _STATUS.pack(status) + body))

    # ------------------------------------------------------------ outbound

    def on_event(self, event: CpgEvent) -> None:
        if type(event) is Deliver:
            # Queued as is and encoded with the rest of this loop iteration's
            # frames in one pass when they are written out.
            size = _DELIVER_QUEUED_BYTES + len(event.group) + len(event.payload)
            if self._flush_scheduled and not self.closed and \
                    self.outbound_bytes + self._buffered_at_write + size \
                    <= self.server.client_queue_bytes:
                # Hot path of _enqueue: far from the bound, a write already due.
                self.outbound.append(event)
                self.outbound_bytes += size
            else:
                self._enqueue(event, size)
        else:
            self.send(encode_event(event))

    def send(self, frame: bytes) -> None:
        self._enqueue(frame, len(frame))

    def _enqueue(self, item: bytes | Deliver, size: int) -> None:
        if self.closed and (self.transport is None or self.transport.is_closing()):
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
            # One write per loop iteration for every frame queued in it.
            self._flush_scheduled = True
            self._loop.call_soon(self._write_out)

    def _buffered_bytes(self) -> int:
        """Bytes written but still in the transport's buffer (the client is slow)."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _write_out(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if not self.outbound or transport is None or transport.is_closing():
            return
        head, fixed = _DELIVER_HEAD.pack, _DELIVER_FIXED_BYTES
        node_pid = _NODE_PID.pack
        parts: list[bytes] = []
        append = parts.append
        for item in self.outbound:
            if not isinstance(item, Deliver):
                append(item)
            else:
                group, payload = item.group, item.payload
                append(head(fixed + len(group) + len(payload), IPC_VERSION, MsgType.DELIVER,
                            0, len(group)))
                append(group)
                append(node_pid(item.nodeid, item.pid))
                append(payload)
        self.outbound.clear()
        self.outbound_bytes = 0
        # One buffer, one write: small frames cost one join instead of an iovec each.
        transport.write(b"".join(parts))
        self._buffered_at_write = transport.get_write_buffer_size()


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
        self._connections: set[_Connection] = set()

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
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


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
        # flags | group of every mcast_nowait body, encoded once.
        self._mcast_prefix = _FLAGS.pack(FLAG_WAIT | FLAG_ACK_BATCH) + _group(group)

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
        return self.client._mcast_nowait(self._mcast_prefix, data)

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

    def _put_now(self, event: CpgEvent, force: bool = False) -> asyncio.Future[None] | None:
        """Hand `event` over without waiting; or, when the queue is full (and not
        `force`), return a future to await before calling again (the event was
        not taken)."""
        if self.closed:
            return None  # after the own leave or a broken connection: nothing more
        if self._callback is None and len(self._queue) >= self.client.queue_limit \
                and self.error is None and not force:
            # Stop reading the socket: the server's bounded queue takes the pressure.
            self._space = self.client._loop.create_future()
            return self._space
        if isinstance(event, ConfChg):
            self._note_change(event)
        if self._callback is not None:
            try:
                self._callback(event)
            except Exception:
                log.exception("CPG client: event callback of group %r raised", self.group)
        elif self.error is None:
            self._queue.append(event)
            self._wake()
        if self.closed and self._left is not None and not self._left.done():
            self._left.set_result(None)
        return None

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


class _ClientConnection(asyncio.Protocol):
    """The client's end of the socket: hands what arrives to its CpgClient at once
    (no reader task to wake per read) and offers the writer side it uses."""

    def __init__(self) -> None:
        self.client: CpgClient | None = None
        self.transport: asyncio.WriteTransport | None = None
        self._early = bytearray()  # data before the client was attached (none in practice)
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        if self.client is None:
            self._early += data
        else:
            self.client._on_data(data)

    def eof_received(self) -> bool:
        if self.client is not None:
            self.client._on_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake_drain()
        if self.client is not None:
            self.client._on_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def attach(self, client: CpgClient) -> None:
        self.client = client
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            client._on_data(early)

    # The writer side (what the client used of asyncio.StreamWriter).

    def writelines(self, frames: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(frames))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("connection to the node lost")
        while self._write_paused and not self.lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter


class CpgClient:
    """Async client of a node's CPG IPC socket."""

    def __init__(self, connection: _ClientConnection, queue_limit: int) -> None:
        self._writer = connection
        self.queue_limit = queue_limit
        self.nodeid = 0
        self.pid = 0
        self._next_request = 1
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._handles: dict[bytes, CpgClientHandle] = {}
        # mcast_nowait requests waiting for their REPLY or MCAST_ACK.
        self._pending_mcasts: dict[int, asyncio.Future[None]] = {}
        self._loop = asyncio.get_running_loop()
        self._unsent: list[bytes] = []
        self._inbound = bytearray()
        # A handle's full queue: reading is paused until this future is done.
        self._blocked: asyncio.Future[None] | None = None
        self.closed = False
        connection.attach(self)

    @classmethod
    async def connect(
        cls, path: str | os.PathLike[str], *, queue_limit: int = DEFAULT_CLIENT_EVENT_LIMIT
    ) -> CpgClient:
        _transport, connection = await asyncio.get_running_loop().create_unix_connection(
            _ClientConnection, os.fspath(path))
        client = cls(connection, queue_limit)
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
        if self.closed:
            raise CpgError(ErrorCode.BAD_HANDLE, "client closed")
        request_id = self._next_request
        self._next_request = (request_id + 1) & _ID_MASK or 1
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending_mcasts[request_id] = future
        if not self._unsent:
            self._loop.call_soon(self._flush_requests)
        self._unsent.append(encode_frame(msg_type, request_id, body))
        return future

    def _mcast_nowait(self, prefix: bytes, data: bytes) -> asyncio.Future[None]:
        """mcast_nowait's request, framed here: one future, no per-request closure."""
        if self.closed:
            raise CpgError(ErrorCode.BAD_HANDLE, "client closed")
        request_id = self._next_request
        self._next_request = (request_id + 1) & _ID_MASK or 1
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending_mcasts[request_id] = future
        if not self._unsent:
            self._loop.call_soon(self._flush_requests)
        self._unsent.append(_FRAME_HEAD.pack(_HEADER.size + len(prefix) + len(data), IPC_VERSION,
                                             MsgType.MCAST, request_id) + prefix + data)
        return future

    def _flush_requests(self) -> None:
        if self._unsent:
            frames, self._unsent = self._unsent, []
            self._writer.writelines(frames)  # dropped if the connection is closing

    def _on_data(self, data: bytes) -> None:
        """Everything the node sent, as it arrives: handled at once, in order."""
        if self._blocked is None and not self.closed and not self._inbound:
            # The usual case: parse the chunk itself (payloads are then sliced
            # once, from bytes) and keep only an incomplete tail.
            try:
                pos, blocked = self._on_frames(data, 0)
            except DecodeError as exc:
                self._on_lost(exc)
                return
            if pos < len(data):
                self._inbound += data[pos:]
            if blocked is not None:
                self._block(blocked)
            return
        self._inbound += data
        if self._blocked is None and not self.closed:
            self._consume()

    def _consume(self) -> None:
        buf = self._inbound
        try:
            pos, blocked = self._on_frames(buf, 0)
        except DecodeError as exc:
            self._on_lost(exc)
            return
        del buf[:pos]
        if blocked is not None:
            self._block(blocked)

    def _block(self, blocked: asyncio.Future[None]) -> None:
        # A handle's queue is full: stop reading until it has room, which
        # pushes the pressure back to the server's bounded queue.
        self._blocked = blocked
        if self._writer.transport is not None:
            self._writer.transport.pause_reading()  # type: ignore[attr-defined]
        blocked.add_done_callback(self._unblock)

    def _unblock(self, _future: asyncio.Future[None]) -> None:
        self._blocked = None
        if self.closed:
            return
        transport = self._writer.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()  # type: ignore[attr-defined]
        self._consume()

    def _on_lost(self, exc: BaseException | None) -> None:
        if self.closed and not self._pending and not self._pending_mcasts \
                and not self._handles:
            return
        if isinstance(exc, DecodeError):
            error = CpgError(ErrorCode.LIBRARY, f"connection to the node broken: {exc}")
        elif exc is not None:
            error = CpgError(ErrorCode.LIBRARY, f"connection to the node broken: {exc}")
        else:
            error = CpgError(ErrorCode.LIBRARY, "connection to the node closed")
        self.closed = True
        self._writer.close()
        self._fail_all(error)

    def _on_frames(self, buf: bytes | bytearray,
                   pos: int) -> tuple[int, asyncio.Future[None] | None]:
        """Handle the complete frames in buf from pos on; the position reached and,
        if a handle's queue is full, the future to await before going on."""
        end_of_data = len(buf)
        while end_of_data - pos >= _FRAME_HEAD.size:
            length, version, msg_type, request_id = _FRAME_HEAD.unpack_from(buf, pos)
            if version != IPC_VERSION:
                raise DecodeError(f"unknown CPG IPC version {version}")
            if not _HEADER.size <= length <= MAX_FRAME_BYTES:
                raise DecodeError(f"frame length {length} out of bounds")
            end = pos + _LENGTH.size + length
            if end > end_of_data:
                break
            start = pos + _FRAME_HEAD.size
            if msg_type == MsgType.DELIVER:
                group_end = start + 1 + (buf[start] if length > _HEADER.size else 0)
                if group_end == start + 1 or group_end + _NODE_PID.size > end:
                    raise DecodeError("malformed DELIVER frame")
                handle = self._handles.get(bytes(buf[start + 1:group_end]))
                if handle is not None:
                    nodeid, pid = _NODE_PID.unpack_from(buf, group_end)
                    blocked = handle._put_now(Deliver(
                        handle.group, nodeid, pid, bytes(buf[group_end + _NODE_PID.size:end])))
                    if blocked is not None:
                        return pos, blocked
            elif msg_type == MsgType.MCAST_ACK:
                if length != _HEADER.size + _ACK_BODY.size:
                    raise DecodeError("malformed MCAST_ACK frame")
                last, count = _ACK_BODY.unpack_from(buf, start)
                self._acked(last, count)
            elif msg_type == MsgType.REPLY:
                self._on_reply(request_id, bytes(buf[start:end]))
            else:
                blocked = self._on_event_frame(Frame(msg_type, request_id, bytes(buf[start:end])))
                if blocked is not None:
                    return pos, blocked
            pos = end
        return pos, None

    def _acked(self, last: int, count: int) -> None:
        pending = self._pending_mcasts
        for offset in range(min(count, len(pending))):
            future = pending.pop((last - offset) & _ID_MASK, None)
            if future is not None and not future.done():
                future.set_result(None)

    def _on_reply(self, request_id: int, body: bytes) -> None:
        if not body:
            return
        mcast = self._pending_mcasts.pop(request_id, None)
        if mcast is not None:
            if mcast.done():
                return
            try:
                self._reply_or_raise(MsgType.MCAST, body[0], b"")
            except CpgError as refusal:
                mcast.set_exception(refusal)
            else:
                mcast.set_result(None)
            return
        future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_result((body[0], body[1:]))

    def _on_event_frame(self, frame: Frame) -> asyncio.Future[None] | None:
        event = decode_event(frame)
        if isinstance(event, TotemConfChg):
            for handle in list(self._handles.values()):
                # Not throttled: rare, and it must reach every handle.
                handle._put_now(event, force=True)
            return None
        target = self._handles.get(event.group)
        if target is not None:
            return target._put_now(event)
        return None

    def _fail_all(self, error: CpgError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        mcasts, self._pending_mcasts = self._pending_mcasts, {}
        for mcast in mcasts.values():
            if not mcast.done():
                mcast.set_exception(error)
                mcast.exception()  # retrieved: its caller may have stopped waiting
        for handle in list(self._handles.values()):
            handle._finish(error)
        self._handles.clear()
