"""When the fence delay of a dead node counts as elapsed (HaTimings.fence_delay_from_lock).

Pins, in the simulator: with the fast profile a new master that never saw the dead node
online fences it and recovers its service in its first round as master, because it can take
the node's agent lock (the old accounting added a whole fence delay after the manager lock's
expiry); it does not do so while that lock is still live; a node the master saw online in its
term still waits the full fence delay even if its agent lock could be taken; the reference
profile keeps counting the fence delay from the new master's first round.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import pytest

from corral.errors import ConfigError
from corral.ha.logic.settings import FAST, REFERENCE
from corral.ha.sim.scenario import RunResult, Simulation, load_scenario

SCENARIOS = pathlib.Path(__file__).parent / "scenarios"


def _time_of(result: RunResult, **match: Any) -> int:
    times = [e["time"] for e in result.events
             if all(e.get(key) == value for key, value in match.items())]
    assert times, f"no event {match}"
    return int(times[0])


LockOverride = Callable[[str, str, int], "bool | None"]


def _run(name: str, timing: dict[str, Any] | None = None,
         lock_override: LockOverride | None = None) -> RunResult:
    """Run a scenario, optionally with other ha-timing and with lock answers forced by
    `lock_override(name, holder, time_s)` (None: the simulated filesystem answers)."""
    scenario = load_scenario(SCENARIOS / name)
    if timing is not None:
        scenario = dataclasses.replace(scenario, datacenter={"ha-timing": timing})
    simulation = Simulation(scenario)
    cluster = simulation.cluster
    if lock_override is not None:
        original = cluster.lock
        override = lock_override

        def lock(name: str, holder: str) -> bool:
            forced = override(name, holder, cluster.time_s)
            if forced is None:
                return original(name, holder)
            if forced:
                cluster.locks[name] = (holder, cluster.time_s)
            return forced

        cluster.lock = lock  # type: ignore[method-assign]
    result = simulation.run()
    assert result.error is None, result.error
    return result


def test_fast_new_master_fences_in_its_first_round() -> None:
    result = _run("failover-fast-profile-master")
    took_over = _time_of(result, type="master", node="node2")
    assert _time_of(result, type="fence_ack", node="node1") == took_over
    assert _time_of(result, type="service", service="vm:101", to="started", node="node2") \
        == took_over
    # The node was reset by its watchdog before (the safety the fence delay is there for).
    assert _time_of(result, type="watchdog_reset", node="node1") < took_over
    assert any("counting the fence delay as elapsed" in line for line in result.log_lines)


def test_fast_new_master_waits_while_the_agent_lock_is_live() -> None:
    refused_until_s = 66

    def refuse(name: str, holder: str, time_s: int) -> bool | None:
        if name == "ha_agent_node1_lock" and holder == "node2" and time_s < refused_until_s:
            return False
        return None

    result = _run("failover-fast-profile-master", lock_override=refuse)
    took_over = _time_of(result, type="master", node="node2")
    fenced = _time_of(result, type="service", service="vm:101", to="fence")
    assert fenced - took_over >= FAST.fence_delay_s, "fence state only after its own delay"
    assert _time_of(result, type="fence_ack", node="node1") >= refused_until_s
    assert not any("counting the fence delay as elapsed" in line for line in result.log_lines)


def test_fast_node_seen_online_waits_the_full_fence_delay() -> None:
    """The master saw node3 online, then gone: it does not even try node3's agent lock before
    the fence delay (12 s here) has passed since it last saw node3 online."""
    fence_delay_s = 12
    tries: list[int] = []

    def record(name: str, holder: str, time_s: int) -> bool | None:
        if (name, holder) == ("ha_agent_node3_lock", "node1"):
            tries.append(time_s)
        return None

    result = _run("failover-fast-profile",
                  timing={"profile": "fast", "fence_delay_s": fence_delay_s},
                  lock_override=record)
    gone = _time_of(result, type="node", node="node3", to="unknown")
    last_seen = gone - FAST.sim_round_s
    fenced = _time_of(result, type="service", service="vm:103", to="fence")
    assert tries and min(tries) >= last_seen + fence_delay_s
    assert fenced >= last_seen + fence_delay_s
    assert not any("counting the fence delay as elapsed" in line for line in result.log_lines)


def test_reference_new_master_counts_its_own_fence_delay() -> None:
    assert not REFERENCE.fence_delay_from_lock and FAST.fence_delay_from_lock
    result = _run("failover-fast-profile-master", timing={"profile": "reference"})
    masters = [e for e in result.events if e["type"] == "master" and e["node"] != "node1"]
    took_over = int(masters[0]["time"])
    fenced = _time_of(result, type="service", service="vm:101", to="fence")
    assert fenced - took_over >= REFERENCE.fence_delay_s
    assert not any("counting the fence delay as elapsed" in line for line in result.log_lines)


def test_lock_shortcut_needs_a_fence_delay_within_the_lock_timeout() -> None:
    with pytest.raises(ConfigError, match="fence_delay_s"):
        dataclasses.replace(FAST, fence_delay_s=FAST.lock_timeout_s + 1).validate()
