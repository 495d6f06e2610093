"""Scenario directories (reference test format) and the simulated run loop.

Round timing (anchors 14.3): a round visits nodes in sorted order, one CRM then one LRM
iteration each, every iteration taking 1 simulated second; a round lasts `sim_round_s` (20 s
with the reference timings, at least 2 s per node). The first command step runs at one round,
then every 5 rounds; `delay D` pushes the next step to the first round boundary at or after
max(one round, D) later, plus 4 rounds. The run ends at the first step boundary more than 25
rounds after the last step.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

from corral.errors import ConfigError, CorralError
from corral.ha.logic.config import (
    GroupConfig,
    datacenter_from_mapping,
    parse_groups,
    parse_int,
    parse_requested_state,
    resource_from_props,
)
from corral.ha.logic.crm import Crm
from corral.ha.logic.lrm import Lrm
from corral.ha.logic.placement import NodeCapacity, ServiceStats
from corral.ha.logic.rules import Rule, parse_rules
from corral.ha.logic.settings import HaTimings, timings_from_mapping
from corral.ha.logic.status import format_status
from corral.ha.logic.statusfiles import parse_manager_status
from corral.ha.sim.cluster import FailingResource, SafetyViolation, SimCluster, SimEnv

MAX_NODES = 29
MAX_SIM_TIME_S = 10_000
ROUNDS_PER_STEP = 5
END_AFTER_ROUNDS = 25
MIB = 1024 * 1024


class ScenarioError(CorralError):
    """The scenario directory is malformed (message names the file)."""


@dataclass
class Scenario:
    path: pathlib.Path
    nodes: dict[str, dict[str, Any]]
    services: dict[str, dict[str, Any]]
    commands: list[list[str]]
    manager_status: dict[str, Any] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    datacenter: dict[str, Any] = field(default_factory=dict)
    static_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    dynamic_stats: dict[str, dict[str, Any]] = field(default_factory=dict)


def _read_json(path: pathlib.Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ScenarioError(f"{path.name}: invalid JSON: {error}") from None


def load_scenario(directory: str | pathlib.Path) -> Scenario:
    path = pathlib.Path(directory)
    if not path.is_dir():
        raise ScenarioError(f"{path}: not a scenario directory")
    nodes = _read_json(path / "hardware_status",
                       {f"node{i}": {"power": "off", "network": "off"} for i in (1, 2, 3)})
    default_services = {f"vm:{100 + i}": {"node": f"node{(i - 1) % 3 + 1}", "state": "started"}
                        for i in range(1, 7)}
    services = _read_json(path / "service_config", default_services)
    commands = _read_json(path / "cmdlist", [])
    if not isinstance(nodes, dict) or not 1 <= len(nodes) <= MAX_NODES:
        raise ScenarioError(f"hardware_status: needs 1..{MAX_NODES} nodes")
    if not isinstance(commands, list) or not all(isinstance(s, list) for s in commands):
        raise ScenarioError("cmdlist: must be a JSON list of lists of command strings")
    try:
        rules = parse_rules((path / "rules_config").read_text(), "rules_config") \
            if (path / "rules_config").exists() else []
        groups = parse_groups((path / "groups").read_text(), "groups") \
            if (path / "groups").exists() else {}
    except ConfigError as error:
        raise ScenarioError(str(error)) from None
    try:
        manager_status = parse_manager_status((path / "manager_status").read_text(),
                                              "manager_status") \
            if (path / "manager_status").exists() else {}
    except ConfigError as error:
        raise ScenarioError(str(error)) from None
    return Scenario(path=path, nodes=nodes, services=services, commands=commands,
                    manager_status=manager_status,
                    rules=rules, groups=groups,
                    datacenter=_read_json(path / "datacenter.cfg", {}),
                    static_stats=_read_json(path / "static_service_stats", {}),
                    dynamic_stats=_read_json(path / "dynamic_service_stats", {}))


@dataclass
class RunResult:
    log_lines: list[str]
    events: list[dict[str, Any]]
    error: str | None = None
    status_text: str = ""

    def events_text(self) -> str:
        return "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.events)

    def log_text(self) -> str:
        return "".join(line + "\n" for line in self.log_lines)


class Simulation:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        try:
            datacenter = datacenter_from_mapping(scenario.datacenter, "datacenter.cfg")
            timings = timings_from_mapping(datacenter.timings)
        except ConfigError as error:
            raise ScenarioError(str(error)) from None
        self.timings: HaTimings = timings
        self.cluster = SimCluster(sorted(scenario.nodes), timings)
        self.cluster.datacenter = datacenter
        self.round_s = max(timings.sim_round_s, 2 * len(scenario.nodes))
        reset_s = timings.watchdog_timeout_s + timings.watchdog_device_timeout_s
        if self.round_s > reset_s:
            raise ScenarioError(
                f"a simulated round of {self.round_s} s ({len(scenario.nodes)} nodes, 2 s per "
                f"node) exceeds the watchdog reset time of {reset_s} s: every daemon would be "
                "reset between its rounds; use fewer nodes or a longer watchdog_timeout_s")
        self.skip: dict[str, int] = {"crm": 0, "lrm": 0}
        self._setup()

    def _setup(self) -> None:
        cluster, scenario = self.cluster, self.scenario
        for name, hardware in sorted(scenario.nodes.items()):
            cluster.nodes[name].capacity = NodeCapacity(
                cores=float(hardware.get("maxcpu", 24)),
                memory_bytes=int(hardware.get("maxmem", 128 * 1024**3)))
        for sid, props in sorted(scenario.services.items()):
            self._add_service(sid, dict(props))
        for sid, stats in sorted(scenario.static_stats.items()):
            cluster.stats[sid] = ServiceStats(float(stats.get("maxcpu", 4)),
                                              int(stats.get("maxmem", 4 * 1024**3)))
        for sid, stats in sorted(scenario.dynamic_stats.items()):
            cluster.dynamic_stats[sid] = ServiceStats(float(stats.get("cpu", 2)),
                                                      int(stats.get("mem", 2 * 1024**3)))
        cluster.rules = scenario.rules
        cluster.groups = scenario.groups
        cluster.manager_status = scenario.manager_status
        for name, hardware in sorted(scenario.nodes.items()):
            if hardware.get("power") == "on":
                cluster.power_on(name)
                cluster.nodes[name].network = hardware.get("network", "on") == "on"

    def _add_service(self, sid: str, props: dict[str, Any]) -> None:
        node = props.pop("node", None)
        running = props.pop("running", None)
        if node not in self.cluster.nodes:
            raise ScenarioError(f"service_config: {sid}: unknown node {node!r}")
        try:
            resource = resource_from_props(sid, props, "service_config: " + sid,
                                           default_state=parse_requested_state("disabled", sid))
        except ConfigError as error:
            raise ScenarioError(str(error)) from None
        self.cluster.resources[sid] = resource
        self.cluster.config_node[sid] = node
        if sid.startswith("fa:"):
            self.cluster.failing[sid] = FailingResource.from_sid(sid)
        if running in (1, "1", True):
            self.cluster.running[node].add(sid)

    # --- commands ------------------------------------------------------------------------

    def _node(self, name: str) -> str:
        if name not in self.cluster.nodes:
            raise ScenarioError(f"cmdlist: unknown node {name!r}")
        return name

    def execute(self, line: str) -> int | None:
        """Run one cmdlist command; returns a delay in seconds for `delay`."""
        self.cluster.log("info", "cmdlist", f"execute {line}")
        words = line.split()
        if not words:
            raise ScenarioError("cmdlist: empty command")
        verb = words[0]
        if verb == "delay" and len(words) == 2:
            return parse_int(words[1], "delay", 0, MAX_SIM_TIME_S)
        handler = {"power": self._cmd_power, "network": self._cmd_network,
                   "reboot": self._cmd_shutdown, "shutdown": self._cmd_shutdown,
                   "restart-lrm": self._cmd_restart_lrm, "crm": self._cmd_crm,
                   "service": self._cmd_service, "skip-round": self._cmd_skip,
                   "cfs": self._cmd_cfs}.get(verb)
        if handler is None:
            raise ScenarioError(f"cmdlist: unknown command {line!r}")
        try:
            handler(words)
        except (IndexError, ConfigError) as error:
            raise ScenarioError(f"cmdlist: bad command {line!r}: {error}") from None
        return None

    def _cmd_power(self, words: list[str]) -> None:
        node = self._node(words[1])
        if words[2] == "on":
            self.cluster.power_on(node)
        elif words[2] == "off":
            self.cluster.power_off(node)
        else:
            raise ScenarioError(f"cmdlist: power {node} needs on|off")

    def _cmd_network(self, words: list[str]) -> None:
        node = self._node(words[1])
        if words[2] not in ("on", "off"):
            raise ScenarioError(f"cmdlist: network {node} needs on|off")
        state = self.cluster.nodes[node]
        if state.power:
            state.network = words[2] == "on"
            self.cluster.log("info", "hardware", f"server '{node}' network {words[2]}")

    def _cmd_shutdown(self, words: list[str]) -> None:
        node = self._node(words[1])
        kind = "reboot" if words[0] == "reboot" else "poweroff"
        state = self.cluster.nodes[node]
        if not state.power:
            return
        state.shutdown_kind = kind
        if state.lrm is not None:
            state.lrm.request_shutdown(kind)
        else:
            self._finish_shutdown(node)

    def _cmd_restart_lrm(self, words: list[str]) -> None:
        state = self.cluster.nodes[self._node(words[1])]
        if state.lrm is not None:
            state.restart_lrm = True
            state.lrm.request_shutdown(None)

    def _cmd_crm(self, words: list[str]) -> None:
        node = self._node(words[1])
        action = words[2]
        state = self.cluster.nodes[node]
        commands = {"enable-node-maintenance": f"enable-node-maintenance {node}",
                    "disable-node-maintenance": f"disable-node-maintenance {node}",
                    "arm-ha": "arm-ha"}
        if action == "stop":
            if state.crm is not None:
                state.crm.request_shutdown()
        elif action == "start":
            if state.power and state.crm is None:
                state.crm = Crm(SimEnv(self.cluster, node, "crm"), self.timings)
        elif action == "disarm-ha" and words[3] in ("freeze", "ignore"):
            self.cluster.crm_commands.append(f"disarm-ha {words[3]}")
        elif action in commands:
            self.cluster.crm_commands.append(commands[action])
        else:
            raise ScenarioError(f"cmdlist: unknown crm action {action!r}")

    def _cmd_service(self, words: list[str]) -> None:
        sid, action = words[1], words[2]
        cluster = self.cluster
        if action in ("started", "stopped", "disabled", "ignored"):
            cluster.resources[sid].state = parse_requested_state(action, sid)
        elif action in ("migrate", "relocate"):
            cluster.crm_commands.append(f"{action} {sid} {self._node(words[3])}")
        elif action == "stop":
            cluster.crm_commands.append(f"stop {sid} {parse_int(words[3], 'timeout', 0, 86400)}")
        elif action == "add" and sid in cluster.resources:
            # As `ha-manager add` does: a resource can only be added once.
            cluster.log("err", "cmdlist", f"service '{sid}' already exists, not added")
        elif action == "add":
            node = self._node(words[3])
            existing = cluster.config_node.get(sid)
            if existing is not None and existing != node:
                # The guest already exists: its config (and process) stay where they are.
                cluster.log("warn", "cmdlist", f"guest '{sid}' lives on '{existing}', adding "
                                               "it there")
                node = existing
            props: dict[str, Any] = {"node": node}
            props["state"] = words[4] if len(words) > 4 else "started"
            if len(words) > 5:
                props["running"] = words[5]
            self._add_service(sid, props)
        elif action == "delete":
            cluster.resources.pop(sid, None)
        elif action == "lock":
            cluster.guest_locks[sid] = words[3] if len(words) > 3 else "backup"
        elif action == "unlock":
            cluster.guest_locks.pop(sid, None)
        elif action == "set-static-stats" and words[3] == "maxcpu" and words[5] == "maxmem":
            cluster.stats[sid] = ServiceStats(float(words[4]), int(words[6]) * MIB)
        elif action == "set-dynamic-stats" and words[3] == "cpu" and words[5] == "mem":
            cluster.dynamic_stats[sid] = ServiceStats(float(words[4]), int(words[6]) * MIB)
        elif action == "manual-migrate":
            self._manual_migrate(sid, self._node(words[3]))
        else:
            raise ScenarioError(f"cmdlist: unknown service action {action!r}")

    def _manual_migrate(self, sid: str, target: str) -> None:
        cluster = self.cluster
        source = cluster.config_node[sid]
        cluster.config_node[sid] = target
        if sid in cluster.running[source]:
            cluster.running[source].discard(sid)
            cluster.running[target].add(sid)

    def _cmd_cfs(self, words: list[str]) -> None:
        state = self.cluster.nodes[self._node(words[1])]
        what, how = words[2], words[3]
        if what not in ("rw", "update") or how not in ("work", "fail"):
            raise ScenarioError("cmdlist: cfs NODE rw|update work|fail")
        if what == "rw":
            state.cfs_readable = how == "work"
        else:
            state.cfs_update_ok = how == "work"

    def _cmd_skip(self, words: list[str]) -> None:
        kind = words[1]
        if kind not in self.skip:
            raise ScenarioError("cmdlist: skip-round needs crm or lrm")
        self.skip[kind] += parse_int(words[2], "skip-round", 1, 100) if len(words) > 2 else 1

    # --- run loop ------------------------------------------------------------------------

    def _finish_shutdown(self, node: str) -> None:
        """The LRM has exited: stop the CRM (it exits in its next loop), then power off."""
        state = self.cluster.nodes[node]
        source = "reboot" if state.shutdown_kind == "reboot" else "shutdown"
        if state.crm is not None:
            self.cluster.log("info", source, f"execute crm {node} stop")
            state.crm.request_shutdown()
            return
        reboot = state.shutdown_kind == "reboot"
        self.cluster.log("info", source, f"execute power {node} off")
        self.cluster.power_off(node, source)
        if reboot:
            self.cluster.log("info", source, f"execute power {node} on")
            self.cluster.power_on(node)

    def _crm_exited(self, node: str) -> None:
        state = self.cluster.nodes[node]
        state.crm = None
        if state.shutdown_kind and state.lrm is None:
            self._finish_shutdown(node)

    def _lrm_exited(self, node: str) -> None:
        state = self.cluster.nodes[node]
        state.lrm = None
        if state.restart_lrm:
            state.restart_lrm = False
            self.cluster.log("info", "hardware", f"restarting LRM on '{node}'")
            state.lrm = Lrm(SimEnv(self.cluster, node, "lrm"), self.timings)
        elif state.shutdown_kind:
            self._finish_shutdown(node)

    def _round(self, start_s: int) -> None:
        cluster = self.cluster
        now_s = start_s
        skip_crm, skip_lrm = self.skip["crm"] > 0, self.skip["lrm"] > 0
        for name in sorted(cluster.nodes):
            state = cluster.nodes[name]
            if state.crm is not None and not skip_crm:
                cluster.time_s = now_s
                cluster.check_watchdogs()
                if state.crm is not None and not state.crm.iterate():
                    self._crm_exited(name)
                now_s += 1
            if state.lrm is not None and not skip_lrm:
                cluster.time_s = now_s
                cluster.check_watchdogs()
                if state.lrm is not None and not state.lrm.iterate():
                    self._lrm_exited(name)
                now_s += 1
            cluster.time_s = now_s
            cluster.check_watchdogs()
            cluster.check_safety()
        self.skip = {kind: max(0, count - 1) for kind, count in self.skip.items()}
        cluster.time_s = start_s + self.round_s

    def run(self) -> RunResult:
        round_s = self.round_s
        steps = list(self.scenario.commands)
        next_step_s = round_s
        last_step_s = 0
        time_s = 0
        error = None
        try:
            while True:
                if time_s > MAX_SIM_TIME_S:
                    raise ScenarioError(f"simulation did not end before {MAX_SIM_TIME_S} s")
                if time_s >= next_step_s:
                    if steps:
                        self.cluster.time_s = time_s
                        delay_s = None
                        for line in steps.pop(0):
                            result = self.execute(line)
                            delay_s = result if result is not None else delay_s
                        last_step_s = time_s
                        wait_s = max(round_s, delay_s or 0)
                        boundary_s = -(-(time_s + wait_s) // round_s) * round_s
                        next_step_s = boundary_s + (ROUNDS_PER_STEP - 1) * round_s
                    elif time_s > last_step_s + END_AFTER_ROUNDS * round_s:
                        break
                    else:
                        next_step_s = time_s + ROUNDS_PER_STEP * round_s
                self._round(time_s)
                time_s += round_s
        except SafetyViolation as violation:
            error = str(violation)
        return RunResult(self.cluster.log_lines, self.cluster.events, error, self.status_text())

    def status_text(self) -> str:
        """`ha status` as the first powered, quorate node would print it at the end."""
        cluster = self.cluster
        viewer = next((n for n in sorted(cluster.nodes) if cluster.quorate(n)), None)
        env = SimEnv(cluster, viewer or sorted(cluster.nodes)[0], "status")
        return format_status(cluster.manager_status,
                             {n: cluster.lrm_status.get(n) for n in sorted(cluster.nodes)},
                             env.read_resources(), viewer is not None, cluster.time_s,
                             str(cluster.datacenter.crs_mode))


def run_scenario(directory: str | pathlib.Path) -> RunResult:
    return Simulation(load_scenario(directory)).run()
