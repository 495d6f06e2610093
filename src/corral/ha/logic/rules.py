"""HA rules (ha/rules.cfg): node-affinity and resource-affinity rules, legacy groups mapped
onto node-affinity, the feasibility checks, the transforms and the compiled per-service form.

The same `check_rules` runs when the master compiles rules each round (dropped rules are logged)
and when a user writes rules (problems are reported at write time), so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.errors import ConfigError
from corral.ha.logic.config import (
    GroupConfig,
    ResourceConfig,
    Section,
    check_sid,
    format_node_priorities,
    format_sections,
    parse_bool,
    parse_node_priorities,
    parse_sections,
)

NODE_AFFINITY = "node-affinity"
RESOURCE_AFFINITY = "resource-affinity"
MAX_RULE_RESOURCES = 1000


@dataclass
class Rule:
    kind: str
    ident: str
    resources: list[str]
    nodes: dict[str, int] = field(default_factory=dict)
    strict: bool = False
    affinity: str = ""
    disabled: bool = False
    comment: str | None = None


def _parse_resources_list(value: str, key: str) -> list[str]:
    sids = [check_sid(part.strip(), key) for part in value.split(",") if part.strip()]
    if not sids:
        raise ConfigError(key, "needs at least one resource")
    if len(sids) > MAX_RULE_RESOURCES:
        raise ConfigError(key, f"more than {MAX_RULE_RESOURCES} resources")
    if len(set(sids)) != len(sids):
        raise ConfigError(key, "a resource is listed twice")
    return sids


def rule_from_section(section: Section, filename: str) -> Rule:
    where = f"{filename}:{section.line}"
    props = section.props
    allowed = {"resources", "disable", "comment"}
    allowed |= {"nodes", "strict"} if section.kind == NODE_AFFINITY else {"affinity"}
    unknown = set(props) - allowed
    if unknown:
        raise ConfigError(f"{where}: {sorted(unknown)[0]}", f"unknown {section.kind} property")
    if "resources" not in props:
        raise ConfigError(f"{where}: resources", "missing required property")
    rule = Rule(kind=section.kind, ident=section.ident,
                resources=_parse_resources_list(props["resources"], f"{where}: resources"),
                disabled="disable" in props, comment=props.get("comment"))
    if section.kind == NODE_AFFINITY:
        if "nodes" not in props:
            raise ConfigError(f"{where}: nodes", "missing required property")
        rule.nodes = parse_node_priorities(props["nodes"], f"{where}: nodes")
        rule.strict = parse_bool(props.get("strict", "0"), f"{where}: strict")
    else:
        rule.affinity = props.get("affinity", "")
        if rule.affinity not in ("positive", "negative"):
            raise ConfigError(f"{where}: affinity", "must be 'positive' or 'negative'")
    return rule


def parse_rules(text: str, filename: str = "ha/rules.cfg") -> list[Rule]:
    sections = parse_sections(text, filename, {NODE_AFFINITY, RESOURCE_AFFINITY})
    idents: set[str] = set()
    rules = []
    for section in sections:
        if section.ident in idents:
            raise ConfigError(f"{filename}:{section.line}", f"duplicate rule id {section.ident!r}")
        idents.add(section.ident)
        rules.append(rule_from_section(section, filename))
    return rules


def format_rules(rules: list[Rule]) -> str:
    sections = []
    for rule in rules:
        props = {"resources": ",".join(rule.resources)}
        if rule.kind == NODE_AFFINITY:
            props["nodes"] = format_node_priorities(rule.nodes)
            if rule.strict:
                props["strict"] = "1"
        else:
            props["affinity"] = rule.affinity
        if rule.disabled:
            props["disable"] = "1"
        if rule.comment:
            props["comment"] = rule.comment
        sections.append(Section(rule.kind, rule.ident, props, 0))
    return format_sections(sections)


def rules_from_groups(groups: dict[str, GroupConfig],
                      resources: dict[str, ResourceConfig]) -> list[Rule]:
    """Legacy groups as in-memory node-affinity rules named `ha-group-<name>`."""
    members: dict[str, list[str]] = {}
    for sid in sorted(resources):
        group = resources[sid].group
        if group and group in groups:
            members.setdefault(group, []).append(sid)
    return [Rule(kind=NODE_AFFINITY, ident=f"ha-group-{name}", resources=sids,
                 nodes=dict(groups[name].nodes), strict=groups[name].restricted,
                 comment=f"Generated from HA group '{name}'.")
            for name, sids in sorted(members.items())]


# --- feasibility checks --------------------------------------------------------------------

def _positive_components(rules: list[Rule]) -> list[tuple[set[str], list[Rule]]]:
    """Merge positive rules that share a resource into connected components."""
    components: list[tuple[set[str], list[Rule]]] = []
    for rule in rules:
        if rule.affinity != "positive":
            continue
        sids, members = set(rule.resources), [rule]
        for other in [c for c in components if c[0] & sids]:
            components.remove(other)
            sids |= other[0]
            members = other[1] + members
        components.append((sids, members))
    return components


def check_rules(rules: list[Rule], nodes: list[str]) -> list[tuple[str, str]]:
    """Return (rule id, reason) for every enabled rule that fails a feasibility check."""
    enabled = sorted((r for r in rules if not r.disabled), key=lambda r: r.ident)
    dropped: dict[str, str] = {}

    def drop(rule: Rule, reason: str) -> None:
        dropped.setdefault(rule.ident, reason)

    node_rules = [r for r in enabled if r.kind == NODE_AFFINITY]
    owner: dict[str, list[Rule]] = {}
    for rule in node_rules:
        for sid in rule.resources:
            owner.setdefault(sid, []).append(rule)
    for sid, owners in sorted(owner.items()):
        if len(owners) > 1:
            for rule in owners:
                drop(rule, f"resource '{sid}' is already used in another node affinity rule")
    node_rules = [r for r in node_rules if r.ident not in dropped]
    rule_of = {sid: r for r in node_rules for sid in r.resources}

    affinity_rules = [r for r in enabled if r.kind == RESOURCE_AFFINITY]
    for rule in affinity_rules:
        if len(rule.resources) < 2:
            drop(rule, "rule defines fewer than two resources")
        elif rule.affinity == "negative" and len(rule.resources) > len(nodes):
            drop(rule, "rule defines more resources than there are cluster nodes")
    affinity_rules = [r for r in affinity_rules if r.ident not in dropped]

    components = _positive_components(affinity_rules)
    for negative in (r for r in affinity_rules if r.affinity == "negative"):
        for sids, members in components:
            if len(sids & set(negative.resources)) >= 2:
                reason = (f"rule shares two or more resources with a resource affinity rule "
                          f"of the opposite kind ({', '.join(sorted(sids & set(negative.resources)))})")
                drop(negative, reason)
                for member in members:
                    drop(member, reason)
    for rule in affinity_rules:
        for sid in rule.resources:
            node_rule = rule_of.get(sid)
            if node_rule and len(set(node_rule.nodes.values())) > 1:
                drop(rule, f"resource '{sid}' is in node affinity rule '{node_rule.ident}' "
                           "which has more than one priority class")
    for sids, members in components:
        touched = sorted({rule_of[s].ident for s in sids if s in rule_of})
        if len(touched) > 1:
            for member in members:
                drop(member, "its resources are in more than one node affinity rule "
                             f"({', '.join(touched)})")
    for rule in (r for r in affinity_rules if r.affinity == "negative"):
        restricted = [s for s in rule.resources if s in rule_of and rule_of[s].strict]
        allowed = {n for s in restricted for n in rule_of[s].nodes}
        if restricted and len(allowed) < len(restricted):
            drop(rule, f"resources {', '.join(restricted)} are restricted by strict node "
                       f"affinity to fewer nodes ({len(allowed)}) than resources")
    return sorted(dropped.items())


# --- compiled form -------------------------------------------------------------------------

@dataclass
class CompiledRules:
    """Per-service placement constraints after checks and transforms."""

    node_priorities: dict[str, dict[str, int]] = field(default_factory=dict)
    strict: dict[str, bool] = field(default_factory=dict)
    positive: dict[str, set[str]] = field(default_factory=dict)
    negative: dict[str, set[str]] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def allowed_priorities(self, sid: str, nodes: list[str]) -> dict[str, int]:
        """Every node the service may run on with its priority (non-strict adds -1 for others)."""
        if sid not in self.node_priorities:
            return {node: 0 for node in nodes}
        allowed = {n: p for n, p in self.node_priorities[sid].items() if n in nodes}
        if not self.strict.get(sid, False):
            for node in nodes:
                allowed.setdefault(node, -1)
        return allowed


def compile_rules(rules: list[Rule], nodes: list[str]) -> CompiledRules:
    dropped = check_rules(rules, nodes)
    gone = {ident for ident, _ in dropped}
    kept = [r for r in rules if not r.disabled and r.ident not in gone]
    compiled = CompiledRules(dropped=dropped)
    node_rules = [r for r in kept if r.kind == NODE_AFFINITY]
    for rule in node_rules:
        for sid in rule.resources:
            compiled.node_priorities[sid] = dict(rule.nodes)
            compiled.strict[sid] = rule.strict
    affinity_rules = [r for r in kept if r.kind == RESOURCE_AFFINITY]
    for sids, _members in _positive_components(affinity_rules):
        for sid in sids:
            compiled.positive[sid] = sids - {sid}
        # Extend the single node-affinity rule touching this group to every member.
        constrained = sorted(s for s in sids if s in compiled.node_priorities)
        if constrained:
            for sid in sids:
                compiled.node_priorities[sid] = dict(compiled.node_priorities[constrained[0]])
                compiled.strict[sid] = compiled.strict[constrained[0]]
    for rule in (r for r in affinity_rules if r.affinity == "negative"):
        for sid in rule.resources:
            compiled.negative.setdefault(sid, set()).update(set(rule.resources) - {sid})
    # Implicit negatives: if A is with B and A is apart from C, then B is apart from C.
    for sid, apart in list(compiled.negative.items()):
        for peer in compiled.positive.get(sid, set()):
            compiled.negative.setdefault(peer, set()).update(apart)
            for other in apart:
                compiled.negative.setdefault(other, set()).add(peer)
    return compiled


def rule_states(rules: list[Rule], nodes: list[str]) -> dict[str, str]:
    """What `ha rules config` shows per rule: 'in use', 'disabled' or 'ignored (conflicts)'."""
    dropped = dict(check_rules(rules, nodes))
    states = {}
    for rule in rules:
        if rule.disabled:
            states[rule.ident] = "disabled"
        elif rule.ident in dropped:
            states[rule.ident] = f"ignored (conflicts): {dropped[rule.ident]}"
        else:
            states[rule.ident] = "in use"
    return states


def check_rules_for_write(existing: list[Rule], changed: Rule, nodes: list[str]) -> list[str]:
    """Problems the rule set would have after adding or replacing `changed`, for the write path.

    Returns one message per rule that would be ignored; the caller shows them (and may refuse
    the write) so conflicts surface when the rule is saved, not later in the master's log.
    """
    rules = [*(r for r in existing if r.ident != changed.ident), changed]
    return [f"rule '{ident}' would be ignored: {reason}"
            for ident, reason in check_rules(rules, nodes)]
