"""ReplicaCore on a scripted ordered bus (tests/cfs_repl/bus.py) and its wire
format: message round trips, truncation, trailing bytes and newer versions;
malformed deliveries counted and dropped; leader choice; ops applied in
order with the same errno on every node; no quorum -> EACCES at once;
submits during a resync queue and fail with EAGAIN after the bound;
verification finds a silently diverged node and repairs it (logged);
lock expiry through the lowest member's UNLOCK; a node marked dirty by an
unfinished resync never leads; an op whose parts straddle a membership
change is dropped by all and sent again; the replicated cluster log; and
the core imports nothing that does I/O."""

from __future__ import annotations

import errno
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.cfs import replica_core as rc
from corral.cfs.ops import Op
from corral.errors import DecodeError

from .bus import Bus, MemStore

T = 1795720870
S = 1_000_000_000

MESSAGES = [
    rc.OpMsg(3, 77, b"\x01op-bytes"),
    rc.SyncStart((1, 9), (1, 2, 5)),
    rc.StateMsg((1, 9), 3, 1234, 0xDEADBEEF, rc.STATE_DIRTY),
    rc.Ack((1, 9), 17),
    rc.WalkMsg(rc.MsgType.QUERY, (1, 9), 2, b"q"),
    rc.WalkMsg(rc.MsgType.ANSWER, (1, 9), 2, b"answer"),
    rc.WalkMsg(rc.MsgType.PATCH, (1, 9), 2, b"patch", last=False),
    rc.Fetch((1, 9), 1, ("a", "nodes/x/qemu-server/100.conf")),
    rc.SyncDone((1, 9), 99),
    rc.VerifyRequest(5),
    rc.Verify(5, 10, 11),
    rc.LogMsg((rc.LogRecord(1, T, 6, 42, "n1", "root@pam", "tag", "hello"),)),
    rc.Frag(4, 1, 3, b"chunk"),
]


def _open_body(message: rc.Message) -> bytes:
    if isinstance(message, rc.OpMsg):
        return message.op_bytes
    if isinstance(message, rc.WalkMsg):
        return message.body
    if isinstance(message, rc.Frag):
        return message.chunk
    return b""


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_wire_round_trip_truncation_trailing(message: rc.Message) -> None:
    data = rc.encode(message)
    assert rc.decode(data) == message
    for cut in range(len(data)):
        prefix = data[:cut]
        if cut >= len(data) - len(_open_body(message)):
            continue  # an open-ended body: a shorter body is another valid message
        with pytest.raises(DecodeError):
            rc.decode(prefix)
    if not _open_body(message):
        with pytest.raises(DecodeError):
            rc.decode(data + b"\x00")


def test_wire_versions_and_garbage() -> None:
    data = bytearray(rc.encode(rc.VerifyRequest(1)))
    data[2] = 2
    with pytest.raises(rc.NewerVersion):
        rc.decode(bytes(data))
    with pytest.raises(DecodeError):
        rc.decode(b"XX\x01\x01" + bytes(8))
    with pytest.raises(DecodeError):
        rc.decode(b"CF\x01\xee")
    with pytest.raises(DecodeError):
        rc.decode(rc.encode(rc.Frag(1, 5, 3, b"")))


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_wire_decode_never_crashes(data: bytes) -> None:
    try:
        rc.decode(b"CF\x01" + data)
    except DecodeError:
        pass


def test_leader_choice() -> None:
    def state(version: int, digest: int, flags: int = 0, term: int = 0) -> rc.StateMsg:
        return rc.StateMsg((1, 1), term, version, digest, flags)

    assert rc.choose_leader({1: state(5, 1), 2: state(7, 2), 3: state(6, 3)}) == 2
    assert rc.choose_leader({1: state(5, 1), 2: state(9, 2, rc.STATE_DIRTY)}) == 1
    assert rc.choose_leader({1: state(5, 1), 2: state(5, 2), 3: state(5, 2)}) == 2
    assert rc.choose_leader({2: state(5, 1), 3: state(5, 1)}) == 2
    assert rc.choose_leader({2: state(5, 1, 1), 3: state(6, 1, 1)}) == 3
    # a side cut off from the quorate history loses even with a higher version
    assert rc.choose_leader({1: state(9, 1, term=4), 2: state(7, 2, term=5)}) == 2


