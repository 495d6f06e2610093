"""The simulator harness itself: scheduler, seeds, network faults, planted bugs.

These tests use the trivial fake core in fakecore.py (a fixed sequencer, not
Totem) so the harness is exercised independently of the real core: a clean
run passes, every planted bug is reported by the right checker together with
the replay command, runs are bit-for-bit reproducible, and the network model
does what the fault plan says (loss, duplication, cuts, FIFO vs reordering).
"""

from __future__ import annotations

import random

import pytest

from corral.sim.cluster import SimOptions, convergence_bound_ns, run_seed
from corral.sim.faults import FAULT_NAMES, FaultPlan, parse_faults
from corral.sim.network import SimNetwork
from corral.sim.rng import derive_seed
from corral.sim.scheduler import Scheduler

from .fakecore import fake_api


def test_derived_seeds_are_stable_across_processes() -> None:
    # Fixed values: a change here means every recorded seed replays differently.
    assert derive_seed(1, "net") == derive_seed(1, "net")
    assert derive_seed(1, "net") != derive_seed(1, "faults")
    assert derive_seed(7, "swarm") == 7498451129856198837


def test_scheduler_breaks_ties_by_insertion_order() -> None:
    scheduler = Scheduler()
    for name in ("a", "b", "c"):
        scheduler.at(5, (name,))
    scheduler.at(1, ("first",))
    order = [scheduler.pop() for _ in range(4)]
    assert order == [("first",), ("a",), ("b",), ("c",)]
    assert scheduler.now_ns == 5
    assert scheduler.pop() is None


def _network(plan: FaultPlan, nodes: tuple[int, ...] = (1, 2, 3)) -> tuple[SimNetwork, Scheduler]:
    scheduler = Scheduler()
    network = SimNetwork(nodes, random.Random(1), scheduler, loopback=True)
    network.set_plan(plan)
    return network, scheduler


def _arrivals(scheduler: Scheduler) -> list[tuple[int, int, bytes]]:
    out = []
    while (event := scheduler.pop()) is not None:
        out.append((event[1], event[2], event[3]))
    return out


def test_broadcast_reaches_every_node_including_self() -> None:
    network, scheduler = _network(FaultPlan())
    network.send(1, 0, b"x")
    assert sorted(dest for dest, _, _ in _arrivals(scheduler)) == [1, 2, 3]


def test_total_loss_drops_everything_but_loopback() -> None:
    network, scheduler = _network(FaultPlan(loss_probability=1.0))
    for _ in range(10):
        network.send(1, 0, b"x")
    assert {dest for dest, _, _ in _arrivals(scheduler)} == {1}
    assert network.stats.dropped_loss == 20


def test_duplication_sends_two_copies() -> None:
    network, scheduler = _network(FaultPlan(dup_probability=1.0))
    network.send(1, 2, b"x")
    assert len(_arrivals(scheduler)) == 2


def test_cuts_are_one_way_and_reference_counted() -> None:
    network, scheduler = _network(FaultPlan())
    network.cut([(1, 2)])
    network.cut([(1, 2)])
    network.send(1, 2, b"a")
    network.send(2, 1, b"b")
    assert _arrivals(scheduler) == [(1, 2, b"b")]
    network.uncut([(1, 2)])
    network.send(1, 2, b"c")
    assert _arrivals(scheduler) == []
    network.uncut([(1, 2)])
    network.send(1, 2, b"d")
    assert _arrivals(scheduler) == [(2, 1, b"d")]


def test_links_are_fifo_without_reorder_and_not_with_it() -> None:
    packets = [bytes([i]) for i in range(200)]
    network, scheduler = _network(FaultPlan(delay_mean_ns=5_000_000))
    for packet in packets:
        network.send(1, 2, packet)
    assert [p for _, _, p in _arrivals(scheduler)] == packets
    network, scheduler = _network(FaultPlan(reorder_jitter_ns=5_000_000))
    for packet in packets:
        network.send(1, 2, packet)
    assert [p for _, _, p in _arrivals(scheduler)] != packets


