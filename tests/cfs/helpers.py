"""Shared helpers for the cfs tests: an in-memory node (CfsState + MemoryKV)
and builders that reach a given final content through varied operation orders."""

from __future__ import annotations

import random

from corral.cfs import rules
from corral.cfs.memkv import MemoryKV
from corral.cfs.ops import Op
from corral.cfs.state import CfsState, Outcome

# A tree's content: path -> (is_dir, mtime, content or None).
Spec = dict[str, tuple[bool, int, bytes | None]]


class MemNode:
    """One node's tree in memory; `ap` applies an op and persists its batch."""

    def __init__(self, limits: rules.Limits | None = None, writer: int = 1) -> None:
        self.state = CfsState(limits, debug_checks=True)
        self.kv = MemoryKV()
        self.writer = writer
        self.quorate = True

    def run(self, op: Op, writer: int | None = None) -> Outcome:
        outcome = self.state.apply(
            op, writer=self.writer if writer is None else writer, quorate=self.quorate,
            reader=self.kv,
        )
        if outcome.errno:
            assert not outcome.mutations, "a rejected op must not change anything"
        self.kv.apply_batch(outcome.mutations)
        return outcome

    def ap(self, op: Op, writer: int | None = None) -> int:
        return self.run(op, writer).errno

    def read(self, path: str) -> bytes:
        code, data = self.state.read(path, 0, 1 << 30, self.kv)
        assert code == 0, code
        return data

    def spec(self) -> Spec:
        """The content of the tree as seen from outside (no versions, no inodes)."""
        out: Spec = {}
        for path, entry in self.state.tree.walk():
            if not path:
                continue
            content = None if entry.is_dir else self.read(path)
            out[path] = (entry.is_dir, entry.mtime, content)
        return out

    def reload(self) -> MemNode:
        """A fresh node loaded from this node's stored records."""
        other = MemNode(self.state.limits, self.writer)
        problems = self.kv.load_state(other.state)
        other.kv = MemoryKV(self.kv)
        assert not [p for p in problems if "duplicate VMID" not in p], problems
        return other


def build(spec: Spec, rng: random.Random) -> MemNode:
    """Reach `spec` through a randomised order of creates, piecewise writes in
    random order, temporary files, renames and truncates."""
    node = MemNode()
    pending = sorted(spec)
    rng.shuffle(pending)
    done: set[str] = {""}
    while pending:
        ready = [p for p in pending if rules.split_parent(p)[0] in done]
        path = rng.choice(ready)
        pending.remove(path)
        is_dir, mtime, content = spec[path]
        if is_dir:
            assert node.ap(Op.mkdir(path, mtime)) == 0
        else:
            _write_file(node, path, mtime, content or b"", rng)
        done.add(path)
    return node


def _write_file(node: MemNode, path: str, mtime: int, content: bytes, rng: random.Random) -> None:
    head, name = rules.split_parent(path)
    target = f"{head}/.tmp-{name}" if head and rng.random() < 0.3 else path
    assert node.ap(Op.create(target, rng.randrange(1, 1000), excl=True)) == 0
    if rng.random() < 0.3:
        assert node.ap(Op.write(target, 0, b"junk" * rng.randrange(1, 3000), 7)) == 0
        assert node.ap(Op.truncate(target, 0, 7)) == 0
    cuts = sorted(rng.sample(range(1, len(content)), min(4, max(0, len(content) - 1))))
    pieces = list(zip([0, *cuts], [*cuts, len(content)], strict=True))
    rng.shuffle(pieces)
    for start, end in pieces:
        assert node.ap(Op.write(target, start, content[start:end], 9)) == 0
    if rng.random() < 0.2:
        assert node.ap(Op.truncate(target, len(content) + 5000, 9)) == 0
        assert node.ap(Op.truncate(target, len(content), 9)) == 0
    if target != path:
        assert node.ap(Op.rename(target, path, 9)) == 0
    assert node.ap(Op.set_mtime(path, mtime)) == 0
