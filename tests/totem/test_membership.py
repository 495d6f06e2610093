"""Membership: formation, crash, graceful leave, partition and merge, EVS events.

Each test drives a few cores through the in-memory harness (simulated time, a
perfect or partitioned network) and checks what the application sees: the
configuration events, their order relative to messages, and timings measured in
simulated time against the configured token/consensus timeouts.
"""

from __future__ import annotations

import pytest

from corral.totem._core import (
    CONF_REGULAR,
    CONF_TRANSITIONAL,
    STATE_GATHER,
    STATE_OPERATIONAL,
    TotemCore,
)
from corral.totem.config import TotemConfig

from .harness import Cluster, ms, seconds


def formed(n: int, **kwargs: object) -> Cluster:
    cluster = Cluster(tuple(range(1, n + 1)), **kwargs)  # type: ignore[arg-type]
    cluster.start()
    cluster.run_until(cluster.operational, seconds(5))
    return cluster


@pytest.mark.parametrize("n", [1, 3, 5])
def test_formation(n: int) -> None:
    cluster = Cluster(tuple(range(1, n + 1)))
    cluster.start()
    took = cluster.run_until(cluster.operational, seconds(5))
    assert took < ms(100)
    ring = cluster.cores[1].ring_id
    assert ring[0] == 1 and ring[1] % 4 == 0
    for nodeid in cluster.nodeids:
        core = cluster.cores[nodeid]
        assert core.members == tuple(range(1, n + 1))
        assert core.ring_id == ring
        regular = cluster.regular_configs(nodeid)[-1]
        assert regular[2] == ring and regular[3] == core.members
        # persist-then-send: the ring seq was handed out for persisting
        assert cluster.logs[nodeid].persisted_ring_seq == ring[1]


def test_singleton_forms_at_once_then_merges() -> None:
    cluster = Cluster((1, 2))
    cluster.start(1)
    assert cluster.cores[1].state == STATE_OPERATIONAL
    assert cluster.cores[1].members == (1,)
    cluster.run_for(seconds(1))
    cluster.start(2)
    cluster.run_until(cluster.operational, seconds(5))
    assert cluster.cores[1].members == (1, 2)
    last = cluster.regular_configs(1)[-1]
    assert last[4] == (2,)  # joined


def test_merge_through_merge_detect_when_join_lost() -> None:
    cluster = Cluster((1, 2))
    cluster.start(1)
    cluster.run_for(seconds(1))
    # Node 2's start JOIN is dropped: only MERGE_DETECT can bring them together.
    cluster.drop_filter = lambda src, dst, pkt: pkt[3] == 3 and src == 2 and cluster.now_ns < ms(1002)
    cluster.start(2)
    took = cluster.run_until(cluster.operational, seconds(10))
    assert cluster.cores[1].stats()["merge_detects_sent"] >= 1
    assert took < seconds(3)


def test_ring_seq_is_highest_seen_plus_4_and_survives_restart() -> None:
    cluster = Cluster((1, 2))
    cluster.logs[2].persisted_ring_seq = 100
    cluster.start()
    cluster.run_until(cluster.operational, seconds(5))
    seq = cluster.cores[1].ring_id[1]
    assert seq > 100 and seq % 4 == 0
    assert cluster.logs[1].persisted_ring_seq == seq


def test_crash_detected_after_token_plus_consensus() -> None:
    cluster = formed(3)
    cluster.run_for(seconds(2))
    cluster.crash(3)
    took = cluster.run_until(lambda: cluster.operational((1, 2)), seconds(30))
    timers = cluster.timers
    expected = timers.token_ns + timers.consensus_ns
    assert expected - timers.hold_ns - ms(50) <= took <= expected + ms(500)
    for nodeid in (1, 2):
        trans = cluster.transitional_configs(nodeid)[-1]
        assert trans[3] == (1, 2) and trans[5] == (3,)
        assert cluster.cores[nodeid].last_leavers() == ()


def test_graceful_leave_is_fast_and_recorded() -> None:
    cluster = formed(3)
    cluster.run_for(seconds(1))
    cluster.leave(3)
    took = cluster.run_until(lambda: cluster.operational((1, 2)), seconds(30))
    assert took < ms(50)
    for nodeid in (1, 2):
        assert cluster.cores[nodeid].last_leavers() == (3,)
        regular = cluster.regular_configs(nodeid)[-1]
        assert regular[3] == (1, 2) and regular[5] == (3,)


