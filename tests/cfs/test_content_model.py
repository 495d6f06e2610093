"""File content through chunked writes and truncates matches a plain
bytearray model (hypothesis): offsets across chunk boundaries, writes past
EOF (zero fill), shrink and grow, ranged reads, appends resolved at apply; after every step the index
digests and the stored chunks agree (Tree.check, reload), and the content
digest equals that of the same bytes written in one go."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.cfs.ops import Op
from corral.cfs.rules import CHUNK_SIZE, Limits

from .helpers import MemNode

_offsets = st.one_of(
    st.integers(0, 5 * CHUNK_SIZE),
    st.sampled_from([CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE]),
)
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _offsets, st.binary(min_size=0, max_size=3 * CHUNK_SIZE)),
        st.tuples(st.just("truncate"), _offsets, st.just(b"")),
        st.tuples(st.just("read"), _offsets, st.integers(0, 3 * CHUNK_SIZE).map(bytes)),
    ),
    max_size=25,
)


@settings(max_examples=120, deadline=None)
@given(steps=_steps)
def test_content_matches_bytearray_model(steps: list[tuple[str, int, bytes]]) -> None:
    node = MemNode()
    assert node.ap(Op.create("f", 1)) == 0
    model = bytearray()
    for kind, offset, payload in steps:
        if kind == "write":
            assert node.ap(Op.write("f", offset, payload, 2)) == 0
            if payload:
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + len(payload)] = payload
        elif kind == "truncate":
            assert node.ap(Op.truncate("f", offset, 3)) == 0
            if offset < len(model):
                del model[offset:]
            else:
                model.extend(bytes(offset - len(model)))
        else:
            size = len(payload)
            code, data = node.state.read("f", offset, size, node.kv)
            assert code == 0 and data == bytes(model[offset:offset + size])
        entry = node.state.tree.lookup("f")
        assert entry is not None and entry.size == len(model)
        chunk_keys = [k for k in node.kv if k[:1] == b"c"]
        assert len(chunk_keys) == -(-len(model) // CHUNK_SIZE)
    assert node.read("f") == bytes(model)
    # The content digest is canonical: one write of the same bytes gives it.
    assert node.ap(Op.create("g", 1)) == 0
    assert node.ap(Op.write("g", 0, bytes(model), 1)) == 0
    same, fresh = node.state.tree.lookup("f"), node.state.tree.lookup("g")
    assert same is not None and fresh is not None and same.digest == fresh.digest
    assert node.state.tree.check()
    assert node.reload().state.tree.digest == node.state.tree.digest


def test_appends_land_at_the_end_as_applied() -> None:
    # Two nodes append "at once": both ops are built before either is applied,
    # so a sender-chosen offset would make the second overwrite the first.
    node = MemNode()
    assert node.ap(Op.create("log", 1)) == 0
    assert node.ap(Op.write("log", 0, b"head\n", 1)) == 0
    first, second = Op.append("log", b"from n1\n", 2), Op.append("log", b"from n2\n", 2)
    assert node.ap(first, writer=1) == 0
    assert node.ap(second, writer=2) == 0
    assert node.read("log") == b"head\nfrom n1\nfrom n2\n"
    across = b"x" * (CHUNK_SIZE + 7)  # an append that crosses a chunk boundary
    assert node.ap(Op.append("log", across, 3)) == 0
    assert node.read("log") == b"head\nfrom n1\nfrom n2\n" + across
    assert node.state.tree.check()
    assert node.reload().read("log") == node.read("log")


def test_append_past_the_size_limit_changes_nothing() -> None:
    node = MemNode(Limits(file_size_max_bytes=10))
    assert node.ap(Op.create("f", 1)) == 0
    assert node.ap(Op.append("f", b"12345678", 1)) == 0
    assert node.ap(Op.append("f", b"abc", 1)) == 27  # EFBIG: rejected whole
    assert node.read("f") == b"12345678"
    assert node.ap(Op.append("missing", b"x", 1)) == 2  # ENOENT
