"""The checkers must fail on bad histories and pass on good ones.

Each test feeds `EvsChecker` a fabricated history (starts, submissions,
deliveries, configuration events) with exactly one planted defect: reordered,
duplicated, invented, mis-attributed or lost messages, mismatched membership,
a transitional configuration that is not a subset, a message delivered in two
rings, a missing self-delivery, live nodes ending in different rings. The
valid histories (including a transitional configuration after which a node
skips messages from a node that left) must pass, so the checkers are not
simply always failing.
"""

from __future__ import annotations

from typing import Any

import pytest

from corral.sim.checkers import (
    CONF_REGULAR,
    CONF_TRANSITIONAL,
    EvsChecker,
    Violation,
    make_payload,
)

A, B, C = (1, 1), (2, 1), (3, 1)
RING1 = (1, 4)
RING2 = (1, 8)


def payload(node: int, counter: int) -> bytes:
    return make_payload(node, counter, counter % 7)


def cluster(*procs: tuple[int, int], members: tuple[int, ...] = (1, 2, 3)) -> EvsChecker:
    checker = EvsChecker()
    for proc in procs:
        checker.on_start(proc)
        checker.on_config(proc, CONF_REGULAR, RING1, members, members, ())
    return checker


def submit_all(checker: EvsChecker, *messages: tuple[int, int]) -> None:
    for node, counter in messages:
        checker.on_submit((node, 1), payload(node, counter))


def deliver(checker: EvsChecker, proc: tuple[int, int], *messages: tuple[int, int]) -> None:
    for node, counter in messages:
        checker.on_deliver(proc, node, payload(node, counter))


def expect(checker_name: str) -> Any:
    return pytest.raises(Violation, match=rf"^\[{checker_name}\]")


def test_valid_history_passes() -> None:
    checker = cluster(A, B, C)
    submit_all(checker, (1, 1), (2, 1), (1, 2), (3, 1))
    for proc in (A, B, C):
        deliver(checker, proc, (1, 1), (2, 1), (1, 2), (3, 1))
    checker.check_final([A, B, C])
    assert checker.deliveries == 12


def test_valid_partition_with_transitional_skip_passes() -> None:
    # C is cut off; A and B deliver C's last message only if contiguous. A and B
    # move on together and agree; C forms its own ring and delivers its message.
    checker = cluster(A, B, C)
    submit_all(checker, (1, 1), (3, 1), (3, 2))
    deliver(checker, A, (1, 1), (3, 1))
    deliver(checker, B, (1, 1), (3, 1))
    deliver(checker, C, (1, 1), (3, 1))
    for proc in (A, B):
        checker.on_config(proc, CONF_TRANSITIONAL, RING2, (1, 2), (), (3,))
        checker.on_config(proc, CONF_REGULAR, RING2, (1, 2), (), (3,))
    checker.on_config(C, CONF_TRANSITIONAL, (3, 8), (3,), (), (1, 2))
    deliver(checker, C, (3, 2))
    checker.on_config(C, CONF_REGULAR, (3, 8), (3,), (), (1, 2))
    checker.check_final([A, B])


def test_reordered_messages_are_caught() -> None:
    checker = cluster(A, B)
    submit_all(checker, (1, 1), (2, 1))
    deliver(checker, A, (1, 1), (2, 1))
    with expect("total-order"):
        deliver(checker, B, (2, 1), (1, 1))


def test_reorder_caught_when_first_node_delivers_last() -> None:
    # B delivers m2 first; A then delivers m1, m2 in the other order: the breach
    # shows up at A's second delivery, whichever side completes the pair.
    checker = cluster(A, B, C)
    submit_all(checker, (1, 1), (2, 1), (3, 1))
    deliver(checker, B, (2, 1), (3, 1), (1, 1))
    deliver(checker, A, (1, 1))
    with expect("total-order"):
        deliver(checker, A, (3, 1))


def test_duplicate_delivery_is_caught() -> None:
    checker = cluster(A, B)
    submit_all(checker, (1, 1))
    deliver(checker, A, (1, 1))
    with expect("integrity"):
        deliver(checker, A, (1, 1))


def test_invented_message_is_caught() -> None:
    checker = cluster(A, B)
    with expect("integrity"):
        deliver(checker, A, (2, 5))


def test_wrong_sender_is_caught() -> None:
    checker = cluster(A, B)
    submit_all(checker, (2, 1))
    with expect("integrity"):
        checker.on_deliver(A, 1, payload(2, 1))


def test_altered_payload_is_caught() -> None:
    checker = cluster(A, B)
    submit_all(checker, (2, 1))
    with expect("integrity"):
        checker.on_deliver(A, 2, payload(2, 1) + b"x")


def test_fifo_breach_is_caught() -> None:
    checker = cluster(A, B)
    submit_all(checker, (2, 1), (2, 2))
    with expect("integrity"):
        deliver(checker, A, (2, 2), (2, 1))


def test_delivery_before_any_configuration_is_caught() -> None:
    checker = EvsChecker()
    checker.on_start(A)
    submit_all(checker, (1, 1))
    with expect("integrity"):
        deliver(checker, A, (1, 1))


