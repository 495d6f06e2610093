"""`ha-manager status` text from manager_status, lrm_status files and resources.cfg.

Layout (one `<type> <status>` line per entry) follows the reference so existing habits and
scripts keep working; Corral adds the stay reason of a service (why it did not move) after the
state when the master recorded one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from corral.ha.logic.config import ResourceConfig
from corral.ha.logic.types import INACTIVE_SERVICE_STATES, LrmMode, LrmState, RequestedState

STALE_AFTER_S = 30
DRIFT_TOLERANCE_S = 2


def _when(timestamp_s: int) -> str:
    return datetime.fromtimestamp(timestamp_s, tz=UTC).ctime()


def _freshness(timestamp_s: int | None, now_s: int) -> str | None:
    if timestamp_s is None or timestamp_s < now_s - STALE_AFTER_S:
        return "old timestamp - dead?"
    if timestamp_s > now_s + DRIFT_TOLERANCE_S:
        return "detected time drift!"
    return None


def master_line(status: Mapping[str, Any], resources: Mapping[str, ResourceConfig],
                quorate: bool, now_s: int, crs_mode: str) -> str | None:
    master = status.get("master_node")
    if not master:
        return None
    timestamp = status.get("timestamp")
    word = _freshness(timestamp, now_s) or "active"
    if word != "active" and quorate and not resources:
        word = "idle"
    disarm = status.get("disarm")
    if disarm:
        word += f" - {disarm.get('state')}, resource mode: {disarm.get('mode')}"
    if crs_mode != "basic":
        word += f" - {crs_mode} load CRS"
    return f"master {master} ({word}, {_when(int(timestamp or 0))})"


def fencing_line(status: Mapping[str, Any], master_active: bool) -> str:
    disarm = status.get("disarm")
    if disarm:
        watchdog = "released" if disarm.get("state") == "disarmed" else "active"
        return (f"fencing {disarm.get('state')}, resource mode: {disarm.get('mode')} "
                f"(CRM watchdog {watchdog})")
    return "fencing armed (CRM watchdog active)" if master_active else "fencing standby"


def _active_services(status: Mapping[str, Any], node: str) -> int:
    return sum(1 for e in (status.get("service_status") or {}).values()
               if node in (e.get("node"), e.get("target"))
               and e.get("state") not in INACTIVE_SERVICE_STATES)


def lrm_line(node: str, lrm: Mapping[str, Any] | None, status: Mapping[str, Any],
             now_s: int) -> str:
    if lrm is None:
        return f"lrm {node} (unable to read lrm status)"
    state = lrm.get("state", "")
    mode = lrm.get("mode", LrmMode.ACTIVE)
    stale = _freshness(lrm.get("timestamp"), now_s)
    if stale:
        word = stale
    elif mode != LrmMode.ACTIVE:
        word = f"{mode} mode"
    elif state == LrmState.WAIT_FOR_AGENT_LOCK and _active_services(status, node) == 0:
        word = "idle"
    else:
        word = str(state)
    if mode == LrmMode.DISARM:
        watchdog = "released"
    elif state in (LrmState.ACTIVE, LrmState.LOST_AGENT_LOCK) or (
            state == LrmState.MAINTENANCE and _active_services(status, node) > 0):
        watchdog = "active"
    else:
        watchdog = "standby"
    return f"lrm {node} ({word}, watchdog {watchdog}, {_when(int(lrm.get('timestamp') or 0))})"


def service_word(entry: Mapping[str, Any] | None, resource: ResourceConfig | None,
                 disarm: Mapping[str, Any] | None) -> str:
    """Verbose service state as the reference shows it."""
    if resource is not None and resource.state == RequestedState.IGNORED:
        return "ignored"
    if entry is None:
        return "queued"
    if resource is None:
        return "deleting"
    if disarm and disarm.get("mode") == "ignore":
        return "ignore"
    state = entry.get("state")
    requested = resource.state
    if state == "stopped":
        if requested == RequestedState.STARTED:
            return "starting"
        return "disabled" if requested == RequestedState.DISABLED else "stopped"
    if state == "started":
        if requested in (RequestedState.STOPPED, RequestedState.DISABLED):
            return "stopping"
        return "started" if entry.get("running") else "starting"
    if state == "error" and requested == RequestedState.DISABLED:
        return "clearing error flag"
    return str(state)


def format_status(status: Mapping[str, Any], lrm_statuses: Mapping[str, Mapping[str, Any] | None],
                  resources: Mapping[str, ResourceConfig], quorate: bool, now_s: int,
                  crs_mode: str = "basic", verbose: bool = False) -> str:
    """The whole `ha status` text; `lrm_statuses` has one entry (None if unreadable) per node."""
    lines = ["quorum OK" if quorate else "quorum No quorum on node"]
    master = master_line(status, resources, quorate, now_s, crs_mode)
    if master:
        lines.append(master)
    master_active = master is not None and "(active" in master
    lines.append(fencing_line(status, master_active))
    for node in sorted(lrm_statuses):
        lines.append(lrm_line(node, lrm_statuses[node], status, now_s))
    services = status.get("service_status") or {}
    for sid in sorted(set(services) | set(resources)):
        entry = services.get(sid)
        resource = resources.get(sid)
        word = service_word(entry, resource, status.get("disarm"))
        node = (entry or {}).get("node") or (resource.node if resource else None) or "?"
        line = f"service {sid} ({node}, {word})"
        reason = (entry or {}).get("reason")
        if reason:
            line += f" - {reason}"
        lines.append(line)
    if verbose:
        lines.append("full cluster state:")
        lines.append(json.dumps({"manager_status": status, "quorate": quorate,
                                 "lrm_status": dict(lrm_statuses)}, indent=4, sort_keys=True))
    return "\n".join(lines) + "\n"
