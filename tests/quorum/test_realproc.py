"""Three real node processes (`python -m corral.quorum.node`: the engine with the
quorum service) on 127.0.0.x with real UDP: they form and become quorate; kill -9
of one leaves the other two quorate with 2 votes; killing a second leaves the last
one without quorum (`Activity blocked`); restarting both brings quorum back.

With allow_downscale and expected_votes 2, a clean shutdown (SIGTERM) of one node
lowers expected votes to 2 on the others, a second one not below 2.

Needs the compiled Totem core; skipped otherwise. Processes are killed in teardown,
also on failure. About 25 s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import pytest

from corral.corosync_conf import dump, parse
from corral.demo import LocalCluster
from corral.quorum.format import format_status
from corral.quorum.node import read_quorum

try:
    from corral.totem import _core

    HAVE_CORE = hasattr(_core, "TotemCore")
except ImportError:
    HAVE_CORE = False

pytestmark = [
    pytest.mark.realproc,
    pytest.mark.skipif(not HAVE_CORE, reason="the Totem core extension is not built yet"),
]

TIMEOUT_S = 30.0


class QuorumCluster(LocalCluster):
    """LocalCluster running `corral.quorum.node` instead of `corral engine`."""

    quorum_options: dict[str, str] | None = None

    def setup(self) -> None:
        super().setup()
        if self.quorum_options:
            root = parse(Path(self.config_path).read_text())
            quorum = root.section("quorum")
            assert quorum is not None
            quorum.options.update(self.quorum_options)
            Path(self.config_path).write_text(dump(root))

    def command(self, nodeid: int, extra: Sequence[str] = ()) -> list[str]:
        argv = super().command(nodeid, extra)
        at = argv.index("corral.cli")
        return [*argv[:at], "corral.quorum.node", *argv[at + 2:]]

    def expected(self, nodeid: int) -> tuple[int, int]:
        """(expected votes, quorum) from the node's quorum.json."""
        status = read_quorum(self.node_dir(nodeid))
        return (status.expected_votes, status.quorum) if status else (0, 0)

    def quorum(self, nodeid: int) -> tuple[tuple[int, ...], bool, int]:
        """(members, quorate, total votes) from the node's quorum.json."""
        status = read_quorum(self.node_dir(nodeid))
        if status is None:
            return ((), False, 0)
        return (tuple(m.nodeid for m in status.members), status.quorate, status.total_votes)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {TIMEOUT_S} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., QuorumCluster]]:
    made: list[QuorumCluster] = []

    def factory(quorum_options: dict[str, str] | None = None) -> QuorumCluster:
        cluster = QuorumCluster(3, str(tmp_path / f"c{len(made)}"), prefix="crl-qu",
                                use_netns=False, stats_interval_s=1.0,
                                totem_options={"token": "1000", "token_coefficient": "0"})
        cluster.quorum_options = quorum_options
        made.append(cluster)
        cluster.setup()
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            close_and_show_logs(cluster)


def close_and_show_logs(made: QuorumCluster) -> None:
    """Kill what still runs; keep the log tails visible for a failure report."""
    made.close()
    for nodeid in made.nodeids:
        log = Path(made.log_path(nodeid))
        if log.exists():
            sys.stderr.write(f"--- node {nodeid} ---\n{log.read_text(errors='replace')[-1500:]}\n")


def test_quorum_over_real_processes(make_cluster: Callable[..., QuorumCluster]) -> None:
    cluster = make_cluster()
    cluster.start_all()
    wait_until(lambda: all(cluster.quorum(n) == ((1, 2, 3), True, 3) for n in (1, 2, 3)),
               "three quorate members")

    cluster.kill(3)
    wait_until(lambda: all(cluster.quorum(n) == ((1, 2), True, 2) for n in (1, 2)),
               "nodes 1 and 2 quorate without 3")
    assert cluster.expected(1) == (3, 2)

    cluster.kill(2)
    wait_until(lambda: cluster.quorum(1) == ((1,), False, 1), "node 1 alone, not quorate")
    status = read_quorum(cluster.node_dir(1))
    assert status is not None
    text = format_status(status, datetime(2026, 1, 1))
    assert "Quorum:           2 Activity blocked\n" in text and "Quorate:          No\n" in text

    cluster.start(2)
    cluster.start(3)
    wait_until(lambda: all(cluster.quorum(n) == ((1, 2, 3), True, 3) for n in (1, 2, 3)),
               "quorum back after the restarts")


def test_clean_shutdown_downscales(make_cluster: Callable[..., QuorumCluster]) -> None:
    cluster = make_cluster({"allow_downscale": "1", "expected_votes": "2"})
    cluster.start_all()
    wait_until(lambda: all(cluster.quorum(n) == ((1, 2, 3), True, 3) for n in (1, 2, 3)),
               "three quorate members")
    assert cluster.expected(1) == (3, 2)
    assert cluster.stop(3) == 0  # SIGTERM: a clean leave
    wait_until(lambda: all(cluster.quorum(n) == ((1, 2), True, 2) for n in (1, 2)),
               "nodes 1 and 2 without 3")
    wait_until(lambda: cluster.expected(1) == (2, 2), "expected votes lowered to 2")
    assert cluster.stop(2) == 0
    wait_until(lambda: cluster.quorum(1) == ((1,), False, 1), "node 1 alone")
    assert cluster.expected(1) == (2, 2)  # not below the configured expected_votes
