"""The votequorum rules feature by feature, with exact numbers.

Scenarios run on `QuorumSim` (every node a real `QuorumCore`, messages delivered in
total order within each partition, settled after every step) and read each node's
status: expected votes, highest expected, total votes, quorum, quorate, flags.
A few checks drive one `QuorumCore` directly where the order of inputs matters
(sync gating, persist-then-act). Covered: the formula, never-decrease, sync
gating, wait_for_all and its re-arm, two_node, last_man_standing, auto_tie_breaker
(lowest, highest, lists, stale views), allow_downscale, expected_votes_tracking,
`expected N`, configuration mismatch and runtime reconfiguration.
"""

from __future__ import annotations

import pytest

from corral.quorum.config import QuorumConfig
from corral.quorum.core import (
    ExpectedVotesRefused,
    MembersChanged,
    PersistExpected,
    QuorateChanged,
    QuorumCore,
    Send,
)
from corral.quorum.vqsim import QuorumSim
from corral.quorum.wire import ConfigFlag, NodeFlag, NodeInfo


def make(options: dict[str, str], count: int = 3, **kwargs: object) -> QuorumSim:
    votes = {n: 1 for n in range(1, count + 1)}
    return QuorumSim(options, votes, auto_settle=True, **kwargs)  # type: ignore[arg-type]


def numbers(sim: QuorumSim, nodeid: int) -> tuple[int, int, int, int, bool]:
    """(expected, highest expected, total, quorum, quorate) as quorumtool shows them."""
    s = sim.status(nodeid)
    return (s.expected_votes, s.highest_expected, s.total_votes, s.quorum, s.quorate)


# ---------------------------------------------------------------- the formula

def test_three_nodes_lose_one_then_two() -> None:
    sim = make({})
    assert numbers(sim, 1) == (3, 3, 3, 2, True)
    sim.crash(3)
    assert numbers(sim, 1) == (3, 3, 2, 2, True)
    sim.crash(2)
    assert numbers(sim, 1) == (3, 3, 1, 2, False)
    assert sim.status(1).flags == ()


def test_formula_uses_total_when_above_expected() -> None:
    sim = QuorumSim({"expected_votes": "2"}, {1: 1, 2: 1, 3: 1, 4: 2}, auto_settle=True)
    # T = 5 > E = 2: expected is raised to 5, quorum = max(7 // 2, 7 // 2) = 3.
    assert numbers(sim, 1) == (5, 5, 5, 3, True)


def test_quorum_never_decreases_when_a_high_expected_node_leaves() -> None:
    sim = make({"expected_votes_tracking": "1"}, count=4)
    # Node 4 comes back with ev_tracking = 7 on its disk and announces it.
    sim.crash(4)
    sim.nodes[4].disk_expected = 7
    sim.restart(4)
    assert numbers(sim, 1) == (4, 7, 4, 4, True)
    sim.crash(4)
    # H drops back to 4 (candidate quorum 3), but quorum stays 4: no decrease allowed.
    assert numbers(sim, 1) == (4, 4, 3, 4, False)


def test_quorate_needs_a_synced_view() -> None:
    config = QuorumConfig.from_options({}, {1: 1, 2: 1, 3: 1})
    core = QuorumCore(config, 1)
    effects = core.membership_changed((1, 4), [1, 2, 3])
    assert isinstance(effects[0], MembersChanged)
    assert not core.quorate and core.status().syncing  # votes suffice, peers not heard yet
    flags = ConfigFlag(0)
    for peer in (2, 3):
        info = NodeInfo(peer, (1, 4), 1, 3, NodeFlag(0), flags, 3, 10_000)
        effects = core.message_received(peer, info.encode())
    assert core.quorate and not core.status().syncing
    assert QuorateChanged(True, (1, 4)) in effects
    # Losing quorum does not wait for a sync.
    core.membership_changed((1, 8), [1])
    assert not core.quorate


# ---------------------------------------------------------------- wait_for_all

def test_wait_for_all_blocks_until_all_seen_and_rearms() -> None:
    sim = make({"wait_for_all": "1"}, down=[3])
    assert numbers(sim, 1) == (3, 3, 2, 2, False)  # enough votes, still waiting
    assert sim.status(1).waiting_for_all and "WaitForAll" in sim.status(1).flags
    sim.restart(3)
    assert sim.quorate_nodes() == [1, 2, 3]
    sim.crash(3)
    assert sim.quorate_nodes() == [1, 2]  # once seen, losing a node is fine
    sim.crash(2)
    assert sim.quorate_nodes() == [] and sim.status(1).waiting_for_all  # re-armed
    sim.restart(2)
    assert numbers(sim, 1) == (3, 3, 2, 2, False)  # waits for all again
    sim.restart(3)
    assert sim.quorate_nodes() == [1, 2, 3]