def test_lost_message_between_same_configurations_is_caught() -> None:
    # A and B install the same two configurations but B lost A's message.
    checker = cluster(A, B)
    submit_all(checker, (1, 1), (1, 2))
    deliver(checker, A, (1, 1), (1, 2))
    deliver(checker, B, (1, 1))
    checker.on_config(A, CONF_TRANSITIONAL, RING2, (1, 2), (), (3,))
    with expect("virtual-synchrony"):
        checker.on_config(B, CONF_TRANSITIONAL, RING2, (1, 2), (), (3,))


def test_lost_message_in_final_ring_is_caught() -> None:
    checker = cluster(A, B)
    submit_all(checker, (1, 1))
    deliver(checker, A, (1, 1))
    with expect("virtual-synchrony"):
        checker.check_final([A, B])


def test_missing_self_delivery_is_caught() -> None:
    checker = cluster(A, B)
    submit_all(checker, (1, 1))
    with expect("self-delivery"):
        checker.check_final([A, B])


def test_crashed_sender_is_exempt_from_self_delivery() -> None:
    checker = cluster(A, B)
    submit_all(checker, (1, 1))
    checker.on_crash(A)
    checker.check_final([B])


def test_mismatched_membership_is_caught() -> None:
    checker = cluster(A, B)
    checker.on_config(A, CONF_REGULAR, RING2, (1, 2), (), (3,))
    with expect("config-consistency"):
        checker.on_config(B, CONF_REGULAR, RING2, (1, 2, 3), (), ())


def test_transitional_not_subset_of_old_ring_is_caught() -> None:
    checker = cluster(A, B, members=(1, 2))
    with expect("config-consistency"):
        checker.on_config(A, CONF_TRANSITIONAL, RING2, (1, 3), (), ())


def test_transitional_not_subset_of_new_ring_is_caught() -> None:
    checker = cluster(A, B)
    checker.on_config(A, CONF_TRANSITIONAL, RING2, (1, 2), (), (3,))
    with expect("config-consistency"):
        checker.on_config(A, CONF_REGULAR, RING2, (1, 3), (3,), (2,))


def test_configuration_without_self_is_caught() -> None:
    checker = cluster(A, B)
    with expect("config-consistency"):
        checker.on_config(A, CONF_REGULAR, RING2, (2, 3), (), (1,))


def test_ring_seq_must_increase() -> None:
    checker = cluster(A, B)
    with expect("config-consistency"):
        checker.on_config(A, CONF_REGULAR, (2, 4), (1, 2, 3), (), ())


def test_message_in_two_rings_is_caught() -> None:
    checker = cluster(A, B)
    submit_all(checker, (1, 1))
    deliver(checker, A, (1, 1))
    checker.on_config(B, CONF_REGULAR, RING2, (1, 2, 3), (), ())
    with expect("same-config"):
        deliver(checker, B, (1, 1))


def test_live_nodes_in_different_rings_are_caught() -> None:
    checker = cluster(A, B)
    checker.on_config(A, CONF_REGULAR, RING2, (1,), (), (2, 3))
    with expect("membership-agreement"):
        checker.check_final([A, B])


def test_node_that_failed_and_came_back_in_one_change_passes() -> None:
    # C crashed and restarted as C2 before A and B noticed: it is in `left`
    # (of the old ring) and in `joined` and `members` (of the new one).
    checker = cluster(A, B, C)
    checker.on_crash(C)
    c2 = (3, 2)
    checker.on_start(c2)
    checker.on_config(c2, CONF_REGULAR, (3, 4), (3,), (), ())
    for proc in (A, B, c2):
        checker.on_config(proc, CONF_TRANSITIONAL, RING2, (3,) if proc == c2 else (1, 2), (), ())
        joined = (1, 2) if proc == c2 else (3,)
        checker.on_config(proc, CONF_REGULAR, RING2, (1, 2, 3), joined, () if proc == c2 else (3,))
    checker.check_final([A, B, c2])


def test_member_in_left_without_rejoining_is_caught() -> None:
    checker = cluster(A, B, C)
    with expect("config-consistency"):
        checker.on_config(A, CONF_REGULAR, RING2, (1, 2, 3), (), (3,))


def test_ring_id_reused_after_disk_loss_is_not_a_mismatch() -> None:
    # B forms ring (2, 8) with A; later B restarts with its ring seq lost and
    # forms (2, 8) again, alone. Only the disk-loss epoch tells them apart.
    checker = EvsChecker()
    for proc in (A, B):
        checker.on_start(proc)
        checker.on_config(proc, CONF_REGULAR, (2, 8), (1, 2), (1, 2), ())
    checker.on_crash(B)
    b2 = (2, 2)
    checker.on_start(b2, disk_lost=True)
    checker.on_config(b2, CONF_REGULAR, (2, 8), (2,), (), ())
    b3 = (2, 3)
    checker.on_start(b3)
    with expect("config-consistency"):
        checker.on_config(b3, CONF_REGULAR, (2, 8), (2, 3), (3,), ())


def test_different_transitional_members_for_one_transition_are_caught() -> None:
    checker = cluster(A, B, C)
    checker.on_config(A, CONF_TRANSITIONAL, RING2, (1, 2), (), (3,))
    with expect("config-consistency"):
        checker.on_config(B, CONF_TRANSITIONAL, RING2, (2,), (), (1, 3))
