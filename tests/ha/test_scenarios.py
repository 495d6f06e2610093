"""Replays every scenario under tests/ha/scenarios and compares its event log with the stored
expected.jsonl (service/node state changes, fence acks, watchdog resets, master changes).

Each run also has the simulator's safety checker armed: a guest on two nodes fails the run.
To accept an intended behaviour change, regenerate with
`corral ha-sim run --write-expected DIR`, then read the diff before committing.
"""

from __future__ import annotations

import difflib
import pathlib

import pytest

from corral.ha.sim.scenario import run_scenario

SCENARIOS = pathlib.Path(__file__).parent / "scenarios"
DIRS = sorted(p for p in SCENARIOS.iterdir() if p.is_dir())


def test_enough_scenarios() -> None:
    assert len(DIRS) >= 60, f"only {len(DIRS)} scenarios"
    for directory in DIRS:
        assert (directory / "README").exists(), f"{directory.name} has no README"


@pytest.mark.parametrize("directory", DIRS, ids=lambda p: p.name)
def test_scenario_matches_expected(directory: pathlib.Path) -> None:
    result = run_scenario(directory)
    assert result.error is None, result.error
    expected = (directory / "expected.jsonl").read_text()
    actual = result.events_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            "expected.jsonl", "actual"))
        pytest.fail(f"event log differs:\n{diff}")