def formed(n: int = 3, **kwargs: object) -> Bus:
    bus = Bus(list(range(1, n + 1)), **kwargs)  # type: ignore[arg-type]
    bus.configure(tuple(range(1, n + 1)))
    bus.deliver_all()
    return bus


def test_ops_in_order_same_errno_everywhere() -> None:
    bus = formed()
    assert all(n.core.phase is rc.Phase.SYNCED for n in bus.nodes.values())
    assert bus.do(1, Op.mkdir("d", T)) == 0
    first = bus.submit(2, Op.create("d/f", T, excl=True))
    second = bus.submit(3, Op.create("d/f", T, excl=True))
    bus.deliver_all()
    assert (bus.nodes[2].results[first], bus.nodes[3].results[second]) == (0, errno.EEXIST)
    assert len(bus.digests()) == 1
    assert bus.nodes[1].core.counters["ops_applied"] == 2


def test_malformed_is_counted_and_dropped() -> None:
    bus = formed()
    before = bus.digests()
    for payload in (b"", b"CF", b"CF\x01\x01" + bytes(3), b"junk" * 10,
                    rc.encode(rc.OpMsg(2, 1, b"not an op"))):
        bus.queue.append((1, payload))
    bus.deliver_all()
    assert bus.digests() == before
    core = bus.nodes[2].core
    assert core.counters["malformed"] == 4 and core.counters["spoofed"] == 1


def test_no_quorum_eacces_at_once_and_nothing_changes() -> None:
    bus = formed()
    bus.run(bus.nodes[3].core.quorum_changed(False, 0), 3)
    request = bus.submit(3, Op.mkdir("d", T))
    assert bus.nodes[3].results[request] == errno.EACCES
    assert not bus.queue
    # an op from a quorate node delivered to a node without quorum is refused there
    assert bus.do(1, Op.mkdir("x", T)) == 0
    assert bus.nodes[3].store.state.tree.lookup("x") is None
    assert bus.nodes[3].core.counters["ops_refused_inquorate"] == 1


def test_submit_during_resync_waits_then_eagain() -> None:
    bus = formed(config=rc.ReplicaConfig(eagain_ns=5 * S, part_max_bytes=1024))
    bus.groups = [(1, 2, 3)]
    for nodeid in (1, 2, 3):
        bus.run(bus.nodes[nodeid].core.confchg((1, 2, 3), bus.now_ns), nodeid)
    waiting = bus.submit(2, Op.mkdir("w", T))
    assert waiting not in bus.nodes[2].results
    bus.deliver_all()  # the resync ends: the queued op is sent and applied
    assert bus.nodes[2].results[waiting] == 0
    for nodeid in (1, 2, 3):
        bus.run(bus.nodes[nodeid].core.confchg((1, 2, 3), bus.now_ns), nodeid)
    bus.queue.clear()  # the resync cannot finish (its messages are lost)
    stuck = bus.submit(2, Op.mkdir("v", T))
    bus.advance(4 * S)
    assert stuck not in bus.nodes[2].results
    bus.advance(2 * S)
    assert bus.nodes[2].results[stuck] == errno.EAGAIN


