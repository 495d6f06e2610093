"""`ha status` text layout (master/fencing/lrm/service words, stay reasons) and the
`corral ha-sim run|check` command: outputs written, diff printed and exit codes.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest

from corral.ha.logic.config import ResourceConfig
from corral.ha.logic.status import format_status, service_word
from corral.ha.logic.types import RequestedState
from corral.ha.simcli import main

SCENARIOS = pathlib.Path(__file__).parent / "scenarios"

STATUS = {
    "master_node": "node1", "timestamp": 1000,
    "node_status": {"node1": "online", "node2": "online"},
    "service_status": {
        "vm:100": {"state": "started", "node": "node1", "running": 1, "uid": "a"},
        "vm:101": {"state": "started", "node": "node2", "uid": "b",
                   "reason": "no usable online node in its highest priority class"},
        "vm:102": {"state": "error", "node": "node2", "uid": "c"},
    },
}
LRMS = {"node1": {"state": "active", "mode": "active", "timestamp": 999, "results": {}},
        "node2": {"state": "wait_for_agent_lock", "mode": "maintenance", "timestamp": 990},
        "node3": None}
RESOURCES = {"vm:100": ResourceConfig("vm:100"), "vm:101": ResourceConfig("vm:101"),
             "vm:102": ResourceConfig("vm:102", state=RequestedState.DISABLED),
             "vm:103": ResourceConfig("vm:103", node="node1")}


def test_status_layout() -> None:
    text = format_status(STATUS, LRMS, RESOURCES, quorate=True, now_s=1001)
    assert text.splitlines() == [
        "quorum OK",
        "master node1 (active, Thu Jan  1 00:16:40 1970)",
        "fencing armed (CRM watchdog active)",
        "lrm node1 (active, watchdog active, Thu Jan  1 00:16:39 1970)",
        "lrm node2 (maintenance mode, watchdog standby, Thu Jan  1 00:16:30 1970)",
        "lrm node3 (unable to read lrm status)",
        "service vm:100 (node1, started)",
        "service vm:101 (node2, starting) - no usable online node in its highest priority class",
        "service vm:102 (node2, clearing error flag)",
        "service vm:103 (node1, queued)",
    ]


def test_status_stale_master_and_disarm() -> None:
    status = dict(STATUS, disarm={"mode": "freeze", "state": "disarmed"})
    text = format_status(status, {}, RESOURCES, quorate=True, now_s=2000, crs_mode="static")
    assert "master node1 (old timestamp - dead? - disarmed, resource mode: freeze - static " \
           "load CRS," in text
    assert "fencing disarmed, resource mode: freeze (CRM watchdog released)" in text


def test_service_words() -> None:
    started = ResourceConfig("vm:1")
    stopped = ResourceConfig("vm:1", state=RequestedState.STOPPED)
    assert service_word({"state": "stopped"}, started, None) == "starting"
    assert service_word({"state": "started", "running": 1}, stopped, None) == "stopping"
    assert service_word({"state": "started"}, None, None) == "deleting"
    assert service_word({"state": "freeze"}, started, {"mode": "ignore"}) == "ignore"
    assert service_word(None, ResourceConfig("vm:1", state=RequestedState.IGNORED), None) == \
        "ignored"


def test_cli_run_and_check(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "scenario"
    shutil.copytree(SCENARIOS / "migrate-vm", scenario)
    shutil.rmtree(scenario / "status", ignore_errors=True)
    out = tmp_path / "out"
    assert main(["run", str(scenario), "--out", str(out)]) == 0
    assert (out / "log").read_text().startswith("info     20      cmdlist: execute power node1 on")
    assert (out / "events.jsonl").read_text() == (scenario / "expected.jsonl").read_text()
    assert "service vm:101 (node2, started)" in (out / "ha-status").read_text()
    assert main(["check", str(scenario)]) == 0
    expected = scenario / "expected.jsonl"
    expected.write_text(expected.read_text().replace('"target": "node2"', '"target": "node3"'))
    assert main(["check", str(scenario)]) == 1
    output = capsys.readouterr().out
    assert "FAILED" in output and '+{"from": "started"' in output


def test_cli_scenario_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "cmdlist").write_text("[[\"bogus\"]]")
    assert main(["check", str(tmp_path / "s")]) == 2
