"""Task UPIDs in the reference's exact format, task logs ending in TASK OK / TASK ERROR /
TASK WARNINGS, the node's active list and index, and task status for running, finished
and crashed tasks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from corral.guests.tasks import (
    TaskError,
    TaskStore,
    Upid,
    new_upid,
    parse_upid,
    process_start_ticks,
)

UPID_RE = re.compile(r"^UPID:[^:]+:[0-9A-F]{8}:[0-9A-F]{8,9}:[0-9A-F]{8}:[^:]+:[^:]*:[^:]+:$")


def test_upid_format_and_parse() -> None:
    example = "UPID:pve1:000FF1FD:10F9374C:630D702C:qmigrate:100:root@pam:"
    upid = parse_upid(example)
    assert (upid.node, upid.pid, upid.pstart, upid.starttime) == ("pve1", 0xFF1FD, 0x10F9374C, 0x630D702C)
    assert (upid.task_type, upid.task_id, upid.user) == ("qmigrate", "100", "root@pam")
    assert str(upid) == example
    mine = new_upid("n1", "qmstart", "100", "root@pam")
    assert UPID_RE.match(str(mine)) and str(mine).count(":") == 8
    assert mine.pid == os.getpid() and mine.pstart == process_start_ticks(os.getpid())
    assert str(Upid("n", 1, 2, 3, "t", "", "u@r")) == "UPID:n:00000001:00000002:00000003:t::u@r:"


@pytest.mark.parametrize("text", [
    "UPID:n1:1:00000000:00000000:qmstart:100:root@pam:",          # short pid
    "UPID:n1:00000001:00000000:00000000:qmstart:100:root@pam",    # no trailing colon
    "UPID:n1:00000001:00000000:00000000:qm/start:100:root@pam:",  # '/' in type
    "UPID:n1:00000001:00000000:0000000g:qmstart:100:root@pam:",   # not hex
    "UPID:n1:00000001:00000000:00000000:qmstart:100:root:",       # user without realm
])
def test_bad_upids(text: str) -> None:
    with pytest.raises(TaskError, match="invalid UPID"):
        parse_upid(text)


def test_task_ok_error_warnings_and_index(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path), "n1")
    upid, value = store.run("qmstart", "100", lambda log: log.log("starting") or 7)
    assert value == 7
    assert store.read_log(upid) == ["starting", "TASK OK"]
    assert store.log_path(upid).startswith(str(tmp_path / f"{upid.starttime & 0xF:X}"))
    with pytest.raises(RuntimeError):
        store.run("qmstop", "101", lambda log: (_ for _ in ()).throw(RuntimeError("disk gone\nmore")))
    failed = parse_upid(str(store.list_tasks()[0]["upid"]))
    assert store.read_log(failed)[-1] == "TASK ERROR: disk gone"
    warned, _ = store.run("qmshutdown", "100", lambda log: log.warn("slow guest"))
    assert store.read_log(warned)[-2:] == ["WARN: slow guest", "TASK WARNINGS: 1"]
    statuses = [(t["type"], t["status"]) for t in store.list_tasks()]
    assert statuses == [("qmshutdown", "WARNINGS: 1"), ("qmstop", "ERROR: disk gone"), ("qmstart", "OK")]
    status = store.status(upid)
    assert status["status"] == "stopped" and status["exitstatus"] == "OK"
    assert store.status(failed)["exitstatus"] == "ERROR: disk gone"


def test_running_and_crashed_tasks(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path), "n1")
    upid, log = store.begin("qmstart", "100")
    assert store.status(upid)["status"] == "running"
    assert store.list_tasks()[0]["status"] == "running"
    store.end(upid, log, None)
    assert store.status(upid)["status"] == "stopped"
    # a task whose process is gone without finishing: stopped, unexpected status
    ghost = Upid("n1", upid.pid, upid.pstart + 1, upid.starttime, "qmstop", "100", "root@pam")
    os.makedirs(os.path.dirname(store.log_path(ghost)), exist_ok=True)
    Path(store.log_path(ghost)).write_text("half done\n")
    (tmp_path / "active").write_text(f"{ghost}\n")
    assert store.status(ghost) == {**store.status(ghost), "status": "stopped",
                                   "exitstatus": "unexpected status"}
    with pytest.raises(TaskError, match="no such task"):
        store.read_log(Upid("n1", 1, 1, 1, "x", "", "root@pam"))
