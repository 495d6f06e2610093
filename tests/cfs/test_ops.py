"""The operation wire encoding: round trip for every kind (hypothesis), and
the three decoder checks of STYLE.md: whole buffer, every truncated prefix
(one byte at a time), and trailing garbage; plus hostile headers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.cfs.ops import FLAG_APPEND, HEADER, Op, OpKind, decode, encode
from corral.errors import DecodeError, UsageError

paths = st.text(min_size=0, max_size=40)
ops = st.builds(
    Op,
    kind=st.sampled_from(list(OpKind)),
    path=paths,
    mtime=st.integers(0, 2**64 - 1),
    arg=st.integers(0, 2**64 - 1),
    path2=paths,
    data=st.binary(max_size=300),
    flags=st.sampled_from([0, 1]),
)


@settings(max_examples=300, deadline=None)
@given(op=ops)
def test_round_trip(op: Op) -> None:
    try:
        wire = encode(op)
    except UnicodeEncodeError:
        return  # a lone surrogate that is not a byte escape: not a kernel path
    assert decode(wire) == op


@settings(max_examples=15, deadline=None)
@given(op=ops)
def test_every_truncation_and_trailing_garbage_fail(op: Op) -> None:
    try:
        wire = encode(op)
    except UnicodeEncodeError:
        return
    for cut in range(len(wire)):
        with pytest.raises(DecodeError):
            decode(wire[:cut])
    with pytest.raises(DecodeError):
        decode(wire + b"\0")


def test_constructors_and_sizes() -> None:
    op = Op.write("nodes/a/qemu-server/100.conf", 4096, b"x" * 200, 1_795_720_870)
    wire = encode(op)
    assert len(wire) == HEADER.size + len(op.path) + 200
    assert decode(wire).arg == 4096
    assert decode(encode(Op.create("f", 1, excl=True))).excl
    assert decode(encode(Op.rename("a", "b", 3))).path2 == "b"


def test_hostile_headers() -> None:
    good = bytearray(encode(Op.mkdir("d", 1)))
    newer = bytearray(good)
    newer[0] = 2
    with pytest.raises(DecodeError, match="format"):
        decode(bytes(newer))
    unknown = bytearray(good)
    unknown[1] = 200
    with pytest.raises(DecodeError, match="kind"):
        decode(bytes(unknown))
    flags = bytearray(good)
    flags[2] = 0x80
    with pytest.raises(DecodeError):
        decode(bytes(flags))
    huge = HEADER.pack(1, 2, 0, 0, 0, 0, 65535, 0, 0)
    with pytest.raises(DecodeError):
        decode(huge)
    lying = HEADER.pack(1, 2, 0, 0, 0, 0, 0, 0, 2**32 - 1)
    with pytest.raises(DecodeError):
        decode(lying)


def test_append_flag() -> None:
    op = decode(encode(Op.append("log", b"line\n", 5)))
    assert op.appends and op.kind == OpKind.WRITE and op.arg == 0 and op.data == b"line\n"
    assert not Op.write("log", 0, b"x", 5).appends
    # The flag only means something on a write whose offset is left to the apply step.
    for bad in (Op(OpKind.WRITE, "log", arg=4, flags=FLAG_APPEND),
                Op(OpKind.MKDIR, "d", flags=FLAG_APPEND)):
        with pytest.raises(UsageError, match="append"):
            encode(bad)
        wire = bytearray(encode(Op(bad.kind, bad.path, arg=bad.arg)))
        wire[2] = FLAG_APPEND
        with pytest.raises(DecodeError, match="append"):
            decode(bytes(wire))


def test_encode_refuses_out_of_bounds() -> None:
    with pytest.raises(UsageError):
        encode(Op.create("x" * 5000, 1))
    with pytest.raises(UsageError):
        encode(Op(OpKind.CREATE, "a", mtime=-1))
