"""Replicas of the configuration tree over real Totem cores and CpgCore in the
in-memory harness (simulated time), each with a real RocksDB store: writes on
one node are visible on all with equal digests; conflicting creates get the
same errno everywhere (one EEXIST); a partitioned minority gets EACCES and
changes nothing while the majority writes, then catches up through the
digest walk with bytes that grow with the changes; a node restarted from a
stale store resyncs; writes submitted during a resync wait and then proceed
(or fail with EAGAIN after the bound); a node killed without leaving and
restarted catches up; the periodic verification repairs a store damaged
behind replication's back."""

from __future__ import annotations

import errno
import pathlib

import pytest

from corral.cfs.ops import Op
from corral.cfs.replica_core import ReplicaConfig

from .sim import ReplCluster, formed, harness

_core = pytest.importorskip("corral.totem._core")
if not hasattr(_core, "TotemCore"):
    pytest.skip("Totem core not built", allow_module_level=True)

T = 1795720870


def conf(vmid: int, node: str = "node1") -> str:
    return f"nodes/{node}/qemu-server/{vmid}.conf"


def make_dirs(cluster: ReplCluster, nodeid: int = 1, nodes: tuple[str, ...] = ("node1",)) -> None:
    assert cluster.do(nodeid, Op.mkdir("nodes", T)) == 0
    for node in nodes:
        assert cluster.do(nodeid, Op.mkdir(f"nodes/{node}", T)) == 0
        assert cluster.do(nodeid, Op.mkdir(f"nodes/{node}/qemu-server", T)) == 0


def assert_equal(cluster: ReplCluster, nodeids: tuple[int, ...] | None = None) -> None:
    digests = cluster.digests(nodeids)
    assert len(set(digests.values())) == 1, digests


def test_writes_replicate_with_equal_digests(tmp_path: pathlib.Path) -> None:
    cluster = formed(tmp_path)
    try:
        make_dirs(cluster)
        assert cluster.do(2, Op.create(conf(100), T, excl=True)) == 0
        assert cluster.do(3, Op.write(conf(100), 0, b"memory: 512\n", T)) == 0
        cluster.settle()
        for node in cluster.nodes.values():
            assert node.store.read_file(conf(100)) == b"memory: 512\n"
        assert_equal(cluster)
        # errors are the same everywhere and change nothing
        assert cluster.do(1, Op.mkdir("nodes", T)) == errno.EEXIST
        assert cluster.do(2, Op.unlink("missing")) == errno.ENOENT
        cluster.settle()
        assert_equal(cluster)
    finally:
        cluster.close()


def test_large_write_is_fragmented_and_applied(tmp_path: pathlib.Path) -> None:
    cluster = formed(tmp_path)
    try:
        data = bytes(range(256)) * 4000  # ~1 MiB: 16 parts of 64 KiB
        assert cluster.do(1, Op.create("big", T)) == 0
        assert cluster.do(2, Op.write("big", 0, data[:1_000_000], T)) == 0
        cluster.settle()
        for node in cluster.nodes.values():
            assert node.store.read_file("big") == data[:1_000_000]
    finally:
        cluster.close()


def test_conflicting_creates_one_winner(tmp_path: pathlib.Path) -> None:
    cluster = formed(tmp_path)
    try:
        make_dirs(cluster, nodes=("node1", "node2"))
        for round_ in range(5):
            vmid = 200 + round_
            r1 = cluster.submit(1, Op.create(conf(vmid, "node1"), T, excl=True))
            r2 = cluster.submit(2, Op.create(conf(vmid, "node2"), T, excl=True))
            codes = sorted([cluster.wait_result(1, r1), cluster.wait_result(2, r2)])
            assert codes == [0, errno.EEXIST]
        cluster.settle()
        assert_equal(cluster)
        lists = {tuple(n.store.state.guest_list()) for n in cluster.nodes.values()}
        assert len(lists) == 1
    finally:
        cluster.close()


def test_partition_minority_eacces_then_catches_up(tmp_path: pathlib.Path) -> None:
    cluster = formed(tmp_path, 5)
    try:
        make_dirs(cluster)
        for vmid in range(100, 400):
            assert cluster.do(1 + vmid % 5, Op.create(conf(vmid), T)) == 0
        cluster.settle()
        before = cluster.digests((4, 5))
        cluster.partition((1, 2, 3), (4, 5))
        cluster.settle((1, 2, 3))
        cluster.settle((4, 5))
        assert cluster.do(4, Op.create(conf(999), T)) == errno.EACCES
        assert cluster.do(5, Op.unlink(conf(100))) == errno.EACCES
        assert cluster.digests((4, 5)) == before  # nothing changed, not even the version
        changed = 7
        for vmid in range(400, 400 + changed):
            assert cluster.do(1, Op.create(conf(vmid), T)) == 0
        assert cluster.do(2, Op.write(conf(100), 0, b"x" * 300, T)) == 0
        cluster.heal()
        cluster.settle()
        assert_equal(cluster)
        report = cluster.nodes[4].core.last_sync
        assert report is not None and set(report.followers) == {4, 5}
        assert report.fetched == changed + 1
        # 8 changed entries among 310: a few KB, not the whole directory
        assert report.wire_bytes < 12_000, report
        assert cluster.nodes[4].store.read_file(conf(100)) == b"x" * 300
    finally:
        cluster.close()


