"""The apply step reads only the stored chunks it needs: none when a
truncate drops everything or a write replaces every byte of the new
content, and otherwise only the chunks it rebuilds or drops."""

from __future__ import annotations

from collections.abc import Sequence

from corral.cfs.memkv import MemoryKV
from corral.cfs.ops import Op
from corral.cfs.state import CfsState


class CountingKV(MemoryKV):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[bytes] = []

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self.asked += keys
        return super().get_many(keys)


def _chunks_read(state: CfsState, kv: CountingKV, op: Op) -> list[int]:
    kv.asked.clear()
    outcome = state.apply(op, writer=1, quorate=True, reader=kv)
    assert outcome.errno == 0
    kv.apply_batch(outcome.mutations)
    return [int.from_bytes(key[9:], "big") for key in kv.asked]


def test_reads_only_the_chunks_it_needs() -> None:
    state, kv = CfsState(debug_checks=True), CountingKV()
    for op in (Op.mkdir("d", 1), Op.create("d/f", 1)):
        _chunks_read(state, kv, op)
    data = bytes(range(256)) * 40  # 10,240 bytes: three chunks
    assert _chunks_read(state, kv, Op.write("d/f", 0, data, 2)) == []
    assert _chunks_read(state, kv, Op.write("d/f", 0, data[::-1], 3)) == []
    # Chunk 2 stays: the digest is updated, so chunk 0's old digest is needed too.
    assert _chunks_read(state, kv, Op.write("d/f", 0, data[:4100], 4)) == [0, 1]
    assert _chunks_read(state, kv, Op.write("d/f", 5000, b"x", 5)) == [1]
    assert _chunks_read(state, kv, Op.truncate("d/f", 5000, 6)) == [1, 2]
    assert _chunks_read(state, kv, Op.truncate("d/f", 0, 7)) == []
    assert _chunks_read(state, kv, Op.write("d/f", 0, b"abc", 8)) == []
    code, content = state.read("d/f", 0, 100, kv)
    assert (code, content) == (0, b"abc")
