"""CpgCore on a fake totally ordered bus (tests/cpg/bus.py): joins, leaves,
delivery, every confchg reason code, sync after partition and merge, local
queueing during sync, messages held back during sync, nested configuration
changes, and the agreement / virtual-synchrony / total-order checkers."""

from __future__ import annotations

import pytest

from corral.cpg import wire
from corral.cpg.core import (
    CONF_TRANSITIONAL,
    EV_CONFIG,
    EV_DELIVER,
    CpgCore,
    CpgError,
    ErrorCode,
    LocalState,
    SyncState,
)
from corral.cpg.events import ConfChg, Deliver, Member, Reason, TotemConfChg

from .bus import Bus, check_total_order, check_views_agree, check_virtual_synchrony

G = b"group-a"
H = b"group-b"


def cluster(n_nodes: int = 3) -> Bus:
    bus = Bus(list(range(1, n_nodes + 1)))
    bus.configure([list(range(1, n_nodes + 1))])
    bus.run()
    return bus


def check_all(bus: Bus) -> None:
    check_views_agree(bus)
    check_virtual_synchrony(bus)
    check_total_order(bus)


def test_join_is_announced_everywhere_with_reason_join() -> None:
    bus = cluster()
    bus.join(1, 10, 100, G)
    bus.run()
    bus.join(2, 20, 200, G)
    bus.run()
    for nodeid, client in ((1, 10), (2, 20)):
        last = bus.confchgs(nodeid, client, G)[-1]
        assert last.members == (Member(1, 100), Member(2, 200))
        assert last.joined == (Member(2, 200, Reason.JOIN),)
    first = bus.confchgs(1, 10, G)[0]
    assert first.members == (Member(1, 100),) and first.joined == (Member(1, 100, Reason.JOIN),)
    assert bus.cores[1].client_groups(10) == {G: LocalState.JOINED}
    assert bus.cores[3].membership(G) == (Member(1, 100), Member(2, 200))
    check_all(bus)


def test_totem_confchg_reaches_every_client() -> None:
    bus = cluster()
    bus.join(3, 30, 300, G)
    bus.run()
    bus.configure([[1, 2, 3]])
    bus.run()
    totem = [e for e in bus.events(3, 30) if isinstance(e, TotemConfChg)]
    assert totem == [TotemConfChg(bus.ring_id_of[3], (1, 2, 3))]


def test_mcast_reaches_members_only_including_sender_and_several_pids_per_node() -> None:
    bus = cluster()
    bus.join(1, 10, 100, G)
    bus.join(1, 11, 101, G)  # a second process on the same node, same group
    bus.join(2, 20, 200, G)
    bus.join(3, 30, 300, H)  # another group: must not see G's messages
    bus.run()
    assert bus.mcast(1, 10, G, b"m1")
    bus.run()
    assert bus.mcast(2, 20, G, b"m2")
    bus.run()
    for nodeid, client in ((1, 10), (1, 11), (2, 20)):
        assert bus.deliveries(nodeid, client) == [b"m1", b"m2"]
    assert bus.deliveries(3, 30) == []
    deliver = next(e for e in bus.events(2, 20) if isinstance(e, Deliver))
    assert (deliver.group, deliver.nodeid, deliver.pid) == (G, 1, 100)
    check_all(bus)


def test_leave_has_reason_leave_and_is_acknowledged_by_own_confchg() -> None:
    bus = cluster()
    bus.join(1, 10, 100, G)
    bus.join(2, 20, 200, G)
    bus.run()
    bus.leave(2, 20, G)
    assert bus.cores[2].client_groups(20) == {G: LocalState.LEAVING}
    bus.run()
    own = bus.confchgs(2, 20, G)[-1]
    assert own.left == (Member(2, 200, Reason.LEAVE),)
    assert own.members == (Member(1, 100),)
    assert bus.confchgs(1, 10, G)[-1] == own
    assert bus.cores[2].client_groups(20) == {}
    bus.mcast(1, 10, G, b"after")
    bus.run()
    assert b"after" not in bus.deliveries(2, 20)
    with pytest.raises(CpgError) as info:
        bus.mcast(2, 20, G, b"x")
    assert info.value.code == ErrorCode.NOT_EXIST
    check_all(bus)


