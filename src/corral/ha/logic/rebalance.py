"""Automatic load rebalancing for the static and dynamic CRS modes (opt-in,
`crs: ha-auto-rebalance=1`).

Imbalance is the coefficient of variation (population standard deviation over mean, the raw
form the reference's 5.2.0 tests use) of node loads, a node's load being the mean of its CPU
and memory load from the services' assigned maxima (static) or measured usage (dynamic). Candidates are "stationary bundles":
started services together with their positively-affine started peers on the same node; a
bundle may go to any other node of its node-affinity rule's highest online priority class (a
lower class would be undone by failback) that hosts none of its negatively-affine peers. `bruteforce` picks the move with the lowest resulting imbalance,
`topsis` ranks moves with the same four criteria as placement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.ha.logic.placement import TOPSIS_WEIGHTS, UsageModel, topsis_scores
from corral.ha.logic.rules import CompiledRules
from corral.ha.logic.types import ServiceState

MOVING = frozenset({ServiceState.MIGRATE, ServiceState.RELOCATE,
                    ServiceState.REQUEST_START_BALANCE})


@dataclass(frozen=True)
class RebalanceMove:
    leader: str
    members: tuple[str, ...]
    source: str
    target: str
    after: float


def imbalance(loads: Iterable[float]) -> float:
    values = list(loads)
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    if mean <= 0:
        return 0.0
    variance = sum((x - mean) ** 2 for x in values) / len(values)
    return math.sqrt(variance) / mean


def _loads(usage: UsageModel, cpu: Mapping[str, float], memory: Mapping[str, float]
           ) -> dict[str, float]:
    loads = {}
    for node in usage.nodes:
        capacity = usage.capacities[node]
        cpu_load = cpu[node] / capacity.cores if capacity.cores > 0 else 0.0
        memory_load = memory[node] / capacity.memory_bytes if capacity.memory_bytes > 0 else 0.0
        loads[node] = (cpu_load + memory_load) / 2
    return loads


def node_loads(usage: UsageModel) -> dict[str, float]:
    return _loads(usage, usage.cpu, usage.memory)


def stationary_bundles(service_status: Mapping[str, Mapping[str, Any]], rules: CompiledRules
                       ) -> list[tuple[str, ...]]:
    """Started services grouped with their started positive peers on the same node."""
    started = {sid: e for sid, e in service_status.items()
               if e.get("state") == ServiceState.STARTED and not e.get("cmd")}
    seen: set[str] = set()
    bundles = []
    for sid in sorted(started):
        if sid in seen:
            continue
        node = started[sid].get("node")
        peers = rules.positive.get(sid, set())
        if any(service_status.get(p, {}).get("state") in MOVING for p in peers):
            continue
        members = tuple(sorted({sid} | {p for p in peers
                                        if p in started and started[p].get("node") == node}))
        seen.update(members)
        bundles.append(members)
    return bundles


def _targets(members: tuple[str, ...], source: str, usage: UsageModel, rules: CompiledRules,
             service_status: Mapping[str, Mapping[str, Any]]) -> list[str]:
    # Only the highest priority class: a move anywhere else would be undone by failback.
    priorities = rules.allowed_priorities(members[0], usage.nodes)
    top = max(priorities.values(), default=0)
    allowed = {node for node, priority in priorities.items() if priority == top}
    blocked: set[str] = {source}
    for member in members:
        for peer in rules.negative.get(member, set()):
            entry = service_status.get(peer, {})
            blocked |= {n for n in (entry.get("node"), entry.get("target")) if isinstance(n, str)}
    return sorted(allowed - blocked)


def _after_move(usage: UsageModel, members: tuple[str, ...], source: str, target: str
                ) -> tuple[dict[str, float], dict[str, float]]:
    cpu, memory = dict(usage.cpu), dict(usage.memory)
    for sid in members:
        source_cpu, source_memory = usage.usage_of(sid, source)
        target_cpu, target_memory = usage.usage_of(sid, target)
        cpu[source] -= source_cpu
        cpu[target] += target_cpu
        memory[source] -= source_memory
        memory[target] += target_memory
    return cpu, memory


def choose_move(usage: UsageModel, service_status: Mapping[str, Mapping[str, Any]],
                rules: CompiledRules, method: str) -> RebalanceMove | None:
    moves: list[RebalanceMove] = []
    criteria: list[list[float]] = []
    for members in stationary_bundles(service_status, rules):
        source = service_status[members[0]].get("node")
        if source not in usage.cpu:
            continue
        for target in _targets(members, source, usage, rules, service_status):
            cpu, memory = _after_move(usage, members, source, target)
            moves.append(RebalanceMove(members[0], members, source, target,
                                       imbalance(_loads(usage, cpu, memory).values())))
            criteria.append(usage.criteria(cpu, memory))
    if not moves:
        return None
    if method == "topsis":
        scores = topsis_scores(criteria, TOPSIS_WEIGHTS)
        ranked = sorted(range(len(moves)), key=lambda i: (-scores[i], moves[i].leader,
                                                          moves[i].source, moves[i].target))
        return moves[ranked[0]]
    return min(moves, key=lambda m: (m.after, m.leader, m.source, m.target))