def test_restart_from_stale_store_resyncs(tmp_path: pathlib.Path) -> None:
    cluster = formed(tmp_path)
    try:
        make_dirs(cluster)
        assert cluster.do(3, Op.create(conf(100), T)) == 0
        cluster.settle()
        cluster.leave(3)
        cluster.nodes.pop(3).store.close()
        cluster.settle((1, 2))
        for vmid in range(101, 111):
            assert cluster.do(1, Op.create(conf(vmid), T)) == 0
        assert cluster.do(2, Op.unlink(conf(100))) == 0
        cluster.start(3)
        cluster.settle()
        assert_equal(cluster)
        assert cluster.nodes[3].core.last_sync is not None
        assert cluster.nodes[3].store.state.tree.lookup(conf(100)) is None
    finally:
        cluster.close()


def test_crash_without_leave_and_restart(tmp_path: pathlib.Path) -> None:
    cluster = formed(tmp_path)
    try:
        make_dirs(cluster)
        requests = [cluster.submit(2, Op.create(conf(vmid), T)) for vmid in range(100, 120)]
        cluster.run_for(harness.ms(3))
        cluster.crash(2)
        cluster.settle((1, 3))
        for vmid in range(120, 125):
            assert cluster.do(1, Op.create(conf(vmid), T)) == 0
        cluster.start(2)
        cluster.settle()
        assert_equal(cluster)
        # every write node 2 acknowledged before it died is everywhere
        for request_id in requests:
            if cluster.acked.get((2, request_id)) is not None:
                path = cluster.ops[(2, request_id)].path
                for node in cluster.nodes.values():
                    assert node.store.state.tree.lookup(path) is not None
    finally:
        cluster.close()


def test_writes_during_resync_wait_then_proceed(tmp_path: pathlib.Path) -> None:
    cluster = formed(tmp_path)
    try:
        make_dirs(cluster)
        cluster.partition((1, 2), (3,))
        cluster.settle((1, 2))
        cluster.settle((3,))
        for vmid in range(100, 150):
            assert cluster.do(1, Op.create(conf(vmid), T)) == 0
        cluster.heal()
        # submit on the stale node while the merge and its resync run
        cluster.run_until(lambda: cluster.nodes[3].core.members == (1, 2, 3),
                          harness.seconds(30))
        request = cluster.submit(3, Op.create(conf(150), T))
        assert cluster.result(3, request) is None
        assert cluster.wait_result(3, request) == 0
        cluster.settle()
        assert_equal(cluster)
    finally:
        cluster.close()


def test_eagain_after_bound_when_resync_cannot_finish(tmp_path: pathlib.Path) -> None:
    config = ReplicaConfig(eagain_ns=harness.seconds(2), part_max_bytes=64 * 1024)
    cluster = ReplCluster((1, 2, 3), tmp_path, config=config)
    cluster.start()
    try:
        cluster.settle()
        cluster.partition((1, 2), (3,))
        cluster.settle((1, 2))
        cluster.settle((3,))
        assert cluster.do(1, Op.mkdir("d", T)) == 0
        # the leader stalls: it never answers the stale node's digest walk
        for nodeid in (1, 2):
            cluster.nodes[nodeid].core._on_walk = lambda *args: None  # type: ignore[method-assign]
        cluster.heal()
        cluster.run_until(lambda: cluster.nodes[2].core.members == (1, 2, 3),
                          harness.seconds(30))
        request = cluster.submit(2, Op.mkdir("e", T))
        start = cluster.now_ns
        assert cluster.wait_result(2, request) == errno.EAGAIN
        assert cluster.now_ns - start >= harness.seconds(2)
    finally:
        cluster.close()


def test_verification_repairs_a_damaged_store(tmp_path: pathlib.Path) -> None:
    config = ReplicaConfig(verify_interval_ns=harness.seconds(2), part_max_bytes=64 * 1024)
    cluster = ReplCluster((1, 2, 3), tmp_path, config=config)
    cluster.start()
    try:
        cluster.settle()
        for i in range(10):
            assert cluster.do(1 + i % 3, Op.create(f"f{i}", T)) == 0
        assert cluster.do(1, Op.write("f3", 0, b"keep me", T)) == 0
        cluster.settle()
        # node 2 loses a file behind replication's back (same version)
        cluster.nodes[2].store.apply_patch(["f3"], [])
        assert len(set(cluster.digests().values())) == 2
        cluster.run_for(harness.seconds(5))
        cluster.settle()
        assert len(set(cluster.digests().values())) == 1
        assert cluster.nodes[2].store.read_file("f3") == b"keep me"
        assert cluster.nodes[1].core.counters["repairs"] == 1
        assert any("repair" in line for line in cluster.nodes[1].logs)
    finally:
        cluster.close()
