"""The CPG wire codec: round trips of every message kind, rejection of every
truncation and of trailing garbage, and (with hypothesis) that arbitrary bytes
only ever raise DecodeError and never disturb a core."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.cpg import wire
from corral.cpg.core import CpgCore
from corral.cpg.events import Reason
from corral.errors import DecodeError

groups = st.binary(min_size=1, max_size=wire.MAX_GROUP_NAME_BYTES)
pids = st.integers(min_value=0, max_value=0xFFFF_FFFF)

SAMPLES = [
    (wire.encode_join(b"g", 7), wire.JoinMsg(b"g", 7)),
    (wire.encode_leave(b"g" * 128, 0, Reason.PROCDOWN), wire.LeaveMsg(b"g" * 128, 0, 5)),
    (wire.encode_mcast(b"grp", 0xFFFF_FFFF, b"data"), wire.McastMsg(b"grp", 0xFFFF_FFFF, b"data")),
    (
        wire.encode_joinlist((3, 1 << 40), [(b"a", 1), (b"b", 2)]),
        wire.JoinlistMsg((3, 1 << 40), ((b"a", 1), (b"b", 2))),
    ),
]


@pytest.mark.parametrize(("encoded", "expected"), SAMPLES)
def test_round_trip_and_every_truncation_rejected(encoded: bytes, expected: object) -> None:
    assert wire.decode(encoded) == expected
    cut_points = range(len(encoded)) if not isinstance(expected, wire.McastMsg) else range(9)
    for cut in cut_points:
        with pytest.raises(DecodeError):
            wire.decode(encoded[:cut])


@pytest.mark.parametrize(("encoded", "expected"), SAMPLES)
def test_trailing_garbage_rejected_except_in_mcast_payload(
    encoded: bytes, expected: object
) -> None:
    if isinstance(expected, wire.McastMsg):
        assert wire.decode(encoded + b"x") == wire.McastMsg(
            expected.group, expected.pid, expected.payload + b"x"
        )
    else:
        with pytest.raises(DecodeError):
            wire.decode(encoded + b"\0")


def test_bounds_enforced() -> None:
    with pytest.raises(DecodeError):  # joinlist entry count above the bound
        wire.decode(b"CG\x01\x04" + (1).to_bytes(4, "big") + (1).to_bytes(8, "big") + b"\xff\xff")
    with pytest.raises(DecodeError):  # duplicate joinlist entry
        wire.decode(wire.encode_joinlist((1, 1), [(b"a", 1), (b"a", 1)]))
    with pytest.raises(DecodeError):  # group name longer than 128 bytes
        wire.decode(b"CG\x01\x01\x81" + b"g" * 129 + b"\0\0\0\1")
    with pytest.raises(DecodeError):  # oversize payload
        wire.decode(wire.encode_mcast(b"g", 1, b"\0" * (wire.MAX_PAYLOAD_BYTES + 1)))
    with pytest.raises(ValueError):
        wire.encode_joinlist((1, 1), [(b"g", i) for i in range(wire.MAX_ENTRIES_PER_NODE + 1)])


@given(
    kind=st.sampled_from(["join", "leave", "mcast", "joinlist"]),
    group=groups,
    pid=pids,
    payload=st.binary(max_size=64),
    entries=st.lists(st.tuples(groups, pids), max_size=8, unique=True),
)
@settings(max_examples=200, deadline=None)
def test_round_trip_property(
    kind: str, group: bytes, pid: int, payload: bytes, entries: list[tuple[bytes, int]]
) -> None:
    if kind == "join":
        assert wire.decode(wire.encode_join(group, pid)) == wire.JoinMsg(group, pid)
    elif kind == "leave":
        assert wire.decode(wire.encode_leave(group, pid, 2)) == wire.LeaveMsg(group, pid, 2)
    elif kind == "mcast":
        decoded = wire.decode(wire.encode_mcast(group, pid, payload))
        assert decoded == wire.McastMsg(group, pid, payload)
    else:
        decoded = wire.decode(wire.encode_joinlist((pid, pid), entries))
        assert decoded == wire.JoinlistMsg((pid, pid), tuple(entries))


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_escape_decode_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except DecodeError:
        pass


@given(st.lists(st.binary(max_size=40), max_size=20))
@settings(max_examples=100, deadline=None)
def test_core_survives_garbage_from_peers(payloads: list[bytes]) -> None:
    core = CpgCore(1)
    core.configuration(True, (0, 0), [1])
    core.configuration(False, (1, 4), [1, 2])
    core.join(5, 50, b"g")
    for payload in payloads:
        core.deliver(2, b"CG\x01" + payload)
        core.deliver(2, payload)
    stats = core.stats()
    dropped = stats["malformed_dropped"] + stats["stale_joinlists"] + stats["foreign_payloads"]
    assert dropped <= 2 * len(payloads)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_core_mcast_fast_path_agrees_with_the_decoder(tail: bytes) -> None:
    core = CpgCore(1)
    core.configuration(True, (0, 0), [1])
    core.configuration(False, (1, 4), [1])
    for payload in core.pop_outbox():
        core.deliver(1, payload)
    group = tail[1:1 + tail[0]] if tail else b""
    if group and len(group) == tail[0]:
        core.join(1, 1, group)
        for payload in core.pop_outbox():
            core.deliver(1, payload)
    core.pop_events()
    message = b"CG\x01\x03" + tail
    try:
        expected = wire.decode(message)
    except DecodeError:
        expected = None
    core.deliver(2, message)
    delivered = [e for _, e in core.pop_events()]
    if expected is None:
        assert delivered == [] and core.stats()["malformed_dropped"] == 1
    else:
        assert isinstance(expected, wire.McastMsg)
        assert core.stats()["malformed_dropped"] == 0
        if core.client_groups(1):
            (event,) = delivered
            assert (event.group, event.pid, event.payload) == (  # type: ignore[union-attr]
                expected.group, expected.pid, expected.payload
            )
