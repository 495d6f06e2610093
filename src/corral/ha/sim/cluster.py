"""Simulated cluster: hardware (power, network), shared files, locks, watchdogs and guests,
plus the per-daemon SimEnv that implements HaEnvironment on top of it.

Everything is deterministic: integer simulated seconds, uids from a counter, sorted iteration.
The safety checker runs after every daemon step: a HA guest running on two powered nodes at
once aborts the run with SafetyViolation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from corral.errors import CorralError
from corral.ha.logic.config import DatacenterHa, GroupConfig, ResourceConfig
from corral.ha.logic.crm import Crm
from corral.ha.logic.lrm import Lrm
from corral.ha.logic.placement import NodeCapacity, ServiceStats
from corral.ha.logic.rules import Rule
from corral.ha.logic.settings import NS_PER_S, HaTimings
from corral.ha.logic.statusfiles import format_status_file, parse_lrm_status, parse_manager_status
from corral.ha.logic.types import SAFE_LEFTOVER_LOCKS

# Measured usage of a running guest without dynamic_service_stats: 2 cores, 2 GiB.
DEFAULT_DYNAMIC_USAGE = ServiceStats(2.0, 2 * 1024**3)

LEVELS = {"info": "info", "warn": "warn", "err": "err", "notice": "noti", "email": "emai"}


class SafetyViolation(CorralError):
    """A HA guest ran on two nodes at once."""


@dataclass
class SimNode:
    name: str
    power: bool = False
    network: bool = False
    capacity: NodeCapacity = field(default_factory=NodeCapacity)
    crm: Crm | None = None
    lrm: Lrm | None = None
    shutdown_kind: str | None = None  # "poweroff" / "reboot" while a shutdown is running
    cfs_readable: bool = True  # cfs NODE rw work|fail
    cfs_update_ok: bool = True  # cfs NODE update work|fail
    restart_lrm: bool = False


@dataclass
class FailingResource:
    """`fa:abcdef`: b failing starts, c failing migrations, d != 0 stop fails, f node number."""

    starts_left: int
    migrations_left: int
    stop_fails: bool
    only_node: str | None

    @classmethod
    def from_sid(cls, sid: str) -> FailingResource:
        digits = sid.split(":", 1)[1]
        def digit(i: int) -> int:
            return int(digits[i]) if len(digits) > i and digits[i].isdigit() else 0
        node = f"node{digit(5)}" if digit(5) else None
        return cls(digit(1), digit(2), digit(3) != 0, node)


class SimCluster:
    def __init__(self, node_names: list[str], timings: HaTimings) -> None:
        self.timings = timings
        self.nodes = {n: SimNode(n) for n in sorted(node_names)}
        self.time_s = 0
        self.manager_status: dict[str, Any] = {}
        self.lrm_status: dict[str, dict[str, Any]] = {}
        self.resources: dict[str, ResourceConfig] = {}
        self.rules: list[Rule] = []
        self.groups: dict[str, GroupConfig] = {}
        self.datacenter = DatacenterHa()
        self.crm_commands: list[str] = []
        self.locks: dict[str, tuple[str, int]] = {}
        self.watchdogs: dict[tuple[str, str], int] = {}
        self.config_node: dict[str, str] = {}
        self.running: dict[str, set[str]] = {n: set() for n in self.nodes}
        self.guest_locks: dict[str, str] = {}
        self.stats: dict[str, ServiceStats] = {}
        self.dynamic_stats: dict[str, ServiceStats] = {}
        self.failing: dict[str, FailingResource] = {}
        self.uid_counter = 0
        self.log_lines: list[str] = []
        self.events: list[dict[str, Any]] = []

    # --- logging -------------------------------------------------------------------------

    def log(self, level: str, source: str, message: str) -> None:
        short = LEVELS.get(level, level[:4])
        self.log_lines.append(f"{short:<5} {self.time_s:>5} {source:>12}: {message}")

    def emit(self, record: dict[str, Any]) -> None:
        self.events.append({"time": self.time_s, **record})

    # --- hardware ------------------------------------------------------------------------

    def quorate(self, node: str) -> bool:
        state = self.nodes[node]
        if not (state.power and state.network):
            return False
        up = sum(1 for n in self.nodes.values() if n.power and n.network)
        return up * 2 > len(self.nodes)

    def power_on(self, node: str) -> None:
        state = self.nodes[node]
        if state.power:
            return
        state.power = state.network = True
        state.shutdown_kind = None
        state.crm = Crm(SimEnv(self, node, "crm"), self.timings)
        state.lrm = Lrm(SimEnv(self, node, "lrm"), self.timings)
        self.log("info", "hardware", f"server '{node}' powered on")

    def power_off(self, node: str, why: str = "poweroff") -> None:
        state = self.nodes[node]
        if not state.power:
            return
        state.power = state.network = False
        state.crm = state.lrm = None
        self.running[node] = set()
        for key in [k for k in self.watchdogs if k[0] == node]:
            del self.watchdogs[key]
        self.log("info", "hardware", f"server '{node}' stopped by {why}")

    def check_watchdogs(self) -> None:
        limit_ns = self.timings.watchdog_reset_after_ns
        for (node, _client), fed_s in sorted(self.watchdogs.items()):
            if (node, _client) not in self.watchdogs:
                continue
            if (self.time_s - fed_s) * NS_PER_S > limit_ns:
                self.log("info", "watchdog", f"execute power {node} off")
                self.emit({"type": "watchdog_reset", "node": node})
                self.power_off(node, "poweroff (watchdog)")

    def check_safety(self) -> None:
        where: dict[str, list[str]] = {}
        for node in sorted(self.nodes):
            if not self.nodes[node].power:
                continue
            for sid in sorted(self.running[node]):
                where.setdefault(sid, []).append(node)
        for sid, nodes in sorted(where.items()):
            if len(nodes) > 1:
                message = f"SAFETY VIOLATION: service '{sid}' runs on {', '.join(nodes)}"
                self.log("err", "checker", message)
                self.emit({"type": "safety_violation", "service": sid, "nodes": nodes})
                raise SafetyViolation(message)

    # --- locks ---------------------------------------------------------------------------

    def lock(self, name: str, holder: str) -> bool:
        if not self.quorate(holder) or not self.nodes[holder].cfs_readable:
            return False
        current = self.locks.get(name)
        expired = current is not None and \
            (self.time_s - current[1]) * NS_PER_S > self.timings.lock_timeout_ns
        if current is None or current[0] == holder or expired:
            self.locks[name] = (holder, self.time_s)
            return True
        return False

    def unlock(self, name: str, holder: str) -> None:
        current = self.locks.get(name)
        if current is not None and current[0] == holder and self.quorate(holder):
            del self.locks[name]

    def new_uid(self) -> str:
        self.uid_counter += 1
        return hashlib.sha256(f"uid-{self.uid_counter}".encode()).hexdigest()[:12]


class SimEnv:
    """HaEnvironment for one daemon ('crm' or 'lrm') of one simulated node."""

    def __init__(self, cluster: SimCluster, node: str, daemon: str) -> None:
        self.cluster = cluster
        self.node = node
        self.daemon = daemon

    def nodename(self) -> str:
        return self.node

    def now_ns(self) -> int:
        return self.cluster.time_s * NS_PER_S

    def log(self, level: str, message: str) -> None:
        self.cluster.log(level, f"{self.node}/{self.daemon}", message)

    def emit(self, record: dict[str, Any]) -> None:
        self.cluster.emit(record)

    def new_uid(self) -> str:
        return self.cluster.new_uid()

    def quorate(self) -> bool:
        return self.cluster.quorate(self.node)

    def node_info(self) -> dict[str, bool]:
        quorate = self.quorate()
        return {name: (name == self.node) or (quorate and n.power and n.network)
                for name, n in self.cluster.nodes.items()}

    def cluster_state_update(self) -> bool:
        return self.cluster.nodes[self.node].cfs_update_ok

    def _cfs_writable(self) -> bool:
        return self.quorate() and self.cluster.nodes[self.node].cfs_readable

    # Status files go through their JSON text form; every write is checked by the validating
    # reader, so the simulator also proves that everything the logic writes can be read back.
    # Reads only decode (a cheap deep copy), the stored documents were validated on write.

    def read_manager_status(self) -> dict[str, Any] | None:
        if not self.cluster.nodes[self.node].cfs_readable:
            return None
        return dict(json.loads(format_status_file(self.cluster.manager_status)))

    def write_manager_status(self, status: dict[str, Any]) -> bool:
        if not self._cfs_writable():
            return False
        self.cluster.manager_status = parse_manager_status(format_status_file(status))
        return True

    def read_lrm_status(self, node: str) -> dict[str, Any] | None:
        if not self.cluster.nodes[self.node].cfs_readable:
            return None
        return dict(json.loads(format_status_file(self.cluster.lrm_status.get(node, {}))))

    def write_lrm_status(self, status: dict[str, Any]) -> bool:
        if not self._cfs_writable():
            return False
        text = format_status_file(status)
        self.cluster.lrm_status[self.node] = parse_lrm_status(text, self.node)
        return True

    def read_resources(self) -> dict[str, ResourceConfig]:
        return {sid: replace(resource, node=self.cluster.config_node.get(sid))
                for sid, resource in self.cluster.resources.items()}

    def set_resource_state(self, sid: str, state: str) -> None:
        from corral.ha.logic.types import RequestedState
        if sid in self.cluster.resources:
            self.cluster.resources[sid].state = RequestedState(state)

    def read_rules(self) -> list[Rule]:
        return [replace(rule, resources=list(rule.resources), nodes=dict(rule.nodes))
                for rule in self.cluster.rules]

    def read_groups(self) -> dict[str, GroupConfig]:
        return {name: replace(group, nodes=dict(group.nodes))
                for name, group in self.cluster.groups.items()}

    def read_datacenter(self) -> DatacenterHa:
        datacenter = self.cluster.datacenter
        return replace(datacenter, timings=dict(datacenter.timings),
                       rebalance=replace(datacenter.rebalance))

    def queue_crm_command(self, line: str) -> None:
        self.cluster.crm_commands.append(line)

    def read_crm_commands(self) -> list[str]:
        if not self.quorate():
            return []
        lines, self.cluster.crm_commands = self.cluster.crm_commands, []
        return lines

    def crm_commands_pending(self) -> bool:
        return bool(self.cluster.crm_commands)

    def get_manager_lock(self) -> bool:
        return self.cluster.lock("ha_manager_lock", self.node)

    def release_manager_lock(self) -> None:
        self.cluster.unlock("ha_manager_lock", self.node)

    def get_agent_lock(self, node: str) -> bool:
        return self.cluster.lock(f"ha_agent_{node}_lock", self.node)

    def release_agent_lock(self, node: str) -> None:
        self.cluster.unlock(f"ha_agent_{node}_lock", self.node)

    def watchdog_open(self) -> None:
        self.cluster.watchdogs[(self.node, self.daemon)] = self.cluster.time_s

    def watchdog_update(self) -> None:
        self.cluster.watchdogs[(self.node, self.daemon)] = self.cluster.time_s

    def watchdog_close(self) -> None:
        self.cluster.watchdogs.pop((self.node, self.daemon), None)

    def guest_config_node(self, sid: str) -> str | None:
        return self.cluster.config_node.get(sid)

    def guest_running(self, sid: str) -> bool:
        return sid in self.cluster.running[self.node]

    def _failing(self, sid: str) -> FailingResource | None:
        failing = self.cluster.failing.get(sid)
        if failing and failing.only_node and failing.only_node != self.node:
            return None
        return failing

    def guest_start(self, sid: str) -> bool:
        if self.cluster.guest_locks.get(sid):
            self.log("err", f"service {sid} is locked ({self.cluster.guest_locks[sid]})")
            return False
        failing = self._failing(sid)
        if failing and failing.starts_left > 0:
            failing.starts_left -= 1
            return False
        self.cluster.running[self.node].add(sid)
        self.cluster.check_safety()
        return True

    def guest_stop(self, sid: str, timeout_s: int | None) -> bool:
        failing = self.cluster.failing.get(sid)
        if failing and failing.stop_fails:
            return False
        self.cluster.running[self.node].discard(sid)
        return True

    def guest_migrate(self, sid: str, target: str, online: bool) -> bool:
        if self.cluster.guest_locks.get(sid):
            return False
        failing = self._failing(sid)
        if failing and failing.migrations_left > 0:
            failing.migrations_left -= 1
            return False
        target_node = self.cluster.nodes[target]
        if not (target_node.power and target_node.network and self.quorate()):
            return False
        self.cluster.config_node[sid] = target
        if online and sid in self.cluster.running[self.node]:
            self.cluster.running[self.node].discard(sid)
            self.cluster.running[target].add(sid)
        return True

    def steal_service(self, sid: str, from_node: str, to_node: str) -> None:
        self.cluster.config_node[sid] = to_node

    def remove_safe_locks(self, sid: str) -> list[str]:
        lock = self.cluster.guest_locks.get(sid)
        if lock in SAFE_LEFTOVER_LOCKS:
            del self.cluster.guest_locks[sid]
            return [lock]
        return []

    def node_capacity(self, node: str) -> NodeCapacity:
        return self.cluster.nodes[node].capacity

    def service_stats(self, sid: str) -> ServiceStats:
        return self.cluster.stats.get(sid, ServiceStats())

    def service_measured_usage(self, sid: str) -> ServiceStats | None:
        if not any(sid in guests for guests in self.cluster.running.values()):
            return None
        return self.cluster.dynamic_stats.get(sid, DEFAULT_DYNAMIC_USAGE)
