"""Fixtures for the real 3-node mount tests: a DemoCluster of corrald processes, each
in its own network namespace (as root; 127.0.0.x otherwise) with its tree mounted by
FUSE, always torn down (daemons stopped then killed, mounts detached, namespaces and
their nftables rules removed) even when a test fails."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.daemon.control import ControlError
from corral.daemon.demo import DemoCluster

FORM_TIMEOUT_S = 60.0
SYNC_TIMEOUT_S = 60.0
PARTITION_TABLE = "crlfcpart"


def can_partition() -> bool:
    return os.geteuid() == 0 and shutil.which("nft") is not None and \
        shutil.which("ip") is not None


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str | Callable[[], str]
               ) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {detail}")
        time.sleep(0.05)


def fs_status(cluster: DemoCluster, nodeid: int) -> dict[str, Any]:
    """The `filesystem` part of the daemon's status ({} if it does not answer)."""
    try:
        data = cluster.control(nodeid, "status")
    except (ControlError, OSError, ValueError):  # a daemon restarting answers nothing
        return {}
    fs = data.get("filesystem", {})
    return fs if isinstance(fs, dict) else {}


def in_sync(cluster: DemoCluster, nodeids: list[int]) -> bool:
    """Every node synced with the same members, quorate, same tree version and digest."""
    states = [fs_status(cluster, n) for n in nodeids]
    if not all(s.get("phase") == "synced" and s.get("quorate") and s.get("mounted")
               for s in states):
        return False
    if any(sorted(s.get("members", [])) != sorted(nodeids) for s in states):
        return False
    return len({(s.get("version"), s.get("digest")) for s in states}) == 1


def describe(cluster: DemoCluster, nodeids: list[int]) -> str:
    lines = []
    for nodeid in nodeids:
        state = fs_status(cluster, nodeid)
        lines.append(f"node{nodeid}: phase={state.get('phase')} quorate={state.get('quorate')} "
                     f"members={state.get('members')} version={state.get('version')} "
                     f"digest={state.get('digest')} last_sync={state.get('last_sync')}")
    for nodeid in nodeids:
        try:
            tail = cluster.log_path(nodeid).read_text(errors="replace")[-1500:]
        except OSError:
            tail = ""
        lines.append(f"--- node{nodeid} log tail ---\n{tail}")
    return "\n".join(lines)


def wait_in_sync(cluster: DemoCluster, nodeids: list[int],
                 timeout_s: float = SYNC_TIMEOUT_S) -> None:
    wait_until(lambda: in_sync(cluster, nodeids), timeout_s,
               lambda: f"nodes {nodeids} in sync\n" + describe(cluster, nodeids))


def node_dirs_ready(cluster: DemoCluster) -> bool:
    return all((cluster.mount(a) / "nodes" / cluster.name(b) / "qemu-server").is_dir()
               for a in cluster.nodeids for b in cluster.nodeids)


def partition(cluster: DemoCluster, nodeid: int, cut: bool) -> None:
    """Drop every packet in and out of node `nodeid`'s namespace except loopback."""
    cluster.isolate(nodeid, cut, table=PARTITION_TABLE)


def _kill_leftovers(cluster: DemoCluster) -> None:
    for nodeid in cluster.nodeids:
        try:
            pid = int(cluster.layout(nodeid).pidfile.read_text().strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[DemoCluster]:
    """A quorate 3-node cluster with every node's directories in every mount."""
    netns = can_partition()
    demo = DemoCluster(3, str(tmp_path / "c"), prefix=f"crl-fc{os.getpid() % 100}",
                       use_netns=netns, stats_interval_s=60, cluster_name="fctest")
    try:
        demo.setup_network()
        demo.build()
        wait_until(lambda: node_dirs_ready(demo), FORM_TIMEOUT_S,
                   lambda: "node directories in every mount\n" + describe(demo, demo.nodeids))
        wait_in_sync(demo, demo.nodeids)
        yield demo
    finally:
        if demo.use_netns:
            for nodeid in demo.nodeids:
                partition(demo, nodeid, cut=False)
        demo.close()
        _kill_leftovers(demo)