def test_swarm_choice_depends_on_seed_and_respects_allowed() -> None:
    plans = {FaultPlan.choose(seed, FAULT_NAMES, 500_000_000) for seed in range(40)}
    assert len(plans) > 20
    only_loss = FaultPlan.choose(3, ("loss",), 500_000_000)
    assert only_loss.loss_probability > 0 and only_loss.active()[0].startswith("loss")
    assert FaultPlan.choose(3, (), 500_000_000) == FaultPlan()
    assert parse_faults("all") == FAULT_NAMES and parse_faults("none") == ()
    assert parse_faults("crash,loss") == ("loss", "crash")
    with pytest.raises(ValueError):
        parse_faults("meteor")


def test_fake_core_clean_run_passes() -> None:
    result = run_seed(SimOptions(seed=5, nodes=4, duration_ms=1000), fake_api(4))
    assert result.ok, result.report
    assert result.delivered == 4 * result.submitted > 0
    assert result.converge_ns == 0


@pytest.mark.parametrize(
    ("bug", "checker"),
    [
        ("dup", "integrity"),
        ("reorder", "total-order"),
        ("drop", "virtual-synchrony"),
        ("invent", "integrity"),
        ("members", "config-consistency"),
    ],
)
def test_planted_core_bug_is_reported_with_replay_command(bug: str, checker: str) -> None:
    options = SimOptions(seed=5, nodes=3, duration_ms=1000)
    result = run_seed(options, fake_api(3, bug))
    assert not result.ok
    assert result.violation is not None and result.violation.checker == checker
    assert f"VIOLATION [{checker}]" in result.report
    assert "replay: python -m corral.sim --seed 5 --nodes 3 --duration-ms 1000" in result.report


def test_same_options_give_the_same_trace_digest() -> None:
    options = SimOptions(seed=11, nodes=3, duration_ms=1500)
    first = run_seed(options, fake_api(3))
    second = run_seed(options, fake_api(3))
    other = run_seed(SimOptions(seed=12, nodes=3, duration_ms=1500), fake_api(3))
    assert first.digest == second.digest
    assert first.digest != other.digest


def test_exception_in_the_core_is_reported_as_core_exception() -> None:
    api = fake_api(3)

    def exploding_factory(nodeid: int, timers: object, ring_seq: int) -> object:
        core = api.factory(nodeid, timers, ring_seq)  # type: ignore[arg-type]
        if nodeid == 2:
            def submit(payload: bytes) -> bool:
                raise RuntimeError("planted")
            core.submit = submit  # type: ignore[attr-defined]
        return core

    from dataclasses import replace

    result = run_seed(SimOptions(seed=5, nodes=3, duration_ms=1000), replace(api, factory=exploding_factory))
    assert result.violation is not None
    assert result.violation.checker == "core-exception"
    assert result.violation.nodes == [2]
    assert "RuntimeError: planted" in result.report


def test_no_convergence_is_a_liveness_violation_stating_the_bound() -> None:
    options = SimOptions(seed=5, nodes=3, duration_ms=1000, token_ms=500)
    result = run_seed(options, fake_api(3, "split"))
    assert result.violation is not None and result.violation.checker == "liveness"
    # token 500, consensus 600, merge 200, join 50: 1000 + 1800 + 200 + 1000 ms
    assert convergence_bound_ns(options.totem_config().timers(3)) == 4_000_000_000
    assert "no single ring of all nodes within 4000ms" in result.report
    assert "2*token + 3*consensus + merge + 20*join" in result.report


def test_send_queue_that_never_drains_is_a_liveness_violation() -> None:
    result = run_seed(SimOptions(seed=5, nodes=3, duration_ms=1000, token_ms=500), fake_api(3, "stuck"))
    assert result.violation is not None and result.violation.checker == "liveness"
    assert "send queues not empty" in result.report