def test_wait_for_all_node_joining_a_quorate_partition_stops_waiting() -> None:
    sim = make({"wait_for_all": "1"}, count=5)
    sim.crash(5)
    sim.crash(1)
    assert sim.quorate_nodes() == [2, 3, 4]
    sim.restart(1)
    # Fresh node 1 waits and T = 4 < 5, but a member of its ring is quorate and not
    # waiting: node 1 stops waiting.
    assert sim.quorate_nodes() == [1, 2, 3, 4]
    assert not sim.status(1).waiting_for_all
    sim.split([[1], [2, 3, 4]])
    assert sim.status(1).waiting_for_all  # re-armed on losing quorum
    sim.split([[1, 5], [2, 3, 4]])
    sim.restart(5)  # neither 1 nor 5 is quorate: both keep waiting
    assert sim.quorate_nodes() == [2, 3, 4]
    assert sim.status(5).waiting_for_all and sim.status(1).waiting_for_all
    sim.join()
    assert sim.quorate_nodes() == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- two_node

def test_two_node_fence_race_semantic() -> None:
    sim = make({"two_node": "1"}, count=2, down=[2])
    s = sim.status(1)
    assert s.flags == ("2Node", "WaitForAll") and not s.quorate  # waits for both at start
    sim.restart(2)
    assert numbers(sim, 1) == (2, 2, 2, 1, True)
    assert sim.status(1).flags == ("2Node", "Quorate", "WaitForAll")
    sim.split([[1], [2]])
    # Both halves keep quorum 1: the fence race, outside quorum, decides.
    assert numbers(sim, 1) == (2, 2, 1, 1, True)
    assert numbers(sim, 2) == (2, 2, 1, 1, True)
    assert len(sim.quorate_partitions()) == 2
    sim.crash(2)  # node 2 lost the race and was fenced
    sim.restart(2)  # rebooted, still cut off: wait_for_all keeps it out
    assert sim.quorate_nodes() == [1]
    sim.join()
    assert sim.quorate_nodes() == [1, 2]


def test_two_node_cleared_once_more_than_two_members() -> None:
    config = QuorumConfig.from_options({"two_node": "1"}, {1: 1, 2: 1})
    core = QuorumCore(config, 1)
    core.membership_changed((1, 4), [1, 2])
    assert "2Node" in core.flags()
    core.membership_changed((1, 8), [1, 2, 3])  # a node outside the nodelist joined
    assert "2Node" not in core.flags()
    core.membership_changed((1, 12), [1, 2])
    assert "2Node" not in core.flags() and core.quorum == 2


def test_two_node_without_wait_for_all_starts_alone() -> None:
    sim = make({"two_node": "1", "wait_for_all": "0"}, count=2, down=[2])
    assert numbers(sim, 1) == (2, 2, 1, 1, True)


# ---------------------------------------------------------------- last_man_standing

LMS = {"last_man_standing": "1", "last_man_standing_window": "10000"}


def test_lms_steps_five_nodes_down_to_two_and_stops() -> None:
    sim = make(LMS, count=5)
    sim.crash(5)
    sim.crash(4)
    assert numbers(sim, 1) == (5, 5, 3, 3, True)
    sim.wait_ms(9_999)
    assert numbers(sim, 1) == (5, 5, 3, 3, True)  # window not over yet
    sim.wait_ms(1)
    assert numbers(sim, 1) == (3, 3, 3, 2, True)
    sim.crash(3)
    sim.wait_ms(10_000)
    assert numbers(sim, 1) == (2, 2, 2, 2, True)
    sim.crash(2)
    assert numbers(sim, 1) == (2, 2, 1, 2, False)  # without ATB, 2 is the floor
    sim.wait_ms(60_000)
    assert numbers(sim, 1) == (2, 2, 1, 2, False)


