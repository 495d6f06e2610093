"""The partition simulator: seeded swarm runs with the checkers, the scenario files in
scenarios/ (commands and the output they must give), regression seeds, a proof
that the checkers bite, and the command line.

Each seed picks a configuration (cluster size, votes, features) and runs 200 random
steps (splits, merges, crashes, clean leaves, restarts, time jumps, partial
deliveries), checking after every step that at most one partition is quorate when
the configuration promises it, then that a majority partition is quorate once
messages settle and that every node is quorate after healing. A failure prints the
command that replays it. CORRAL_SOAK=1 runs 5000 more seeds with longer runs.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from corral.quorum.config import QuorumConfig
from corral.quorum.vqsim import (
    CheckFailed,
    QuorumSim,
    main,
    run_scenario,
    run_seed,
    script_header,
    strict_safety_applies,
    swarm_config,
)

SEED_BATCHES = [range(start, start + 100) for start in range(0, 300, 100)]


@pytest.mark.parametrize("seeds", SEED_BATCHES, ids=lambda r: f"{r.start}-{r.stop - 1}")
def test_swarm_seeds(seeds: range) -> None:
    strict = 0
    for seed in seeds:
        sim = run_seed(seed, steps=200)
        strict += sim.check_one_quorate
    assert strict >= len(seeds) // 2  # most configurations get the strict check


def test_runs_are_deterministic() -> None:
    first, second = run_seed(17, steps=150), run_seed(17, steps=150)
    assert first.log == second.log


def test_swarm_covers_every_feature() -> None:
    seen: set[str] = set()
    for seed in range(100):
        options, _ = swarm_config(seed)
        seen |= set(options)
    assert {"wait_for_all", "last_man_standing", "auto_tie_breaker", "allow_downscale",
            "expected_votes_tracking", "expected_votes"} <= seen


def test_checker_catches_two_quorate_partitions() -> None:
    sim = QuorumSim({"two_node": "1"}, {1: 1, 2: 1}, auto_settle=True, check_one_quorate=True)
    sim.replay = "(test)"
    with pytest.raises(CheckFailed, match=r"(?s)2 quorate partitions.*replay: \(test\)"):
        sim.split([[1], [2]])


def test_strict_safety_scope() -> None:
    def config(options: dict[str, str]) -> QuorumConfig:
        return QuorumConfig.from_options(options, {1: 1, 2: 1, 3: 1, 4: 1})

    assert strict_safety_applies(config({}))
    assert strict_safety_applies(config({"auto_tie_breaker": "1"}))
    assert not strict_safety_applies(config({"last_man_standing": "1"}))
    assert not strict_safety_applies(config({"last_man_standing": "1", "wait_for_all": "1"}))
    assert not strict_safety_applies(config({"allow_downscale": "1", "wait_for_all": "1"}))
    assert not strict_safety_applies(config({"expected_votes": "3"}))
    assert not strict_safety_applies(
        QuorumConfig.from_options({"two_node": "1"}, {1: 1, 2: 1})
    )


SCENARIOS = sorted((Path(__file__).parent / "scenarios").glob("*.vq"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_files(path: Path) -> None:
    """Each file in scenarios/: a cluster, commands, and `>` lines it must print."""
    text = path.read_text()
    assert text.count("\n>") >= 3  # a scenario pins its behaviour
    run_scenario(text)


def test_scenario_expectation_mismatch_fails() -> None:
    with pytest.raises(CheckFailed, match="line 3: expected '\\[1 2 3\\]', got '\\[1\\* 2\\* 3\\*\\]'"):
        run_scenario("# nodes: 1,2,3\nshow\n> [1 2 3]\n")


def test_scenarios_cover_every_feature() -> None:
    options = set()
    for path in SCENARIOS:
        options |= set(script_header(path.read_text().splitlines())[1])
    assert {"two_node", "wait_for_all", "last_man_standing", "auto_tie_breaker",
            "allow_downscale"} <= options


@pytest.mark.parametrize("seed", [5387])
def test_regression_seeds(seed: int) -> None:
    """Seeds that once failed the strict check (ATB with a stale previous partition)."""
    sim = run_seed(seed, steps=300)
    assert sim.check_one_quorate


def test_regression_fresh_node_and_stale_member_cannot_both_break_the_tie() -> None:
    """Found by the swarm when a restarted node used the whole nodelist as its history."""
    sim = QuorumSim({"auto_tie_breaker": "1"}, {1: 1, 2: 1, 3: 1, 4: 1}, auto_settle=True)
    sim.crash(1)
    sim.split([[2, 3], [1, 4]])
    sim.restart(1)
    assert sim.quorate_partitions() == [frozenset({2, 3})]


def test_cli_seed_and_script(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                             ) -> None:
    assert main(["--seed", "3", "--steps", "50"]) == 0
    assert capsys.readouterr().out.startswith("seed 3: ok")
    script = "split 1,2 3\nshow\ndown 3\nexpected 2 1\nstatus 1\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["--script", "-", "--nodes", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1* 2*] [3]\n")
    assert "Expected votes:   2\n" in out and "Quorum:           2  \n" in out


def test_cli_reports_a_violation(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # `expected 1` on a lone node cut off from a quorate pair: the operator forced
    # a second quorate partition, and the checker says so.
    monkeypatch.setattr(sys, "stdin", io.StringIO("split 1 2,3\nexpected 1 1\n"))
    assert main(["--script", "-", "--nodes", "1,2,3"]) == 1
    assert "FAILED: 2 quorate partitions: [[1], [2, 3]]" in capsys.readouterr().err
    # two_node is outside the strict check: both halves quorate is its design.
    monkeypatch.setattr(sys, "stdin", io.StringIO("split 1 2\nshow\n"))
    assert main(["--script", "-", "--nodes", "1,2", "--option", "two_node=1"]) == 0
    assert capsys.readouterr().out == "[1*] [2*]\n"


@pytest.mark.skipif(os.environ.get("CORRAL_SOAK") != "1", reason="soak: set CORRAL_SOAK=1")
def test_soak_many_seeds() -> None:
    for seed in range(1000, 6000):
        run_seed(seed, steps=400)
