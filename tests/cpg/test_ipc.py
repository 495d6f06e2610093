"""The CPG Unix-socket API: the frame decoder (whole, byte by byte, with a
partial next frame, oversize skipping), event codec round trips, and a real
socket served by CpgIpcServer over a fake Totem: permissions of the socket,
join/mcast/leave/membership through CpgClient, bad requests answered with an
error and no change, flow control (TRY_AGAIN or waiting), finalize and abrupt
disconnect as PROCDOWN, and clients that stop reading being disconnected at
the outbound bound with a logged error; accepted MCASTs answered by one
MCAST_ACK per run of consecutive ids (in order with the other answers, also
across the request-id wrap), and a full queue-mode handle throttling the
client's reading without losing events. Runs on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

import pytest

from corral.cpg.core import CpgError, ErrorCode
from corral.cpg.events import ConfChg, CpgEvent, Deliver, Member, Reason, TotemConfChg
from corral.cpg.ipc import (
    FLAG_ACK_BATCH,
    FLAG_WAIT,
    MAX_FRAME_BYTES,
    CpgClient,
    CpgClientHandle,
    CpgIpcServer,
    Frame,
    FrameDecoder,
    MsgType,
    OversizeFrame,
    decode_event,
    encode_event,
    encode_frame,
)
from corral.cpg.service import CpgService
from corral.errors import DecodeError

from .conftest import Runner
from .fakenode import FakeNetwork


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="crl-cpg-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- codec

EVENTS: list[CpgEvent] = [
    Deliver(b"g", 1, 2, b"payload"),
    ConfChg(b"g" * 128, (Member(1, 2), Member(3, 4)), (Member(5, 6, Reason.NODEDOWN),), ()),
    TotemConfChg((1, 1 << 40), (1, 2, 3)),
]


@pytest.mark.parametrize("event", EVENTS)
def test_event_round_trip_whole_and_byte_by_byte(event: CpgEvent) -> None:
    encoded = encode_event(event)
    (frame,) = FrameDecoder().feed(encoded)
    assert isinstance(frame, Frame) and decode_event(frame) == event
    decoder = FrameDecoder()
    frames = [f for i in range(len(encoded)) for f in decoder.feed(encoded[i:i + 1])]
    assert len(frames) == 1 and isinstance(frames[0], Frame)
    assert decode_event(frames[0]) == event


def test_partial_next_frame_is_kept_and_truncated_bodies_rejected() -> None:
    one, two = encode_event(EVENTS[0]), encode_event(EVENTS[2])
    decoder = FrameDecoder()
    assert len(decoder.feed(one + two[:5])) == 1
    (frame,) = decoder.feed(two[5:])
    assert decode_event(frame) == EVENTS[2]  # type: ignore[arg-type]
    confchg = encode_event(EVENTS[1])
    (whole,) = FrameDecoder().feed(confchg)
    assert isinstance(whole, Frame)
    for cut in range(len(whole.body)):
        with pytest.raises(DecodeError):
            decode_event(Frame(whole.type, 0, whole.body[:cut]))
    with pytest.raises(DecodeError):
        decode_event(Frame(whole.type, 0, whole.body + b"\0"))


def test_oversize_frame_is_skipped_and_bad_version_rejected() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    big = encode_frame(MsgType.MCAST, 7, b"x" * 500)
    small = encode_frame(MsgType.LOCAL_GET, 8)
    out = []
    for i in range(0, len(big + small), 64):
        out += decoder.feed((big + small)[i:i + 64])
    assert out == [OversizeFrame(MsgType.MCAST, 7), Frame(MsgType.LOCAL_GET, 8, b"")]
    with pytest.raises(DecodeError):
        FrameDecoder().feed(b"\0\0\0\6\x09\x01\0\0\0\0")


# ---------------------------------------------------------------- over a socket


async def make_node(
    sock_dir: str, n_nodes: int = 2, **server_options: int
) -> tuple[FakeNetwork, list[CpgService], list[CpgIpcServer], list[str]]:
    network = FakeNetwork(list(range(1, n_nodes + 1)), capacity=8)
    services = [CpgService(node) for node in network.nodes.values()]
    network.start()
    network.configure([list(network.nodes)])
    await network.settle()
    servers, paths = [], []
    for index, service in enumerate(services):
        path = os.path.join(sock_dir, f"cpg{index + 1}.sock")
        server = CpgIpcServer(service, path, **server_options)
        await server.start()
        servers.append(server)
        paths.append(path)
    return network, services, servers, paths


async def shutdown(network: FakeNetwork, servers: list[CpgIpcServer]) -> None:
    for server in servers:
        await server.close()
    await network.stop()


async def until(handle: CpgClientHandle, predicate: object) -> list[CpgEvent]:
    assert callable(predicate)
    out: list[CpgEvent] = []
    async for event in handle.events():
        out.append(event)
        if predicate(event):
            return out
    raise AssertionError(f"events ended before the expected one: {out}")


async def raw_request(path: str, frames: list[bytes]) -> list[Frame]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"".join(frames))
    await writer.drain()
    decoder = FrameDecoder()
    replies: list[Frame] = []
    while len(replies) < len(frames):
        data = await reader.read(65536)
        assert data, "server closed early"
        replies += [f for f in decoder.feed(data) if isinstance(f, Frame)
                    and f.type == MsgType.REPLY]
    writer.close()
    return replies


def test_socket_is_private_to_root(run: Runner, sock_dir: str) -> None:
    async def main() -> None:
        network, _, servers, paths = await make_node(sock_dir, 1)
        info = os.stat(paths[0])
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        if os.geteuid() == 0:
            assert (info.st_uid, info.st_gid) == (0, 0)
        await shutdown(network, servers)
        assert not os.path.exists(paths[0])

    run(main)


def test_join_mcast_leave_through_the_socket(run: Runner, sock_dir: str) -> None:
    async def main() -> None:
        network, _services, servers, paths = await make_node(sock_dir)
        one = await CpgClient.connect(paths[0])
        two = await CpgClient.connect(paths[1])
        assert await one.local_get() == 1 and await two.local_get() == 2
        assert one.pid == os.getpid()
        h1 = await one.join("grp")
        await h1.wait_joined()
        h2 = await two.join(b"grp")
        await h2.wait_joined()
        await h1.mcast(b"from-one")
        got = await until(h2, lambda e: isinstance(e, Deliver))
        assert got[-1] == Deliver(b"grp", 1, os.getpid(), b"from-one")
        own = await until(h1, lambda e: isinstance(e, Deliver))
        assert own[-1].payload == b"from-one"  # type: ignore[union-attr]
        expected = (Member(1, os.getpid()), Member(2, os.getpid()))
        assert await one.membership_get("grp") == expected
        assert h1.members() == expected
        await h2.leave()
        rest = [e async for e in h2.events()]  # ends with the own leave confchg
        assert isinstance(rest[-1], ConfChg)
        assert rest[-1].left == (Member(2, os.getpid(), Reason.LEAVE),)
        changes = await until(h1, lambda e: isinstance(e, ConfChg) and e.left)
        assert changes[-1].left == (Member(2, os.getpid(), Reason.LEAVE),)  # type: ignore[union-attr]
        await one.finalize()
        await two.finalize()
        await shutdown(network, servers)

    run(main)


def test_bad_requests_get_errors_and_change_nothing(run: Runner, sock_dir: str) -> None:
    async def main() -> None:
        network, services, servers, paths = await make_node(sock_dir, 1)
        replies = await raw_request(paths[0], [
            encode_frame(MsgType.JOIN, 1, b"\x00"),  # empty group name
            encode_frame(MsgType.JOIN, 2, b"\x05ab"),  # truncated group name
            encode_frame(MsgType.LEAVE, 3, b"\x03grp"),  # not joined
            encode_frame(MsgType.MCAST, 4, b"\x01\x03grpdata"),  # not joined
            encode_frame(99, 5),  # unknown request type
            encode_frame(MsgType.DELIVER, 6, b""),  # an event type as a request
            encode_frame(MsgType.LOCAL_GET, 7, b"junk"),  # trailing bytes
            encode_frame(MsgType.MCAST, 8, b"\x01\x03grp" + b"x" * MAX_FRAME_BYTES),
            encode_frame(MsgType.LOCAL_GET, 9),  # still served after all that
            encode_frame(MsgType.MCAST, 10, b""),  # no flags
            encode_frame(MsgType.MCAST, 11, b"\x01\x00data"),  # empty group name
            encode_frame(MsgType.MCAST, 12, b"\x01\x05grp"),  # truncated group name
            encode_frame(MsgType.MCAST, 13, b"\x01\x81" + b"g" * 129),  # group name too long
            encode_frame(MsgType.MCAST, 14, b"\x01\x03grp"),  # well formed, empty payload
        ])
        statuses = {f.request_id: f.body[0] for f in replies}
        assert statuses == {
            1: ErrorCode.INVALID_PARAM, 2: ErrorCode.INVALID_PARAM, 3: ErrorCode.NOT_EXIST,
            4: ErrorCode.NOT_EXIST, 5: ErrorCode.MESSAGE_ERROR, 6: ErrorCode.MESSAGE_ERROR,
            7: ErrorCode.INVALID_PARAM, 8: ErrorCode.TOO_BIG, 9: ErrorCode.OK,
            10: ErrorCode.INVALID_PARAM, 11: ErrorCode.INVALID_PARAM,
            12: ErrorCode.INVALID_PARAM, 13: ErrorCode.INVALID_PARAM, 14: ErrorCode.NOT_EXIST,
        }
        await network.settle()
        assert services[0].core.groups() == []
        client = await CpgClient.connect(paths[0])
        with pytest.raises(CpgError) as info:
            await client.join("x" * 129)
        assert info.value.code == ErrorCode.INVALID_PARAM
        await client.join("grp")
        other = await CpgClient.connect(paths[0])
        with pytest.raises(CpgError) as info:
            await other.join("grp")  # same pid, same group
        assert info.value.code == ErrorCode.EXIST
        await client.close()
        await other.close()
        await shutdown(network, servers)

    run(main)


def test_flow_control_try_again_or_wait(run: Runner, sock_dir: str) -> None:
    async def main() -> None:
        network, _services, servers, paths = await make_node(sock_dir, 1)
        client = await CpgClient.connect(paths[0])
        handle = await client.join("grp")
        await handle.wait_joined()
        network.pause()
        with pytest.raises(CpgError) as info:
            for i in range(2000):
                await handle.mcast(b"%d" % i, wait=False)
        assert info.value.code == ErrorCode.TRY_AGAIN
        sent = i
        blocked = asyncio.ensure_future(handle.mcast(b"waited"))
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert not blocked.done()
        network.resume()
        await blocked
        got = await until(handle, lambda e: getattr(e, "payload", None) == b"waited")
        assert len([e for e in got if isinstance(e, Deliver)]) == sent + 1
        await client.finalize()
        await shutdown(network, servers)

    run(main)


def test_mcast_nowait_keeps_order_waits_on_flow_control_and_reports_refusal(
    run: Runner, sock_dir: str
) -> None:
    async def main() -> None:
        network, _services, servers, paths = await make_node(sock_dir, 1)
        client = await CpgClient.connect(paths[0])
        handle = await client.join("grp")
        await handle.wait_joined()
        network.pause()
        # Queued at once, in call order; none is answered while the node is paused.
        futures = [handle.mcast_nowait(b"%04d" % i) for i in range(300)]
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert not futures[-1].done()
        network.resume()
        await asyncio.gather(*futures)
        got = await until(handle, lambda e: getattr(e, "payload", None) == b"0299")
        payloads = [e.payload for e in got if isinstance(e, Deliver)]
        assert payloads == [b"%04d" % i for i in range(300)]
        # A refusal arrives as the future's CpgError (not a member of this group).
        other = await client.join("other")
        await other.wait_joined()
        await other.leave()
        refused = other.client._request_nowait(
            MsgType.MCAST, b"\x01\x05other" + b"late")
        with pytest.raises(CpgError):
            await refused
        await client.finalize()
        await shutdown(network, servers)

    run(main)


def test_finalize_and_abrupt_disconnect_are_procdown(run: Runner, sock_dir: str) -> None:
    async def main() -> None:
        network, services, servers, paths = await make_node(sock_dir)
        watcher = await services[1].join("grp", pid=4242)
        for how in ("finalize", "drop"):
            client = await CpgClient.connect(paths[0])
            handle = await client.join("grp")
            await handle.wait_joined()
            if how == "finalize":
                await client.finalize()
            else:
                client._writer.transport.abort()
                await client.close()
            me = Member(1, os.getpid(), Reason.PROCDOWN)
            async for event in watcher.events():
                if isinstance(event, ConfChg) and event.left == (me,):
                    break
        await shutdown(network, servers)

    run(main)


def test_client_that_stops_reading_is_disconnected(
    run: Runner, sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        network, services, servers, paths = await make_node(
            sock_dir, client_queue_bytes=256 * 1024
        )
        slow = await CpgClient.connect(paths[0], queue_limit=4)
        slow_handle = await slow.join("grp")  # never read: the library stops reading
        sender = await services[1].join("grp", pid=77)
        await sender.wait_joined()
        for i in range(3000):
            await sender.mcast(b"%06d" % i + b"x" * 1000)
        me = Member(1, os.getpid(), Reason.PROCDOWN)
        async for event in sender.events():
            if isinstance(event, ConfChg) and event.left == (me,):
                break
        with pytest.raises(CpgError):
            async for _ in slow_handle.events():
                pass
        assert services[0].stats()["clients"] == 0
        await slow.close()
        await shutdown(network, servers)

    with caplog.at_level(logging.ERROR, logger="corral.cpg.ipc"):
        run(main)
    assert any("did not read" in r.message for r in caplog.records)



def test_callback_mode_and_leave_through_the_socket(run: Runner, sock_dir: str) -> None:
    async def main() -> None:
        network, _services, servers, paths = await make_node(sock_dir, 1)
        client = await CpgClient.connect(paths[0])
        seen: list[CpgEvent] = []
        handle = await client.join("grp", callback=seen.append)
        await handle.wait_joined()
        await handle.mcast(b"cb")
        await handle.leave()
        assert [type(e) for e in seen] == [ConfChg, Deliver, ConfChg]
        assert seen[-1].left == (Member(1, os.getpid(), Reason.LEAVE),)  # type: ignore[union-attr]
        again = await client.join("grp")  # the group may be joined again after leaving
        await again.wait_joined()
        await client.finalize()
        await shutdown(network, servers)

    run(main)


def test_many_frames_in_one_chunk_and_client_limit(run: Runner, sock_dir: str) -> None:
    frames = b"".join(encode_event(Deliver(b"g", 1, 2, b"%d" % i)) for i in range(5000))
    decoded = FrameDecoder().feed(frames)
    assert [decode_event(f).payload for f in decoded] == [  # type: ignore[arg-type,union-attr]
        b"%d" % i for i in range(5000)
    ]

    async def main() -> None:
        network, _services, servers, paths = await make_node(sock_dir, 1, max_clients=1)
        first = await CpgClient.connect(paths[0])
        with pytest.raises((CpgError, ConnectionError)):
            await CpgClient.connect(paths[0])  # refused: the server closes it at once
        assert await first.local_get() == 1
        await first.finalize()
        await shutdown(network, servers)

    run(main)


def test_accepted_ack_batch_mcasts_are_answered_by_one_ack_per_consecutive_run(
    run: Runner, sock_dir: str
) -> None:
    """Requests 5..7 (ACK_BATCH) share one MCAST_ACK; 10 starts a new run, which
    is flushed before the plain REPLY to 11 and the refusal of 12, in order."""

    async def main() -> None:
        network, _services, servers, paths = await make_node(sock_dir, 1)
        reader, writer = await asyncio.open_unix_connection(paths[0])
        batch = bytes((FLAG_WAIT | FLAG_ACK_BATCH,))
        writer.write(b"".join([
            encode_frame(MsgType.JOIN, 1, b"\x03grp"),
            *(encode_frame(MsgType.MCAST, rid, batch + b"\x03grp" + b"m%d" % rid)
              for rid in (5, 6, 7, 10)),
            encode_frame(MsgType.MCAST, 11, bytes((FLAG_WAIT,)) + b"\x03grp" + b"plain"),
            encode_frame(MsgType.MCAST, 12, batch + b"\x03zzz" + b"not joined"),
        ]))
        await writer.drain()
        decoder = FrameDecoder()
        answers: list[tuple[int, int, bytes]] = []
        while len(answers) < 5:
            data = await reader.read(65536)
            assert data, "server closed early"
            answers += [(f.type, f.request_id, f.body) for f in decoder.feed(data)
                        if isinstance(f, Frame) and f.type in (MsgType.REPLY, MsgType.MCAST_ACK)]
        ok = bytes((ErrorCode.OK,))
        assert answers == [
            (MsgType.REPLY, 1, ok),
            (MsgType.MCAST_ACK, 0, (7).to_bytes(4, "big") + (3).to_bytes(4, "big")),
            (MsgType.MCAST_ACK, 0, (10).to_bytes(4, "big") + (1).to_bytes(4, "big")),
            (MsgType.REPLY, 11, ok),
            (MsgType.REPLY, 12, bytes((ErrorCode.NOT_EXIST,))),
        ]
        writer.close()
        await shutdown(network, servers)

    run(main)


def test_mcast_nowait_futures_complete_across_request_id_wrap(run: Runner, sock_dir: str) -> None:
    async def main() -> None:
        network, _services, servers, paths = await make_node(sock_dir, 1)
        client = await CpgClient.connect(paths[0])
        handle = await client.join("grp")
        await handle.wait_joined()
        client._next_request = 0xFFFF_FFFE  # ids FFFFFFFE, FFFFFFFF, then 1, 2 (0 is skipped)
        futures = [handle.mcast_nowait(b"w%d" % i) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*futures), 5.0)
        assert not client._pending_mcasts
        got = await until(handle, lambda e: getattr(e, "payload", None) == b"w3")
        assert [e.payload for e in got if isinstance(e, Deliver)] == [b"w0", b"w1", b"w2", b"w3"]
        await client.finalize()
        await shutdown(network, servers)

    run(main)


def test_queue_mode_handle_throttles_reading_without_losing_events(
    run: Runner, sock_dir: str
) -> None:
    """A handle whose queue is full stops the client's reading (the frame that did
    not fit is handed over once there is room); nothing is lost or reordered."""

    async def main() -> None:
        network, services, servers, paths = await make_node(sock_dir)
        client = await CpgClient.connect(paths[0], queue_limit=3)
        handle = await client.join("grp")
        await handle.wait_joined()
        sender = await services[1].join("grp", pid=99)
        await sender.wait_joined()
        for i in range(200):
            await sender.mcast(b"%03d" % i)
        got = await until(handle, lambda e: getattr(e, "payload", None) == b"199")
        assert [e.payload for e in got if isinstance(e, Deliver)] == [b"%03d" % i
                                                                      for i in range(200)]
        await client.finalize()
        await shutdown(network, servers)

    run(main)


def test_requests_split_at_every_byte_are_answered(run: Runner, sock_dir: str) -> None:
    """The server parses what arrives and keeps incomplete tails: requests sent a
    byte at a time (each byte its own read) are answered exactly as whole ones."""

    async def main() -> None:
        network, _services, servers, paths = await make_node(sock_dir, 1)
        reader, writer = await asyncio.open_unix_connection(paths[0])
        stream = b"".join([
            encode_frame(MsgType.JOIN, 1, b"\x03grp"),
            encode_frame(MsgType.MCAST, 2, bytes((FLAG_WAIT | FLAG_ACK_BATCH,)) + b"\x03grp" + b"a"),
            encode_frame(MsgType.LOCAL_GET, 3),
        ])
        for index in range(len(stream)):
            writer.write(stream[index:index + 1])
            await writer.drain()
            await asyncio.sleep(0)
        decoder = FrameDecoder()
        answers: list[tuple[int, int]] = []
        while len(answers) < 3:
            data = await reader.read(65536)
            assert data, "server closed early"
            answers += [(f.type, f.request_id) for f in decoder.feed(data)
                        if isinstance(f, Frame) and f.type in (MsgType.REPLY, MsgType.MCAST_ACK)]
        assert answers == [(MsgType.REPLY, 1), (MsgType.MCAST_ACK, 0), (MsgType.REPLY, 3)]
        writer.close()
        await shutdown(network, servers)

    run(main)
