"""A directory's writer is part of the digest and is repaired by a resync.

A lock directory's writer is its holder: only the holder may refresh it, and
the lock's checksum (judged by the expiry UNLOCK) names it. Two nodes that
hold the same lock path with different writers must therefore compare
unequal, and the digest walk must give the requester the source's writer,
even when the mtimes happen to be equal (a re-taken lock in the same second).
Without that, a node back from a partition keeps believing it holds a lock
another node took over, and a refresh succeeds on that node only."""

from __future__ import annotations

from corral.cfs import resync
from corral.cfs.ops import Op
from corral.cfs.state import lock_checksum

from .helpers import MemNode

LOCK = "priv/lock/ha_agent_node1_lock"


def _node(lock_writer: int, lock_mtime: int) -> MemNode:
    node = MemNode()
    for path in ("priv", "priv/lock"):
        assert node.ap(Op.mkdir(path, 5)) == 0
    assert node.ap(Op.mkdir(LOCK, lock_mtime), writer=lock_writer) == 0
    return node


def _sync(requester: MemNode, source: MemNode) -> None:
    walk = resync.ResyncWalk(requester.state.tree)
    queries = walk.start(source.state.tree.digest)
    while queries:
        answers = [resync.answer(source.state.tree, q, leaf_max=2)
                   for q in resync.decode_queries(resync.encode_queries(queries))]
        queries = walk.feed(resync.decode_answers(resync.encode_answers(answers)))
    patch = resync.decode_patch(resync.encode_patch(
        resync.build_patch(source.state.tree, walk.fetch, source.read)))
    requester.kv.apply_batch(requester.state.apply_patch(walk.delete, patch, walk.touch_dirs))


def _lock(node: MemNode) -> tuple[int, int, int]:
    entry = node.state.tree.lookup(LOCK)
    assert entry is not None
    return entry.writer, entry.mtime, lock_checksum(LOCK, entry)


def test_lock_holder_differs_only_in_writer() -> None:
    majority, returning = _node(lock_writer=2, lock_mtime=100), _node(lock_writer=1, lock_mtime=100)
    assert majority.state.tree.digest != returning.state.tree.digest
    _sync(returning, majority)
    assert _lock(returning) == _lock(majority)
    assert returning.state.tree.digest == majority.state.tree.digest
    assert returning.state.tree.check()
    # The stale holder's refresh now fails here as it does on the majority.
    assert returning.ap(Op.set_mtime(LOCK, 101), writer=1) == majority.ap(
        Op.set_mtime(LOCK, 101), writer=1) != 0
    assert returning.reload().state.tree.digest == majority.state.tree.digest


def test_lock_retaken_later_gets_holder_and_mtime() -> None:
    majority, returning = _node(lock_writer=3, lock_mtime=140), _node(lock_writer=1, lock_mtime=100)
    _sync(returning, majority)
    assert _lock(returning) == _lock(majority) and _lock(returning)[:2] == (3, 140)
    assert returning.state.tree.digest == majority.state.tree.digest


def test_answer_codec_carries_the_writer() -> None:
    node = _node(lock_writer=7, lock_mtime=9)
    answer = resync.answer(node.state.tree, resync.Query(LOCK), leaf_max=2)
    assert isinstance(answer, resync.Entries) and answer.dir_writer == 7
    assert resync.decode_answers(resync.encode_answers([answer])) == [answer]
