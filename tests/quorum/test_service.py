"""QuorumService over the real CpgService, on the CPG tests' fake asyncio Totem
(tests/cpg/fakenode.py): nodes announce votes in `corral-quorum` and become quorate,
partitions lose quorum, `expected` propagates, a clean leave (group LEAVE) drives
allow_downscale while a partition does not, the last-man-standing timer fires on
the real clock, ev_tracking is written to the state directory and read back as a
floor, subscribers see the changes, and services started after the ring formed
still hear each other (re-announcement on a group join). Each test runs on asyncio
and uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from corral.cpg.service import CpgService
from corral.quorum.config import QuorumConfig
from corral.quorum.core import ExpectedVotesRefused, MembersChanged, QuorateChanged
from corral.quorum.service import EV_TRACKING_FILE, QuorumService, read_ev_tracking
from cpg.fakenode import FakeNetwork  # tests/ is on sys.path (rootdir of both packages)

Main = Callable[[], Coroutine[Any, Any, None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Main], None]:
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def runner(main: Main) -> None:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            loop_runner.run(asyncio.wait_for(main(), 20))

    return runner


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def cluster(
    options: dict[str, str], count: int = 3, state_dirs: dict[int, Path] | None = None
) -> tuple[FakeNetwork, dict[int, QuorumService]]:
    network = FakeNetwork(list(range(1, count + 1)))
    config = QuorumConfig.from_options(options, {n: 1 for n in network.nodes})
    services = {}
    for nodeid, node in network.nodes.items():
        state = state_dirs.get(nodeid) if state_dirs else None
        services[nodeid] = QuorumService(CpgService(node), config, state)
    network.start()
    for service in services.values():
        await service.start()
    network.configure([list(network.nodes)])
    await until(lambda: all(s.quorate for s in services.values()))
    return network, services


def numbers(service: QuorumService) -> tuple[int, int, int, int, bool]:
    s = service.status()
    return (s.expected_votes, s.highest_expected, s.total_votes, s.quorum, s.quorate)


def test_quorate_then_partition(run: Callable[[Main], None]) -> None:
    async def main() -> None:
        network, services = await cluster({})
        assert numbers(services[1]) == (3, 3, 3, 2, True)
        changes: list[object] = []
        services[3].subscribe(changes.append)
        network.configure([[1, 2], [3]])
        await until(lambda: not services[3].quorate and services[1].status().total_votes == 2)
        await until(lambda: not services[1].status().syncing)
        assert numbers(services[1]) == (3, 3, 2, 2, True)
        assert numbers(services[3]) == (3, 3, 1, 2, False)
        assert any(isinstance(c, MembersChanged) and c.members == (3,) for c in changes)
        assert QuorateChanged(False, services[3].status().ring_id) in changes
        network.configure([[1, 2, 3]])
        await asyncio.wait_for(services[3].wait_quorate(), 5)
        await network.stop()

    run(main)


def test_services_started_after_the_ring_formed(run: Callable[[Main], None]) -> None:
    async def main() -> None:
        # Two of five nodes: nobody becomes quorate, so only the re-announcement on a
        # group join lets node 2 hear node 1's NODEINFO, sent before node 2 joined.
        network = FakeNetwork([1, 2])
        config = QuorumConfig.from_options({}, {n: 1 for n in range(1, 6)})
        cpgs = {n: CpgService(node) for n, node in network.nodes.items()}
        network.start()
        network.configure([[1, 2]])
        await network.settle()
        services = {}
        for nodeid in (1, 2):
            services[nodeid] = QuorumService(cpgs[nodeid], config)
            await services[nodeid].start()
            await network.settle()
        await until(lambda: not any(s.status().syncing for s in services.values()))
        assert numbers(services[2]) == (5, 5, 2, 3, False)
        await services[1].set_expected(3)
        await until(lambda: all(s.quorate for s in services.values()))
        await network.stop()

    run(main)


def test_expected_on_a_lone_node(run: Callable[[Main], None]) -> None:
    async def main() -> None:
        network, services = await cluster({})
        network.configure([[1, 2], [3]])
        await until(lambda: not services[3].quorate)
        with pytest.raises(ExpectedVotesRefused, match="would lose quorum"):
            await services[3].set_expected(2)
        await services[3].set_expected(1)
        await until(lambda: services[3].quorate)
        assert numbers(services[3]) == (1, 1, 1, 1, True)
        assert numbers(services[1])[:3] == (3, 3, 2)  # the other partition is untouched
        await network.stop()

    run(main)


def test_clean_leave_downscales_a_partition_does_not(run: Callable[[Main], None]) -> None:
    async def main() -> None:
        options = {"allow_downscale": "1", "expected_votes": "2"}
        network, services = await cluster(options)
        await services[3].stop()
        network.configure([[1, 2]])
        await until(lambda: services[1].status().ring_id == services[2].status().ring_id
                    and not services[1].status().syncing and services[1].status().members
                    and len(services[1].status().members) == 2)
        assert numbers(services[1]) == (2, 2, 2, 2, True)
        await network.stop()

        network, services = await cluster(options)
        network.configure([[1, 2], [3]])
        await until(lambda: len(services[1].status().members) == 2
                    and not services[1].status().syncing)
        assert numbers(services[1]) == (3, 3, 2, 2, True)
        await network.stop()

    run(main)


def test_last_man_standing_timer(run: Callable[[Main], None]) -> None:
    async def main() -> None:
        options = {"last_man_standing": "1", "last_man_standing_window": "150"}
        network, services = await cluster(options, count=4)
        network.configure([[1, 2, 3], [4]])
        await until(lambda: services[1].status().total_votes == 3)
        assert numbers(services[1]) == (4, 4, 3, 3, True)
        await until(lambda: services[1].status().quorum == 2, timeout_s=5)
        assert numbers(services[1]) == (3, 3, 3, 2, True)
        await network.stop()

    run(main)


def test_ev_tracking_written_and_used_as_floor(
    run: Callable[[Main], None], tmp_path: Path
) -> None:
    dirs = {n: tmp_path / f"n{n}" for n in (1, 2, 3)}

    async def main() -> None:
        options = {"expected_votes_tracking": "1", "expected_votes": "1"}
        network, _services = await cluster(options, state_dirs=dirs)
        await until(lambda: all(read_ev_tracking(d) == 3 for d in dirs.values()))
        await network.stop()
        config = QuorumConfig.from_options(options, {1: 1, 2: 1, 3: 1})
        restarted = FakeNetwork([1])
        service = QuorumService(CpgService(restarted.nodes[1]), config, dirs[1])
        assert service.status().expected_votes == 3
        restarted.start()
        await service.start()
        restarted.configure([[1]])
        await until(lambda: service.status().ring_id is not None)
        await asyncio.sleep(0.05)
        assert numbers(service) == (3, 3, 1, 2, False)
        await restarted.stop()

    run(main)
    assert (dirs[1] / EV_TRACKING_FILE).read_text() == "3\n"


def test_bad_ev_tracking_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / EV_TRACKING_FILE).write_text("lots\n")
    with pytest.raises(Exception, match="delete it to reset"):
        read_ev_tracking(tmp_path)
    assert read_ev_tracking(tmp_path / "absent") == 0