def test_lms_window_restarts_on_each_leave() -> None:
    sim = make(LMS, count=5)
    sim.crash(5)
    sim.wait_ms(6_000)
    sim.crash(4)  # restarts the 10 s window
    sim.wait_ms(6_000)
    assert numbers(sim, 1) == (5, 5, 3, 3, True)
    sim.wait_ms(4_000)
    assert numbers(sim, 1) == (3, 3, 3, 2, True)


def test_lms_with_atb_goes_down_to_one() -> None:
    sim = make({**LMS, "auto_tie_breaker": "1", "wait_for_all": "1"}, count=5)
    for nodeid in (5, 4, 3):
        sim.crash(nodeid)
        sim.wait_ms(10_000)
    assert numbers(sim, 1) == (2, 2, 2, 2, True)
    sim.split([[1], [2]])
    # Exact half of 2: the partition with the lowest previous member (1) stays quorate.
    assert numbers(sim, 1) == (2, 2, 1, 2, True)
    assert numbers(sim, 2) == (2, 2, 1, 2, False)
    assert "AutoTieBreaker" in sim.status(1).flags


def test_lms_without_wfa_allows_two_quorate_sides_after_regrouping() -> None:
    """LMS assumes the nodes gone are dead; a partition breaks that assumption."""
    sim = make(LMS, count=5, check_one_quorate=False)
    sim.split([[1, 2, 3], [4, 5]])
    sim.wait_ms(10_000)
    sim.split([[1, 2], [3], [4, 5]])
    sim.wait_ms(10_000)
    sim.split([[1, 2], [3, 4, 5]])  # 3 never lowered with {1, 2}; 4 and 5 never did
    assert len(sim.quorate_partitions()) == 2
    safe = make({**LMS, "wait_for_all": "1"}, count=5)
    safe.split([[1, 2, 3], [4, 5]])
    safe.wait_ms(10_000)
    safe.split([[1, 2], [3], [4, 5]])
    safe.wait_ms(10_000)
    safe.split([[1, 2], [3, 4, 5]])  # wait_for_all re-armed on 3, 4, 5: they wait
    assert safe.quorate_nodes() == [1, 2]


def test_lms_with_wfa_and_atb_still_trusts_that_the_gone_are_gone() -> None:
    """Found by the swarm (seed 1373): why the strict check excludes LMS entirely."""
    options = {**LMS, "wait_for_all": "1", "auto_tie_breaker": "1",
               "auto_tie_breaker_node": "highest"}
    sim = make(options, count=3, check_one_quorate=False)
    sim.split([[2, 3], [1]])
    sim.split([[1, 3], [2]])  # 1 stops waiting: 3 is quorate; only 3 saw a node leave
    sim.wait_ms(10_001)
    assert numbers(sim, 3) == (2, 2, 2, 2, True) and numbers(sim, 1)[0] == 3
    sim.split([[1, 2], [3]])
    # 3 holds the tie at expected 2; 1 still counts 2 of 3 votes as a majority.
    assert sim.quorate_partitions() == [frozenset({1, 2}), frozenset({3})]


# ---------------------------------------------------------------- auto_tie_breaker

@pytest.mark.parametrize(
    ("mode", "winner"),
    [("lowest", [1, 2]), ("highest", [3, 4]), ("3 1", [3, 4]), ("2 4", [1, 2])],
)
def test_atb_even_split(mode: str, winner: list[int]) -> None:
    sim = make({"auto_tie_breaker": "1", "auto_tie_breaker_node": mode}, count=4)
    sim.split([[1, 2], [3, 4]])
    assert sim.quorate_nodes() == winner
    assert numbers(sim, winner[0]) == (4, 4, 2, 3, True)


def test_atb_list_skips_nodes_absent_before_the_split() -> None:
    options = {"auto_tie_breaker": "1", "auto_tie_breaker_node": "3 4 1"}
    sim = make(options, count=4)
    sim.crash(3)  # {1, 2, 4} quorate: 3 is not a previous member any more
    sim.split([[1, 2], [4]])
    # 3 is in neither half and was not there before: skip it; 4 was, and is not here.
    assert sim.quorate_nodes() == []
    sim2 = make({"auto_tie_breaker": "1", "auto_tie_breaker_node": "3 1"}, count=4)
    sim2.crash(3)
    sim2.split([[1, 2], [4]])
    assert sim2.quorate_nodes() == [1, 2]


def test_atb_only_when_the_other_side_cannot_win() -> None:
    sim = make({"auto_tie_breaker": "1", "wait_for_all": "1"}, count=5)
    sim.split([[1, 2], [3, 4, 5]])
    # 2 == 5 // 2, but 3 votes can be (and are) quorate on the other side.
    assert sim.quorate_nodes() == [3, 4, 5]


