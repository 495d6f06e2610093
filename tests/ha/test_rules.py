"""Rule feasibility checks (one test per check of the reference's seven), the transforms
(positive merge, implicit negatives, node-affinity extension) and legacy groups as rules.
"""

from __future__ import annotations

from corral.ha.logic.config import GroupConfig, ResourceConfig
from corral.ha.logic.rules import (
    NODE_AFFINITY,
    RESOURCE_AFFINITY,
    Rule,
    check_rules,
    check_rules_for_write,
    compile_rules,
    rule_states,
    rules_from_groups,
)

NODES = ["node1", "node2", "node3"]


def node_rule(ident: str, sids: list[str], nodes: dict[str, int], strict: bool = False) -> Rule:
    return Rule(NODE_AFFINITY, ident, sids, nodes=nodes, strict=strict)


def affinity_rule(ident: str, sids: list[str], affinity: str) -> Rule:
    return Rule(RESOURCE_AFFINITY, ident, sids, affinity=affinity)


def dropped_ids(rules: list[Rule]) -> list[str]:
    return [ident for ident, _ in check_rules(rules, NODES)]


def test_valid_rules_pass() -> None:
    rules = [node_rule("n", ["vm:1"], {"node1": 1}),
             affinity_rule("p", ["vm:1", "vm:2"], "positive"),
             affinity_rule("q", ["vm:3", "vm:4"], "negative")]
    assert dropped_ids(rules) == []


def test_check1_resource_in_two_node_rules_drops_both() -> None:
    rules = [node_rule("a", ["vm:1"], {"node1": 0}), node_rule("b", ["vm:1", "vm:2"], {"node2": 0}),
             node_rule("c", ["vm:3"], {"node3": 0})]
    assert dropped_ids(rules) == ["a", "b"]


def test_check2_affinity_rule_needs_two_resources() -> None:
    assert dropped_ids([affinity_rule("x", ["vm:1"], "positive")]) == ["x"]


def test_check3_negative_rule_larger_than_cluster() -> None:
    rule = affinity_rule("x", ["vm:1", "vm:2", "vm:3", "vm:4"], "negative")
    assert dropped_ids([rule]) == ["x"]


def test_check4_positive_and_negative_share_two_resources_after_merge() -> None:
    rules = [affinity_rule("p1", ["vm:1", "vm:2"], "positive"),
             affinity_rule("p2", ["vm:2", "vm:3"], "positive"),
             affinity_rule("n", ["vm:1", "vm:3"], "negative")]
    assert dropped_ids(rules) == ["n", "p1", "p2"]


def test_check5_affinity_with_multi_priority_node_rule() -> None:
    rules = [node_rule("pri", ["vm:1"], {"node1": 2, "node2": 1}),
             affinity_rule("p", ["vm:1", "vm:2"], "positive")]
    assert dropped_ids(rules) == ["p"]


def test_check6_positive_group_touching_two_node_rules() -> None:
    rules = [node_rule("n1", ["vm:1"], {"node1": 0}), node_rule("n2", ["vm:2"], {"node2": 0}),
             affinity_rule("p", ["vm:1", "vm:2"], "positive")]
    assert dropped_ids(rules) == ["p"]


def test_check7_negative_resources_restricted_to_too_few_nodes() -> None:
    rules = [node_rule("n", ["vm:1", "vm:2"], {"node1": 0}, strict=True),
             affinity_rule("apart", ["vm:1", "vm:2"], "negative")]
    assert dropped_ids(rules) == ["apart"]
    # non-strict rules do not restrict
    rules[0].strict = False
    assert dropped_ids(rules) == []


def test_disabled_rules_are_not_checked_or_compiled() -> None:
    rule = affinity_rule("x", ["vm:1"], "positive")
    rule.disabled = True
    assert dropped_ids([rule]) == []
    assert compile_rules([rule], NODES).positive == {}


def test_non_strict_adds_other_nodes_at_minus_one() -> None:
    compiled = compile_rules([node_rule("n", ["vm:1"], {"node1": 2})], NODES)
    assert compiled.allowed_priorities("vm:1", NODES) == {"node1": 2, "node2": -1, "node3": -1}
    strict = compile_rules([node_rule("n", ["vm:1"], {"node1": 2}, strict=True)], NODES)
    assert strict.allowed_priorities("vm:1", ["node2", "node3"]) == {}
    assert strict.allowed_priorities("vm:9", NODES) == {"node1": 0, "node2": 0, "node3": 0}


def test_transforms_merge_and_implicit_negative_and_extension() -> None:
    rules = [affinity_rule("p1", ["vm:1", "vm:2"], "positive"),
             affinity_rule("p2", ["vm:2", "vm:3"], "positive"),
             affinity_rule("n", ["vm:1", "vm:9"], "negative"),
             node_rule("pin", ["vm:3"], {"node2": 0}, strict=True)]
    compiled = compile_rules(rules, NODES)
    assert compiled.positive["vm:1"] == {"vm:2", "vm:3"}
    # vm:9 apart from vm:1 implies apart from vm:1's positive peers, and vice versa
    assert compiled.negative["vm:3"] >= {"vm:9"}
    assert compiled.negative["vm:9"] >= {"vm:1", "vm:2", "vm:3"}
    # the node rule of vm:3 extends to its whole positive group
    assert compiled.node_priorities["vm:1"] == {"node2": 0} and compiled.strict["vm:1"]


def test_groups_become_node_affinity_rules() -> None:
    groups = {"g1": GroupConfig("g1", {"node1": 2, "node2": 0}, restricted=True)}
    resources = {"vm:1": ResourceConfig("vm:1", group="g1"), "vm:2": ResourceConfig("vm:2")}
    rules = rules_from_groups(groups, resources)
    assert len(rules) == 1
    assert rules[0].ident == "ha-group-g1" and rules[0].resources == ["vm:1"]
    assert rules[0].strict and rules[0].nodes == {"node1": 2, "node2": 0}


def test_rule_states_and_write_time_report() -> None:
    existing = [node_rule("a", ["vm:1"], {"node1": 0}),
                affinity_rule("off", ["vm:5"], "positive")]
    existing[1].disabled = True
    states = rule_states(existing, NODES)
    assert states == {"a": "in use", "off": "disabled"}
    conflicting = node_rule("b", ["vm:1"], {"node2": 0})
    problems = check_rules_for_write(existing, conflicting, NODES)
    assert problems == [
        "rule 'a' would be ignored: resource 'vm:1' is already used in another node affinity rule",
        "rule 'b' would be ignored: resource 'vm:1' is already used in another node affinity rule",
    ]
    # replacing rule 'a' itself is fine
    assert check_rules_for_write(existing, node_rule("a", ["vm:1"], {"node3": 0}), NODES) == []
    assert rule_states([*existing, conflicting], NODES)["b"].startswith("ignored (conflicts)")
