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

from .harness import HaNode, SafetyChecker, ha_cli, make_guest, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")
soak = pytest.mark.skipif(os.environ.get("CORRAL_SOAK") != "1",
                          reason="network namespaces, ~1.5 minutes: set CORRAL_SOAK=1")

RECOVERY_TIMEOUT_S = 90
FAST_PROFILE = "ha-timing: profile=fast\n"


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
    from corral.daemon.demo import DemoCluster
    assert isinstance(corrald_cluster, DemoCluster)
    cluster = corrald_cluster
    names = {i: cluster.name(i) for i in cluster.nodeids}
    mounts = {i: cluster.mount(i) for i in cluster.nodeids}
    nodes = {i: HaNode(tmp_path, names[i], mounts[i], None) for i in cluster.nodeids}
    checker = SafetyChecker({names[i]: nodes[i].guest_dir for i in cluster.nodeids})
    try:
        (mounts[1] / "datacenter.cfg").write_text(FAST_PROFILE)
        make_guest(mounts[1], names[2], 100)
        wait_for(lambda: all((m / "nodes" / names[2] / "qemu-server/100.conf").exists()
                             for m in mounts.values()), 20, "the guest config everywhere")
        added = ha_cli(mounts[1], "add", "vm:100")
        assert added.returncode == 0, added.stderr
        checker.start()
        for node in nodes.values():
            node.start()
        wait_for(lambda: checker.running_on.get("100") == {names[2]}, 60,
                 "vm:100 on node2\n" + nodes[2].log_text()[-3000:])
        wait_for(lambda: "service vm:100 (node2, started)" in ha_cli(mounts[3], "status").stdout,
                 30, "status on node3 to show vm:100 started")
        status = ha_cli(mounts[3], "status").stdout
        assert status.startswith("quorum OK\nmaster node")
        assert all(f"lrm {names[i]} (" in status for i in cluster.nodeids), status
        cluster.kill(2)
        nodes[2].kill()
        cut = time.monotonic()
        wait_for(lambda: not checker.running_on.get("100"), 20, "node2's watchdog fallback")
        fenced_s = time.monotonic() - cut
        wait_for(lambda: len(checker.running_on.get("100", set())) == 1, RECOVERY_TIMEOUT_S,
                 "recovery\n" + nodes[1].log_text()[-3000:] + nodes[3].log_text()[-3000:])
        recovered_s = time.monotonic() - cut
        where = checker.running_on["100"]
        assert where <= {names[1], names[3]}
        print(f"real cluster: guest killed on node2 after {fenced_s:.1f} s, running on "
              f"{sorted(where)} after {recovered_s:.1f} s")
        time.sleep(3)
        assert not checker.violations, checker.violations
    finally:
        checker.stop()
        for node in nodes.values():
            node.cleanup()


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
    from corral.daemon.demo import DemoCluster
    assert isinstance(corrald_cluster, DemoCluster)
    cluster = corrald_cluster
    names = {i: cluster.name(i) for i in cluster.nodeids}
    mounts = {i: cluster.mount(i) for i in cluster.nodeids}
    nodes = {i: HaNode(tmp_path, names[i], mounts[i], None) for i in cluster.nodeids}
    checker = SafetyChecker({names[i]: nodes[i].guest_dir for i in cluster.nodeids})
    try:
        (mounts[1] / "datacenter.cfg").write_text(FAST_PROFILE)
        make_guest(mounts[1], names[2], 100)
        wait_for(lambda: all((m / "nodes" / names[2] / "qemu-server/100.conf").exists()
                             for m in mounts.values()), 20, "the guest config everywhere")
        added = ha_cli(mounts[1], "add", "vm:100")
        assert added.returncode == 0, added.stderr
        checker.start()
        for node in nodes.values():
            node.start()
        wait_for(lambda: checker.running_on.get("100") == {names[2]}, 60,
                 "vm:100 on node2\n" + nodes[2].log_text()[-3000:])
        _partition(cluster, 2, cut=True)
        cut = time.monotonic()
        wait_for(lambda: not checker.running_on.get("100"), 30,
                 "node2's watchdog fallback\n" + nodes[2].log_text()[-3000:])
        fenced_s = time.monotonic() - cut
        assert nodes[2].proc is not None and nodes[2].proc.poll() is None  # still running
        wait_for(lambda: len(checker.running_on.get("100", set())) == 1, RECOVERY_TIMEOUT_S,
                 "recovery\n" + nodes[1].log_text()[-3000:] + nodes[3].log_text()[-3000:])
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
        checker.stop()
        for node in nodes.values():
            node.cleanup()
