"""The Cython tree index: digests are order-independent, change exactly when
content changes, stay equal to a from-scratch recomputation after every
incremental update; readdir is sorted, pages by cookie and stays fast for
270,000 entries; bulk_load rejects broken records instead of failing.

Method: hypothesis generates final tree contents and reaches them through
different operation orders (tests/cfs/helpers.build); digests are compared
with each other and with the content specs.
"""

from __future__ import annotations

import random
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.cfs._tree import ROOT_INO, Tree

from .helpers import MemNode, Spec, build

_names = st.sampled_from(["a", "b", "c", "nodes", "x.cfg", "ü", "lock", "0"])


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    spec: Spec = {}
    dirs = [""]
    for _ in range(draw(st.integers(0, 14))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_names)
        path = f"{parent}/{name}" if parent else name
        if path in spec:
            continue
        mtime = draw(st.integers(0, 3))
        if draw(st.booleans()):
            spec[path] = (True, mtime, None)
            dirs.append(path)
        else:
            size = draw(st.sampled_from([0, 1, 7, 200, 4095, 4096, 4097, 9000]))
            fill = draw(st.integers(0, 2))
            spec[path] = (False, mtime, bytes([fill]) * size)
    return spec


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(spec=specs(), seed_a=st.integers(0, 2**32), seed_b=st.integers(0, 2**32))
def test_same_content_different_order_same_digest(spec: Spec, seed_a: int, seed_b: int) -> None:
    node_a = build(spec, random.Random(seed_a))
    node_b = build(spec, random.Random(seed_b))
    assert node_a.spec() == spec == node_b.spec()
    assert node_a.state.tree.digest == node_b.state.tree.digest
    assert node_a.state.tree.check() and node_b.state.tree.check()


@SETTINGS
@given(spec_a=specs(), spec_b=specs(), seed=st.integers(0, 2**32))
def test_digest_changes_iff_content_changes(spec_a: Spec, spec_b: Spec, seed: int) -> None:
    node_a = build(spec_a, random.Random(seed))
    node_b = build(spec_b, random.Random(seed + 1))
    assert (node_a.state.tree.digest == node_b.state.tree.digest) == (spec_a == spec_b)


@SETTINGS
@given(spec=specs(), seed=st.integers(0, 2**32))
def test_reload_from_records_gives_same_digest(spec: Spec, seed: int) -> None:
    node = build(spec, random.Random(seed))
    again = node.reload()
    assert again.state.tree.digest == node.state.tree.digest
    assert again.spec() == spec


def test_single_change_changes_digest_and_restoring_it_restores() -> None:
    node = MemNode()
    from corral.cfs.ops import Op

    assert node.ap(Op.mkdir("d", 1)) == 0
    assert node.ap(Op.create("d/f", 1)) == 0
    assert node.ap(Op.write("d/f", 0, b"abc", 5)) == 0
    before = node.state.tree.digest
    assert node.ap(Op.write("d/f", 1, b"X", 5)) == 0
    assert node.state.tree.digest != before
    assert node.ap(Op.write("d/f", 1, b"b", 5)) == 0
    assert node.state.tree.digest == before
    assert node.ap(Op.set_mtime("d/f", 6)) == 0
    assert node.state.tree.digest != before
    assert node.ap(Op.set_mtime("d/f", 5)) == 0
    assert node.state.tree.digest == before
    assert node.ap(Op.rename("d/f", "d/g", 5)) == 0
    assert node.state.tree.digest != before


def test_readdir_sorted_paging_and_interleaved_changes() -> None:
    tree = Tree()
    rng = random.Random(7)
    names = [f"n{rng.randrange(10**9)}" for _ in range(3000)]
    names = list(dict.fromkeys(names))
    for index, name in enumerate(names):
        tree.add(tree.root, name, index + 2, False, 0, 0, 0)
    listed: list[str] = []
    cookie = 0
    while page := tree.readdir(tree.root, cookie, 256):
        listed += [entry.name for entry in page]
        cookie += len(page)
    assert listed == sorted(names)
    # Changes between listings are merged into the cached order.
    removed = set(names[::3])
    for name in removed:
        entry = tree.lookup(name)
        assert entry is not None
        tree.remove(entry)
    tree.add(tree.root, "zz-new", 10**6, False, 0, 0, 0)
    tree.add(tree.root, names[0], 10**6 + 1, False, 0, 0, 0)
    expected = sorted((set(names) - removed) | {"zz-new", names[0]})
    assert tree.sorted_names(tree.root) == expected
    after = tree.readdir_after(tree.root, expected[10], 5)
    assert [entry.name for entry in after] == expected[11:16]
    assert tree.check()


def test_readdir_270k_entries_is_fast() -> None:
    tree = Tree()
    started = time.perf_counter()
    for index in range(270_000):
        tree.add(tree.root, f"{index}.conf", index + 2, False, 0, index, 0)
    listed = 0
    cookie = 0
    list_started = time.perf_counter()
    while page := tree.readdir(tree.root, cookie, 4096):
        listed += len(page)
        cookie += len(page)
    list_s = time.perf_counter() - list_started
    assert listed == 270_000
    # The reference took 517 s; generous margins for a shared, loaded box.
    assert list_s < 5.0, list_s
    assert time.perf_counter() - started < 30.0


def test_bulk_load_reports_bad_records_and_keeps_the_rest() -> None:
    tree = Tree()
    records = [
        (5, ROOT_INO, "d", True, 0, 1, 5, 1, 0),
        (6, 5, "f", False, 3, 1, 6, 1, 123),
        (7, 5, "f", False, 3, 1, 7, 1, 456),     # duplicate name: the lower inode wins
        (8, 99, "orphan", False, 0, 1, 8, 1, 0),  # missing parent
        (9, 6, "under-a-file", False, 0, 1, 9, 1, 0),
        (10, 7, "child-of-rejected", False, 0, 1, 10, 1, 0),
    ]
    rejects = dict(tree.bulk_load(reversed(records)))
    assert rejects[7] == "duplicate name"
    assert rejects[8] == "missing parent"
    assert rejects[9] == "missing parent"
    assert 10 in rejects
    found = tree.lookup("d/f")
    assert found is not None and found.ino == 6
    assert tree.count == 2 and tree.total_bytes == 3
    assert tree.check()


def test_move_into_itself_is_refused() -> None:
    tree = Tree()
    top = tree.add(tree.root, "a", 2, True, 0, 0, 0)
    inner = tree.add(top, "b", 3, True, 0, 0, 0)
    try:
        tree.move(top, inner, "x", 4, 0)
    except ValueError:
        pass
    else:
        raise AssertionError("moving a directory into itself must fail")
    assert tree.check()
