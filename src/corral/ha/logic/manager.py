"""The master's manager round: node states, service state machine, fencing, CRM commands.

One Manager exists per master term: it copies node_status, service_status, node_request and
disarm from manager_status; last-seen times and the compiled rules are per term. Every service
state change gets a new uid, is logged as "service 'SID': state changed from 'A' to 'B'" and
emitted as a structured event; every decision that leaves a service in place records why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.errors import ConfigError, InvariantError
from corral.ha.logic.config import AutoRebalance, ResourceConfig, parse_crm_command
from corral.ha.logic.env import HaEnvironment
from corral.ha.logic.placement import Placement, ServiceStats, UsageModel, select_service_node
from corral.ha.logic.rebalance import choose_move, imbalance, node_loads
from corral.ha.logic.rules import CompiledRules, compile_rules, rules_from_groups
from corral.ha.logic.settings import HaTimings
from corral.ha.logic.types import (
    CrsMode,
    ExitCode,
    LrmMode,
    NodeState,
    Preference,
    RequestedState,
    ServiceState,
)

GONE_NODE_DELETE_NS = 3600 * 1_000_000_000
MAX_FIXPOINT_PASSES = 32
MAX_COMMANDS_PER_ROUND = 1000
KEPT_ON_CHANGE = ("node", "failed_nodes", "maintenance_node")
BUSY_FOR_DISARM = frozenset({ServiceState.FENCE, ServiceState.RECOVERY, ServiceState.MIGRATE,
                             ServiceState.RELOCATE})
MOTION_STATES = frozenset({ServiceState.MIGRATE, ServiceState.RELOCATE,
                           ServiceState.REQUEST_START_BALANCE})


class Manager:
    def __init__(self, env: HaEnvironment, timings: HaTimings, status: dict[str, Any]) -> None:
        self.env = env
        self.timings = timings
        self.node_status: dict[str, str] = dict(status.get("node_status") or {})
        self.service_status: dict[str, dict[str, Any]] = {
            sid: dict(entry) for sid, entry in (status.get("service_status") or {}).items()}
        self.node_request: dict[str, dict[str, Any]] = dict(status.get("node_request") or {})
        self.disarm: dict[str, str] | None = status.get("disarm")
        self.last_seen_ns: dict[str, int] = {}
        self.seen_online: set[str] = set()
        self.lock_probed_ns: dict[str, int] = {}
        self.crs_mode = CrsMode.BASIC
        self.crs_seen = False
        self.rebalance_on_start = False
        self.auto_rebalance = AutoRebalance()
        self.imbalance_rounds = 0
        self.rules_key: str | None = None
        self.compiled = CompiledRules()
        self.dropped_rules_of: dict[str, list[str]] = {}
        self.lrm_modes: dict[str, str] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.resources: dict[str, ResourceConfig] = {}
        self.reasons: dict[str, str] = {}
        self.changes = 0
        self.now_ns = 0

    # --- helpers -------------------------------------------------------------------------

    def log(self, level: str, message: str) -> None:
        self.env.log(level, message)

    def online_nodes(self) -> list[str]:
        return sorted(n for n, s in self.node_status.items() if s == NodeState.ONLINE)

    def _set_node_state(self, node: str, new: str) -> None:
        old = self.node_status.get(node, NodeState.UNKNOWN)
        self.node_status[node] = new
        if old != new:
            self.log("info", f"node '{node}': state changed from '{old}' => '{new}'")
            self.env.emit({"type": "node", "node": node, "from": str(old), "to": str(new)})

    def offline_delayed(self, node: str) -> bool:
        if self.node_status.get(node) == NodeState.ONLINE:
            return False
        last_seen = self.last_seen_ns.setdefault(node, self.now_ns)
        if self.now_ns - last_seen >= self.timings.fence_delay_ns:
            return True
        if not self._fenced_before_term(node):
            return False
        # Count as seen offline for a whole fence delay: later checks need no lock attempt.
        self.last_seen_ns[node] = self.now_ns - self.timings.fence_delay_ns
        return True

    def _fenced_before_term(self, node: str) -> bool:
        """Whether a node this master never saw online is already fenced (its agent lock can
        be taken). The lock is taken at most once per round and node; the fence pass then
        keeps it. Why this is safe: HaTimings' module docstring and docs/ha.md."""
        if (not self.timings.fence_delay_from_lock or node in self.seen_online
                or self.node_status.get(node) == NodeState.MAINTENANCE
                or self.lock_probed_ns.get(node) == self.now_ns):
            return False
        self.lock_probed_ns[node] = self.now_ns
        if not self.env.get_agent_lock(node):
            return False
        self.log("info", f"node '{node}': agent lock taken, it was not renewed for the lock "
                         "timeout - counting the fence delay as elapsed")
        return True

    def change(self, sid: str, new_state: ServiceState, **fields: Any) -> None:
        entry = self.service_status[sid]
        old_state = entry["state"]
        if "cmd" in entry:
            command = " ".join(str(part) for part in entry["cmd"])
            self.log("warn", f"service '{sid}': dropping pending crm command '{command}', the "
                             f"service changed from '{old_state}' to '{new_state}' first")
        fresh = {key: entry[key] for key in KEPT_ON_CHANGE if key in entry}
        fresh.update({k: v for k, v in fields.items() if v is not None})
        fresh["state"] = str(new_state)
        fresh["uid"] = self.env.new_uid()
        self.service_status[sid] = fresh
        self.changes += 1
        shown = [f"{k} = {v}" for k, v in sorted(fields.items()) if v is not None]
        params = f"  ({', '.join(shown)})" if shown else ""
        self.log("info", f"service '{sid}': state changed from '{old_state}' to '{new_state}'"
                         f"{params}")
        self.env.emit({"type": "service", "service": sid, "from": old_state,
                       "to": str(new_state), "node": fresh.get("node"),
                       "target": fresh.get("target")})

    def requested(self, sid: str) -> RequestedState:
        resource = self.resources.get(sid)
        return resource.state if resource else RequestedState.DISABLED

    def requested_running_state(self, sid: str) -> ServiceState:
        """The 'req' state: started if requested started, else request_stop."""
        if self.requested(sid) == RequestedState.STARTED:
            return ServiceState.STARTED
        return ServiceState.REQUEST_STOP

    def result_for(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        return self.results.get(entry.get("uid", ""))

    def note_reason(self, sid: str, reason: str) -> None:
        """Record (and log once per change) why a service stays where it is."""
        for rule_id in self.dropped_rules_of.get(sid, []):
            reason += f"; rule '{rule_id}' was dropped"
        self.service_status[sid]["reason"] = reason
        if self.reasons.get(sid) != reason:
            self.reasons[sid] = reason
            self.log("info", f"service '{sid}' stays on node "
                             f"'{self.service_status[sid].get('node')}': {reason}")

    def note_missing_guest(self, sid: str) -> None:
        """A configured resource whose guest config exists on no node cannot be managed."""
        reason = "guest configuration not found on any node, not managed"
        if self.reasons.get(sid) != reason:
            self.reasons[sid] = reason
            self.log("warn", f"service '{sid}': {reason}")

    def clear_reason(self, sid: str) -> None:
        self.reasons.pop(sid, None)
        self.service_status.get(sid, {}).pop("reason", None)

    def usage(self, skip: str | None = None) -> UsageModel:
        online = self.online_nodes()
        capacities = {n: self.env.node_capacity(n) for n in online}
        stats = {sid: self.env.service_stats(sid) for sid in self.service_status}
        measured: dict[str, ServiceStats] = {}
        if self.crs_mode == CrsMode.DYNAMIC:
            for sid in self.service_status:
                usage = self.env.service_measured_usage(sid)
                if usage is not None:
                    measured[sid] = usage
        model = UsageModel(self.crs_mode, online, capacities, stats, measured)
        model.add_services(self.service_status, skip=skip)
        return model

    def select(self, sid: str, preference: Preference) -> Placement:
        resource = self.resources.get(sid)
        failback = resource.failback if resource else True
        return select_service_node(sid, preference, self.service_status[sid], failback,
                                   self.compiled, self.service_status, self.usage(skip=sid))

    # --- the round -----------------------------------------------------------------------

    def round(self) -> None:
        """One manager round (anchors section 5)."""
        self.now_ns = self.env.now_ns()
        members = self.env.node_info()
        self._read_lrm_statuses(sorted(set(members) | set(self.node_status)))
        self._update_nodes(members)
        me = self.env.nodename()
        if self.node_status.get(me) not in (NodeState.ONLINE, NodeState.MAINTENANCE):
            self.log("info", "master seems offline")
            return
        self._read_datacenter()
        self.resources = self.env.read_resources()
        if not self.disarm:
            self._sync_services()
        self._compile_rules()
        self._process_commands()
        if self.disarm:
            self._disarm_round()
        else:
            self._auto_rebalance_step()
            self._fixpoint(sorted(self.service_status))
        self.write_status()

    def status_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "master_node": self.env.nodename(),
            "timestamp": self.now_ns // 1_000_000_000,
            "node_status": dict(sorted(self.node_status.items())),
            "service_status": {sid: self.service_status[sid]
                               for sid in sorted(self.service_status)},
        }
        if self.node_request:
            document["node_request"] = self.node_request
        if self.disarm:
            document["disarm"] = dict(self.disarm)
        return document

    def write_status(self) -> None:
        self.env.write_manager_status(self.status_document())

    def _read_lrm_statuses(self, nodes: list[str]) -> None:
        self.results = {}
        self.lrm_modes = {}
        for node in nodes:
            status = self.env.read_lrm_status(node)
            if status is None:
                self.lrm_modes[node] = "unknown"
                continue
            self.lrm_modes[node] = status.get("mode", LrmMode.ACTIVE)
            for uid, result in (status.get("results") or {}).items():
                self.results[uid] = result

    def _update_nodes(self, members: dict[str, bool]) -> None:
        for node, online in sorted(members.items()):
            state = self.node_status.get(node)
            mode = self.lrm_modes.get(node, LrmMode.ACTIVE)
            if online:
                self.last_seen_ns[node] = self.now_ns
                self.seen_online.add(node)
                if state in (None, NodeState.UNKNOWN, NodeState.GONE):
                    self._set_node_state(node, NodeState.ONLINE)
                elif state == NodeState.ONLINE and mode == LrmMode.MAINTENANCE:
                    self._set_node_state(node, NodeState.MAINTENANCE)
                elif state == NodeState.MAINTENANCE and mode != LrmMode.MAINTENANCE:
                    self._set_node_state(node, NodeState.ONLINE)
            elif state is None:
                self.node_status[node] = NodeState.UNKNOWN
            elif state == NodeState.ONLINE:
                self._set_node_state(node, NodeState.UNKNOWN)
            elif state == NodeState.MAINTENANCE and mode != LrmMode.MAINTENANCE:
                self._set_node_state(node, NodeState.UNKNOWN)
        for node in sorted(set(self.node_status) - set(members)):
            state = self.node_status[node]
            if state == NodeState.UNKNOWN:
                self._set_node_state(node, NodeState.GONE)
                self.last_seen_ns[node] = self.now_ns
            elif state == NodeState.GONE:
                gone_since = self.last_seen_ns.setdefault(node, self.now_ns)
                if self.now_ns - gone_since >= GONE_NODE_DELETE_NS:
                    self.log("info", f"deleting gone node '{node}', not a cluster member anymore.")
                    del self.node_status[node]

    def _read_datacenter(self) -> None:
        try:
            datacenter = self.env.read_datacenter()
        except ConfigError as error:
            self.log("warn", f"datacenter.cfg: {error}; keeping previous settings")
            return
        mode = datacenter.crs_mode
        if mode != self.crs_mode:
            if self.crs_mode == CrsMode.BASIC and not self.crs_seen:
                self.log("info", f"using scheduler mode '{mode}'")
            else:
                self.log("info", f"switching scheduler mode from '{self.crs_mode}' to '{mode}'")
            self.crs_mode = mode
        self.crs_seen = True
        self.rebalance_on_start = datacenter.rebalance_on_start
        self.auto_rebalance = datacenter.rebalance

    def _sync_services(self) -> None:
        for sid in sorted(self.resources):
            resource = self.resources[sid]
            if sid in self.service_status or resource.state == RequestedState.IGNORED:
                continue
            if resource.node is None:
                self.note_missing_guest(sid)
                continue
            state = (ServiceState.REQUEST_START if resource.state == RequestedState.STARTED
                     else ServiceState.REQUEST_STOP)
            self.service_status[sid] = {"state": str(state), "node": resource.node,
                                        "uid": self.env.new_uid()}
            self.log("info", f"adding new service '{sid}' on node '{resource.node}'")
            self.env.emit({"type": "service", "service": sid, "from": None, "to": str(state),
                           "node": resource.node, "target": None})
        for sid in sorted(self.service_status):
            configured = self.resources.get(sid)
            if configured is None or configured.state == RequestedState.IGNORED:
                why = "no config" if configured is None else "ignored state requested"
                self.log("info", f"removing stale service '{sid}' ({why})")
                self.env.emit({"type": "service", "service": sid,
                               "from": self.service_status[sid]["state"], "to": None,
                               "node": self.service_status[sid].get("node"), "target": None})
                del self.service_status[sid]
                self.clear_reason(sid)

    def _compile_rules(self) -> None:
        rules = self.env.read_rules()
        groups = self.env.read_groups()
        rules = rules + rules_from_groups(groups, self.resources)
        for resource in self.resources.values():
            if resource.group in groups and groups[resource.group].nofailback:
                resource.failback = False
        nodes = sorted(self.node_status)
        key = repr((rules, nodes, sorted(self.resources)))
        if key == self.rules_key:
            return
        self.rules_key = key
        self.compiled = compile_rules(rules, nodes)
        self.dropped_rules_of = {}
        by_id = {rule.ident: rule for rule in rules}
        for rule_id, reason in self.compiled.dropped:
            self.log("warn", f"Drop rule '{rule_id}', because {reason}.")
            for sid in by_id[rule_id].resources:
                self.dropped_rules_of.setdefault(sid, []).append(rule_id)

    # --- automatic rebalancing -----------------------------------------------------------

    def _auto_rebalance_step(self) -> None:
        """At most one motion per round, only when imbalance stayed high for hold rounds."""
        settings = self.auto_rebalance
        if not settings.enabled or self.crs_mode == CrsMode.BASIC:
            self.imbalance_rounds = 0
            return
        if any(e["state"] in MOTION_STATES or e.get("cmd") for e in self.service_status.values()):
            return
        usage = self.usage()
        before = imbalance(node_loads(usage).values())
        if before <= settings.threshold:
            self.imbalance_rounds = 0
            return
        self.imbalance_rounds += 1
        if self.imbalance_rounds < settings.hold_rounds:
            return
        self.imbalance_rounds = 0
        move = choose_move(usage, self.service_status, self.compiled, settings.method)
        if move is None or (before - move.after) / before < settings.margin:
            return
        verb = "migrate" if move.leader.startswith("vm:") else "relocate"
        self.log("info", f"auto rebalance - {verb} {move.leader} to {move.target} (expected "
                         f"change for imbalance from {before:.2f} to {move.after:.2f})")
        self._queue_motion(f"{verb} {move.leader} {move.target}", verb, move.leader,
                           move.target)

    # --- state machine -------------------------------------------------------------------

    def _handlers(self) -> dict[str, Callable[[str], None]]:
        return {
            ServiceState.STOPPED: self._on_stopped,
            ServiceState.REQUEST_START: self._on_request_start,
            ServiceState.STARTED: self._on_started,
            ServiceState.REQUEST_STOP: self._on_request_stop,
            ServiceState.MIGRATE: self._on_motion,
            ServiceState.RELOCATE: self._on_motion,
            ServiceState.REQUEST_START_BALANCE: self._on_motion,
            ServiceState.FENCE: lambda sid: None,
            ServiceState.RECOVERY: self._on_recovery,
            ServiceState.FREEZE: self._on_freeze,
            ServiceState.ERROR: self._on_error,
        }

    def _fixpoint(self, sids: list[str]) -> None:
        handlers = self._handlers()
        for _ in range(MAX_FIXPOINT_PASSES):
            changes_before = self.changes
            for sid in sids:
                if sid not in self.service_status:
                    continue
                state = self.service_status[sid]["state"]
                if state not in handlers:
                    raise InvariantError(f"service '{sid}' in unknown state {state!r}")
                handlers[state](sid)
                self._maybe_freeze(sid)
            self._fence_pass()
            if self.changes == changes_before:
                return
        self.log("err", "state machine did not settle within one round")

    def _maybe_freeze(self, sid: str) -> None:
        entry = self.service_status[sid]
        if (self.lrm_modes.get(entry.get("node", "")) == LrmMode.RESTART
                and entry["state"] in (ServiceState.STARTED, ServiceState.STOPPED,
                                       ServiceState.REQUEST_STOP)):
            self.change(sid, ServiceState.FREEZE)

    def _fence_pass(self) -> None:
        outcome: dict[str, bool] = {}
        for sid in sorted(self.service_status):
            entry = self.service_status[sid]
            if entry["state"] != ServiceState.FENCE:
                continue
            node = entry["node"]
            if node not in outcome:
                outcome[node] = self.fence_node(node)
            if outcome[node]:
                self.change(sid, ServiceState.RECOVERY)
        carrying = {e["node"] for e in self.service_status.values()
                    if e["state"] == ServiceState.FENCE}
        for node, state in sorted(self.node_status.items()):
            if state == NodeState.FENCE and node not in carrying and node not in outcome:
                self.log("warn", f"node '{node}' in fence state but no services to-fence! "
                                 "admin interference?!")
                self.fence_node(node)

    def fence_node(self, node: str) -> bool:
        if self.node_status.get(node) != NodeState.FENCE:
            self._set_node_state(node, NodeState.FENCE)
            self.log("email", f"FENCE: Try to fence node '{node}'")
        if not self.env.get_agent_lock(node):
            return False
        self.log("info", f"fencing: acknowledged - got agent lock for node '{node}'")
        self.env.emit({"type": "fence_ack", "node": node})
        self._set_node_state(node, NodeState.UNKNOWN)
        self.log("email", f"SUCCEED: fencing: acknowledged - got agent lock for node '{node}'")
        return True

    def _on_stopped(self, sid: str) -> None:
        entry = self.service_status[sid]
        config_node = self.resources[sid].node if sid in self.resources else None
        if config_node and entry.get("node") != config_node:
            self.log("info", f"fixup service '{sid}' location ({entry.get('node')} => {config_node})")
            entry["node"] = config_node
        node = entry["node"]
        command = entry.pop("cmd", None)
        if command and command[0] in ("migrate", "relocate"):
            target = command[1]
            if target != node and self.node_status.get(target) == NodeState.ONLINE:
                self.change(sid, ServiceState(command[0]), node=node, target=target)
                return
            self.log("info", f"ignore crm command '{command[0]} {sid} {target}': target is "
                             "the current node or not online")
        elif command and command[0] == "stop":
            self.log("info", f"ignore crm command 'stop {sid}': service already stopped")
        requested = self.requested(sid)
        if requested == RequestedState.DISABLED:
            return
        if self.offline_delayed(node) and self.node_status.get(node) != NodeState.MAINTENANCE:
            self.change(sid, ServiceState.FENCE)
            return
        if requested == RequestedState.STARTED:
            self.change(sid, ServiceState.REQUEST_START, node=node)

    def _on_request_start(self, sid: str) -> None:
        node = self.service_status[sid]["node"]
        if self.rebalance_on_start:
            placement = self.select(sid, Preference.BEST_SCORE)
            if placement.node is not None:
                which = "current" if placement.node == node else "new"
                self.log("info", f"service {sid}: re-balance selected {which} node "
                                 f"{placement.node} for startup")
                if placement.node != node:
                    self.change(sid, ServiceState.REQUEST_START_BALANCE, node=node,
                                target=placement.node)
                    return
        self.change(sid, ServiceState.STARTED, node=node)

    def _on_started(self, sid: str) -> None:
        entry = self.service_status[sid]
        node = entry["node"]
        node_state = self.node_status.get(node)
        if node_state != NodeState.ONLINE:
            if self.offline_delayed(node):
                self.change(sid, ServiceState.FENCE)
                return
            if node_state != NodeState.MAINTENANCE:
                self.note_reason(sid, f"node '{node}' is not online ({node_state}), waiting "
                                      "for it to return or for the fence delay")
                return
            entry["maintenance_node"] = node
        if self.requested(sid) in (RequestedState.DISABLED, RequestedState.STOPPED):
            self.change(sid, ServiceState.REQUEST_STOP)
            return
        if self._started_command(sid):
            return
        self._started_placement(sid)

    def _started_command(self, sid: str) -> bool:
        entry = self.service_status[sid]
        command = entry.pop("cmd", None)
        if not command:
            return False
        node = entry["node"]
        if command[0] in ("migrate", "relocate"):
            target = command[1]
            if target == node or self.node_status.get(target) != NodeState.ONLINE:
                self.log("info", f"ignore crm command '{command[0]} {sid} {target}': target is "
                                 "the current node or not online")
                return False
            self.log("info", f"{command[0]} service '{sid}' to node '{target}'")
            self.change(sid, ServiceState(command[0]), node=node, target=target)
            return True
        if command[0] == "stop":
            timeout = int(command[1])
            kind = "hard" if timeout == 0 else "graceful"
            self.log("info", f"{kind} stop of service '{sid}' (timeout {timeout} s)")
            self.change(sid, ServiceState.REQUEST_STOP, timeout=timeout)
            self.env.set_resource_state(sid, RequestedState.STOPPED)
            self.resources[sid].state = RequestedState.STOPPED
            return True
        return False

    def _consume_start_result(self, sid: str, result: dict[str, Any]) -> bool | None:
        """Apply an LRM result in `started`; True = try next node, None = went to error."""
        entry = self.service_status[sid]
        node = entry["node"]
        code = result.get("exit_code")
        if code == ExitCode.SUCCESS:
            if entry.get("failed_nodes"):
                self.log("info", f"relocation policy successful for '{sid}' on node '{node}',"
                                 f" failed nodes: {', '.join(entry['failed_nodes'])}")
            entry.pop("failed_nodes", None)
            entry["running"] = 1
            return False
        entry.pop("running", None)
        failed = entry.setdefault("failed_nodes", [])
        failed.append(node)
        resource = self.resources.get(sid)
        max_relocate = resource.max_relocate if resource else 1
        if code in (ExitCode.ERROR, ExitCode.EWRONG_NODE):
            if len(failed) <= max_relocate:
                self.log("warn", f"starting service {sid} on node '{node}' failed, "
                                 "relocating service.")
                return True
            self.log("err", f"recovery policy for service {sid} failed, entering error state."
                            f" Failed nodes: {', '.join(failed)}")
        else:
            self.log("err", f"service '{sid}' got unrecoverable error (exit code {code})")
        self.change(sid, ServiceState.ERROR)
        return None

    def _started_placement(self, sid: str) -> None:
        entry = self.service_status[sid]
        node = entry["node"]
        result = self.result_for(entry)
        try_next = False
        if result is not None:
            outcome = self._consume_start_result(sid, result)
            if outcome is None:
                return
            try_next = outcome
        preference = Preference.TRY_NEXT if try_next else Preference.NONE
        placement = self.select(sid, preference)
        if placement.node is not None and placement.node != node:
            self._move_started(sid, placement.node)
            return
        if try_next:
            self.log("warn", f"Start Error Recovery: Tried all available nodes for service "
                             f"'{sid}', retry start on current node. Tried nodes: "
                             f"{', '.join(entry.get('failed_nodes', []))}")
        if entry.get("maintenance_node") == node and self.node_status.get(node) == NodeState.ONLINE:
            self.log("info", f"service '{sid}': clearing stale maintenance node '{node}' setting"
                             " (is current node)")
            entry.pop("maintenance_node")
        if placement.node is None:
            self.note_reason(sid, placement.reason or "no node found")
        elif self.dropped_rules_of.get(sid):
            self.note_reason(sid, "placed without the rules that were dropped")
        else:
            self.clear_reason(sid)
        if result is not None:
            entry["uid"] = self.env.new_uid()

    def _move_started(self, sid: str, target: str) -> None:
        entry = self.service_status[sid]
        node = entry["node"]
        fallback = entry.get("maintenance_node")
        if fallback is not None:
            if target == fallback:
                self.log("info", f"moving service '{sid}' back to '{target}', node came back "
                                 "from maintenance.")
                entry.pop("maintenance_node")
            elif node != fallback:
                self.log("info", f"dropping maintenance fallback node '{fallback}' for '{sid}'")
                entry.pop("maintenance_node")
        self.clear_reason(sid)
        if sid.startswith("vm:"):
            self.log("info", f"migrate service '{sid}' to node '{target}' (running)")
            self.change(sid, ServiceState.MIGRATE, node=node, target=target)
        else:
            self.log("info", f"relocate service '{sid}' to node '{target}'")
            self.change(sid, ServiceState.RELOCATE, node=node, target=target)

    def _on_request_stop(self, sid: str) -> None:
        entry = self.service_status[sid]
        result = self.result_for(entry)
        if result is not None:
            if result.get("exit_code") == ExitCode.SUCCESS:
                self.change(sid, ServiceState.STOPPED)
            else:
                self.log("err", f"service '{sid}' stop failed (exit code {result.get('exit_code')})")
                self.change(sid, ServiceState.ERROR)
            return
        if self.offline_delayed(entry["node"]):
            self.change(sid, ServiceState.FENCE)

    def _on_motion(self, sid: str) -> None:
        entry = self.service_status[sid]
        result = self.result_for(entry)
        node, target = entry["node"], entry.get("target")
        if result is not None:
            code = result.get("exit_code")
            after = self.requested_running_state(sid)
            if code == ExitCode.SUCCESS:
                self.change(sid, after, node=target)
            elif code == ExitCode.EWRONG_NODE:
                self.log("err", f"service '{sid}' - migration failed: service registered on "
                                "wrong node!")
                self.change(sid, ServiceState.ERROR)
            elif code == ExitCode.IGNORED:
                self.change(sid, after, node=node)
            else:
                self.log("err", f"service '{sid}' - migration failed (exit code {code})")
                self.change(sid, after, node=node)
            return
        if self.offline_delayed(node):
            self.change(sid, ServiceState.FENCE)

    def _on_recovery(self, sid: str) -> None:
        entry = self.service_status[sid]
        fenced = entry["node"]
        placement = self.select(sid, Preference.BEST_SCORE)
        requested = self.requested(sid)
        if placement.node is None:
            if requested == RequestedState.DISABLED:
                self.change(sid, ServiceState.STOPPED)
                return
            self.log("err", f"recovering service '{sid}' from fenced node '{fenced}' failed, "
                            "no recovery node found")
            self.note_reason(sid, placement.reason or "no recovery node found")
            return
        new_node = placement.node
        if new_node == fenced:
            self.log("info", f"recover service '{sid}' to previous failed and fenced node "
                             f"'{fenced}' again")
        else:
            self.log("info", f"recover service '{sid}' from fenced node '{fenced}' to node "
                             f"'{new_node}'")
        for lock in self.env.remove_safe_locks(sid):
            self.log("info", f"service '{sid}': removed leftover lock '{lock}' from recovered "
                             "service")
        self.env.steal_service(sid, fenced, new_node)
        if sid in self.resources:
            self.resources[sid].node = new_node
        self.clear_reason(sid)
        if requested == RequestedState.STARTED:
            self.change(sid, ServiceState.STARTED, node=new_node)
        elif requested == RequestedState.STOPPED:
            self.change(sid, ServiceState.REQUEST_STOP, node=new_node)
        else:
            self.change(sid, ServiceState.STOPPED, node=new_node)

    def _on_freeze(self, sid: str) -> None:
        entry = self.service_status[sid]
        if self.lrm_modes.get(entry["node"], LrmMode.ACTIVE) == LrmMode.ACTIVE:
            self.change(sid, self.requested_running_state(sid))

    def _on_error(self, sid: str) -> None:
        if self.requested(sid) == RequestedState.DISABLED:
            self.service_status[sid].pop("failed_nodes", None)
            self.change(sid, ServiceState.STOPPED)
        else:
            self.note_reason(sid, "in error state, set the requested state to 'disabled' to "
                                  "recover")

    # --- crm commands --------------------------------------------------------------------

    def _process_commands(self) -> None:
        lines = self.env.read_crm_commands()
        if len(lines) > MAX_COMMANDS_PER_ROUND:
            self.log("err", f"{len(lines)} crm commands queued, dropping all but the first "
                            f"{MAX_COMMANDS_PER_ROUND}")
            lines = lines[:MAX_COMMANDS_PER_ROUND]
        for line in lines:
            self.log("info", f"got crm command: {line}")
            try:
                command = parse_crm_command(line)
            except ConfigError as error:
                self.log("err", str(error))
                continue
            verb, args = command.verb, command.args
            if verb in ("migrate", "relocate"):
                self._queue_motion(line, verb, args[0], args[1])
            elif verb == "stop":
                if args[0] not in self.service_status:
                    self.log("err", f"crm command '{line}' error - no such service: {args[0]}")
                else:
                    self.service_status[args[0]]["cmd"] = ["stop", int(args[1])]
            elif verb == "enable-node-maintenance":
                self._enable_maintenance(args[0])
            elif verb == "disable-node-maintenance":
                if self.node_request.pop(args[0], None) is None:
                    self.log("warn", f"crm command '{line}' - node '{args[0]}' is not in "
                                     "maintenance mode")
            elif verb == "disarm-ha":
                if self.disarm is None:
                    self.disarm = {"mode": args[0], "state": "disarming"}
                    self.log("info", f"disarming HA stack, resource mode '{args[0]}'")
            elif verb == "arm-ha":
                self._arm()

    def _queue_motion(self, line: str, verb: str, sid: str, target: str) -> None:
        entry = self.service_status.get(sid)
        if entry is None:
            self.log("err", f"crm command '{line}' error - no such service: {sid}")
            return
        if self.node_status.get(target) != NodeState.ONLINE:
            self.log("err", f"crm command '{line}' error - node not online: {target}")
            return
        if entry.get("node") == target and entry["state"] not in MOTION_STATES:
            self.log("info", f"ignore crm command - service already on target node: {line}")
            return
        for peer in sorted(self.compiled.negative.get(sid, set())):
            peer_entry = self.service_status.get(peer, {})
            if target in (peer_entry.get("node"), peer_entry.get("target")) and \
                    peer_entry.get("state") not in (ServiceState.STOPPED, ServiceState.REQUEST_START):
                self.log("err", f"crm command '{line}' error - service '{peer}' on node "
                                f"'{target}' is in negative affinity with service '{sid}'")
                return
        entry["cmd"] = [verb, target]
        for peer in sorted(self.compiled.positive.get(sid, set())):
            peer_status = self.service_status.get(peer)
            if peer_status is None or target in (peer_status.get("node"), peer_status.get("target")):
                continue
            self.log("info", f"crm command '{line}' - {verb} service '{peer}' to node "
                             f"'{target}' (service '{peer}' in positive affinity with service "
                             f"'{sid}')")
            peer_status["cmd"] = [verb, target]

    def _enable_maintenance(self, node: str) -> None:
        if self.disarm is not None:
            self.log("warn", f"ignoring maintenance request for node '{node}': HA is disarmed")
        elif node in self.node_request:
            self.log("info", f"node '{node}' is already in maintenance mode")
        elif self.node_status.get(node) != NodeState.ONLINE:
            self.log("err", f"cannot enable maintenance mode for node '{node}': node is not "
                            "online")
        else:
            self.node_request[node] = {"maintenance": 1}

    # --- disarm / arm --------------------------------------------------------------------

    def _arm(self) -> None:
        if self.disarm is None:
            self.log("info", "HA stack is already armed")
            return
        if self.disarm.get("mode") == "ignore":
            for sid in sorted(self.service_status):
                config_node = self.resources[sid].node if sid in self.resources else None
                entry = self.service_status[sid]
                if config_node and entry.get("node") != config_node:
                    self.log("info", f"service '{sid}' was moved to node '{config_node}' "
                                     "while disarmed, adopting the new location")
                    entry["node"] = config_node
        self.log("info", "arming HA stack")
        self.disarm = None

    def _disarm_round(self) -> None:
        if self.disarm is None or self.disarm["state"] != "disarming":
            return
        busy = sorted(s for s, e in self.service_status.items() if e["state"] in BUSY_FOR_DISARM)
        if busy:
            self._fixpoint(busy)
            return
        for sid in sorted(self.service_status):
            entry = self.service_status[sid]
            if self.disarm["mode"] == "freeze":
                if entry["state"] in (ServiceState.STARTED, ServiceState.STOPPED,
                                      ServiceState.REQUEST_START, ServiceState.REQUEST_STOP):
                    self.change(sid, ServiceState.FREEZE)
            else:
                for key in ("running", "cmd", "reason"):
                    entry.pop(key, None)
        online = [n for n, s in self.node_status.items()
                  if s in (NodeState.ONLINE, NodeState.MAINTENANCE)]
        if all(self.lrm_modes.get(n) == LrmMode.DISARM for n in online):
            self.disarm["state"] = "disarmed"
            self.log("info", "HA stack disarmed: all online LRMs released their watchdogs")
