"""Service placement: the usage model (basic and static CRS modes), TOPSIS node scoring and
select_service_node with node affinity, resource affinity, failback and maintenance fallback.

select_service_node also says *why* it found no node, so the manager can log and show it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.ha.logic.rules import CompiledRules
from corral.ha.logic.types import CrsMode, Preference, ServiceState

DEFAULT_NODE_CORES = 24.0
DEFAULT_NODE_MEMORY_BYTES = 128 * 1024**3
DEFAULT_SERVICE_CPU = 4.0
DEFAULT_SERVICE_MEMORY_BYTES = 4 * 1024**3

# TOPSIS criteria weights: average cpu, highest cpu, average memory, highest memory.
TOPSIS_WEIGHTS = (1.0, 2.0, 5.0, 10.0)

# States whose service loads its current node, and states that also load the target.
LOADS_CURRENT = frozenset({
    ServiceState.STARTED, ServiceState.REQUEST_STOP, ServiceState.FENCE, ServiceState.FREEZE,
    ServiceState.ERROR, ServiceState.RECOVERY, ServiceState.MIGRATE, ServiceState.RELOCATE})
LOADS_TARGET = frozenset({
    ServiceState.MIGRATE, ServiceState.RELOCATE, ServiceState.REQUEST_START_BALANCE})
NOT_PLACED = frozenset({ServiceState.STOPPED, ServiceState.REQUEST_START})


@dataclass(frozen=True)
class NodeCapacity:
    cores: float = DEFAULT_NODE_CORES
    memory_bytes: int = DEFAULT_NODE_MEMORY_BYTES


@dataclass(frozen=True)
class ServiceStats:
    maxcpu: float = DEFAULT_SERVICE_CPU
    maxmem_bytes: int = DEFAULT_SERVICE_MEMORY_BYTES


def topsis_scores(matrix: list[list[float]], weights: tuple[float, ...]) -> list[float]:
    """Closeness of each alternative (row) to the ideal; all criteria are minimised.

    Columns are divided by their Euclidean norm and weighted (weights normalised to sum 1);
    ideal best is the column minimum, worst the maximum; score = d_worst / (d_best + d_worst),
    0 when both distances are 0. Higher is better.
    """
    if not matrix:
        return []
    total = sum(weights)
    normalised_weights = [w / total for w in weights]
    columns = len(weights)
    norms = [math.sqrt(sum(row[j] ** 2 for row in matrix)) or 1.0 for j in range(columns)]
    weighted = [[normalised_weights[j] * row[j] / norms[j] for j in range(columns)]
                for row in matrix]
    best = [min(row[j] for row in weighted) for j in range(columns)]
    worst = [max(row[j] for row in weighted) for j in range(columns)]
    scores = []
    for row in weighted:
        to_best = math.sqrt(sum((row[j] - best[j]) ** 2 for j in range(columns)))
        to_worst = math.sqrt(sum((row[j] - worst[j]) ** 2 for j in range(columns)))
        total_distance = to_best + to_worst
        scores.append(to_worst / total_distance if total_distance > 0 else 0.0)
    return scores


class UsageModel:
    """Load per online node, rebuilt from the service states whenever a placement is made."""

    def __init__(self, mode: CrsMode, online_nodes: list[str],
                 capacities: Mapping[str, NodeCapacity],
                 stats: Mapping[str, ServiceStats],
                 measured: Mapping[str, ServiceStats] | None = None) -> None:
        self.mode = mode
        # dynamic mode: measured usage of running services (cpu = cores in use)
        self.measured = measured or {}
        self.nodes = sorted(online_nodes)
        self.capacities = {n: capacities.get(n, NodeCapacity()) for n in self.nodes}
        self.stats = stats
        self.count = {n: 0 for n in self.nodes}
        self.cpu = {n: 0.0 for n in self.nodes}
        self.memory = {n: 0.0 for n in self.nodes}

    def stats_of(self, sid: str) -> ServiceStats:
        return self.stats.get(sid, ServiceStats())

    def service_cpu(self, sid: str, node: str) -> float:
        """Cores the service is assumed to use on `node` (maxcpu 0 = the whole node)."""
        maxcpu = self.stats_of(sid).maxcpu
        return maxcpu if maxcpu > 0 else self.capacities[node].cores

    def usage_of(self, sid: str, node: str) -> tuple[float, float]:
        """(cores, memory bytes) a running service adds to `node` in this model."""
        if self.mode == CrsMode.DYNAMIC and sid in self.measured:
            return self.measured[sid].maxcpu, float(self.measured[sid].maxmem_bytes)
        return self.service_cpu(sid, node), float(self.stats_of(sid).maxmem_bytes)

    def criteria(self, cpu: Mapping[str, float], memory: Mapping[str, float]) -> list[float]:
        """The four TOPSIS criteria (avg/max cpu load, avg/max memory load) of a cluster state."""
        cpu_loads, memory_loads = [], []
        for node in self.nodes:
            capacity = self.capacities[node]
            cpu_loads.append(cpu[node] / capacity.cores if capacity.cores > 0 else 0.0)
            memory_loads.append(memory[node] / capacity.memory_bytes
                                if capacity.memory_bytes > 0 else 0.0)

        def average(loads: list[float]) -> float:
            return 1.0 + math.sqrt(sum(x * x for x in loads) / len(loads)) if loads else 1.0

        return [average(cpu_loads), 1.0 + max(cpu_loads, default=0.0),
                average(memory_loads), 1.0 + max(memory_loads, default=0.0)]

    def add(self, sid: str, node: str, running: bool = False) -> None:
        """Count the service on `node`; a running one counts its measured usage (dynamic)."""
        if node not in self.count:
            return
        self.count[node] += 1
        if running and self.mode == CrsMode.DYNAMIC and sid in self.measured:
            self.cpu[node] += self.measured[sid].maxcpu
            self.memory[node] += self.measured[sid].maxmem_bytes
            return
        self.cpu[node] += self.service_cpu(sid, node)
        self.memory[node] += self.stats_of(sid).maxmem_bytes

    def add_services(self, service_status: Mapping[str, Mapping[str, Any]],
                     skip: str | None = None) -> None:
        for sid in sorted(service_status):
            if sid == skip:
                continue
            entry = service_status[sid]
            state = entry.get("state")
            if state in LOADS_CURRENT and entry.get("node"):
                running = state == ServiceState.STARTED and bool(entry.get("running"))
                self.add(sid, entry["node"], running)
            if state in LOADS_TARGET and entry.get("target"):
                self.add(sid, entry["target"])

    def scores(self, sid: str, candidates: list[str]) -> dict[str, float]:
        """Lower is better: service count (basic) or negated TOPSIS closeness (static and
        dynamic; the service to place always counts with its maximum values)."""
        if self.mode == CrsMode.BASIC:
            return {n: float(self.count.get(n, 0)) for n in candidates}
        rows = [self._criteria_if_started_on(sid, n) for n in candidates]
        closeness = topsis_scores(rows, TOPSIS_WEIGHTS)
        return {n: -c for n, c in zip(candidates, closeness, strict=True)}

    def _criteria_if_started_on(self, sid: str, candidate: str) -> list[float]:
        cpu, memory = dict(self.cpu), dict(self.memory)
        cpu[candidate] += self.service_cpu(sid, candidate)
        memory[candidate] += self.stats_of(sid).maxmem_bytes
        return self.criteria(cpu, memory)


@dataclass(frozen=True)
class Placement:
    """Chosen node (None: no node found) and, when nothing moves, the reason why."""

    node: str | None
    reason: str | None = None


def _peer_location(entry: Mapping[str, Any], online: set[str]) -> list[str]:
    if entry.get("state") in NOT_PLACED:
        return []
    places = [entry.get("target")] if entry.get("target") else [entry.get("node")]
    return [p for p in places if p in online]


def _affinity_sets(sid: str, rules: CompiledRules, service_status: Mapping[str, Mapping[str, Any]],
                   online: set[str]) -> tuple[dict[str, int], set[str]]:
    together: dict[str, int] = {}
    for peer in sorted(rules.positive.get(sid, set())):
        for node in _peer_location(service_status.get(peer, {}), online):
            together[node] = together.get(node, 0) + 1
    separate: set[str] = set()
    for peer in sorted(rules.negative.get(sid, set())):
        entry = service_status.get(peer, {})
        if entry.get("state") in NOT_PLACED:
            continue
        separate |= {p for p in (entry.get("node"), entry.get("target")) if p in online}
    return together, separate


def select_service_node(sid: str, preference: Preference, entry: Mapping[str, Any],
                        failback: bool, rules: CompiledRules,
                        service_status: Mapping[str, Mapping[str, Any]],
                        usage: UsageModel) -> Placement:
    """Pick a node for `sid` (anchors section 9.1); `entry` is its manager_status entry."""
    online = set(usage.nodes)
    current = entry.get("node")
    allowed = rules.allowed_priorities(sid, usage.nodes)
    if not allowed:
        return Placement(None, "no online node is allowed by its strict node affinity rule")
    top = max(allowed.values())
    preferred = sorted(n for n, p in allowed.items() if p == top)
    together, separate = _affinity_sets(sid, rules, service_status, online)
    if (preference == Preference.NONE and not failback and current in allowed
            and (current in together or current not in separate)):
        return Placement(current)
    if preference == Preference.TRY_NEXT:
        preferred = [n for n in preferred if n not in entry.get("failed_nodes", [])]
        if not preferred:
            return Placement(None, "every node of its priority class already failed to "
                                   "start it")
    before_separate = list(preferred)
    preferred = [n for n in preferred if n not in separate]
    if not preferred:
        if before_separate:
            return Placement(None, "negative affinity excludes every node of its priority "
                                   f"class ({', '.join(before_separate)})")
        return Placement(None, "no usable online node in its highest priority class")
    best_together = sorted((n for n in preferred if n in together),
                           key=lambda n: (-together[n], n))
    if best_together:
        preferred = best_together[:1]
    maintenance_node = entry.get("maintenance_node")
    if maintenance_node in preferred:
        return Placement(maintenance_node)
    if preference == Preference.NONE and current in preferred:
        return Placement(current)
    scores = usage.scores(sid, preferred)
    ranked = sorted(preferred, key=lambda n: (scores[n], n))
    if preference == Preference.TRY_NEXT and current in ranked:
        index = ranked.index(current)
        if index < len(ranked) - 1:
            return Placement(ranked[index + 1])
    return Placement(ranked[0])
