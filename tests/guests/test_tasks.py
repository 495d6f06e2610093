"""Task UPIDs in the reference's exact format, task logs ending in TASK OK / TASK ERROR /
TASK WARNINGS, the node's active list and index, and task status for running, finished
and crashed tasks. The cluster-wide list: each node publishes a bounded list of its
active and recent tasks into the tree on every begin/end (only when it changed), every
node reads and merges all lists (running first, newest first), malformed or foreign
entries are skipped and reported, a failed publish never fails a task, and the
`corral tasks` entry point's output and bad-input exits."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from corral.guests.clustertasks import (
    MAX_PUBLISHED_ACTIVE,
    MAX_PUBLISHED_FINISHED,
    MAX_TASKS_FILE_BYTES,
    cluster_tasks,
    cluster_tasks_command,
    main,
    merge_task_lists,
    publish,
    read_node_tasks,
)
from corral.guests.tasks import (
    TaskError,
    TaskLog,
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

    def work(log: TaskLog) -> int:
        log.log("starting")
        return 7

    upid, value = store.run("qmstart", "100", work)
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


# --- the cluster-wide list: publishing into the tree and reading every node's ---------------


def _two_nodes(tmp_path: Path) -> tuple[str, TaskStore, TaskStore]:
    root = str(tmp_path / "tree")
    stores = []
    for node in ("n1", "n2"):
        store = TaskStore(str(tmp_path / f"tasks-{node}"), node)
        store.publish_to(root)
        stores.append(store)
    return root, stores[0], stores[1]


def test_publish_on_begin_and_end_and_merge(tmp_path: Path) -> None:
    root, n1, n2 = _two_nodes(tmp_path)
    first, _ = n1.run("qmstart", "100", lambda log: None)
    running, log = n2.begin("qmigrate", "101")
    listed = cluster_tasks(root).tasks
    assert [e["upid"] for e in listed] == [str(running), str(first)]   # running first
    assert "status" not in listed[0] and "endtime" not in listed[0] and listed[0]["saved"] == 0
    assert listed[1]["status"] == "OK" and listed[1]["saved"] == 1 and listed[1]["node"] == "n1"
    assert listed[1]["type"] == "qmstart" and listed[1]["id"] == "100"
    n2.end(running, log, "target gone")
    listed = cluster_tasks(root).tasks
    assert {e["upid"]: e["status"] for e in listed} == {str(running): "ERROR: target gone",
                                                       str(first): "OK"}
    assert (tmp_path / "tree/nodes/n2/tasks.json").exists()
    assert not (tmp_path / "tree/nodes/n2/tasks.json.tmp").exists()
    assert publish(n2, root) is False          # unchanged: not rewritten
    assert read_node_tasks(root, "n3") == []   # never published


def test_published_list_is_bounded(tmp_path: Path) -> None:
    root, n1, _ = _two_nodes(tmp_path)
    n1.publish_to(None)                        # fill quickly, publish once at the end
    for i in range(MAX_PUBLISHED_FINISHED + 30):
        n1.run("qmstart", str(100 + i), lambda log: None)
    for i in range(MAX_PUBLISHED_ACTIVE + 5):
        n1.begin("qmstop", str(100 + i))
    assert publish(n1, root) is True
    entries = read_node_tasks(root, "n1")
    running = [e for e in entries if "status" not in e]
    finished = [e for e in entries if "status" in e]
    assert len(running) == MAX_PUBLISHED_ACTIVE and len(finished) == MAX_PUBLISHED_FINISHED
    assert finished[0]["id"] == str(100 + MAX_PUBLISHED_FINISHED + 29)   # newest kept
    size = os.path.getsize(tmp_path / "tree/nodes/n1/tasks.json")
    assert size < MAX_TASKS_FILE_BYTES // 4
    assert len(cluster_tasks(root, limit=7).tasks) == 7


def test_ordering_newest_first(tmp_path: Path) -> None:
    entries = [{"upid": f"UPID:n1:00000001:00000002:{t:08X}:qmstart:1:root@pam:", "starttime": t,
                "status": "OK", "endtime": t + 1} for t in (5, 9, 7)]
    running = {"upid": "UPID:n2:00000001:00000002:00000001:qmstop:1:root@pam:", "starttime": 1}
    merged = merge_task_lists([entries, [running]], 10)
    assert [e["starttime"] for e in merged] == [1, 9, 7, 5]


def test_dead_active_task_is_published_as_unexpected(tmp_path: Path) -> None:
    root, n1, _ = _two_nodes(tmp_path)
    upid, _ = n1.begin("qmstart", "100")
    ghost = Upid("n1", upid.pid, upid.pstart + 1, upid.starttime, "qmstop", "100", "root@pam")
    (Path(n1.task_dir) / "active").write_text(f"{ghost}\n")
    publish(n1, root)
    [entry] = read_node_tasks(root, "n1")
    assert entry["upid"] == str(ghost) and entry["status"] == "unexpected status"


def _write_tasks_file(root: str, node: str, data: bytes) -> None:
    path = Path(root, "nodes", node, "tasks.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("data, problem", [
    (b"{not json", "not JSON"),
    (b"x" * (MAX_TASKS_FILE_BYTES + 1), "byte limit"),
    (b'{"version": 2, "node": "bad", "tasks": []}', "not a version 1"),
    (b'{"version": 1, "node": "n1", "tasks": []}', "published by 'n1'"),
    (b'{"version": 1, "node": "bad", "tasks": [{"upid": "UPID:x"}]}', "invalid UPID"),
    (b'{"version": 1, "node": "bad", "tasks": [{"upid": '
     b'"UPID:n1:00000001:00000002:00000003:qmstart:1:root@pam:"}]}', "belongs to node 'n1'"),
    (b'{"version": 1, "node": "bad", "tasks": [{"upid": '
     b'"UPID:bad:00000001:00000002:00000003:qmstart:1:root@pam:", "status": 5}]}', "bad status"),
    (b'{"version": 1, "node": "bad", "tasks": [{"upid": '
     b'"UPID:bad:00000001:00000002:00000003:qmstart:1:root@pam:", "endtime": "x"}]}', "bad endtime"),
    (b'{"version": 1, "node": "bad", "tasks": 3}', "missing or too long"),
])
def test_malformed_node_file_is_skipped(tmp_path: Path, data: bytes, problem: str) -> None:
    root, n1, _ = _two_nodes(tmp_path)
    good, _ = n1.run("qmstart", "100", lambda log: None)
    _write_tasks_file(root, "bad", data)
    result = cluster_tasks(root)
    assert [e["upid"] for e in result.tasks] == [str(good)]
    assert len(result.problems) == 1 and "nodes/bad/tasks.json" in result.problems[0]
    assert problem in result.problems[0]


def test_failed_publish_does_not_fail_the_task(tmp_path: Path) -> None:
    (tmp_path / "tree").write_text("a file where the tree should be\n")
    store = TaskStore(str(tmp_path / "tasks"), "n1")
    store.publish_to(str(tmp_path / "tree"))
    upid, _ = store.run("qmstart", "100", lambda log: None)
    assert store.read_log(upid)[-1] == "TASK OK"
    assert store.publish_failures == 2 and store.last_publish_error


def test_cluster_tasks_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, n1, n2 = _two_nodes(tmp_path)
    one, _ = n1.run("qmstart", "100", lambda log: None)
    # n2 has finished a task but never published: the command publishes it first
    n2.publish_to(None)
    two, _ = n2.run("qmigrate", "101", lambda log: None)
    assert cluster_tasks_command(root, "n2", n2.task_dir, ["--output-format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {e["upid"] for e in printed} == {str(one), str(two)}
    assert cluster_tasks_command(root, "n1", n1.task_dir, ["--limit", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("UPID") and len(lines) == 2 and lines[1].endswith(" OK")
    for bad in (["--limit", "0"], ["--limit"], ["--output-format", "yaml"], ["--bogus"]):
        assert cluster_tasks_command(root, "n1", n1.task_dir, list(bad)) == 2
        assert capsys.readouterr().err.startswith("corral tasks: ")
    _write_tasks_file(root, "bad", b"{")
    assert cluster_tasks_command(root, "n1", n1.task_dir, []) == 1
    assert "skipped nodes/bad/tasks.json" in capsys.readouterr().err
    assert main(["--root", root, "--node", "n1", "--task-dir", n1.task_dir, "--limit", "5"]) == 1


# --- the API's parameter checks (corral.daemon.guestapi) ------------------------------------


def test_migrate_api_parameters() -> None:
    from corral.daemon.api import ApiError
    from corral.daemon.guestapi import parse_migrate_params

    target, options = parse_migrate_params(
        {"target": "n2", "online": "1", "with-local-disks": "1", "targetstorage": "a:b",
         "bwlimit": "1024", "migration_type": "insecure",
         "migration_network": "10.0.0.0/24"}, "n1")
    assert target == "n2" and options.online and options.with_local_disks
    assert options.bwlimit_kib == 1024 and options.migration_type == "insecure"
    assert options.targetstorage == "a:b" and options.migration_network == "10.0.0.0/24"
    assert parse_migrate_params({"target": "n2"}, "n1")[1].online is False
    with pytest.raises(ApiError) as caught:
        parse_migrate_params({"online": "yes", "bwlimit": "-1", "migration_type": "ssh",
                              "migration_network": "x", "targetstorage": "a:b:c",
                              "colour": "red"}, "n1")
    assert caught.value.status == 400 and caught.value.errors is not None
    assert set(caught.value.errors) == {"target", "online", "bwlimit", "migration_type",
                                        "migration_network", "targetstorage", "colour"}
    for params, name in (({"target": "n1"}, "target"), ({"target": "bad/name"}, "target")):
        with pytest.raises(ApiError) as caught:
            parse_migrate_params(params, "n1")
        assert caught.value.errors is not None and name in caught.value.errors


def test_task_list_filters() -> None:
    from corral.daemon.api import ApiError
    from corral.daemon.guestapi import filter_tasks

    rows: list[dict[str, object]] = [
        {"upid": "a", "type": "qmigrate", "id": "100", "status": "running"},
        {"upid": "b", "type": "qmstart", "id": "100", "status": "OK"},
        {"upid": "c", "type": "qmigrate", "id": "101", "status": "ERROR: boom"},
        {"upid": "d", "type": "qmstop", "id": "102", "status": "OK"}]
    assert [r["upid"] for r in filter_tasks(rows, {})] == ["a", "b", "c", "d"]
    assert [r["upid"] for r in filter_tasks(rows, {"vmid": "100"})] == ["a", "b"]
    assert [r["upid"] for r in filter_tasks(rows, {"typefilter": "qmigrate"})] == ["a", "c"]
    assert [r["upid"] for r in filter_tasks(rows, {"errors": "1"})] == ["c"]
    assert [r["upid"] for r in filter_tasks(rows, {"start": "1", "limit": "2"})] == ["b", "c"]
    with pytest.raises(ApiError) as caught:
        filter_tasks(rows, {"limit": "x", "vmid": "5", "errors": "maybe", "typefilter": "a b"})
    assert caught.value.errors is not None
    assert set(caught.value.errors) == {"limit", "vmid", "errors", "typefilter"}