def test_atb_not_used_by_a_node_without_quorate_history() -> None:
    sim = make({"auto_tie_breaker": "1"}, count=4)
    sim.crash(1)  # {2, 3, 4} quorate; lowest previous member is now 2
    sim.split([[2, 3], [1, 4]])
    assert sim.quorate_nodes() == [2, 3]
    sim.restart(1)  # fresh node 1 with 4: neither may claim the tie
    assert sim.quorate_nodes() == [2, 3]


@pytest.mark.parametrize(
    ("mode", "cut_off", "halves"),
    [("highest", 4, [[1, 3], [2, 4]]), ("lowest", 1, [[1, 3], [2, 4]])],
)
def test_atb_stale_view_of_a_cut_off_node_breaks_no_tie(
    mode: str, cut_off: int, halves: list[list[int]]
) -> None:
    """Found by the swarm (seed 5387): node 4 (or 1) lost quorum alone while the
    others went on as {1, 2, 3} (or {2, 3, 4}); if it kept {1, 2, 3, 4} as its
    previous partition it would claim the tie in its half while the other half
    claims it by the newer partition."""
    sim = make({"auto_tie_breaker": "1", "auto_tie_breaker_node": mode}, count=4)
    rest = [n for n in (1, 2, 3, 4) if n != cut_off]
    sim.split([rest, [cut_off]])
    sim.split(halves)
    assert len(sim.quorate_partitions()) == 1
    winner = max(rest) if mode == "highest" else min(rest)
    assert winner in sim.quorate_nodes()


# ---------------------------------------------------------------- allow_downscale

def test_downscale_on_clean_leave_not_below_configured() -> None:
    options = {"allow_downscale": "1", "expected_votes": "3"}
    sim = make(options, count=5)
    assert numbers(sim, 1) == (5, 5, 5, 3, True)
    assert "AllowDownscale" in sim.status(1).flags
    sim.leave(5)
    assert numbers(sim, 1) == (4, 4, 4, 3, True)
    sim.leave(4)
    assert numbers(sim, 1) == (3, 3, 3, 2, True)
    sim.leave(3)
    assert numbers(sim, 1) == (3, 3, 2, 2, True)  # configured 3 is the floor
    sim.crash(2)
    assert numbers(sim, 1) == (3, 3, 1, 2, False)


def test_downscale_when_a_node_outside_the_nodelist_leaves_cleanly() -> None:
    config = QuorumConfig.from_options({"allow_downscale": "1", "expected_votes": "2"},
                                       {1: 1, 2: 1})
    core = QuorumCore(config, 1)
    core.membership_changed((1, 4), [1, 2, 9])
    core.membership_changed((1, 8), [1, 2], left_clean=[9])
    assert core.status().expected_votes == 2


def test_downscale_ignores_failed_nodes() -> None:
    sim = make({"allow_downscale": "1", "expected_votes": "3"}, count=5)
    sim.crash(5)
    sim.crash(4)
    assert numbers(sim, 1) == (5, 5, 3, 3, True)


# ---------------------------------------------------------------- expected_votes_tracking

def test_ev_tracking_floor_after_restart() -> None:
    options = {"expected_votes_tracking": "1", "expected_votes": "1"}
    sim = make(options)
    assert numbers(sim, 1) == (3, 3, 3, 2, True)
    assert sim.nodes[1].disk_expected == 3
    for nodeid in (1, 2, 3):
        sim.crash(nodeid)
    sim.restart(1)
    assert numbers(sim, 1) == (3, 3, 1, 2, False)  # the floor from ev_tracking
    untracked = make({"expected_votes": "1"})
    for nodeid in (1, 2, 3):
        untracked.crash(nodeid)
    untracked.restart(1)
    assert numbers(untracked, 1) == (1, 1, 1, 1, True)


def test_ev_tracking_persist_then_act() -> None:
    config = QuorumConfig.from_options({"expected_votes_tracking": "1", "expected_votes": "1"},
                                       {1: 1, 2: 1})
    core = QuorumCore(config, 1)
    effects = core.membership_changed((1, 4), [1, 2])
    assert PersistExpected(2) in effects
    info = NodeInfo(2, (1, 4), 1, 2, NodeFlag(0), ConfigFlag.EXPECTED_VOTES_TRACKING, 1, 10_000)
    core.message_received(2, info.encode())
    assert not core.quorate  # synced and enough votes, but 2 is not on disk yet
    effects = core.persisted(2)
    assert core.quorate and QuorateChanged(True, (1, 4)) in effects
    assert core.status().tracked_expected == 2


