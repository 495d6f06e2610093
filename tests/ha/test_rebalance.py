"""Automatic rebalancing: the imbalance metric (raw coefficient of variation), stationary
bundles with positive affinity, target filtering by node and negative affinity, and the
bruteforce and topsis choices; plus parsing of the crs ha-auto-rebalance keys.
"""

from __future__ import annotations

from typing import Any

import pytest

from corral.errors import ConfigError
from corral.ha.logic.config import datacenter_from_mapping
from corral.ha.logic.placement import UsageModel
from corral.ha.logic.rebalance import choose_move, imbalance, node_loads, stationary_bundles
from corral.ha.logic.rules import NODE_AFFINITY, RESOURCE_AFFINITY, Rule, compile_rules
from corral.ha.logic.types import CrsMode

NODES = ["node1", "node2", "node3"]


def test_imbalance_is_raw_coefficient_of_variation() -> None:
    assert imbalance([3.0, 0.0, 0.0]) == pytest.approx(1.41421356)
    assert imbalance([1.0, 1.0, 1.0]) == 0.0
    assert imbalance([0.0, 0.0]) == 0.0
    assert imbalance([]) == 0.0


def started(*placements: tuple[str, str]) -> dict[str, dict[str, Any]]:
    return {sid: {"state": "started", "node": node} for sid, node in placements}


def model(status: dict[str, dict[str, Any]]) -> UsageModel:
    usage = UsageModel(CrsMode.STATIC, NODES, {}, {})
    usage.add_services(status)
    return usage


def test_node_loads_average_cpu_and_memory() -> None:
    loads = node_loads(model(started(("vm:1", "node1"))))
    # default service: 4 of 24 cores and 4 of 128 GiB
    assert loads["node1"] == pytest.approx((4 / 24 + 4 / 128) / 2)
    assert loads["node2"] == 0.0


def test_bundles_group_positive_peers_on_the_same_node() -> None:
    rules = compile_rules([Rule(RESOURCE_AFFINITY, "p", ["vm:1", "vm:2", "vm:3"],
                                affinity="positive")], NODES)
    status = started(("vm:1", "node1"), ("vm:2", "node1"), ("vm:3", "node2"), ("vm:4", "node1"))
    assert stationary_bundles(status, rules) == [("vm:1", "vm:2"), ("vm:3",), ("vm:4",)]
    status["vm:3"] = {"state": "migrate", "node": "node2", "target": "node1"}
    assert stationary_bundles(status, rules) == [("vm:4",)]


def test_bruteforce_picks_lowest_imbalance() -> None:
    status = started(("vm:1", "node1"), ("vm:2", "node1"), ("vm:3", "node1"))
    move = choose_move(model(status), status, compile_rules([], NODES), "bruteforce")
    assert move is not None
    assert (move.leader, move.source, move.target) == ("vm:1", "node1", "node2")
    assert move.after == pytest.approx(imbalance([2, 1, 0]))


def test_targets_respect_node_and_negative_affinity() -> None:
    rules = compile_rules([
        Rule(NODE_AFFINITY, "n", ["vm:1"], nodes={"node1": 0, "node3": 0}, strict=True),
        Rule(RESOURCE_AFFINITY, "a", ["vm:1", "vm:9"], affinity="negative")], NODES)
    status = started(("vm:1", "node1"), ("vm:2", "node1"), ("vm:9", "node3"))
    move = choose_move(model(status), status, rules, "bruteforce")
    assert move is not None and move.leader == "vm:2"
    # vm:1 may only go to node3, where its negative peer vm:9 runs: only vm:9 can move
    only_1 = {"vm:1": status["vm:1"], "vm:9": status["vm:9"]}
    move = choose_move(model(only_1), only_1, rules, "bruteforce")
    assert move is not None and move.leader == "vm:9" and move.target == "node2"


def test_topsis_method_returns_a_valid_move() -> None:
    status = started(("vm:1", "node1"), ("vm:2", "node1"))
    move = choose_move(model(status), status, compile_rules([], NODES), "topsis")
    assert move is not None and move.target in ("node2", "node3")


def test_auto_rebalance_keys() -> None:
    datacenter = datacenter_from_mapping({"crs": {
        "ha": "static", "ha-auto-rebalance": 1, "ha-auto-rebalance-threshold": "0.5",
        "ha-auto-rebalance-hold-duration": 2, "ha-auto-rebalance-margin": "0.2",
        "ha-auto-rebalance-method": "topsis"}})
    settings = datacenter.rebalance
    assert settings.enabled and settings.threshold == 0.5 and settings.hold_rounds == 2
    assert settings.margin == 0.2 and settings.method == "topsis"
    assert not datacenter_from_mapping({}).rebalance.enabled
    with pytest.raises(ConfigError, match="bruteforce"):
        datacenter_from_mapping({"crs": {"ha-auto-rebalance-method": "random"}})
    with pytest.raises(ConfigError, match="unknown crs property"):
        datacenter_from_mapping({"crs": {"ha-auto-rebalance-speed": 1}})


def test_targets_stay_in_the_top_priority_class() -> None:
    """Regression (swarm seed 8): moving below the top class made failback move it back."""
    rules = compile_rules([Rule(NODE_AFFINITY, "n", ["vm:1"], nodes={"node1": 0})], NODES)
    status = started(("vm:1", "node1"))
    assert choose_move(model(status), status, rules, "bruteforce") is None
