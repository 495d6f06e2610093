"""CpgService and CpgHandle on a fake asyncio Totem (tests/cpg/fakenode.py):
join/mcast/events across nodes, leave acknowledged by the own confchg, close
as PROCDOWN, mcast waiting on Totem backpressure without losing order, mcast
during a sync, callbacks, and a consumer that never reads being disconnected
at its queue bound with a logged error. Each test runs on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from corral.cpg.core import CpgError, ErrorCode, SyncState
from corral.cpg.events import ConfChg, CpgEvent, Deliver, Member, Reason, TotemConfChg
from corral.cpg.service import CpgHandle, CpgService

from .conftest import Runner
from .fakenode import FakeNetwork


async def make_cluster(
    n_nodes: int = 3, capacity: int = 64
) -> tuple[FakeNetwork, dict[int, CpgService]]:
    network = FakeNetwork(list(range(1, n_nodes + 1)), capacity=capacity)
    services = {n: CpgService(node) for n, node in network.nodes.items()}
    network.start()
    network.configure([list(network.nodes)])
    await network.settle()
    return network, services


async def take(handle: CpgHandle, count: int) -> list[CpgEvent]:
    out: list[CpgEvent] = []
    async for event in handle.events():
        out.append(event)
        if len(out) == count:
            break
    return out


async def until(handle: CpgHandle, predicate: object) -> list[CpgEvent]:
    """Events up to and including the first one matching `predicate`."""
    assert callable(predicate)
    out: list[CpgEvent] = []
    async for event in handle.events():
        out.append(event)
        if predicate(event):
            break
    return out


def left_is(member: Member) -> object:
    return lambda e: isinstance(e, ConfChg) and e.left == (member,)


def payloads(events: list[CpgEvent]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Deliver)]


def test_join_mcast_and_events_across_nodes(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster()
        one = await services[1].join("grp", pid=100)
        await one.wait_joined()
        two = await services[2].join(b"grp", pid=200)
        await two.wait_joined()
        await one.mcast(b"hello")
        await two.mcast(b"world")
        await network.settle()
        events_one = await take(one, 4)
        assert isinstance(events_one[0], ConfChg)
        assert events_one[0].joined == (Member(1, 100, Reason.JOIN),)
        assert events_one[1].joined == (Member(2, 200, Reason.JOIN),)  # type: ignore[union-attr]
        assert payloads(events_one) == [b"hello", b"world"]
        events_two = await take(two, 3)
        assert payloads(events_two) == [b"hello", b"world"]
        assert one.members() == two.members() == (Member(1, 100), Member(2, 200))
        assert services[3].members("grp") == one.members()
        await network.stop()

    run(main)


def test_leave_returns_after_own_confchg_and_ends_events(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster()
        one = await services[1].join("grp", pid=100)
        stay = await services[2].join("grp", pid=200)
        await network.settle()
        await one.leave()
        events = [e async for e in one.events()]
        assert isinstance(events[-1], ConfChg)
        assert events[-1].left == (Member(1, 100, Reason.LEAVE),)
        with pytest.raises(CpgError):
            await one.mcast(b"x")
        await network.settle()
        assert stay.members() == (Member(2, 200),)
        await network.stop()

    run(main)


def test_close_without_leave_is_procdown(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster()
        gone = await services[1].join("grp", pid=100)
        stay = await services[2].join("grp", pid=200)
        await network.settle()
        gone.close()
        await network.settle()
        await until(stay, left_is(Member(1, 100, Reason.PROCDOWN)))
        await network.stop()

    run(main)


def test_mcast_waits_on_backpressure_and_keeps_order(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster(2, capacity=4)
        sender = await services[1].join("grp", pid=100)
        receiver = await services[2].join("grp", pid=200)
        await network.settle()
        network.pause()
        sending = asyncio.ensure_future(
            asyncio.gather(*(sender.mcast(b"%04d" % i) for i in range(600)))
        )
        for _ in range(50):
            await asyncio.sleep(0)
        assert not sending.done()  # blocked: Totem queue full and service pending at bound
        assert network.nodes[1].submit_refusals >= 1
        assert services[1].stats()["pending_to_totem"] <= 256
        network.resume()
        await sending
        await network.settle()
        got = payloads(await until(receiver, lambda e: getattr(e, "payload", b"") == b"0599"))
        assert got == [b"%04d" % i for i in range(600)]
        await network.stop()

    run(main)


def test_mcast_without_wait_says_try_again(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster(2, capacity=1)
        sender = await services[1].join("grp", pid=100)
        await network.settle()
        network.pause()
        with pytest.raises(CpgError) as info:
            for i in range(1000):
                await sender.mcast(b"%d" % i, wait=False)
        assert info.value.code == ErrorCode.TRY_AGAIN
        network.resume()
        await network.stop()

    run(main)


def test_mcast_during_sync_is_delivered_after(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster(3)
        one = await services[1].join("grp", pid=100)
        three = await services[3].join("grp", pid=300)
        await network.settle()
        network.pause()
        network.configure([[1, 2], [3]])
        assert services[1].core.state == SyncState.SYNC
        await one.mcast(b"in-sync")  # accepted into the local queue, not lost
        network.resume()
        await network.settle()
        events = await take(one, 5)
        kinds = [type(e).__name__ for e in events]
        # NODEDOWN is known at the transitional configuration, before the new ring.
        assert kinds == ["ConfChg", "ConfChg", "ConfChg", "TotemConfChg", "Deliver"]
        assert events[2].left == (Member(3, 300, Reason.NODEDOWN),)  # type: ignore[union-attr]
        assert isinstance(events[3], TotemConfChg) and events[3].members == (1, 2)
        assert not payloads(await until(three, lambda e: isinstance(e, TotemConfChg)))
        await network.stop()

    run(main)


def test_callback_mode(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster(2)
        seen: list[CpgEvent] = []
        handle = await services[1].join("grp", pid=100, callback=seen.append)
        await network.settle()
        await handle.mcast(b"cb")
        await network.settle()
        assert [type(e) for e in seen] == [ConfChg, Deliver]
        await network.stop()

    run(main)


def test_slow_consumer_is_disconnected_at_its_queue_bound(
    run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        network, services = await make_cluster(2)
        slow = await services[1].join("grp", pid=100, queue_limit=8)
        fast = await services[2].join("grp", pid=200)
        await network.settle()
        for i in range(50):
            await fast.mcast(b"%d" % i)
        await network.settle()
        with pytest.raises(CpgError) as info:
            async for _ in slow.events():
                pass
        assert info.value.code == ErrorCode.NO_SPACE
        await until(fast, left_is(Member(1, 100, Reason.PROCDOWN)))
        assert services[1].stats()["clients"] == 0
        await network.stop()

    with caplog.at_level(logging.ERROR, logger="corral.cpg"):
        run(main)
    assert any("did not read" in r.message for r in caplog.records)


def test_join_errors_leave_no_client_behind(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster(1)
        await services[1].join("grp", pid=100)
        with pytest.raises(CpgError) as info:
            await services[1].join("grp", pid=100)
        assert info.value.code == ErrorCode.EXIST
        with pytest.raises(CpgError):
            await services[1].join("x" * 129)
        assert services[1].stats()["clients"] == 1
        await services[1].close()
        await network.stop()

    run(main)


def test_leave_in_callback_mode_and_no_events_after_leave(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster(2)
        seen: list[CpgEvent] = []
        handle = await services[1].join("grp", pid=100, callback=seen.append)
        await handle.wait_joined()
        await handle.leave()
        assert seen[-1].left == (Member(1, 100, Reason.LEAVE),)  # type: ignore[union-attr]
        count = len(seen)
        network.configure([[1, 2]])  # a totem confchg after the leave reaches nobody
        await network.settle()
        assert len(seen) == count
        again = await services[1].join("grp", pid=100)  # same pid may join again
        await again.wait_joined()
        await network.stop()

    run(main)


def test_service_close_ends_waiting_handles(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster(1)
        handle = await services[1].join("grp", pid=100)
        await handle.wait_joined()
        network.pause()
        leaving = asyncio.ensure_future(handle.leave())
        await asyncio.sleep(0)
        await services[1].close()
        with pytest.raises(CpgError) as info:
            await leaving
        assert info.value.code == ErrorCode.LIBRARY
        with pytest.raises(CpgError):
            await services[1].join("other")
        await network.stop()

    run(main)


def test_a_failing_sink_drops_only_that_client(run: Runner) -> None:
    async def main() -> None:
        network, services = await make_cluster(1)
        service = services[1]

        def broken(event: CpgEvent) -> None:
            raise RuntimeError("bug in a client")

        bad = service.open_client(55, broken)
        service.client_join(bad, b"grp")
        good = await service.join("grp", pid=66)
        await network.settle()
        await until(good, left_is(Member(1, 55, Reason.PROCDOWN)))
        assert service.stats()["clients"] == 1
        await network.stop()

    run(main)
