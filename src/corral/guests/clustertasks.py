"""The cluster-wide task list (the reference's /cluster/tasks), built from the tree.

Each node publishes its recent tasks to `nodes/<node>/tasks.json` in the replicated
tree: every active task (at most MAX_PUBLISHED_ACTIVE, newest first) plus the last
MAX_PUBLISHED_FINISHED finished ones. The file is small (about 250 bytes per task,
well below the tree's 1 MiB file limit), written to `tasks.json.tmp` and renamed over
the old one, so readers on every node see either the old or the new list, never half a
file. A node publishes whenever one of its tasks begins or ends (TaskStore.publish_to),
and only when the list changed.

Any node reads every node's file and merges them (`cluster_tasks`): entries in the
reference's shape (`upid`, `node`, `pid`, `pstart`, `starttime`, `type`, `id`, `user`,
`saved`, and `status` + `endtime` once finished), running tasks first, then newest
first. Everything read is checked: a file that is too large, is not JSON, or holds an
entry whose UPID is malformed or names another node is skipped and reported in
`problems` instead of breaking the list. A node that crashed while a task ran keeps
showing it as running until it publishes again (as in the reference); `qm
task-status` on that node then says `unexpected status`.

    corral tasks [--root DIR] [--node NAME] [--task-dir DIR] [--limit N] [--output-format text|json]

(`main`, for the lead to wire as a CLI entry point; `corral qm tasks --cluster` can
call `cluster_tasks_command`.)
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.guests.tasks import TaskError, TaskStore, parse_upid

TASKS_FILE_NAME = "tasks.json"
FORMAT_VERSION = 1
MAX_PUBLISHED_ACTIVE = 50
MAX_PUBLISHED_FINISHED = 50
MAX_TASKS_FILE_BYTES = 256 * 1024     # a full list is ~25 KiB; anything far larger is bogus
MAX_STATUS_CHARS = 512
MAX_NODES = 1024
DEFAULT_LIMIT = 50


@dataclass
class ClusterTaskList:
    tasks: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --- pure part: what a node publishes, and how a published list is read -------------------


def published_entries(store: TaskStore) -> list[dict[str, Any]]:
    """This node's active tasks (status absent while running) and recent finished ones."""
    entries: list[dict[str, Any]] = []
    active = store.list_active()[:MAX_PUBLISHED_ACTIVE]
    for upid_text, running in active:
        entry = _entry_from_upid(upid_text)
        entry["saved"] = 0
        if not running:               # its process is gone without finishing it
            entry["status"] = "unexpected status"
        entries.append(entry)
    for upid_text, endtime, status in store.list_finished(MAX_PUBLISHED_FINISHED):
        entry = _entry_from_upid(upid_text)
        entry.update(saved=1, endtime=endtime, status=status)
        entries.append(entry)
    return entries


