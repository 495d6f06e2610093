"""corral-ha on corrald's real 3-node cluster (trees mounted by corrald), fast profile in
datacenter.cfg (the filesystem's lock expiry follows it: 14 s).

1. Loopback: the node running vm:100 is killed (`kill -9` of its corrald and its corral-ha);
   its watchdog mux kills the guest, and the guest comes back on another node once the
   filesystem has expired the dead node's agent lock. About 60 s in all: it runs in the
   default suite.
2. Network namespaces (CORRAL_SOAK=1): the node running vm:100 is partitioned with nftables
   (corrald and corral-ha keep running, the node loses quorum): its watchdog fallback kills
   the guest, the others recover it; after the partition heals the node does not start it
   again.
The safety checker samples all nodes' guests throughout.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import HaOnCluster, ha_cli, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")
soak = pytest.mark.skipif(os.environ.get("CORRAL_SOAK") != "1",
                          reason="network namespaces, ~1.5 minutes: set CORRAL_SOAK=1")

RECOVERY_TIMEOUT_S = 90


@pytest.fixture(params=[False], ids=["loopback"])
def corrald_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    from corral.daemon.demo import DemoCluster
    cluster = DemoCluster(3, str(tmp_path / "c"), prefix=f"crl-ha{os.getpid() % 100}",
                          use_netns=request.param, cluster_name="hatest")
    cluster.setup_network()
    try:
        cluster.build()
        yield cluster
    finally:
        cluster.close()


def test_kill_node_guest_recovers_on_real_cluster(corrald_cluster: object,
                                                  tmp_path: Path) -> None:
    ha = HaOnCluster(corrald_cluster, tmp_path)
    names, mounts, checker = ha.names, ha.mounts, ha.checker
    try:
        ha.add_guest(100, node=2, timeout_s=20)
        ha.start(wait_running_on=2)
        wait_for(lambda: "service vm:100 (node2, started)" in ha_cli(mounts[3], "status").stdout,
                 30, "status on node3 to show vm:100 started")
        status = ha_cli(mounts[3], "status").stdout
        assert status.startswith("quorum OK\nmaster node")
        assert all(f"lrm {names[i]} (" in status for i in names), status
        ha.cluster.kill(2)
        ha.nodes[2].kill()
        cut = time.monotonic()
        wait_for(lambda: not checker.running_on.get("100"), 20, "node2's watchdog fallback")
        fenced_s = time.monotonic() - cut
        wait_for(lambda: len(checker.running_on.get("100", set())) == 1, RECOVERY_TIMEOUT_S,
                 "recovery\n" + ha.logs(1, 3))
        recovered_s = time.monotonic() - cut
        where = checker.running_on["100"]
        assert where <= {names[1], names[3]}
        print(f"real cluster: guest killed on node2 after {fenced_s:.1f} s, running on "
              f"{sorted(where)} after {recovered_s:.1f} s")
        time.sleep(3)
        assert not checker.violations, checker.violations
    finally:
        ha.close()


PARTITION_TABLE = "crlhapart"


def _partition(cluster: object, nodeid: int, cut: bool) -> None:
    from corral.daemon.demo import DemoCluster
    assert isinstance(cluster, DemoCluster)
    cluster.isolate(nodeid, cut, table=PARTITION_TABLE)


@soak
@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables")
@pytest.mark.parametrize("corrald_cluster", [True], ids=["netns"], indirect=True)
def test_partitioned_node_fences_itself_on_real_cluster(corrald_cluster: object,
                                                        tmp_path: Path) -> None:
    ha = HaOnCluster(corrald_cluster, tmp_path)
    names, nodes, checker, cluster = ha.names, ha.nodes, ha.checker, ha.cluster
    try:
        ha.add_guest(100, node=2, timeout_s=20)
        ha.start(wait_running_on=2)
        _partition(cluster, 2, cut=True)
        cut = time.monotonic()
        wait_for(lambda: not checker.running_on.get("100"), 30,
                 "node2's watchdog fallback\n" + nodes[2].log_text()[-3000:])
        fenced_s = time.monotonic() - cut
        assert nodes[2].proc is not None and nodes[2].proc.poll() is None  # still running
        wait_for(lambda: len(checker.running_on.get("100", set())) == 1, RECOVERY_TIMEOUT_S,
                 "recovery\n" + ha.logs(1, 3))
        recovered_s = time.monotonic() - cut
        where = checker.running_on["100"]
        assert where <= {names[1], names[3]}
        print(f"partition: guest killed on node2 after {fenced_s:.1f} s, running on "
              f"{sorted(where)} after {recovered_s:.1f} s")
        _partition(cluster, 2, cut=False)
        time.sleep(15)  # node2 rejoins and runs several rounds
        assert checker.running_on.get("100") == where
        assert not checker.violations, checker.violations
    finally:
        ha.close()