def test_verification_repairs_a_silent_divergence() -> None:
    bus = formed(config=rc.ReplicaConfig(verify_interval_ns=10 * S, part_max_bytes=1024))
    for i in range(20):
        assert bus.do(1 + i % 3, Op.create(f"f{i}", T)) == 0
    assert bus.do(1, Op.write("f3", 0, b"data", T)) == 0
    # node 2 loses a file behind replication's back (same version, other digest)
    store = bus.nodes[2].store
    store.apply_patch(["f3"], [])
    assert len(bus.digests()) == 2
    bus.advance(11 * S)
    bus.deliver_all()
    assert len(bus.digests()) == 1
    assert bus.nodes[2].store.read_file("f3") == b"data"
    assert bus.nodes[1].core.counters["repairs"] == 1
    assert any("repair" in line.text for line in bus.nodes[1].logs)
    report = bus.nodes[2].core.last_sync
    assert report is not None and report.repair and report.followers == (2,)
    bus.advance(11 * S)
    bus.deliver_all()
    assert bus.nodes[1].core.counters["repairs"] == 1
    assert bus.nodes[1].core.counters["verify_rounds"] == 2


def test_lock_expiry_by_lowest_member() -> None:
    bus = formed()
    for path in ("priv", "priv/lock", "priv/lock/x"):
        assert bus.do(2, Op.mkdir(path, T)) == 0
    assert bus.do(3, Op.set_mtime("priv/lock/x", 0)) == errno.EACCES
    assert bus.nodes[1].core.counters["unlocks_sent"] == 0
    bus.advance(121 * S)
    assert bus.do(3, Op.set_mtime("priv/lock/x", 0)) == errno.EACCES
    assert bus.nodes[1].core.counters["unlocks_sent"] == 1
    for node in bus.nodes.values():
        assert node.store.state.tree.lookup("priv/lock/x") is None
    assert len(bus.digests()) == 1


def test_dirty_node_never_leads_and_is_cleaned() -> None:
    bus = formed()
    for i in range(5):
        assert bus.do(1, Op.create(f"f{i}", T)) == 0
    # node 3 restarts with an inflated version and the marker of an unfinished resync
    stale = bus.nodes[3].store
    stale.apply_patch([], [rc.PatchItem(f"junk{i}", False, T, 3, b"j") for i in range(30)])
    stale.dirty = True
    bus.add(3, stale.reload())
    assert bus.nodes[3].store.state.version > bus.nodes[1].store.state.version
    bus.configure((1, 2, 3))
    bus.deliver_all()
    assert len(bus.digests()) == 1
    assert bus.nodes[3].store.state.tree.lookup("junk0") is None
    assert bus.nodes[3].store.dirty is False
    assert bus.nodes[3].core.last_sync is not None and bus.nodes[3].core.last_sync.leader == 1


def test_alone_node_keeps_dirty_marker() -> None:
    bus = Bus([1])
    bus.nodes[1].store.dirty = True
    bus.configure((1,))
    bus.deliver_all()
    assert bus.nodes[1].core.phase is rc.Phase.SYNCED
    assert bus.nodes[1].store.dirty is True


def test_fragmented_op_straddling_a_change_is_resent_once() -> None:
    bus = formed()
    assert bus.do(1, Op.create("big", T)) == 0
    request = bus.submit(2, Op.write("big", 0, b"z" * 5000, T))
    assert len(bus.queue) >= 5
    bus.step()
    bus.step()
    for nodeid in (1, 2, 3):
        bus.run(bus.nodes[nodeid].core.confchg((1, 2, 3), bus.now_ns), nodeid)
    bus.deliver_all()
    assert bus.nodes[2].results[request] == 0
    assert bus.nodes[2].core.counters["ops_resent"] == 1
    assert bus.nodes[1].core.counters["frag_dropped"] >= 1
    for node in bus.nodes.values():
        assert node.store.read_file("big") == b"z" * 5000
    assert len(bus.digests()) == 1