def test_partition_and_merge() -> None:
    cluster = formed(5)
    cluster.run_for(seconds(1))
    cluster.partition((1, 2, 3), (4, 5))
    cluster.run_until(lambda: cluster.operational((1, 2, 3)) and cluster.operational((4, 5)),
                      seconds(30))
    assert cluster.cores[4].ring_id[0] == 4
    # Traffic on both sides while partitioned.
    for i in range(10):
        cluster.submit(1, b"a%d" % i)
        cluster.submit(5, b"b%d" % i)
    cluster.run_for(seconds(1))
    cluster.heal()
    cluster.run_until(cluster.operational, seconds(30))
    ring = cluster.cores[1].ring_id
    for nodeid in cluster.nodeids:
        trans = cluster.transitional_configs(nodeid)[-1]
        regular = cluster.regular_configs(nodeid)[-1]
        side = (1, 2, 3) if nodeid <= 3 else (4, 5)
        assert trans[2] == ring and trans[3] == side
        assert regular[3] == (1, 2, 3, 4, 5)
        assert regular[4] == tuple(n for n in cluster.nodeids if n not in side)
    assert [p for _, p in cluster.logs[2].delivered] == [b"a%d" % i for i in range(10)]
    assert [p for _, p in cluster.logs[4].delivered] == [b"b%d" % i for i in range(10)]


def _history(cluster: Cluster, nodeid: int) -> list[tuple[object, ...]]:
    """Events after the first regular configuration of the whole cluster."""
    events = cluster.logs[nodeid].events
    everyone = cluster.nodeids
    start = next(i for i, e in enumerate(events)
                 if e[0] == "conf" and e[1] == CONF_REGULAR and e[3] == everyone)
    return events[start + 1:]


def test_evs_old_messages_before_transitional_identical_on_survivors() -> None:
    """Messages in flight when a node crashes are delivered before the
    transitional configuration, identically on every survivor, even when one
    survivor missed them (recovery re-sends them encapsulated)."""
    cluster = formed(4)
    cluster.run_for(seconds(1))
    # Node 4 will miss everything node 1 multicasts from now on.
    cluster.drop_filter = lambda src, dst, pkt: dst == 4 and src == 1 and pkt[3] == 2
    for i in range(20):
        cluster.submit(1, b"x%d" % i)
        cluster.submit(2, b"y%d" % i)
    cluster.run_for(ms(2))
    cluster.crash(1)
    cluster.drop_filter = None
    cluster.run_until(lambda: cluster.operational((2, 3, 4)), seconds(30))
    histories = {n: _history(cluster, n) for n in (2, 3, 4)}
    assert histories[2] == histories[3] == histories[4]
    events = histories[2]
    kinds = [e[1] if e[0] == "conf" else "msg" for e in events]
    trans_at = len(kinds) - 1 - kinds[::-1].index(CONF_TRANSITIONAL)
    assert kinds[trans_at + 1] == CONF_REGULAR
    assert all(k == "msg" for k in kinds[trans_at - 40:trans_at])
    assert cluster.cores[4].stats()["old_ring_messages_recovered"] > 0


def test_evs_new_messages_after_regular() -> None:
    cluster = formed(3)
    cluster.run_for(seconds(1))
    cluster.crash(3)
    cluster.run_until(lambda: cluster.cores[1].state == STATE_GATHER, seconds(10))
    cluster.submit(1, b"during-gather")
    cluster.run_until(lambda: cluster.operational((1, 2)), seconds(30))
    cluster.run_for(ms(100))
    for nodeid in (1, 2):
        events = cluster.logs[nodeid].events
        regular_at = max(i for i, e in enumerate(events) if e[0] == "conf" and e[1] == CONF_REGULAR)
        assert events[regular_at + 1:] == [("msg", 1, b"during-gather")]


def test_fail_to_receive_self_exclusion() -> None:
    config = TotemConfig(token=1000, fail_recv_const=50)
    cluster = formed(3, config=config)
    # Node 3 receives no multicasts at all, but still gets the token.
    cluster.drop_filter = lambda src, dst, pkt: dst == 3 and pkt[3] == 2
    for i in range(5):
        cluster.submit(1, b"m%d" % i)
    cluster.run_until(lambda: cluster.cores[3].stats()["fail_recv_self_exclusions"] > 0,
                      seconds(30))
    # It gathers alone (a singleton ring), as corosync does; the others then
    # pull it back in through the next gather once it answers JOINs again.
    cluster.run_until(lambda: any(c[3] == (3,) for c in cluster.regular_configs(3)), seconds(30))
    assert cluster.cores[1].stats()["fail_recv_self_exclusions"] == 0


