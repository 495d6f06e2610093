"""ha/manager_status and nodes/<node>/lrm_status: JSON text <-> validated dicts.

Readers check every field the logic relies on and raise ConfigError naming the file and the
JSON path of the bad value, so a corrupted or hand-edited status file is reported precisely
instead of crashing a daemon later. Writers emit sorted, compact JSON.
"""

from __future__ import annotations

import json
from typing import Any

from corral.errors import ConfigError
from corral.ha.logic.config import MAX_CONFIG_BYTES, SID_RE
from corral.ha.logic.types import ExitCode, LrmMode, LrmState, NodeState, ServiceState

MANAGER_STATUS = "ha/manager_status"
SERVICE_KEYS = {"state", "node", "uid", "target", "running", "failed_nodes", "maintenance_node",
                "timeout", "cmd", "reason"}


def _load(text: str, filename: str) -> dict[str, Any]:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(filename, f"larger than {MAX_CONFIG_BYTES} bytes")
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(filename, f"invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(filename, "top level must be a JSON object")
    return data


def _expect(condition: bool, filename: str, path: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{filename}: {path}", message)


def _check_service(sid: str, entry: Any, filename: str) -> None:
    path = f"service_status.{sid}"
    _expect(bool(SID_RE.match(sid)), filename, path, "invalid service id")
    _expect(isinstance(entry, dict), filename, path, "must be an object")
    unknown = set(entry) - SERVICE_KEYS
    _expect(not unknown, filename, path, f"unknown keys {sorted(unknown)}")
    states = {s.value for s in ServiceState}
    _expect(entry.get("state") in states, filename, f"{path}.state",
            f"invalid state {entry.get('state')!r}")
    for key in ("node", "uid", "target", "maintenance_node"):
        if key in entry:
            _expect(isinstance(entry[key], str), filename, f"{path}.{key}", "must be a string")
    _expect(isinstance(entry.get("node"), str), filename, f"{path}.node", "missing node")
    if "failed_nodes" in entry:
        _expect(isinstance(entry["failed_nodes"], list)
                and all(isinstance(n, str) for n in entry["failed_nodes"]),
                filename, f"{path}.failed_nodes", "must be a list of node names")
    if "cmd" in entry:
        _expect(isinstance(entry["cmd"], list) and len(entry["cmd"]) == 2
                and entry["cmd"][0] in ("migrate", "relocate", "stop"),
                filename, f"{path}.cmd", "must be [migrate|relocate|stop, argument]")


def parse_manager_status(text: str, filename: str = MANAGER_STATUS) -> dict[str, Any]:
    data = _load(text, filename)
    node_states = {s.value for s in NodeState}
    nodes = data.get("node_status", {})
    _expect(isinstance(nodes, dict), filename, "node_status", "must be an object")
    for node, state in nodes.items():
        _expect(state in node_states, filename, f"node_status.{node}", f"invalid state {state!r}")
    services = data.get("service_status", {})
    _expect(isinstance(services, dict), filename, "service_status", "must be an object")
    for sid, entry in services.items():
        _check_service(sid, entry, filename)
    requests = data.get("node_request", {})
    _expect(isinstance(requests, dict) and all(isinstance(v, dict) for v in requests.values()),
            filename, "node_request", "must map node names to objects")
    disarm = data.get("disarm")
    if disarm is not None:
        _expect(isinstance(disarm, dict) and disarm.get("mode") in ("freeze", "ignore")
                and disarm.get("state") in ("disarming", "disarmed"), filename, "disarm",
                "must be {mode: freeze|ignore, state: disarming|disarmed}")
    if "timestamp" in data:
        _expect(isinstance(data["timestamp"], int), filename, "timestamp", "must be an integer")
    return data


def parse_lrm_status(text: str, node: str) -> dict[str, Any]:
    filename = f"nodes/{node}/lrm_status"
    data = _load(text, filename)
    if not data:
        return data
    _expect(data.get("state") in {s.value for s in LrmState}, filename, "state",
            f"invalid state {data.get('state')!r}")
    _expect(data.get("mode") in {m.value for m in LrmMode}, filename, "mode",
            f"invalid mode {data.get('mode')!r}")
    results = data.get("results", {})
    _expect(isinstance(results, dict), filename, "results", "must be an object")
    codes = {c.value for c in ExitCode}
    for uid, result in results.items():
        _expect(isinstance(result, dict) and isinstance(result.get("sid"), str)
                and result.get("exit_code") in codes, filename, f"results.{uid}",
                "must be {sid, state, exit_code} with a known exit code")
    return data


def format_status_file(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