def test_disconnect_without_leave_is_procdown() -> None:
    bus = cluster()
    bus.join(1, 10, 100, G)
    bus.join(3, 30, 300, G)
    bus.run()
    bus.disconnect(3, 30)
    bus.run()
    last = bus.confchgs(1, 10, G)[-1]
    assert last.left == (Member(3, 300, Reason.PROCDOWN),)
    assert last.members == (Member(1, 100),)
    # The pid may join again once its PROCDOWN went through.
    bus.join(3, 31, 300, G)
    bus.run()
    assert bus.cores[1].membership(G) == (Member(1, 100), Member(3, 300))
    check_all(bus)


def test_node_lost_is_nodedown_on_both_sides() -> None:
    bus = cluster()
    for nodeid in (1, 2, 3):
        bus.join(nodeid, nodeid * 10, nodeid * 100, G)
    bus.run()
    bus.configure([[1, 2], [3]])
    bus.run()
    survivors = bus.confchgs(1, 10, G)[-1]
    assert survivors.left == (Member(3, 300, Reason.NODEDOWN),)
    assert survivors.members == (Member(1, 100), Member(2, 200))
    alone = bus.confchgs(3, 30, G)[-1]
    assert alone.left == (Member(1, 100, Reason.NODEDOWN), Member(2, 200, Reason.NODEDOWN))
    assert alone.members == (Member(3, 300),)
    check_all(bus)


def test_merge_announces_nodeup_and_views_converge() -> None:
    bus = cluster()
    for nodeid in (1, 2, 3):
        bus.join(nodeid, nodeid * 10, nodeid * 100, G)
    bus.run()
    bus.configure([[1, 2], [3]])
    bus.run()
    # Each side changes on its own while apart.
    bus.join(1, 11, 101, H)
    bus.leave(3, 30, G)
    bus.run()
    bus.configure([[1, 2, 3]])
    bus.run()
    merged = bus.confchgs(1, 10, G)[-1]
    assert merged.joined == ()  # 3's process left while apart: nothing to announce
    assert bus.confchgs(1, 10, G)[-1].members == (Member(1, 100), Member(2, 200))
    three = bus.confchgs(3, 30, G)
    assert three[-1].left == (Member(3, 300, Reason.LEAVE),)
    bus.join(3, 32, 302, H)
    bus.run()
    assert bus.confchgs(1, 11, H)[-1].members == (Member(1, 101), Member(3, 302))
    check_all(bus)


def test_merge_nodeup_for_processes_of_the_other_side() -> None:
    bus = Bus([1, 2, 3])
    bus.configure([[1, 2], [3]])
    bus.run()
    bus.join(1, 10, 100, G)
    bus.join(3, 30, 300, G)
    bus.run()
    bus.configure([[1, 2, 3]])
    bus.run()
    on_one = bus.confchgs(1, 10, G)[-1]
    assert on_one.joined == (Member(3, 300, Reason.NODEUP),)
    on_three = bus.confchgs(3, 30, G)[-1]
    assert on_three.joined == (Member(1, 100, Reason.NODEUP),)
    assert on_one.members == on_three.members == (Member(1, 100), Member(3, 300))
    check_all(bus)


def test_unknown_entry_is_dropped_as_procdown_at_sync() -> None:
    # A forged JOIN claims a process on node 2 that node 2 never had; node 2's
    # joinlist does not vouch for it, so the next sync removes it as PROCDOWN.
    bus = cluster()
    bus.join(1, 10, 100, G)
    bus.run()
    bus.inject(2, wire.encode_join(G, 999))
    assert bus.cores[1].membership(G) == (Member(1, 100), Member(2, 999))
    bus.configure([[1, 2, 3]])
    bus.run()
    last = bus.confchgs(1, 10, G)[-1]
    assert last.left == (Member(2, 999, Reason.PROCDOWN),)
    check_all(bus)


