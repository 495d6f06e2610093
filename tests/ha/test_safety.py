"""Timing safety: settings that would let the master recover a guest before the partitioned
node's watchdog fired are refused; the fast profile keeps the rule and fails over well under
30 s; and, with the rule deliberately broken, the simulator's checker catches the double run.
Also the simulator's handling of malformed scenarios.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import replace

import pytest

from corral.errors import ConfigError
from corral.ha.logic.settings import FAST, REFERENCE, HaTimings, timings_from_mapping
from corral.ha.sim.scenario import ScenarioError, Simulation, load_scenario, run_scenario

SCENARIOS = pathlib.Path(__file__).parent / "scenarios"


def test_reference_defaults() -> None:
    assert (REFERENCE.fence_delay_s, REFERENCE.lock_timeout_s, REFERENCE.watchdog_timeout_s) == \
        (60, 120, 60)


def test_unsafe_lock_timeout_refused() -> None:
    with pytest.raises(ConfigError) as info:
        HaTimings(lock_timeout_s=60).validate()
    assert info.value.key == "lock_timeout_s"
    assert "unsafe" in str(info.value)


@pytest.mark.parametrize("changes, key", [
    ({"safety_margin_s": 1}, "safety_margin_s"),
    ({"watchdog_timeout_s": 5, "lrm_round_s": 10}, "watchdog_timeout_s"),
    ({"fence_delay_s": 0}, "fence_delay_s"),
    ({"crm_round_s": 99999}, "crm_round_s"),
    ({"sim_round_s": 71}, "sim_round_s"),
])
def test_out_of_bounds_refused(changes: dict[str, int], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        replace(REFERENCE, **changes).validate()
    assert info.value.key == key


def test_timings_from_mapping() -> None:
    assert timings_from_mapping({}) == REFERENCE
    assert timings_from_mapping({"profile": "fast"}) == FAST
    assert timings_from_mapping({"fence_delay_s": "30"}).fence_delay_s == 30
    with pytest.raises(ConfigError, match="unknown HA timing key"):
        timings_from_mapping({"fence_delay": 30})
    with pytest.raises(ConfigError, match="unknown timing profile"):
        timings_from_mapping({"profile": "ludicrous"})
    with pytest.raises(ConfigError, match="lock_timeout_s"):
        timings_from_mapping({"profile": "fast", "lock_timeout_s": 10})


def _cut_and_recovery(events: list[dict[str, object]], node: str, sid: str) -> tuple[int, int]:
    cut = next(int(str(e["time"])) for e in events
               if e["type"] == "node" and e["node"] == node and e["to"] == "unknown")
    started = next(int(str(e["time"])) for e in events
                   if e["type"] == "service" and e["service"] == sid and e["from"] == "recovery")
    reset = next(int(str(e["time"])) for e in events
                 if e["type"] == "watchdog_reset" and e["node"] == node)
    assert reset < started, "the node must be reset before its guest is recovered"
    return cut, started


def test_fast_profile_failover_well_under_30s() -> None:
    result = run_scenario(SCENARIOS / "failover-fast-profile")
    assert result.error is None
    cut, started = _cut_and_recovery(result.events, "node3", "vm:103")
    assert started - cut < 25


def test_reference_profile_failover_about_two_minutes() -> None:
    result = run_scenario(SCENARIOS / "failover-network-cut")
    cut, started = _cut_and_recovery(result.events, "node3", "vm:103")
    assert 100 <= started - cut <= 150


def test_broken_safety_rule_is_caught_by_checker() -> None:
    simulation = Simulation(load_scenario(SCENARIOS / "failover-network-cut"))
    unsafe = replace(REFERENCE, lock_timeout_s=30)  # bypasses validate() on purpose
    simulation.timings = unsafe
    simulation.cluster.timings = unsafe
    result = simulation.run()
    assert result.error is not None and "SAFETY VIOLATION" in result.error
    assert "vm:103" in result.error
    assert any(e["type"] == "safety_violation" for e in result.events)


def _write(directory: pathlib.Path, files: dict[str, object]) -> pathlib.Path:
    directory.mkdir()
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (directory / name).write_text(text)
    return directory


@pytest.mark.parametrize("files, fragment", [
    ({"cmdlist": [["teleport node1"]]}, "unknown command"),
    ({"cmdlist": [["power node9 on"]]}, "unknown node"),
    ({"cmdlist": "{"}, "invalid JSON"),
    ({"datacenter.cfg": {"ha-timing": {"lock_timeout_s": 20}}}, "lock_timeout_s"),
    ({"rules_config": "colocation: x\n\tresources vm:1\n"}, "unknown section type"),
    ({"datacenter.cfg": {"ha-timing": {"profile": "fast"}},
      "hardware_status": {f"node{i}": {"power": "off"} for i in range(1, 6)}},
     "exceeds the watchdog reset time"),
    ({"service_config": {"vm:1": {"node": "node7"}}}, "unknown node"),
])
def test_malformed_scenarios_are_reported(tmp_path: pathlib.Path, files: dict[str, object],
                                          fragment: str) -> None:
    directory = _write(tmp_path / "bad", files)
    with pytest.raises(ScenarioError, match=fragment):
        run_scenario(directory)
