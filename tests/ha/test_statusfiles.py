"""manager_status / lrm_status JSON readers: valid documents round-trip, and each kind of
corruption is reported with the file name and the JSON path of the bad value.
"""

from __future__ import annotations

import json

import pytest

from corral.errors import ConfigError
from corral.ha.logic.statusfiles import format_status_file, parse_lrm_status, parse_manager_status

MANAGER = {
    "master_node": "node1", "timestamp": 700,
    "node_status": {"node1": "online", "node2": "maintenance", "node3": "fence"},
    "service_status": {
        "vm:103": {"state": "started", "node": "node2", "running": 1, "uid": "ohGl"},
        "ct:104": {"state": "migrate", "node": "node1", "target": "node2", "uid": "x",
                   "failed_nodes": ["node3"], "cmd": ["migrate", "node2"]},
    },
    "node_request": {"node2": {"maintenance": 1}},
    "disarm": {"mode": "freeze", "state": "disarming"},
}
LRM = {"state": "active", "mode": "active", "timestamp": 701,
       "results": {"QHSg": {"sid": "vm:101", "state": "started", "exit_code": 0}}}


def test_round_trip() -> None:
    assert parse_manager_status(format_status_file(MANAGER)) == MANAGER
    assert parse_lrm_status(format_status_file(LRM), "node1") == LRM


def test_empty_files_are_empty_documents() -> None:
    assert parse_manager_status("") == {}
    assert parse_lrm_status("{}", "node1") == {}


def _broken(path: list[str], value: object) -> str:
    data = json.loads(json.dumps(MANAGER))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(data)


@pytest.mark.parametrize("path, value, fragment", [
    (["node_status", "node1"], "sleeping", "node_status.node1: invalid state 'sleeping'"),
    (["service_status", "vm:103", "state"], "running", "service_status.vm:103.state"),
    (["service_status", "vm:103", "node"], 5, "service_status.vm:103.node"),
    (["service_status", "vm:103", "colour"], "red", "unknown keys"),
    (["service_status", "ct:104", "cmd"], ["teleport", "x"], "service_status.ct:104.cmd"),
    (["service_status", "ct:104", "failed_nodes"], "node3", "failed_nodes"),
    (["disarm"], {"mode": "panic", "state": "disarming"}, "disarm"),
    (["timestamp"], "noon", "timestamp"),
])
def test_manager_status_errors(path: list[str], value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_manager_status(_broken(path, value))
    assert fragment in str(info.value) and "ha/manager_status" in str(info.value)


@pytest.mark.parametrize("text, fragment", [
    ("[1, 2]", "top level must be a JSON object"),
    ("{\"state\": ", "invalid JSON"),
    ('{"state": "dancing", "mode": "active"}', "state"),
    ('{"state": "active", "mode": "holiday"}', "mode"),
    ('{"state": "active", "mode": "active", "results": {"u": {"sid": "vm:1", "exit_code": 42}}}',
     "results.u"),
])
def test_lrm_status_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_lrm_status(text, "node2")
    assert fragment in str(info.value) and "nodes/node2/lrm_status" in str(info.value)