def test_mcast_during_sync_is_queued_locally_and_sent_after() -> None:
    bus = cluster()
    bus.join(1, 10, 100, G)
    bus.join(2, 20, 200, G)
    bus.run()
    bus.configure([[1, 2, 3]])
    assert bus.cores[1].state == SyncState.SYNC
    assert bus.mcast(1, 10, G, b"during-sync")
    assert all(wire.decode(p).__class__ is wire.JoinlistMsg for p in bus.queues[1])
    bus.run()
    assert bus.deliveries(2, 20) == [b"during-sync"]
    assert bus.cores[1].state == SyncState.OPERATIONAL
    check_all(bus)


def test_messages_queued_in_totem_at_the_change_are_held_until_sync() -> None:
    # Node 3 is apart; node 1 has a JOIN and an mcast accepted by Totem but not
    # yet sent when the rings merge, so they arrive during the sync. Every node
    # must first see the merge (NODEUP), then the held-back JOIN and message.
    bus = Bus([1, 2, 3])
    bus.configure([[1, 2], [3]])
    bus.run()
    bus.join(1, 10, 100, G)
    bus.join(3, 30, 300, G)
    bus.run()
    bus.join(1, 11, 101, G)
    bus.mcast(1, 10, G, b"held")
    assert len(bus.queues[1]) == 2
    bus.configure([[1, 2, 3]])
    bus.run()
    expected_members = (Member(1, 100), Member(1, 101), Member(3, 300))
    for nodeid, client in ((1, 10), (3, 30)):
        changes = bus.confchgs(nodeid, client, G)
        assert changes[-1].joined == (Member(1, 101, Reason.JOIN),)
        assert changes[-1].members == expected_members
        assert changes[-2].joined[0].reason == Reason.NODEUP
        assert bus.deliveries(nodeid, client) == [b"held"]
    assert bus.confchgs(1, 11, G)[0].joined == (Member(1, 101, Reason.JOIN),)
    assert all(bus.cores[n].stats()["sync_mismatch"] == 0 for n in (1, 2, 3))
    check_all(bus)


def test_old_ring_messages_in_transitional_window_and_leave_in_flight() -> None:
    bus = cluster()
    for nodeid in (1, 2, 3):
        bus.join(nodeid, nodeid * 10, nodeid * 100, G)
    bus.run()
    bus.mcast(1, 10, G, b"tail")
    bus.leave(2, 20, G)
    bus.configure([[1, 2], [3]], old_tail=1)
    bus.run()
    # Delivered in the old ring's transitional window, after 3 was reported down.
    assert bus.deliveries(2, 20) == [b"tail"]
    assert b"tail" not in bus.deliveries(3, 30)
    assert bus.confchgs(1, 10, G)[-1].left == (Member(2, 200, Reason.LEAVE),)
    check_all(bus)


def test_nested_configuration_change_during_sync() -> None:
    bus = Bus([1, 2, 3, 4])
    bus.configure([[1, 2], [3, 4]])
    bus.run()
    for nodeid in (1, 2, 3, 4):
        bus.join(nodeid, nodeid * 10, nodeid * 100, G)
    bus.run()
    bus.mcast(1, 10, G, b"m-before")
    bus.configure([[1, 2, 3, 4]])
    bus.run_steps(2)  # some joinlists and the held message, not all
    assert bus.cores[1].state == SyncState.SYNC
    bus.configure([[1, 2, 3], [4]])
    bus.run()
    assert bus.cores[1].stats()["syncs_abandoned"] == 1
    for nodeid in (1, 2, 3):
        assert bus.cores[nodeid].membership(G) == (
            Member(1, 100), Member(2, 200), Member(3, 300)
        )
    assert bus.cores[4].membership(G) == (Member(4, 400),)
    assert bus.deliveries(2, 20).count(b"m-before") == 1
    check_all(bus)