def test_partition_then_walk_bytes_grow_with_changes() -> None:
    sizes = {}
    for changed in (2, 40):
        bus = formed(5)
        for i in range(400):
            assert bus.do(1, Op.create(f"f{i:04}", T)) == 0
        bus.configure((1, 2, 3), (4, 5))
        bus.deliver_all()
        for node in (4, 5):
            bus.run(bus.nodes[node].core.quorum_changed(False, 0), node)
        assert bus.do(4, Op.unlink("f0001")) == errno.EACCES
        for i in range(changed):
            assert bus.do(1, Op.write(f"f{i * 7:04}", 0, b"new", T)) == 0
        for node in (4, 5):
            bus.run(bus.nodes[node].core.quorum_changed(True, 0), node)
        sent_before = bus.bytes_sent
        bus.configure((1, 2, 3, 4, 5))
        bus.deliver_all()
        assert len(bus.digests()) == 1
        report = bus.nodes[4].core.last_sync
        assert report is not None and report.followers == (4, 5) and report.fetched == changed
        sizes[changed] = bus.bytes_sent - sent_before
    assert sizes[2] < 9000, sizes
    assert sizes[40] > 3 * sizes[2], sizes


def test_clusterlog_replicates_and_renders() -> None:
    bus = formed()
    bus.run(bus.nodes[2].core.log(T, 6, "probe", "hello"), 2)
    bus.deliver_all()
    for node in bus.nodes.values():
        entries = node.core.log_entries()
        assert [(e.node, e.msg) for e in entries] == [("node2", "hello")]
    # a node that joins later gets the recent log from the leader
    bus.add(4, MemStore())
    bus.configure((1, 2, 3, 4))
    bus.deliver_all()
    assert [e.msg for e in bus.nodes[4].core.log_entries()] == ["hello"]


def test_core_is_sans_io() -> None:
    path = pathlib.Path(rc.__file__)
    text = path.read_text()
    for name in ("asyncio", "socket", "time", "random", "threading", "subprocess"):
        assert f"import {name}\n" not in text and f"from {name} import" not in text, name


def _split_now(bus: Bus, *groups: tuple[int, ...], inquorate: tuple[int, ...] = ()) -> None:
    """A partition that loses every message still in flight (the ACKs)."""
    bus.queue.clear()
    bus.groups = [tuple(sorted(g)) for g in groups]
    for group in bus.groups:
        for nodeid in group:
            if nodeid in inquorate:
                bus.run(bus.nodes[nodeid].core.quorum_changed(False, bus.now_ns), nodeid)
            bus.run(bus.nodes[nodeid].core.confchg(group, bus.now_ns), nodeid)
    bus.deliver_all()


def test_op_is_answered_once_every_member_applied_it() -> None:
    bus = formed()
    request = bus.submit(2, Op.mkdir("d", T))
    bus.step()  # the op is applied everywhere; the ACKs are still queued
    assert request not in bus.nodes[2].results
    bus.deliver_all()
    assert bus.nodes[2].results[request] == 0


def test_unconfirmed_op_on_the_minority_is_eio() -> None:
    bus = formed()
    request = bus.submit(3, Op.mkdir("d", T))
    bus.step()
    _split_now(bus, (1, 2), (3,), inquorate=(3,))
    assert bus.nodes[3].results[request] == errno.EIO


def test_unconfirmed_op_on_the_quorate_side_is_kept_and_answered() -> None:
    bus = formed()
    request = bus.submit(1, Op.mkdir("d", T))
    bus.step()
    _split_now(bus, (1, 2), (3,), inquorate=(3,))
    assert bus.nodes[1].results[request] == 0
    assert bus.nodes[1].store.term > bus.nodes[3].store.term


def test_change_feed_reports_what_did_not_come_through_submit() -> None:
    bus = formed()
    assert bus.do(1, Op.mkdir("d", T)) == 0
    assert bus.nodes[1].applied == []
    assert [op.path for op in bus.nodes[2].applied] == ["d"]
    for i in range(3):
        assert bus.do(1, Op.create(f"d/f{i}", T)) == 0
    bus.configure((1, 2), (3,))
    assert bus.do(1, Op.write("d/f0", 0, b"new", T)) == 0
    assert bus.do(1, Op.unlink("d/f1")) == 0
    bus.nodes[3].applied.clear()
    bus.configure((1, 2, 3))
    bus.deliver_all()
    fed = {(op.kind.name, op.path) for op in bus.nodes[3].applied}
    assert ("TRUNCATE", "d/f0") in fed and ("UNLINK", "d/f1") in fed
