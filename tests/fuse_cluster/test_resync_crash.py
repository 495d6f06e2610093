"""kill -9 of the resync leader while a rejoining node is being brought up to date
(real 3-node cluster).

Checks: node 3 is stopped while 3,000 files are created through nodes 1 and 2;
node 3 restarts, and as soon as it starts applying the resync patch (its resync
marker file appears) the leader (node 1) is killed. Nodes 2 and 3 must then finish between themselves
(node 2 has the data; node 3, possibly half-patched with its resync marker set, may
not lead) and end in sync with every acknowledged file; node 1 restarts and all
three end with equal digests. Whether the kill landed mid-patch (node 3's marker
file present) is printed: on a loaded box the resync can finish first.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.fuse_cluster.conftest import (
    FORM_TIMEOUT_S,
    fs_status,
    in_sync,
    wait_in_sync,
    wait_until,
)
from tests.fuse_cluster.writers import Writer

from corral.daemon.demo import DemoCluster

FILES = 3000
CLIENTS = 12


def _fill(mounts: dict[int, Path]) -> list[Writer]:
    """CLIENTS writers through nodes 1 and 2 until FILES acknowledged creates."""
    writers = [Writer(f"c{k}", mounts[1 + k % 2] / "fill" / f"d{k:02d}") for k in range(CLIENTS)]
    for writer in writers:
        writer.directory.mkdir()
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: sum(len(w.acked) for w in writers) >= FILES, 120,
                   f"{FILES} acknowledged creates")
    finally:
        for writer in writers:
            writer.finish()
    return writers


def _wait_for_patch(cluster: DemoCluster, marker: Path) -> bool:
    """Until node 3 starts applying the patch (its marker appears: True) or, if that
    window was missed, it is in sync with the others (False)."""
    deadline = time.monotonic() + 60
    next_status = 0.0
    while time.monotonic() < deadline:
        if marker.exists():
            return True
        if time.monotonic() >= next_status:
            if in_sync(cluster, cluster.nodeids):
                return False
            next_status = time.monotonic() + 0.05
        time.sleep(0.0005)
    raise AssertionError("node 3 neither resynced nor patched within 60 s")


def test_leader_killed_during_resync(cluster: DemoCluster) -> None:
    mounts = {n: cluster.mount(n) for n in cluster.nodeids}
    (mounts[1] / "fill").mkdir()
    wait_in_sync(cluster, cluster.nodeids)
    cluster.stop(3)
    wait_until(lambda: sorted(fs_status(cluster, 1).get("members", [])) == [1, 2], 60,
               "nodes 1 and 2 without node 3")
    writers = _fill(mounts)
    wait_in_sync(cluster, [1, 2])

    marker = Path(str(cluster.state_dir(3) / "cfs") + ".resync")
    cluster.start(3)
    mid_patch = _wait_for_patch(cluster, marker)
    os.kill(cluster.processes[1].pid, signal.SIGKILL)
    cluster.processes.pop(1).wait()
    wait_in_sync(cluster, [2, 3])
    assert not marker.exists(), "node 3's resync marker outlived its resync"
    for writer in writers:
        listed = set(os.listdir(mounts[3] / "fill" / writer.directory.name))
        missing = set(writer.acked) - listed
        assert not missing, f"node 3 lacks {len(missing)} acknowledged files of {writer.name}"
        for name in writer.acked:
            assert (mounts[3] / "fill" / writer.directory.name / name).read_bytes() == \
                writer.acked[name]
    cluster.start(1)
    cluster.wait_quorate(cluster.nodeids, 3, FORM_TIMEOUT_S)
    wait_in_sync(cluster, cluster.nodeids)
    last = fs_status(cluster, 3).get("last_sync")
    print(f"resync crash: leader killed {'mid-patch' if mid_patch else 'before the patch'}; "
          f"node 3's last resync {last}")
