"""Placement: TOPSIS scoring against hand-computed values, the basic and static usage models,
and select_service_node's rules (failback, try-next, maintenance fallback, positive and negative
affinity, top priority class chosen before anti-affinity) including the stay reasons.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from corral.ha.logic.placement import (
    NodeCapacity,
    Placement,
    ServiceStats,
    UsageModel,
    select_service_node,
    topsis_scores,
)
from corral.ha.logic.rules import NODE_AFFINITY, RESOURCE_AFFINITY, Rule, compile_rules
from corral.ha.logic.types import CrsMode, Preference

NODES = ["node1", "node2", "node3"]
GiB = 1024**3


def test_topsis_single_criterion() -> None:
    assert topsis_scores([[1.0], [2.0], [3.0]], (1.0,)) == pytest.approx([1.0, 0.5, 0.0])


def test_topsis_identical_alternatives_score_zero() -> None:
    assert topsis_scores([[1.0, 2.0], [1.0, 2.0]], (1.0, 1.0)) == [0.0, 0.0]


def test_topsis_weights_decide_between_criteria() -> None:
    # alternative 0 is better on criterion 0, alternative 1 on criterion 1
    matrix = [[1.0, 2.0], [2.0, 1.0]]
    heavy_first = topsis_scores(matrix, (10.0, 1.0))
    heavy_second = topsis_scores(matrix, (1.0, 10.0))
    assert heavy_first[0] > heavy_first[1]
    assert heavy_second[1] > heavy_second[0]
    # symmetric matrix: the scores are complementary
    assert heavy_first[0] + heavy_first[1] == pytest.approx(1.0)


def test_topsis_hand_computed_two_by_two() -> None:
    matrix = [[1.0, 3.0], [2.0, 1.0]]
    weights = (1.0, 3.0)
    norm0, norm1 = math.sqrt(5), math.sqrt(10)
    w0, w1 = 0.25, 0.75
    v = [[w0 * 1 / norm0, w1 * 3 / norm1], [w0 * 2 / norm0, w1 * 1 / norm1]]
    best = [min(v[0][0], v[1][0]), min(v[0][1], v[1][1])]
    worst = [max(v[0][0], v[1][0]), max(v[0][1], v[1][1])]
    expected = []
    for row in v:
        d_best = math.dist(row, best)
        d_worst = math.dist(row, worst)
        expected.append(d_worst / (d_best + d_worst))
    assert topsis_scores(matrix, weights) == pytest.approx(expected)


def usage(mode: CrsMode, status: dict[str, dict[str, Any]], nodes: list[str] = NODES,
          capacities: dict[str, NodeCapacity] | None = None,
          stats: dict[str, ServiceStats] | None = None) -> UsageModel:
    model = UsageModel(mode, nodes, capacities or {}, stats or {})
    model.add_services(status)
    return model


def test_basic_usage_counts_current_and_target() -> None:
    status = {"vm:1": {"state": "started", "node": "node1"},
              "vm:2": {"state": "migrate", "node": "node1", "target": "node2"},
              "vm:3": {"state": "stopped", "node": "node3"},
              "vm:4": {"state": "request_start", "node": "node3"}}
    model = usage(CrsMode.BASIC, status)
    assert model.count == {"node1": 2, "node2": 1, "node3": 0}


def test_static_prefers_node_with_free_memory() -> None:
    capacities = {"node1": NodeCapacity(32, 256 * GiB), "node2": NodeCapacity(32, 16 * GiB)}
    stats = {"vm:1": ServiceStats(2, 12 * GiB), "vm:9": ServiceStats(2, 8 * GiB)}
    model = usage(CrsMode.STATIC, {"vm:1": {"state": "started", "node": "node1"}},
                  ["node1", "node2"], capacities, stats)
    scores = model.scores("vm:9", ["node1", "node2"])
    assert scores["node1"] < scores["node2"]


def test_static_maxcpu_zero_counts_whole_node() -> None:
    model = usage(CrsMode.STATIC, {"vm:1": {"state": "started", "node": "node1"}},
                  ["node1"], {"node1": NodeCapacity(16, 64 * GiB)}, {"vm:1": ServiceStats(0, GiB)})
    assert model.cpu["node1"] == 16


def select(sid: str, entry: dict[str, Any], rules: list[Rule],
           status: dict[str, dict[str, Any]] | None = None, preference: Preference = Preference.NONE,
           failback: bool = True, nodes: list[str] = NODES) -> Placement:
    status = dict(status or {})
    status[sid] = entry
    model = UsageModel(CrsMode.BASIC, nodes, {}, {})
    model.add_services({s: e for s, e in status.items() if s != sid})
    return select_service_node(sid, preference, entry, failback, compile_rules(rules, nodes),
                               status, model)


PREFER1 = Rule(NODE_AFFINITY, "p", ["vm:1"], nodes={"node1": 2, "node2": 1})


def test_failback_moves_to_higher_priority() -> None:
    entry = {"state": "started", "node": "node2"}
    assert select("vm:1", entry, [PREFER1]).node == "node1"
    assert select("vm:1", entry, [PREFER1], failback=False).node == "node2"


def test_stays_on_current_node_without_rules() -> None:
    other = {"vm:2": {"state": "started", "node": "node2"}}
    assert select("vm:1", {"state": "started", "node": "node2"}, [], other).node == "node2"


def test_best_score_picks_least_loaded() -> None:
    others = {"vm:2": {"state": "started", "node": "node1"},
              "vm:3": {"state": "started", "node": "node2"}}
    entry = {"state": "recovery", "node": "node9"}
    assert select("vm:1", entry, [], others, Preference.BEST_SCORE).node == "node3"


def test_try_next_skips_failed_nodes_and_reports_exhaustion() -> None:
    entry = {"state": "started", "node": "node1", "failed_nodes": ["node1"]}
    assert select("vm:1", entry, [], preference=Preference.TRY_NEXT).node == "node2"
    entry["failed_nodes"] = ["node1", "node2", "node3"]
    placement = select("vm:1", entry, [], preference=Preference.TRY_NEXT)
    assert placement.node is None and placement.reason


def test_maintenance_node_is_preferred_when_back() -> None:
    entry = {"state": "started", "node": "node3", "maintenance_node": "node2"}
    assert select("vm:1", entry, []).node == "node2"


def test_positive_affinity_goes_to_peer() -> None:
    rule = Rule(RESOURCE_AFFINITY, "t", ["vm:1", "vm:2"], affinity="positive")
    peers = {"vm:2": {"state": "started", "node": "node3"}}
    assert select("vm:1", {"state": "started", "node": "node1"}, [rule], peers).node == "node3"


def test_positive_affinity_ignores_stopped_peer() -> None:
    rule = Rule(RESOURCE_AFFINITY, "t", ["vm:1", "vm:2"], affinity="positive")
    peers = {"vm:2": {"state": "stopped", "node": "node3"}}
    assert select("vm:1", {"state": "started", "node": "node1"}, [rule], peers).node == "node1"


def test_negative_affinity_avoids_peer_source_and_target() -> None:
    rule = Rule(RESOURCE_AFFINITY, "a", ["vm:1", "vm:2"], affinity="negative")
    peers = {"vm:2": {"state": "migrate", "node": "node1", "target": "node2"}}
    assert select("vm:1", {"state": "started", "node": "node1"}, [rule], peers).node == "node3"


def test_top_priority_class_is_not_widened_by_anti_affinity() -> None:
    rules = [Rule(NODE_AFFINITY, "n", ["vm:1"], nodes={"node2": 0}),
             Rule(RESOURCE_AFFINITY, "a", ["vm:1", "vm:2"], affinity="negative")]
    peers = {"vm:2": {"state": "started", "node": "node2"}}
    placement = select("vm:1", {"state": "started", "node": "node1"}, rules, peers)
    assert placement.node is None
    assert "negative affinity" in (placement.reason or "")


def test_strict_rule_without_online_node_reports_reason() -> None:
    rule = Rule(NODE_AFFINITY, "n", ["vm:1"], nodes={"node4": 0}, strict=True)
    placement = select("vm:1", {"state": "recovery", "node": "node4"}, [rule],
                       preference=Preference.BEST_SCORE)
    assert placement.node is None and "strict" in (placement.reason or "")


def test_dynamic_counts_measured_usage_of_running_services() -> None:
    status: dict[str, dict[str, Any]] = {
        "vm:1": {"state": "started", "node": "node1", "running": 1},
        "vm:2": {"state": "started", "node": "node2"},  # not confirmed running yet
    }
    stats = {"vm:1": ServiceStats(8, 64 * GiB), "vm:2": ServiceStats(2, 8 * GiB)}
    measured = {"vm:1": ServiceStats(0.5, 1 * GiB), "vm:2": ServiceStats(1, 4 * GiB)}
    model = UsageModel(CrsMode.DYNAMIC, NODES, {}, stats, measured)
    model.add_services(status)
    assert model.memory["node1"] == 1 * GiB  # measured
    assert model.memory["node2"] == 8 * GiB  # starting: counted with its maximum
    assert model.usage_of("vm:1", "node3") == (0.5, float(GiB))
    static = UsageModel(CrsMode.STATIC, NODES, {}, stats, measured)
    static.add_services(status)
    assert static.memory["node1"] == 64 * GiB
    scores = model.scores("vm:9", ["node1", "node2", "node3"])
    assert min(scores, key=lambda n: (scores[n], n)) == "node3"
