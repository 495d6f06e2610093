"""Real corrald processes on 127.0.0.x: a cluster's whole life through the `corral` verbs.

Checks: create starts a quorate one-node cluster and refuses a second create;
a join by token and one by password; `corral status`/`nodes` from every node
(pvecm layout, versions and clock offsets filled in); a write on one node's
mounted tree seen on the others, corosync.conf in the tree; `expected` refuses
nonsense; delnode refuses an online node and removes a stopped one (the config
change reaches the other member); a node whose state was wiped joins again,
first after delnode (it gets a free id) and then in place with --force.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable

from tests.cluster.conftest import wait_until

from corral.corosync_conf import ClusterConfig
from corral.daemon.demo import DEMO_PASSWORD, DemoCluster

FORM_TIMEOUT_S = 40


def _conf(cluster: DemoCluster, nodeid: int) -> ClusterConfig:
    return ClusterConfig.from_file(str(cluster.layout(nodeid).conf))


def _mounted(path: object) -> bool:
    target = os.path.realpath(str(path))
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == target for line in mounts)


def _read(path: object) -> str | None:
    try:
        with open(str(path), encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def _status_json(cluster: DemoCluster, nodeid: int) -> dict[str, object]:
    result = cluster.corral(nodeid, "status", "--json")
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_cluster_lifecycle(make_cluster: Callable[[int], DemoCluster]) -> None:
    cluster = make_cluster(3)
    cluster.create()
    cluster.start(1)
    cluster.wait_quorate([1], 1, FORM_TIMEOUT_S)

    again = cluster.corral(1, "create", "other", "--link0", cluster.address(1), "--no-start",
                           check=False)
    assert again.returncode == 2 and "already in a cluster" in again.stderr
    assert _conf(cluster, 1).config_version == 1

    # Each new node raises the expected votes: it must be up before the next join.
    cluster.join(2)
    cluster.start(2)
    cluster.wait_quorate([1, 2], 2, FORM_TIMEOUT_S)
    joined = cluster.corral(3, "add", f"{cluster.address(1)}:"
                            f"{cluster.api_port}", "--fingerprint", cluster.fingerprint(1),
                            "--password", "--name", cluster.name(3), "--link0",
                            cluster.address(3), "--api-port", str(cluster.api_port),
                            "--mount", str(cluster.mount(3)), "--no-start",
                            stdin_text=DEMO_PASSWORD + "\n")
    assert "joined as nodeid 3" in joined.stdout
    cluster.start(3)
    cluster.wait_quorate([1, 2, 3], 3, FORM_TIMEOUT_S)

    def versions_known(nodeid: int) -> bool:
        rows = _status_json(cluster, nodeid)["nodes"]
        assert isinstance(rows, list)
        return all(row["version"] and row["clock_offset_ms"] is not None for row in rows)

    for nodeid in (1, 2, 3):
        wait_until(lambda n=nodeid: versions_known(n), 15, f"heartbeats on node {nodeid}")
        text = cluster.corral(nodeid, "status").stdout
        assert "Quorate:          Yes" in text and "Config Version:   3" in text
        assert "Nodes:            3" in text and f"0x{nodeid:08x}" in text
        assert f"{cluster.address(nodeid)} (local)" in text
        assert "MISMATCH" not in text and "TOO LARGE" not in text
        assert f"Configuration tree: mounted at {cluster.mount(nodeid)} (synced" in text
        nodes = cluster.corral(nodeid, "nodes").stdout
        assert nodes.startswith("\nMembership information\n")
        assert f"node{nodeid} (local)" in nodes
        assert _conf(cluster, nodeid).config_version == 3

    # The replicated tree: a write on node 1's mount is seen on the others' mounts,
    # and the tree carries the current corosync.conf.
    guest = "nodes/node1/qemu-server/100.conf"
    wait_until(lambda: (cluster.mount(1) / "nodes/node1/qemu-server").is_dir(), 15, "node dirs")
    (cluster.mount(1) / guest).write_text("memory: 512\n")
    for nodeid in (2, 3):
        wait_until(lambda n=nodeid: _read(cluster.mount(n) / guest) == "memory: 512\n", 10,
                   f"the write on node {nodeid}")
        assert "config_version: 3" in (cluster.mount(nodeid) / "corosync.conf").read_text()
        assert '"100"' in (cluster.mount(nodeid) / ".vmlist").read_text()

    for bad in ("1", "abc", "9", "0"):
        result = cluster.corral(1, "expected", bad, check=False)
        assert result.returncode == 2, bad
        assert "expected votes" in result.stderr
    assert cluster.corral(1, "expected", "3").returncode == 0

    online = cluster.corral(1, "delnode", "node3", check=False)
    assert online.returncode == 2 and "online" in online.stderr
    assert cluster.stop(3) == 0
    wait_until(lambda: cluster.quorate_with(1, 2), FORM_TIMEOUT_S, "node 3 gone")
    removed = cluster.corral(1, "delnode", "node3")
    assert "config_version 4" in removed.stdout
    wait_until(lambda: _conf(cluster, 2).config_version == 4, 10, "node 2 adopts v4")
    assert [n.name for n in _conf(cluster, 2).nodes] == ["node1", "node2"]

    # node 3's state is wiped; it joins again through node 2 and gets the free id 3.
    shutil.rmtree(cluster.state_dir(3))
    rejoined = cluster.join(3, via=2)
    assert "joined as nodeid 3" in rejoined.stdout
    cluster.start(3)
    cluster.wait_quorate([1, 2, 3], 3, FORM_TIMEOUT_S)
    assert _conf(cluster, 1).config_version == 5

    # Crash + wipe without delnode: the name is taken until --force replaces it.
    cluster.kill(3)
    wait_until(lambda: cluster.quorate_with(1, 2), FORM_TIMEOUT_S, "node 3 crashed")
    shutil.rmtree(cluster.state_dir(3))
    refused = cluster.corral(3, "add", f"{cluster.address(1)}:{cluster.api_port}",
                             "--fingerprint", cluster.fingerprint(1), "--token",
                             cluster.join_token(1), "--name", "node3", "--link0",
                             cluster.address(3), "--no-start", check=False)
    assert refused.returncode == 2 and "already in the cluster" in refused.stderr
    assert not cluster.layout(3).conf.exists()
    forced = cluster.join(3, extra=["--force"])
    assert "joined as nodeid 3" in forced.stdout
    cluster.start(3)
    cluster.wait_quorate([1, 2, 3], 3, FORM_TIMEOUT_S)
    assert _conf(cluster, 3).config_version == 6
    # The wiped node got the tree back by resync, including the earlier write.
    wait_until(lambda: _read(cluster.mount(3) / guest) == "memory: 512\n", 15, "resync")
    wait_until(lambda: "config_version: 6" in (_read(cluster.mount(3) / "corosync.conf") or ""),
               10, "corosync.conf in the tree")


def test_sigterm_leaves_and_cleans_up(make_cluster: Callable[[int], DemoCluster]) -> None:
    """SIGTERM: exit 0, tree unmounted, sockets and pid file removed, cluster files
    kept; the survivor of a 2-node cluster sees the node go and loses quorum; a
    restart rejoins."""
    cluster = make_cluster(2)
    cluster.create()
    cluster.start(1)
    cluster.wait_quorate([1], 1, FORM_TIMEOUT_S)
    cluster.join(2)
    cluster.start(2)
    cluster.wait_quorate([1, 2], 2, FORM_TIMEOUT_S)
    wait_until(lambda: (cluster.mount(2) / ".members").exists(), 15, "node 2's tree mounted")
    process = cluster.processes[2]
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert not _mounted(cluster.mount(2))
    layout = cluster.layout(2)
    assert not layout.control_socket.exists() and not layout.pidfile.exists()
    assert layout.conf.exists()
    log = cluster.log_path(2).read_text()
    assert "leaving the ring" in log and "corrald stopped" in log
    wait_until(lambda: [m["nodeid"] for m in cluster.control(1, "quorum")["members"]] == [1],
               FORM_TIMEOUT_S,
               "node 1 alone")
    assert not cluster.control(1, "quorum")["quorate"]
    cluster.processes.pop(2)
    cluster.start(2)
    cluster.wait_quorate([1, 2], 2, FORM_TIMEOUT_S)
    assert os.stat(layout.control_socket).st_mode & 0o777 == 0o600
