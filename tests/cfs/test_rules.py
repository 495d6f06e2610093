"""The apply step's errno contract (anchors/pmxcfs.md sections 3-8), checked
on an in-memory node: names, root virtual entries, POSIX cases, limits,
quorum, VMID uniqueness and quarantine, locks and their expiry, modes. Also:
a rejected operation changes nothing, and two nodes applying the same random
operation stream produce the same errnos and byte-identical stores.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.cfs import rules
from corral.cfs.locks import LockTracker
from corral.cfs.ops import Op
from corral.cfs.resync import PatchItem
from corral.cfs.state import LockChanged, UnlockRequested

from .helpers import MemNode

S = 1_000_000_000


def _node(limits: rules.Limits | None = None) -> MemNode:
    node = MemNode(limits)
    for path in ("nodes", "nodes/a", "nodes/a/qemu-server", "nodes/a/lxc", "nodes/b",
                 "nodes/b/qemu-server", "priv", "priv/lock", "d"):
        assert node.ap(Op.mkdir(path, 1)) == 0
    return node


def _unchanged(node: MemNode, op: Op, code: int) -> None:
    before = (dict(node.kv), node.state.tree.digest, node.state.version)
    assert node.ap(op) == code
    assert (dict(node.kv), node.state.tree.digest, node.state.version) == before


def test_names() -> None:
    node = _node()
    for bad in (".", "..", "d/.", "d/../x", "d//x", "/d"):
        _unchanged(node, Op.create(bad, 1), errno.EINVAL)
    _unchanged(node, Op.create("d/" + "x" * 256, 1), errno.ENAMETOOLONG)
    assert node.ap(Op.create("d/" + "x" * 255, 1)) == 0


def test_root_virtual_entries() -> None:
    node = _node()
    _unchanged(node, Op.create(".members", 1), errno.EEXIST)
    _unchanged(node, Op.mkdir("local", 1), errno.EEXIST)
    _unchanged(node, Op.write(".members", 0, b"x", 1), errno.EIO)
    _unchanged(node, Op.truncate(".vmlist", 0, 1), errno.EIO)
    _unchanged(node, Op.unlink(".vmlist"), errno.EACCES)
    _unchanged(node, Op.unlink("local"), errno.EACCES)
    _unchanged(node, Op.rename("d", "qemu-server"), errno.EACCES)
    _unchanged(node, Op.set_mtime(".version", 5), errno.EACCES)
    assert rules.SYMLINK_ERRNO == rules.MKNOD_ERRNO == errno.ENOSYS
    assert rules.LINK_ERRNO == errno.EPERM


def test_posix_cases() -> None:
    node = _node()
    assert node.ap(Op.create("d/f", 1, excl=True)) == 0
    _unchanged(node, Op.create("d/f", 1, excl=True), errno.EEXIST)
    assert node.ap(Op.create("d/f", 1)) == 0
    _unchanged(node, Op.create("nope/f", 1), errno.ENOENT)
    _unchanged(node, Op.create("d/f/g", 1), errno.ENOTDIR)
    _unchanged(node, Op.rmdir("d"), errno.ENOTEMPTY)
    _unchanged(node, Op.rmdir("d/f"), errno.ENOTDIR)
    _unchanged(node, Op.unlink("d"), errno.EISDIR)
    _unchanged(node, Op.mkdir("d", 1), errno.EEXIST)
    # pwrite past EOF zero-fills.
    assert node.ap(Op.write("d/f", 10, b"ab", 2)) == 0
    assert node.read("d/f") == bytes(10) + b"ab"
    # Directories: only empty ones move.
    assert node.ap(Op.mkdir("e", 1)) == 0
    _unchanged(node, Op.rename("d", "e2"), errno.ENOTEMPTY)
    assert node.ap(Op.rename("e", "e2")) == 0
    assert node.ap(Op.mkdir("e3", 1)) == 0
    assert node.ap(Op.rename("e2", "e3")) == 0  # onto an empty directory
    _unchanged(node, Op.rename("e3", "d/f"), errno.ENOTDIR)
    _unchanged(node, Op.rename("e3", "e3/x"), errno.EINVAL)
    # Files: replace a file atomically; never onto a directory.
    assert node.ap(Op.create("d/g", 1)) == 0
    assert node.ap(Op.write("d/g", 0, b"new", 3)) == 0
    assert node.ap(Op.rename("d/g", "d/f", 3)) == 0
    assert node.read("d/f") == b"new" and node.state.tree.lookup("d/g") is None
    _unchanged(node, Op.rename("d/f", "d"), errno.EISDIR)
    _unchanged(node, Op.rename("d/f", "e3"), errno.EISDIR)
    _unchanged(node, Op.rename("missing", "x"), errno.ENOENT)
    assert node.state.tree.check()


def test_file_size_limit_rejects_the_whole_write() -> None:
    node = _node()
    assert node.ap(Op.create("d/big", 1)) == 0
    one_mib = 1024 * 1024
    assert node.ap(Op.write("d/big", 0, b"a" * one_mib, 1)) == 0
    _unchanged(node, Op.write("d/big", one_mib, b"b", 1), errno.EFBIG)
    _unchanged(node, Op.write("d/big", 0, b"c" * (one_mib + 1), 1), errno.EFBIG)
    _unchanged(node, Op.truncate("d/big", 2 * one_mib, 1), errno.EFBIG)
    assert node.read("d/big") == b"a" * one_mib


def test_total_size_and_inode_limits_are_enforced() -> None:
    limits = rules.Limits(file_size_max_bytes=1000, total_size_max_bytes=2500, inodes_max=12)
    node = _node(limits)
    for name in ("f1", "f2"):
        assert node.ap(Op.create(f"d/{name}", 1)) == 0
        assert node.ap(Op.write(f"d/{name}", 0, b"x" * 1000, 1)) == 0
    assert node.ap(Op.create("d/f3", 1)) == 0
    _unchanged(node, Op.write("d/f3", 0, b"x" * 501, 1), errno.ENOSPC)
    _unchanged(node, Op.truncate("d/f3", 501, 1), errno.ENOSPC)
    assert node.ap(Op.write("d/f3", 0, b"x" * 500, 1)) == 0
    _unchanged(node, Op.create("d/f4", 1), errno.ENOSPC)  # 12 inodes in use
    _unchanged(node, Op.mkdir("d/sub", 1), errno.ENOSPC)
    assert node.ap(Op.unlink("d/f1")) == 0
    assert node.ap(Op.create("d/f4", 1)) == 0
    assert node.ap(Op.write("d/f4", 0, b"y" * 1000, 1)) == 0
    assert node.state.tree.total_bytes == 2500
    assert node.state.statfs(block_size=500) == (5, 0, 12, 0)


def test_no_quorum_every_mutation_is_eacces() -> None:
    node = _node()
    assert node.ap(Op.create("d/f", 1)) == 0
    node.quorate = False
    for op in (Op.create("d/g", 1), Op.write("d/f", 0, b"x", 1), Op.truncate("d/f", 0, 1),
               Op.mkdir("d/x", 1), Op.rmdir("d"), Op.unlink("d/f"), Op.rename("d/f", "d/h"),
               Op.set_mtime("d/f", 9), Op.mkdir("priv/lock/l", 1), Op.unlock("priv/lock/l", 0)):
        _unchanged(node, op, errno.EACCES)
    assert rules.mode_of("d/f", False, quorate=False) == 0o440
    assert rules.mode_of("d", True, quorate=False) == 0o555
    assert rules.mode_of("local", False, quorate=True) == 0o755
    assert rules.mode_of("local", False, quorate=False) == 0o555


def test_modes_ownership() -> None:
    assert rules.mode_of("storage.cfg", False, True) == 0o640
    assert rules.mode_of("priv/shadow.cfg", False, True) == 0o600
    assert rules.mode_of("priv", True, True) == 0o700
    assert rules.mode_of("nodes/a/priv/x", False, True) == 0o600
    assert rules.mode_of("nodes/a/x", False, True) == 0o640
    assert rules.mode_of(".members", False, True) == 0o440
    assert rules.mode_of(".debug", False, True) == 0o640
    assert rules.chmod_error("priv/x", 0o600) == 0
    assert rules.chmod_error("priv/x", 0o640) == errno.EPERM
    assert rules.chmod_error("x", 0o640) == 0
    assert rules.chown_error(0, 33, 33) == 0 and rules.chown_error(-1, -1, 33) == 0
    assert rules.chown_error(1000, 33, 33) == errno.EPERM
    assert rules.chown_error(0, 0, 33) == errno.EPERM


def test_guest_config_pattern() -> None:
    assert rules.guest_config("nodes/a/qemu-server/100.conf") == rules.GuestConfig("a", "qemu", 100)
    assert rules.guest_config("nodes/a-b/lxc/99.conf") == rules.GuestConfig("a-b", "lxc", 99)
    for plain in ("nodes/a/qemu-server/0.conf", "nodes/a/qemu-server/099.conf",
                  "nodes/-a/qemu-server/100.conf", "nodes/a/qemu-server/4294967296.conf",
                  "nodes/a/other/100.conf", "nodes/a/qemu-server/100.conf.tmp"):
        assert rules.guest_config(plain) is None, plain
    assert rules.guest_config("nodes/a/openvz/4294967295.conf") is not None


def test_vmid_unique_across_nodes_and_types() -> None:
    node = _node()
    assert node.ap(Op.create("nodes/a/qemu-server/100.conf", 1, excl=True)) == 0
    _unchanged(node, Op.create("nodes/b/qemu-server/100.conf", 1), errno.EEXIST)
    _unchanged(node, Op.create("nodes/a/lxc/100.conf", 1), errno.EEXIST)
    assert node.ap(Op.create("nodes/a/qemu-server/0.conf", 1)) == 0
    assert node.ap(Op.create("nodes/b/qemu-server/0.conf", 1)) == 0
    # Migration: the config itself may move to another node.
    assert node.ap(Op.rename("nodes/a/qemu-server/100.conf", "nodes/b/qemu-server/100.conf")) == 0
    assert node.state.guest_list() == [(100, "b", "qemu", node.state.guest_list()[0][3])]
    # An unrelated file may not take a held id.
    assert node.ap(Op.create("nodes/a/qemu-server/tmp", 1)) == 0
    _unchanged(node, Op.rename("nodes/a/qemu-server/tmp", "nodes/a/qemu-server/100.conf"),
               errno.EEXIST)
    # The PVE atomic-write pattern on the holder's own node works.
    assert node.ap(Op.create("nodes/b/qemu-server/100.conf.tmp", 1)) == 0
    assert node.ap(Op.rename("nodes/b/qemu-server/100.conf.tmp",
                             "nodes/b/qemu-server/100.conf")) == 0
    assert node.ap(Op.unlink("nodes/b/qemu-server/100.conf")) == 0
    assert node.ap(Op.create("nodes/a/lxc/100.conf", 1)) == 0
    assert [g[:3] for g in node.state.guest_list()] == [(100, "a", "lxc")]


def test_duplicate_vmid_in_loaded_store_is_quarantined() -> None:
    node = _node()
    assert node.ap(Op.create("nodes/a/qemu-server/100.conf", 1)) == 0
    # A resync patch bypasses the rules: that is how a duplicate can reach a
    # store (or an older, buggy version, or a merged database).
    node.kv.apply_batch(node.state.apply_patch(
        [], [PatchItem("nodes/b/qemu-server/100.conf", False, 1, 2, b"dup")]))
    again = node.reload()
    assert [g[:3] for g in again.state.guest_list()] == [(100, "a", "qemu")]
    assert again.state.quarantined == {"nodes/b/qemu-server/100.conf": 100}
    _unchanged(again, Op.write("nodes/b/qemu-server/100.conf", 0, b"x", 1), errno.EEXIST)
    assert again.ap(Op.unlink("nodes/b/qemu-server/100.conf")) == 0
    assert again.state.quarantined == {}
    assert [g[:3] for g in again.state.guest_list()] == [(100, "a", "qemu")]


def test_locks_take_refresh_and_expire() -> None:
    node = _node()
    tracker = LockTracker()
    outcome = node.run(Op.mkdir("priv/lock/file-storage_cfg", 100), writer=1)
    assert outcome.errno == 0
    tracker.follow(outcome.effects, now_ns=0)
    assert len(tracker) == 1
    _unchanged(node, Op.mkdir("priv/lock/file-storage_cfg", 100), errno.EEXIST)
    _unchanged(node, Op.rename("priv/lock/file-storage_cfg", "priv/lock/other"), errno.EACCES)
    # Refresh: only the writer, never backwards.
    assert node.ap(Op.set_mtime("priv/lock/file-storage_cfg", 99), writer=1) == errno.EACCES
    assert node.ap(Op.set_mtime("priv/lock/file-storage_cfg", 150), writer=2) == errno.EACCES
    refreshed = node.run(Op.set_mtime("priv/lock/file-storage_cfg", 150), writer=1)
    assert refreshed.errno == 0 and isinstance(refreshed.effects[0], LockChanged)
    tracker.follow(refreshed.effects, now_ns=10 * S)
    # utime(0, 0): fails with EACCES and asks for an unlock.
    request = node.run(Op.set_mtime("priv/lock/file-storage_cfg", 0), writer=2)
    assert request.errno == errno.EACCES and not request.mutations
    (asked,) = tracker.follow(request.effects, now_ns=60 * S)
    assert isinstance(asked, UnlockRequested)
    assert not tracker.is_expired(asked.path, asked.checksum, now_ns=129 * S)
    assert tracker.is_expired(asked.path, asked.checksum, now_ns=131 * S)
    assert node.ap(Op.unlock(asked.path, asked.checksum)) == 0
    assert node.state.tree.lookup("priv/lock/file-storage_cfg") is None


def test_unlock_only_removes_the_same_incarnation_and_empty_locks() -> None:
    node = _node()
    assert node.ap(Op.mkdir("priv/lock/x", 100)) == 0
    request = node.run(Op.set_mtime("priv/lock/x", 0))
    (asked,) = [e for e in request.effects if isinstance(e, UnlockRequested)]
    assert node.ap(Op.set_mtime("priv/lock/x", 200)) == 0  # refreshed meanwhile
    _unchanged(node, Op.unlock("priv/lock/x", asked.checksum), errno.ESTALE)
    checksum = node.state.locks()["priv/lock/x"]
    assert node.ap(Op.create("priv/lock/x/holder", 1)) == 0
    current = node.state.locks()["priv/lock/x"]
    assert current != checksum
    _unchanged(node, Op.unlock("priv/lock/x", current), errno.ENOTEMPTY)


def test_lock_tracker_rebuild_keeps_unchanged_first_seen() -> None:
    tracker = LockTracker()
    tracker.note("priv/lock/a", 1, now_ns=0)
    tracker.note("priv/lock/b", 2, now_ns=0)
    tracker.rebuild({"priv/lock/a": 1, "priv/lock/b": 3}, now_ns=100 * S)
    assert tracker.is_expired("priv/lock/a", 1, now_ns=121 * S)
    assert not tracker.is_expired("priv/lock/b", 3, now_ns=121 * S)
    assert not tracker.is_expired("priv/lock/c", 4, now_ns=121 * S)  # first sight


_paths = st.sampled_from(["d/f", "d/g", "d/h", "d/s", "d/s/f", "priv/lock/l",
                          "nodes/a/qemu-server/100.conf", "nodes/b/qemu-server/100.conf"])
_ops = st.one_of(
    st.builds(Op.create, _paths, st.integers(0, 9), st.booleans()),
    st.builds(Op.write, _paths, st.integers(0, 9000), st.binary(max_size=5000), st.integers(0, 9)),
    st.builds(Op.truncate, _paths, st.integers(0, 9000), st.integers(0, 9)),
    st.builds(Op.mkdir, _paths, st.integers(0, 9)),
    st.builds(Op.rmdir, _paths),
    st.builds(Op.unlink, _paths),
    st.builds(Op.rename, _paths, _paths),
    st.builds(Op.set_mtime, _paths, st.integers(0, 9)),
)


@settings(max_examples=60, deadline=None)
@given(stream=st.lists(st.tuples(_ops, st.integers(1, 3)), max_size=40))
def test_same_stream_same_result_on_two_nodes(stream: list[tuple[Op, int]]) -> None:
    first, second = _node(), _node()
    for op, writer in stream:
        before = (dict(first.kv), first.state.tree.digest, first.state.version)
        code = first.ap(op, writer=writer)
        if code:
            assert (dict(first.kv), first.state.tree.digest, first.state.version) == before
        assert second.ap(op, writer=writer) == code
    assert first.kv == second.kv
    assert first.state.tree.check()
    assert first.reload().state.tree.digest == first.state.tree.digest


def test_unknown_limits_are_config_errors() -> None:
    from corral.errors import ConfigError

    with pytest.raises(ConfigError):
        rules.Limits(file_size_max_bytes=0)
    with pytest.raises(ConfigError):
        rules.Limits(file_size_max_bytes=2000, total_size_max_bytes=1000)


_dup_paths = st.sampled_from([
    "nodes/a/qemu-server/100.conf", "nodes/b/qemu-server/100.conf", "nodes/a/lxc/100.conf",
    "nodes/b/qemu-server/101.conf", "d/tmp1", "d/tmp2",
])
_dup_ops = st.one_of(
    st.builds(Op.create, _dup_paths, st.integers(0, 3), st.booleans()),
    st.builds(Op.write, _dup_paths, st.integers(0, 10), st.binary(max_size=20), st.integers(0, 3)),
    st.builds(Op.unlink, _dup_paths),
    st.builds(Op.rename, _dup_paths, _dup_paths),
)


@settings(max_examples=80, deadline=None)
@given(stream=st.lists(_dup_ops, max_size=25))
def test_guest_list_with_duplicates_matches_a_reload(stream: list[Op]) -> None:
    """Whatever ops follow a load with duplicate VMIDs, the running guest list
    equals the one a restarted node would rebuild (oldest config wins)."""
    node = _node()
    items = [PatchItem(path, False, 1, 2, b"dup") for path in (
        "nodes/b/qemu-server/100.conf", "nodes/a/qemu-server/100.conf", "nodes/a/lxc/100.conf")]
    node.kv.apply_batch(node.state.apply_patch([], items))
    assert len(node.state.quarantined) == 2
    for op in stream:
        node.ap(op)
        again = node.reload()
        assert node.state.guests == again.state.guests
        assert node.state.quarantined == again.state.quarantined
