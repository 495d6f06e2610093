"""Fixtures for the real-process cluster tests: a DemoCluster on 127.0.0.x that is
always torn down (daemons stopped, then killed), even when a test fails."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.daemon.demo import DemoCluster


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _kill_leftovers(cluster: DemoCluster) -> None:
    """corrald processes started by `corral create/add` without --no-start."""
    for nodeid in cluster.nodeids:
        pidfile = cluster.layout(nodeid).pidfile
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[[int], DemoCluster]]:
    clusters: list[DemoCluster] = []

    def make(n_nodes: int) -> DemoCluster:
        cluster = DemoCluster(n_nodes, str(tmp_path / f"c{len(clusters)}"), use_netns=False,
                              stats_interval_s=60)
        clusters.append(cluster)
        cluster.setup_network()
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()
        _kill_leftovers(cluster)