def encode_task_file(node: str, entries: list[dict[str, Any]]) -> bytes:
    document = {"version": FORMAT_VERSION, "node": node, "tasks": entries}
    return (json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n").encode()


def decode_task_file(node: str, data: bytes) -> list[dict[str, Any]]:
    """The validated entries of one node's file (ValueError naming what is wrong)."""
    if len(data) > MAX_TASKS_FILE_BYTES:
        raise ValueError(f"{len(data)} bytes, over the {MAX_TASKS_FILE_BYTES} byte limit")
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise ValueError("not a version 1 task list")
    if document.get("node") != node:
        raise ValueError(f"published by '{document.get('node')}', not '{node}'")
    tasks = document.get("tasks")
    if not isinstance(tasks, list) or len(tasks) > MAX_PUBLISHED_ACTIVE + MAX_PUBLISHED_FINISHED:
        raise ValueError("task list missing or too long")
    return [_checked_entry(node, item) for item in tasks]


def merge_task_lists(lists: Sequence[list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Running tasks first, then newest first (by start time, then end time, then UPID)."""
    merged = [entry for entries in lists for entry in entries]
    merged.sort(key=lambda e: ("status" in e, -int(e["starttime"]), -int(e.get("endtime", 0)),
                               e["upid"]))
    return merged[:limit]


def _entry_from_upid(upid_text: str) -> dict[str, Any]:
    upid = parse_upid(upid_text)
    return {"upid": upid_text, "node": upid.node, "pid": upid.pid, "pstart": upid.pstart,
            "starttime": upid.starttime, "type": upid.task_type, "id": upid.task_id,
            "user": upid.user}


def _checked_entry(node: str, item: object) -> dict[str, Any]:
    """Rebuild an entry from its UPID; only status, endtime and saved are taken as given."""
    if not isinstance(item, dict) or not isinstance(item.get("upid"), str):
        raise ValueError("an entry without a UPID")
    try:
        entry = _entry_from_upid(item["upid"])
    except TaskError as exc:
        raise ValueError(str(exc)) from None
    if entry["node"] != node:
        raise ValueError(f"task {item['upid']} belongs to node '{entry['node']}'")
    saved = item.get("saved", 0)
    entry["saved"] = 1 if saved in (1, True) else 0
    status, endtime = item.get("status"), item.get("endtime")
    if status is not None:
        if not isinstance(status, str) or not status or len(status) > MAX_STATUS_CHARS:
            raise ValueError(f"task {item['upid']}: bad status")
        entry["status"] = status
    if endtime is not None:
        if not isinstance(endtime, int) or isinstance(endtime, bool) or not 0 <= endtime < 1 << 40:
            raise ValueError(f"task {item['upid']}: bad endtime")
        entry["endtime"] = endtime
    return entry


# --- I/O: publishing into and reading from the tree -----------------------------------------


def task_file_path(root: str, node: str) -> str:
    return os.path.join(root, "nodes", node, TASKS_FILE_NAME)


def publish(store: TaskStore, root: str) -> bool:
    """Write this node's list if it changed; True if written. Errors (a read-only tree
    without quorum, for one) are left to the caller: TaskStore swallows them."""
    path = task_file_path(root, store.node)
    data = encode_task_file(store.node, published_entries(store))
    try:
        with open(path, "rb") as handle:
            if handle.read(MAX_TASKS_FILE_BYTES + 1) == data:
                return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as handle:
        handle.write(data)
    os.replace(path + ".tmp", path)
    return True


def read_node_tasks(root: str, node: str) -> list[dict[str, Any]]:
    """One node's published entries ([] if it never published); ValueError if malformed."""
    try:
        with open(task_file_path(root, node), "rb") as handle:
            data = handle.read(MAX_TASKS_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    return decode_task_file(node, data)


def cluster_tasks(root: str, limit: int = DEFAULT_LIMIT) -> ClusterTaskList:
    """Every node's recent tasks, merged (what /cluster/tasks returns)."""
    result = ClusterTaskList()
    try:
        nodes = sorted(os.listdir(os.path.join(root, "nodes")))
    except FileNotFoundError:
        return result
    lists = []
    for node in nodes[:MAX_NODES]:
        try:
            lists.append(read_node_tasks(root, node))
        except (ValueError, OSError) as exc:
            result.problems.append(f"nodes/{node}/{TASKS_FILE_NAME}: {exc}")
    if len(nodes) > MAX_NODES:
        result.problems.append(f"only the first {MAX_NODES} of {len(nodes)} node directories read")
    result.tasks = merge_task_lists(lists, limit)
    return result


# --- CLI entry points ---------------------------------------------------------------------------


def format_text(tasks: list[dict[str, Any]]) -> str:
    """One line per task, the columns of `qm tasks` plus node, type, id and times."""
    lines = [f"{'UPID':<62} {'NODE':<12} {'TYPE':<10} {'ID':<8} {'STATUS'}"]
    for entry in tasks:
        lines.append(f"{entry['upid']:<62} {entry['node']:<12} {entry['type']:<10} "
                     f"{entry['id']:<8} {entry.get('status', 'running')}")
    return "\n".join(lines)


def cluster_tasks_command(root: str, node: str, task_dir: str, args: list[str]) -> int:
    """`... tasks --cluster [--limit N] [--output-format text|json]`: publish this node's
    list first (so it is fresh even if nothing ran since the daemon started), then print
    every node's. Exit 2 on bad input, 1 if a node's file was unreadable (still printed)."""
    limit, output = DEFAULT_LIMIT, "text"
    while args:
        option = args.pop(0)
        if option not in ("--limit", "--output-format") or not args:
            print(f"corral tasks: unexpected argument '{option}'" if option not in
                  ("--limit", "--output-format") else f"corral tasks: {option} needs a value",
                  file=sys.stderr)
            return 2
        value = args.pop(0)
        if option == "--limit" and not (value.isdigit() and int(value) > 0):
            print("corral tasks: --limit must be a positive integer", file=sys.stderr)
            return 2
        if option == "--output-format" and value not in ("text", "json"):
            print("corral tasks: --output-format must be text or json", file=sys.stderr)
            return 2
        limit, output = (int(value), output) if option == "--limit" else (limit, value)
    try:
        publish(TaskStore(task_dir, node), root)
    except OSError as exc:
        print(f"corral tasks: cannot publish this node's tasks: {exc}", file=sys.stderr)
    result = cluster_tasks(root, limit)
    print(json.dumps(result.tasks, sort_keys=True) if output == "json" else format_text(result.tasks))
    for problem in result.problems:
        print(f"corral tasks: skipped {problem}", file=sys.stderr)
    return 1 if result.problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`corral tasks [--root DIR] [--node NAME] [--task-dir DIR] [--limit N] [--output-format F]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    settings = {"--root": "/etc/corral", "--node": socket.gethostname().split(".")[0],
                "--task-dir": "/var/log/corral/tasks"}
    while args and args[0] in settings:
        option = args.pop(0)
        if not args:
            print(f"corral tasks: {option} needs a value", file=sys.stderr)
            return 2
        settings[option] = args.pop(0)
    return cluster_tasks_command(settings["--root"], settings["--node"], settings["--task-dir"], args)


if __name__ == "__main__":
    sys.exit(main())
