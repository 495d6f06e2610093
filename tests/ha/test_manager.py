"""Manager and daemon details that scenarios do not pin directly: resources without a guest
config, the uid protocol (new uid per change, results consumed only for the current uid), and
the rule that a node carrying a 'fence' service never becomes master.
"""

from __future__ import annotations

import pathlib

from corral.ha.sim.scenario import Simulation, load_scenario

SCENARIOS = pathlib.Path(__file__).parent / "scenarios"


def test_resource_without_guest_is_reported_not_added() -> None:
    simulation = Simulation(load_scenario(SCENARIOS / "failover-network-cut"))
    simulation.cluster.config_node.pop("vm:103")
    result = simulation.run()
    assert result.error is None
    assert not any(e.get("service") == "vm:103" for e in result.events)
    warnings = [line for line in result.log_lines if "guest configuration not found" in line]
    assert len(warnings) == 1, "reported once per master term, not every round"


def test_every_state_change_gets_a_new_uid() -> None:
    simulation = Simulation(load_scenario(SCENARIOS / "migrate-vm"))
    seen: list[str] = []
    original = simulation.cluster.new_uid

    def recording_uid() -> str:
        uid = original()
        seen.append(uid)
        return uid

    simulation.cluster.new_uid = recording_uid  # type: ignore[method-assign]
    result = simulation.run()
    changes = [e for e in result.events if e["type"] == "service"]
    assert len(seen) >= len(changes)
    assert len(set(seen)) == len(seen)
    final = simulation.cluster.manager_status["service_status"]["vm:101"]
    assert final["state"] == "started" and final["node"] == "node2"
    assert final["uid"] in seen


def test_stale_results_are_not_consumed() -> None:
    """A result recorded under an old uid must not move the service."""
    simulation = Simulation(load_scenario(SCENARIOS / "migrate-vm"))
    cluster = simulation.cluster
    simulation.run()
    status = cluster.manager_status
    entry = status["service_status"]["vm:101"]
    cluster.lrm_status["node2"]["results"]["stale-uid"] = {
        "sid": "vm:101", "state": "started", "exit_code": 1}
    crm = cluster.nodes["node1"].crm
    assert crm is not None and crm.manager is not None
    crm.iterate()
    after = cluster.manager_status["service_status"]["vm:101"]
    assert after["state"] == "started" and after["node"] == entry["node"]
    assert "failed_nodes" not in after


def test_node_with_fence_service_never_becomes_master() -> None:
    simulation = Simulation(load_scenario(SCENARIOS / "initial-fence-state"))
    simulation.cluster.manager_status["node_status"]["node1"] = "fence"
    simulation.cluster.manager_status["service_status"]["vm:101"]["state"] = "fence"
    result = simulation.run()
    masters = [e["node"] for e in result.events if e["type"] == "master"]
    assert masters and "node1" not in masters[:1]
    assert masters[0] == "node2"


def test_crm_command_queue_is_bounded() -> None:
    from corral.ha.logic.manager import MAX_COMMANDS_PER_ROUND

    simulation = Simulation(load_scenario(SCENARIOS / "migrate-vm"))
    simulation.cluster.crm_commands = ["arm-ha"] * (MAX_COMMANDS_PER_ROUND + 5)
    result = simulation.run()
    assert any(f"dropping all but the first {MAX_COMMANDS_PER_ROUND}" in line
               for line in result.log_lines)
    assert sum("got crm command: arm-ha" in line for line in result.log_lines) == \
        MAX_COMMANDS_PER_ROUND
