"""kill -9 of one node's corrald during streams of writes, on a real 3-node cluster.

Checks: writers stream file creates (O_CREAT|O_EXCL, one write, close) through a
surviving node's mount and through the killed node's own mount while one node is
killed with SIGKILL: node 1 (the lowest id, which leads every resync) or node 3.
Afterwards every write that returned success is on both survivors with its exact content, no file holds a
partial body (only absent, empty = create without its write, or whole), and the
survivors' trees have equal versions and digests; the survivors keep accepting
writes. The killed node restarts from its store, rejoins, and then holds the same
tree (same digest, every acknowledged file).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from tests.fuse_cluster.conftest import (
    FORM_TIMEOUT_S,
    describe,
    in_sync,
    wait_in_sync,
    wait_until,
)
from tests.fuse_cluster.writers import Writer

from corral.daemon.demo import DemoCluster


def _check_tree(mount: Path, writers: list[Writer], where: str) -> None:
    for writer in writers:
        listed = set(os.listdir(mount / writer.directory.name))
        unexpected = listed - set(writer.attempted)
        assert not unexpected, f"{where}: files nobody wrote: {sorted(unexpected)[:5]}"
        missing = [name for name in writer.acked if name not in listed]
        assert not missing, (f"{where}: {len(missing)} acknowledged writes of {writer.name} "
                             f"lost, e.g. {missing[:5]}")
        for name in listed:
            body = (mount / writer.directory.name / name).read_bytes()
            if name in writer.acked:
                assert body == writer.acked[name], f"{where}: {name} differs: {body[:40]!r}"
            else:
                assert body in (b"", writer.attempted[name]), \
                    f"{where}: unacknowledged {name} is half-applied: {body[:40]!r}"


@pytest.mark.parametrize("killed", [1, 3], ids=["leader", "highest"])
def test_kill9_during_writes_loses_no_acknowledged_write(cluster: DemoCluster,
                                                         killed: int) -> None:
    survivor, other = [n for n in cluster.nodeids if n != killed]
    mounts = {n: cluster.mount(n) for n in cluster.nodeids}
    for directory in ("s-remote", "s-own"):
        (mounts[survivor] / directory).mkdir()
    wait_until(lambda: (mounts[killed] / "s-own").is_dir(), 10, "the directories on the node to kill")
    remote = Writer("remote", mounts[survivor] / "s-remote")
    own = Writer("own", mounts[killed] / "s-own", stop_on_error=True)
    writers = [remote, own]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: len(remote.acked) >= 30 and len(own.acked) >= 30, 30,
                   "30 acknowledged writes per writer")
        os.kill(cluster.processes[killed].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        cluster.processes.pop(killed).wait()
        own.finish()
        assert own.errors, "a write through the killed node's mount succeeded after the kill"
        # The survivors form a 2-node ring (token timeout), resync, and go on writing.
        wait_until(lambda: in_sync(cluster, [survivor, other]), 60,
                   lambda: "the survivors in sync\n" + describe(cluster, [survivor, other]))
        reformed_s = time.monotonic() - killed_at
        acked_before = len(remote.acked)
        wait_until(lambda: len(remote.acked) >= acked_before + 20, 30,
                   "writes on the 2-node ring")
    finally:
        for writer in writers:
            writer.finish()
    wait_in_sync(cluster, [survivor, other])
    for nodeid in (survivor, other):
        _check_tree(mounts[nodeid], writers, f"node{nodeid}")

    cluster.start(killed)
    cluster.wait_quorate(cluster.nodeids, 3, FORM_TIMEOUT_S)
    wait_in_sync(cluster, cluster.nodeids)
    _check_tree(mounts[killed], writers, f"node{killed} after restart")
    print(f"kill -9: {len(remote.acked)} + {len(own.acked)} acknowledged writes, "
          f"{len(remote.errors)} refused during the ring change; survivors in sync "
          f"{reformed_s:.1f} s after the kill")


def test_kill9_of_every_node_keeps_acknowledged_writes(cluster: DemoCluster) -> None:
    """All three daemons killed at once mid-stream (as in a power cut of the whole
    cluster, minus the page cache): every write acknowledged through any mount is
    there after all three restart from their stores, with equal digests."""
    mounts = {n: cluster.mount(n) for n in cluster.nodeids}
    for nodeid in cluster.nodeids:
        (mounts[1] / f"all-{nodeid}").mkdir()
    wait_in_sync(cluster, cluster.nodeids)
    writers = [Writer(f"w{n}", mounts[n] / f"all-{n}", stop_on_error=True)
               for n in cluster.nodeids]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: all(len(w.acked) >= 20 for w in writers), 30,
                   "20 acknowledged writes per writer")
        for process in cluster.processes.values():
            os.kill(process.pid, signal.SIGKILL)
        for nodeid in list(cluster.processes):
            cluster.processes.pop(nodeid).wait()
    finally:
        for writer in writers:
            writer.finish()
    for nodeid in cluster.nodeids:
        cluster.start(nodeid)
    cluster.wait_quorate(cluster.nodeids, 3, FORM_TIMEOUT_S)
    wait_in_sync(cluster, cluster.nodeids)
    for nodeid in cluster.nodeids:
        _check_tree(mounts[nodeid], writers, f"node{nodeid} after the restart of all")
    print(f"kill -9 of all: {[len(w.acked) for w in writers]} acknowledged writes kept")