def test_crash_and_restart_of_a_node() -> None:
    bus = cluster()
    for nodeid in (1, 2, 3):
        bus.join(nodeid, nodeid * 10, nodeid * 100, G)
    bus.run()
    bus.crash(3)
    bus.configure([[1, 2]])
    bus.run()
    assert bus.confchgs(1, 10, G)[-1].left == (Member(3, 300, Reason.NODEDOWN),)
    bus.restart(3)
    bus.join(3, 30, 333, G)  # queued: the new incarnation has no ring yet
    assert bus.queues[3] == deque_empty()
    bus.configure([[1, 2, 3]])
    bus.run()
    assert bus.confchgs(1, 10, G)[-1].joined == (Member(3, 333, Reason.JOIN),)
    assert bus.confchgs(3, 30, G)[0].members == (
        Member(1, 100), Member(2, 200), Member(3, 333)
    )
    check_all(bus)


def deque_empty() -> object:
    from collections import deque

    return deque()


def test_bad_local_calls_are_refused_and_change_nothing() -> None:
    core = CpgCore(1)
    with pytest.raises(CpgError) as info:
        core.join(1, 100, b"")
    assert info.value.code == ErrorCode.INVALID_PARAM
    with pytest.raises(CpgError):
        core.join(1, 100, b"x" * 129)
    core.join(1, 100, b"x" * 128)
    with pytest.raises(CpgError) as info:
        core.join(2, 100, b"x" * 128)
    assert info.value.code == ErrorCode.EXIST
    with pytest.raises(CpgError) as info:
        core.leave(1, b"other")
    assert info.value.code == ErrorCode.NOT_EXIST
    with pytest.raises(CpgError) as info:
        core.mcast(7, G, b"")
    assert info.value.code == ErrorCode.BAD_HANDLE
    with pytest.raises(CpgError) as info:
        core.mcast(1, b"x" * 128, b"\0" * (wire.MAX_PAYLOAD_BYTES + 1))
    assert info.value.code == ErrorCode.TOO_BIG
    with pytest.raises(CpgError):
        core.join(3, 1 << 32, G)
    assert core.client_groups(1) == {b"x" * 128: LocalState.JOINING}
    assert core.client_groups(2) == {}


def test_local_entries_are_bounded() -> None:
    core = CpgCore(1)
    for index in range(wire.MAX_ENTRIES_PER_NODE):
        core.join(index, index, b"g")
    with pytest.raises(CpgError) as info:
        core.join(99_999, 99_999, b"g")
    assert info.value.code == ErrorCode.NO_SPACE


def test_local_queue_during_sync_is_bounded_and_says_try_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from corral.cpg import core as core_module

    monkeypatch.setattr(core_module, "MAX_QUEUED_MESSAGES", 3)
    bus = cluster(2)
    bus.join(1, 10, 100, G)
    bus.run()
    bus.configure([[1, 2]])
    assert [bus.mcast(1, 10, G, b"%d" % i) for i in range(4)] == [True, True, True, False]
    assert not bus.cores[1].can_queue(1)
    bus.run()
    assert bus.deliveries(1, 10) == [b"0", b"1", b"2"]
    assert bus.cores[1].can_queue(1)


def test_malformed_deliveries_are_counted_and_dropped() -> None:
    bus = cluster()
    bus.join(1, 10, 100, G)
    bus.run()
    before = bus.cores[1].view_digest()
    good = wire.encode_join(G, 5)
    bad = [
        b"CG", b"CG\x01", b"CG\x02" + good[3:], good[:-1], good + b"\0", b"CG\x01\x09abc",
        wire.encode_leave(G, 5, Reason.NODEUP), b"CG\x01\x03\x00\x00\x00\x00\x00",
    ]
    foreign = [b"", b"\x01\x01\x01g\0\0\0\1", b"CQ\x01\x01"]
    for payload in bad + foreign:
        bus.inject(2, payload)
    assert bus.cores[1].stats()["malformed_dropped"] == len(bad)
    assert bus.cores[1].stats()["foreign_payloads"] == len(foreign)
    assert bus.cores[1].view_digest() == before
    # A joinlist for another ring or from a node outside the ring is ignored.
    bus.inject(2, wire.encode_joinlist((9, 9), [(G, 1)]))
    assert bus.cores[1].stats()["stale_joinlists"] == 1
    assert bus.cores[1].view_digest() == before


