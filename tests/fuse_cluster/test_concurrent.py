"""Concurrent calls from two nodes' mounts on a real 3-node cluster.

Checks: O_APPEND writes from nodes 1 and 2 to one file at the same time leave
every record in the file exactly once, whole, on every node; `mkdir priv/lock/<x>`
issued on two nodes at the same moment (a barrier) succeeds on exactly one, the
other gets EEXIST, and every node then holds the lock directory.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from tests.fuse_cluster.conftest import wait_in_sync, wait_until

from corral.daemon.demo import DemoCluster

RECORDS_PER_NODE = 150
LOCK_ROUNDS = 20


def _append_records(path: Path, tag: str, start: threading.Barrier,
                    failures: list[BaseException]) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            start.wait()
            for index in range(RECORDS_PER_NODE):
                record = f"{tag}-{index:05d}\n".encode()
                assert os.write(fd, record) == len(record)
        finally:
            os.close(fd)
    except BaseException as error:  # the main thread reports it
        failures.append(error)


# Two nodes' appends in flight together: with an offset chosen by the sender both would
# land at the same place and one would overwrite the other (66 of 300 records lost before
# the append op); the apply step resolves the end of the file in the total order.
def test_o_append_from_two_nodes_keeps_every_record_once(cluster: DemoCluster) -> None:
    mounts = {n: cluster.mount(n) for n in cluster.nodeids}
    (mounts[1] / "shared.log").write_bytes(b"")
    wait_until(lambda: (mounts[2] / "shared.log").exists(), 10, "the file on node 2")
    start = threading.Barrier(2)
    failures: list[BaseException] = []
    threads = [threading.Thread(target=_append_records,
                                args=(mounts[n] / "shared.log", f"n{n}", start, failures))
               for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    wait_in_sync(cluster, cluster.nodeids)
    expected = sorted(f"n{n}-{i:05d}" for n in (1, 2) for i in range(RECORDS_PER_NODE))
    bodies = {n: (mounts[n] / "shared.log").read_bytes() for n in cluster.nodeids}
    assert len(set(bodies.values())) == 1, "the nodes disagree on the file"
    lines = bodies[1].decode(errors="replace").splitlines()
    lost = sorted(set(expected) - set(lines))
    assert not lost and sorted(lines) == expected, (
        f"{len(lines)} lines for {len(expected)} records; {len(lost)} lost, e.g. {lost[:5]}; "
        f"garbled or doubled: {sorted(set(lines) - set(expected))[:5]}")


def _mkdir(path: Path, start: threading.Barrier, results: dict[int, int], nodeid: int) -> None:
    start.wait()
    try:
        os.mkdir(path)
    except OSError as error:
        results[nodeid] = error.errno or -1
    else:
        results[nodeid] = 0


def test_lock_mkdir_on_two_nodes_at_once_one_wins(cluster: DemoCluster) -> None:
    mounts = {n: cluster.mount(n) for n in cluster.nodeids}
    (mounts[1] / "priv" / "lock").mkdir(parents=True, exist_ok=True)
    wait_until(lambda: (mounts[3] / "priv" / "lock").is_dir(), 10, "priv/lock on node 3")
    winners: dict[int, int] = {}
    for round_index in range(LOCK_ROUNDS):
        name = f"x{round_index}"
        start = threading.Barrier(2)
        results: dict[int, int] = {}
        contenders = (1, 2) if round_index % 2 == 0 else (2, 3)
        threads = [threading.Thread(target=_mkdir,
                                    args=(mounts[n] / "priv" / "lock" / name, start, results, n))
                   for n in contenders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(results.values()) == [0, errno.EEXIST], f"round {round_index}: {results}"
        winner = next(n for n, code in results.items() if code == 0)
        winners[winner] = winners.get(winner, 0) + 1
    wait_in_sync(cluster, cluster.nodeids)
    for nodeid in cluster.nodeids:
        held = sorted(os.listdir(mounts[nodeid] / "priv" / "lock"))
        assert held == sorted(f"x{i}" for i in range(LOCK_ROUNDS)), (nodeid, held)
    print(f"locks: winners per node {winners}")