# ---------------------------------------------------------------- expected N

def test_expected_accepted_restores_quorum_on_a_lone_node() -> None:
    sim = make({}, count=3)
    sim.crash(3)
    sim.crash(2)
    assert not sim.status(1).quorate
    sim.set_expected(1, on_node=1)
    assert numbers(sim, 1) == (1, 1, 1, 1, True)


def test_expected_applies_on_every_member() -> None:
    sim = make({}, count=5)
    sim.split([[1, 2, 3], [4, 5]])
    sim.set_expected(4, on_node=2)
    for nodeid in (1, 2, 3):
        assert numbers(sim, nodeid) == (4, 4, 3, 3, True)
    assert numbers(sim, 4) == (5, 5, 2, 3, False)  # the other partition never saw it


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "outside"),
        (-3, "outside"),
        (True, "must be an integer"),
        ("2", "must be an integer"),
        (2, "below the 3 votes present"),
        (6, "would lose quorum"),
        (10**9, "outside"),
    ],
)
def test_expected_refused(value: object, message: str) -> None:
    sim = make({})
    with pytest.raises(ExpectedVotesRefused, match=message):
        sim.nodes[1].core.set_expected(value)  # type: ignore[arg-type]


def test_expected_refused_before_a_ring() -> None:
    core = QuorumCore(QuorumConfig.from_options({}, {1: 1}), 1)
    with pytest.raises(ExpectedVotesRefused, match="not a member"):
        core.set_expected(1)


def test_expected_upper_bound_is_twice_total_minus_one() -> None:
    sim = make({})
    effects = sim.nodes[1].core.set_expected(5)  # quorum 3 <= 3 votes: accepted
    assert len(effects) == 1 and isinstance(effects[0], Send)


# ---------------------------------------------------------------- config view

def test_config_mismatch_is_reported() -> None:
    sim = make({})
    other = QuorumConfig.from_options({"wait_for_all": "1"}, {1: 1, 2: 1, 3: 1})
    core = sim.nodes[1].core
    info = NodeInfo(2, core.ring_id or (0, 0), 1, 3, NodeFlag.QUORATE, ConfigFlag.WAIT_FOR_ALL,
                    other.expected_votes, 10_000)
    core.message_received(2, info.encode())
    assert core.status().config_mismatch == (2,)


# ---------------------------------------------------------------- runtime reconfiguration

def reload(sim: QuorumSim, options: dict[str, str], votes: dict[int, int],
           nodes: list[int]) -> None:
    """Every node in `nodes` reloads the configuration, one after the other."""
    config = QuorumConfig.from_options(options, votes)
    sim.config = config
    for nodeid in nodes:
        sim._effects(nodeid, sim.nodes[nodeid].core.reconfigure(config))
        sim.settle()


def test_reload_after_removing_a_dead_node_lowers_quorum() -> None:
    sim = make({}, count=4)
    sim.crash(4)
    assert numbers(sim, 1) == (4, 4, 3, 3, True)
    reload(sim, {}, {1: 1, 2: 1, 3: 1}, [1])
    assert numbers(sim, 1) == (3, 4, 3, 3, True)  # the others still expect 4
    reload(sim, {}, {1: 1, 2: 1, 3: 1}, [2, 3])
    for nodeid in (1, 2, 3):
        assert numbers(sim, nodeid) == (3, 3, 3, 2, True)


def test_reload_after_adding_a_node_raises_expected() -> None:
    sim = make({}, count=3)
    reload(sim, {}, {1: 1, 2: 1, 3: 1, 4: 1}, [1, 2, 3])
    assert numbers(sim, 2) == (4, 4, 3, 3, True)
    sim.crash(3)
    assert numbers(sim, 2) == (4, 4, 2, 3, False)


def test_reload_changes_own_votes() -> None:
    sim = make({}, count=3)
    reload(sim, {}, {1: 3, 2: 1, 3: 1}, [1])
    # Node 1 announces 3 votes: T = 5 > E, so expected follows.
    assert numbers(sim, 2) == (5, 5, 5, 3, True)
