"""Ordinary shell tools on one node's mount, results checked on the others (real 3-node
cluster): mkdir -p, cp, echo >>, mv, ls -l, stat, truncate, rm; a guest config
migrated by `mv` between two nodes' directories (then listed under its new node in
every node's .vmlist); a second config for a taken VMID refused on another node
(EEXIST, from the replicated rules); the atomic-replace pattern (temp file, mv -f)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.fuse_cluster.conftest import wait_in_sync, wait_until

from corral.daemon.demo import DemoCluster


def sh(script: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(cwd),
                            capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"{script!r}: {result.stderr}"
    return result


def _vmlist_node(mount: Path, vmid: str) -> str | None:
    ids = json.loads((mount / ".vmlist").read_text()).get("ids", {})
    entry = ids.get(vmid)
    return None if entry is None else str(entry.get("node"))


def test_shell_tools_across_nodes(cluster: DemoCluster, tmp_path: Path) -> None:
    m1, m2, m3 = (cluster.mount(n) for n in cluster.nodeids)
    source = tmp_path / "storage.cfg"
    source.write_text("dir: local\n\tpath /var/lib/vz\n")
    sh(f"mkdir -p sh/a/b && cp {source} sh/a/storage.cfg && "
       "echo 'content iso' >> sh/a/storage.cfg", m1)
    wait_in_sync(cluster, cluster.nodeids)
    assert sh("cat sh/a/storage.cfg", m2).stdout == source.read_text() + "content iso\n"
    sh("mv sh/a/storage.cfg sh/a/b/moved.cfg && truncate -s 4 sh/a/b/moved.cfg && "
       "touch -d '2024-01-02 03:04:05 UTC' sh/a/b/moved.cfg", m2)
    wait_in_sync(cluster, cluster.nodeids)
    assert "-rw-r----- 1 root www-data 4" in sh("ls -l sh/a/b", m3).stdout
    assert sh("stat -c '%Y %s %a' sh/a/b/moved.cfg; cat sh/a/b/moved.cfg; ls sh/a", m3
              ).stdout.split() == ["1704164645", "4", "640", "dir:b"]

    # A guest config created on node 1, migrated to node 2's directory by mv on node 3.
    guest = "nodes/node1/qemu-server/4242.conf"
    sh(f"printf 'memory: 2048\\ncores: 2\\n' > {guest}", m1)
    wait_until(lambda: _vmlist_node(m3, "4242") == "node1", 10, "4242 in node 3's .vmlist")
    taken = sh("printf 'memory: 1\\n' > nodes/node3/qemu-server/4242.conf", m2, check=False)
    assert taken.returncode != 0 and "File exists" in taken.stderr, taken
    sh(f"mv {guest} nodes/node2/qemu-server/4242.conf", m3)
    wait_in_sync(cluster, cluster.nodeids)
    for mount in (m1, m2, m3):
        assert not (mount / guest).exists()
        assert (mount / "nodes/node2/qemu-server/4242.conf").read_text() == \
            "memory: 2048\ncores: 2\n"
        wait_until(lambda mount=mount: _vmlist_node(mount, "4242") == "node2", 10,  # type: ignore[misc]
                   ".vmlist showing the migration")

    # Atomic replace as PVE tools do it, on node 2; node 1 sees only whole versions.
    sh("printf 'v1\\n' > sh/conf && printf 'v2\\n' > sh/conf.tmp.1 && mv -f sh/conf.tmp.1 sh/conf",
       m2)
    wait_in_sync(cluster, cluster.nodeids)
    assert sh("cat sh/conf; ls sh", m1).stdout == "v2\na\nconf\n"
    sh("rm -r sh", m3)
    wait_in_sync(cluster, cluster.nodeids)
    assert all(not os.path.exists(m / "sh") for m in (m1, m2, m3))
