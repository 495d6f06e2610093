"""Generated files render the reference's JSON shapes from their inputs; the
cfs cores stay sans-I/O (no clock, socket, randomness or threads)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from corral.cfs import virtual
from corral.cfs.ops import Op

from .helpers import MemNode

CORES = ["ops.py", "rules.py", "state.py", "records.py", "resync.py", "locks.py",
         "virtual.py", "memkv.py"]
FORBIDDEN = {"asyncio", "socket", "time", "random", "uvloop", "subprocess", "threading", "os"}


@pytest.mark.parametrize("name", CORES)
def test_cores_are_sans_io(name: str) -> None:
    source = Path(__file__).resolve().parents[2] / "src/corral/cfs" / name
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        assert not names & FORBIDDEN, f"{name} imports {names & FORBIDDEN}"


def test_members_standalone_and_cluster() -> None:
    assert json.loads(virtual.render_members("vm", 1, None)) == {"nodename": "vm", "version": 1}
    cluster = virtual.ClusterInfo("lab", 3, True, [
        virtual.ClusterNode("pve2", 2, False, "10.0.0.2"),
        virtual.ClusterNode("pve1", 1, True, "10.0.0.1"),
    ])
    doc = json.loads(virtual.render_members("pve1", 5, cluster))
    assert doc["cluster"] == {"name": "lab", "version": 3, "nodes": 2, "quorate": 1}
    assert doc["nodelist"]["pve2"] == {"id": 2, "online": 0, "ip": "10.0.0.2"}
    assert list(doc["nodelist"]) == ["pve1", "pve2"]


def test_vmlist_from_state() -> None:
    node = MemNode()
    for path in ("nodes", "nodes/vm", "nodes/vm/qemu-server", "nodes/vm/lxc"):
        assert node.ap(Op.mkdir(path, 1)) == 0
    assert node.ap(Op.create("nodes/vm/qemu-server/100.conf", 1)) == 0
    assert node.ap(Op.create("nodes/vm/lxc/101.conf", 1)) == 0
    doc = json.loads(virtual.render_vmlist(node.state.guests_version, node.state.guest_list()))
    assert doc["ids"]["100"]["type"] == "qemu" and doc["ids"]["101"]["type"] == "lxc"
    assert doc["ids"]["100"]["node"] == "vm"
    assert doc["ids"]["101"]["version"] > doc["ids"]["100"]["version"]
    assert doc["version"] == node.state.guests_version


def test_version_counters_follow_changes() -> None:
    node = MemNode()
    assert node.ap(Op.create("storage.cfg", 1)) == 0
    first = node.state.observed["storage.cfg"]
    assert node.ap(Op.write("storage.cfg", 0, b"dir: local\n", 2)) == 0
    assert node.state.observed["storage.cfg"] > first
    doc = json.loads(virtual.render_version(1795720870, 1, 7, node.state.observed,
                                            {"vm": {"kv/demo": 0}}))
    assert doc["starttime"] == 1795720870 and doc["vmlist"] == 7
    assert doc["storage.cfg"] == node.state.observed["storage.cfg"]
    assert doc["kvstore"] == {"vm": {"kv/demo": 0}}


def test_clusterlog_newest_first_and_bounded() -> None:
    entries = [virtual.LogEntry(i, 1000 + i, 6, "probe", 1, "vm", "root@pam", f"m{i}")
               for i in range(80)]
    doc = json.loads(virtual.render_clusterlog(entries))
    assert len(doc["data"]) == 50
    assert doc["data"][0]["msg"] == "m79" and doc["data"][-1]["msg"] == "m30"