def test_usage_errors() -> None:
    from corral.errors import UsageError

    core = TotemCore(1, TotemConfig().timers(1))
    with pytest.raises(UsageError):
        core.submit(bytes((1 << 20) + (1 << 16) + 1))
    core.start(0)
    with pytest.raises(UsageError):
        core.start(0)
    core.leave(1)
    with pytest.raises(UsageError):
        core.submit(b"x")
    with pytest.raises(UsageError):
        TotemCore(0, TotemConfig().timers(1))


def test_own_messages_past_an_unfillable_gap_are_delivered_in_transitional() -> None:
    """Frames only a crashed node held leave a gap nobody can fill; the
    survivors still deliver their own later messages, after the transitional
    configuration and before the regular one, identically."""
    cluster = formed(3)
    cluster.run_for(seconds(1))
    cluster.drop_filter = lambda src, dst, pkt: src == 1 and pkt[3] == 2  # node 1's frames vanish
    cluster.submit(1, b"lost")
    cluster.run_for(ms(1))
    for i in range(5):
        cluster.submit(2, b"two-%d" % i)
        cluster.submit(3, b"three-%d" % i)
    cluster.run_for(ms(2))
    cluster.crash(1)
    cluster.drop_filter = None
    cluster.run_until(lambda: cluster.operational((2, 3)), seconds(30))
    tails = []
    for nodeid in (2, 3):
        events = cluster.logs[nodeid].events
        trans_at = max(i for i, e in enumerate(events) if e[0] == "conf" and e[1] == CONF_TRANSITIONAL)
        assert events[trans_at + 1 + 10][1] == CONF_REGULAR
        tail = events[trans_at + 1:trans_at + 11]
        assert sorted(p for _, _, p in tail) == sorted(
            [b"two-%d" % i for i in range(5)] + [b"three-%d" % i for i in range(5)])
        tails.append(tail)
        assert (1, b"lost") not in cluster.logs[nodeid].delivered
    assert tails[0] == tails[1]


def test_stale_second_rotation_commit_token_is_dropped() -> None:
    """A commit token whose slot for this node was filled by someone else (an
    older round, or this node's previous incarnation) must not install a ring."""
    from corral.totem._core import (
        PACKET_COMMIT,
        PACKET_JOIN,
        STATE_COMMIT,
        STATE_RECOVERY,
        encode_packet,
    )

    core = TotemCore(2, TotemConfig(token=1000).timers(2))
    core.start(0)
    core.pop_outbox()
    core.receive(1, encode_packet({"type": PACKET_JOIN, "sender": 1, "ring_rep": 1, "ring_seq": 0,
                                   "flags": 0, "join_ring_seq": 96, "proc": (1, 2),
                                   "failed": ()}))
    empty = (0, 0, 0, 0, 0, 0, 0)
    rep_slot = (1, 96, 5, 0, 0, 0, 1)
    core.receive(2, encode_packet({"type": PACKET_COMMIT, "sender": 1, "ring_rep": 1,
                                   "ring_seq": 100, "hop": 1, "members": (1, 2),
                                   "slots": (rep_slot, empty)}))
    assert core.state == STATE_COMMIT
    forwarded = [p for d, p in core.pop_outbox() if p[3] == PACKET_COMMIT]
    my_slot = _core_decode(forwarded[-1])["slots"][1]
    stale = (2, 40, 9, 7, 7, 7, 1)
    before = core.stats()["dropped_wrong_state"]
    core.receive(3, encode_packet({"type": PACKET_COMMIT, "sender": 1, "ring_rep": 1,
                                   "ring_seq": 100, "hop": 3, "members": (1, 2),
                                   "slots": (rep_slot, stale)}))
    assert core.state == STATE_COMMIT
    assert core.stats()["dropped_wrong_state"] == before + 1
    core.receive(4, encode_packet({"type": PACKET_COMMIT, "sender": 1, "ring_rep": 1,
                                   "ring_seq": 100, "hop": 3, "members": (1, 2),
                                   "slots": (rep_slot, my_slot)}))
    assert core.state == STATE_RECOVERY


def _core_decode(packet: bytes) -> dict:
    from corral.totem._core import decode_packet

    return decode_packet(packet)