def test_unknown_totem_event_is_a_usage_error() -> None:
    core = CpgCore(1)
    with pytest.raises(Exception, match="unknown totem event"):
        core.totem_event((99,))


def test_confchg_is_identical_on_every_node() -> None:
    bus = cluster(4)
    for nodeid in (1, 2, 3, 4):
        bus.join(nodeid, nodeid, nodeid, G)
        bus.mcast(nodeid, nodeid, G, b"hello-%d" % nodeid)
    bus.run()
    sequences = [
        [e for e in bus.events(n, n) if isinstance(e, ConfChg | Deliver)] for n in (1, 2, 3, 4)
    ]
    # Every client sees the same suffix from its own join on.
    for nodeid, seq in zip((1, 2, 3, 4), sequences, strict=True):
        assert seq == sequences[0][len(sequences[0]) - len(seq):], nodeid
    check_all(bus)


def test_totem_events_batch_equals_one_by_one() -> None:
    """CpgCore.totem_events (the service's batch path) produces exactly what
    feeding the same events to totem_event one by one does, odd ones included."""
    regular = 0 if CONF_TRANSITIONAL != 0 else 1
    cores = (CpgCore(1), CpgCore(1))
    traffic: list[tuple[object, ...]] = [
        (EV_CONFIG, CONF_TRANSITIONAL, (1, 4), (1,), (), ()),
        (EV_CONFIG, regular, (1, 4), (1,), (1,), ()),
        (EV_DELIVER, 1, wire.encode_joinlist((1, 4), [])),
        (EV_DELIVER, 1, wire.encode_join(G, 70)),
        (EV_DELIVER, 1, wire.encode_join(G, 80)),
        (EV_DELIVER, 1, b"\x00garbage"),
        (EV_DELIVER, 1, bytearray(wire.encode_mcast(G, 70, b"as a bytearray"))),
        *((EV_DELIVER, 1, wire.encode_mcast(G, 70 + 10 * (i % 2), b"m%d" % i))
          for i in range(6)),
    ]
    for core in cores:
        core.add_client(7, 70)
        core.add_client(8, 80)
    for event in traffic[:3]:  # the ring and the sync: then both clients join
        for core in cores:
            core.totem_event(event)
    for core in cores:
        core.join(7, 70, G)
        core.join(8, 80, G)
    for event in traffic[3:]:
        cores[0].totem_event(event)
    cores[1].totem_events(traffic[3:])
    one_by_one, batched = cores[0].pop_events(), cores[1].pop_events()
    assert one_by_one == batched
    assert cores[0].stats() == cores[1].stats()
    payloads = [(c, e.payload) for c, e in batched if isinstance(e, Deliver)]
    assert (7, b"as a bytearray") in payloads and (8, b"m5") in payloads
    assert len(payloads) == 2 * 7


def test_mcast_fast_path_encodes_like_the_wire_module() -> None:
    """mcast() on an operational node encodes in place; the bytes must be exactly
    wire.encode_mcast's, also for bytearray arguments."""
    regular = 0 if CONF_TRANSITIONAL != 0 else 1
    core = CpgCore(1)
    core.add_client(7, 70)
    core.totem_event((EV_CONFIG, CONF_TRANSITIONAL, (1, 4), (1,), (), ()))
    core.totem_event((EV_CONFIG, regular, (1, 4), (1,), (1,), ()))
    core.totem_event((EV_DELIVER, 1, wire.encode_joinlist((1, 4), [])))
    core.join(7, 70, G)
    assert core.state == SyncState.OPERATIONAL
    core.pop_outbox()
    assert core.mcast(7, G, b"payload")
    assert core.mcast(7, bytearray(G), bytearray(b"more"))  # type: ignore[arg-type]
    assert core.pop_outbox() == [wire.encode_mcast(G, 70, b"payload"),
                                 wire.encode_mcast(G, 70, b"more")]
