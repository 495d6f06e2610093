"""The digest walk and resync patch: after applying the planner's patch the
requester's tree equals the source's (hypothesis, through the wire codecs);
the walk lists exactly the differing entries; the bytes exchanged grow with
the number of differences, not with the tree size; decoders are bounds-checked.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.cfs import resync
from corral.cfs._tree import Tree
from corral.errors import DecodeError

from .helpers import MemNode, build
from .test_tree import specs


def _sync(requester: MemNode, source: MemNode) -> int:
    """Run the whole protocol through the encoders; returns bytes exchanged."""
    walk = resync.ResyncWalk(requester.state.tree)
    queries = walk.start(source.state.tree.digest)
    wire = 0
    while queries:
        query_bytes = resync.encode_queries(queries)
        answers = [resync.answer(source.state.tree, q, leaf_max=2)
                   for q in resync.decode_queries(query_bytes)]
        answer_bytes = resync.encode_answers(answers)
        wire += len(query_bytes) + len(answer_bytes)
        queries = walk.feed(resync.decode_answers(answer_bytes))
    patch = resync.build_patch(source.state.tree, walk.fetch, source.read)
    patch_bytes = resync.encode_patch(patch)
    wire += len(patch_bytes)
    mutations = requester.state.apply_patch(walk.delete, resync.decode_patch(patch_bytes),
                                            walk.touch_dirs)
    requester.kv.apply_batch(mutations)
    return wire


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_source=specs(), spec_requester=specs(), seed=st.integers(0, 2**32))
def test_patch_makes_trees_equal(spec_source: dict, spec_requester: dict, seed: int) -> None:
    source = build(spec_source, random.Random(seed))
    requester = build(spec_requester, random.Random(seed + 1))
    _sync(requester, source)
    assert requester.state.tree.digest == source.state.tree.digest
    assert requester.spec() == spec_source
    assert requester.state.tree.check()
    # The store holds exactly the patched tree.
    assert requester.reload().spec() == spec_source


def _flat_tree(count: int, changed: dict[str, int] | None = None,
               missing: set[str] = frozenset(), extra: set[str] = frozenset()) -> Tree:
    tree = Tree()
    nodes = tree.add(tree.root, "nodes", 2, True, 1, 2, 1)
    node_dir = tree.add(nodes, "pve1", 3, True, 1, 3, 1)
    guests = tree.add(node_dir, "qemu-server", 4, True, 1, 4, 1)
    tree.add(tree.root, "storage.cfg", 5, False, 1, 5, 1, 100, 77)
    ino = 10
    for vmid in range(100, 100 + count):
        name = f"{vmid}.conf"
        if name in missing:
            continue
        ino += 1
        content_sum = (changed or {}).get(name, vmid * 7919)
        tree.add(guests, name, ino, False, 1, ino, 1, 200, content_sum)
    for name in sorted(extra):
        ino += 1
        tree.add(guests, name, ino, False, 1, ino, 1, 200, 5)
    return tree


def test_walk_finds_exactly_the_differences_and_bytes_scale_with_them() -> None:
    diffs = {"changed": {"150.conf": 1}, "missing": {"777.conf"}, "extra": {"x.tmp"}}
    costs = []
    for count in (10_000, 80_000):
        source = _flat_tree(count)
        requester = _flat_tree(count, diffs["changed"], diffs["missing"], diffs["extra"])
        walk, wire_bytes = resync.run_walk(requester, source)
        prefix = "nodes/pve1/qemu-server/"
        assert sorted(walk.fetch) == [prefix + "150.conf", prefix + "777.conf"]
        assert walk.delete == [prefix + "x.tmp"]
        costs.append(wire_bytes)
    # The whole listing would be ~20 bytes per entry; the walk sends a few KB,
    # and eight times the entries costs at most one or two more bucket levels.
    assert costs[0] < 8_000, costs
    assert costs[1] < costs[0] * 1.6, costs


def test_equal_trees_need_no_queries() -> None:
    walk, wire_bytes = resync.run_walk(_flat_tree(500), _flat_tree(500))
    assert walk.fetch == walk.delete == [] and wire_bytes == 8


def test_decoders_reject_truncation_and_garbage() -> None:
    source = _flat_tree(100)
    queries = [resync.Query(""), resync.Query("nodes/pve1/qemu-server", 1, 3)]
    answers = [resync.answer(source, q, leaf_max=4) for q in queries] + [resync.Missing("x")]
    patch = [resync.PatchItem("a", True, 1, 1), resync.PatchItem("a/b", False, 2, 1, b"xyz")]
    for blob, decode in ((resync.encode_queries(queries), resync.decode_queries),
                         (resync.encode_answers(answers), resync.decode_answers),
                         (resync.encode_patch(patch), resync.decode_patch)):
        assert resync.encode_queries(decode(blob)) == blob if decode is resync.decode_queries \
            else decode(blob) is not None
        for cut in range(len(blob)):
            with pytest.raises(DecodeError):
                decode(blob[:cut])
        with pytest.raises(DecodeError):
            decode(blob + b"\x01")
    assert resync.decode_patch(resync.encode_patch(patch)) == patch
    assert resync.decode_answers(resync.encode_answers(answers)) == answers
