"""Soak (CORRAL_SOAK=1 only, about 2 minutes): repeated kill -9 of a random node
(seeded) while writers stream creates through all three mounts, on one real 3-node
cluster. After each round (kill, survivors in sync, restart, all in sync) every
acknowledged write so far is on every node with its exact bytes, nothing is
half-applied, and the digests are equal."""

from __future__ import annotations

import os
import random
import signal

import pytest
from tests.fuse_cluster.conftest import FORM_TIMEOUT_S, in_sync, wait_in_sync, wait_until
from tests.fuse_cluster.writers import Writer

from corral.daemon.demo import DemoCluster

pytestmark = pytest.mark.skipif(os.environ.get("CORRAL_SOAK") != "1",
                                reason="about 2 minutes: set CORRAL_SOAK=1")

ROUNDS = 10
SEED = 20261126


def _check(cluster: DemoCluster, writers: list[Writer]) -> None:
    for nodeid in cluster.nodeids:
        for writer in writers:
            folder = cluster.mount(nodeid) / writer.directory.name
            listed = set(os.listdir(folder))
            missing = set(writer.acked) - listed
            assert not missing, f"node{nodeid} lost {len(missing)} writes of {writer.name}"
            assert listed <= set(writer.attempted)
            for name in listed:
                body = (folder / name).read_bytes()
                expected = writer.acked.get(name)
                if expected is not None:
                    assert body == expected, f"node{nodeid}: {name} differs"
                else:
                    assert body in (b"", writer.attempted[name]), f"{name} half-applied"


def _round(cluster: DemoCluster, index: int, victim: int, target: int) -> list[Writer]:
    """Writers through every mount, kill -9 of `victim` once each has `target`
    acknowledged writes, survivors in sync, restart, all in sync."""
    survivors = [n for n in cluster.nodeids if n != victim]
    writers = []
    for nodeid in cluster.nodeids:
        folder = cluster.mount(survivors[0]) / f"r{index:02d}-{nodeid}"
        folder.mkdir()
        writers.append(Writer(f"r{index:02d}w{nodeid}", cluster.mount(nodeid) / folder.name,
                              stop_on_error=nodeid == victim))
    wait_in_sync(cluster, cluster.nodeids)
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: all(len(w.acked) >= target for w in writers), 60,
                   f"round {index}: writes before the kill")
        os.kill(cluster.processes[victim].pid, signal.SIGKILL)
        cluster.processes.pop(victim).wait()
        wait_until(lambda: in_sync(cluster, survivors), 60, f"round {index}: survivors in sync")
    finally:
        for writer in writers:
            writer.finish()
    cluster.start(victim)
    cluster.wait_quorate(cluster.nodeids, 3, FORM_TIMEOUT_S)
    wait_in_sync(cluster, cluster.nodeids)
    return writers


def test_repeated_kill9_rounds(cluster: DemoCluster) -> None:
    rng = random.Random(SEED)
    all_writers: list[Writer] = []
    for index in range(ROUNDS):
        victim = rng.choice(cluster.nodeids)
        all_writers.extend(_round(cluster, index, victim, 10 + rng.randrange(20)))
        _check(cluster, all_writers)
        print(f"round {index}: killed node {victim}; "
              f"{sum(len(w.acked) for w in all_writers)} acknowledged writes so far")
