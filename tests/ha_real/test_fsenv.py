"""The HA environment over a tree: against a real FUSE mount in local mode (lock EEXIST,
refresh, unlock request refused before expiry, release; status files round trip;
crm_commands read-and-clear; relocation by renaming a guest config) and against a plain
directory shared by two nodes (mutual exclusion, expiry by mtime, a re-taken lock is lost
by its old holder, no lock and no write without quorum, a short quorum loss does not make a
holder forget its lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.cfs.mount import is_mounted, is_stale, lazy_unmount
from corral.ha.daemon.agent import ProcessGuestAgent
from corral.ha.daemon.fsenv import FsEnv, Tree
from corral.ha.daemon.watchdog import WatchdogClient

from .harness import make_guest, write_members

HAVE_FUSE = os.path.exists("/dev/fuse") and os.geteuid() == 0


def _env(root: Path, node: str, tmp: Path, members: Path | None = None,
         lock_timeout_s: int = 120) -> FsEnv:
    tree = Tree(root, members, lock_timeout_s)
    agent = ProcessGuestAgent(root, node, tmp / node / "guests")
    return FsEnv(tree, node, "crm", agent, WatchdogClient(str(tmp / "none.sock")))


@pytest.fixture
def fuse_root(tmp_path: Path) -> Iterator[Path]:
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and root")
    root, ready = tmp_path / "mnt", tmp_path / "ready"
    log = open(tmp_path / "mount.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "corral.cfs.mount", "--store",
                             str(tmp_path / "store"), "--mountpoint", str(root), "--nodename",
                             "n1", "--ready-file", str(ready), "--local"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "mount.log").read_text()
            assert time.monotonic() < deadline, "mount did not come up"
            time.sleep(0.05)
        os.stat(root)
        yield root
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.close()
        if is_stale(root) or is_mounted(root):
            lazy_unmount(root)


def test_locks_on_fuse_mount(fuse_root: Path, tmp_path: Path) -> None:
    env = _env(fuse_root, "n1", tmp_path)
    assert env.tree.cluster_fs and env.quorate()
    assert env.get_manager_lock()
    lock = fuse_root / "priv/lock/ha_manager_lock"
    with pytest.raises(FileExistsError):
        os.mkdir(lock)
    with pytest.raises(PermissionError):
        os.utime(lock, (0, 0))  # unlock request: refused, the lock is fresh
    assert lock.is_dir()
    before = lock.stat().st_mtime
    time.sleep(1.1)
    assert env.get_manager_lock()  # refresh
    assert lock.stat().st_mtime > before
    # A second daemon of the same node (after a restart) does not adopt its node's lock by
    # refreshing it: a resynced replica can name a stale writer (docs/ha-daemon.md); it waits
    # for the lock to expire like anybody else.
    other = _env(fuse_root, "n1", tmp_path)
    assert not other.get_manager_lock()
    assert lock.stat().st_mtime > before
    env.release_manager_lock()
    assert not lock.exists()
    assert env.get_agent_lock("n1")
    assert (fuse_root / "priv/lock/ha_agent_n1_lock").is_dir()
    env.release_agent_lock("n1")


def test_status_files_and_commands_on_fuse_mount(fuse_root: Path, tmp_path: Path) -> None:
    env = _env(fuse_root, "n1", tmp_path)
    (fuse_root / "nodes/n1").mkdir(parents=True, exist_ok=True)
    status = {"master_node": "n1", "node_status": {"n1": "online"}, "timestamp": 5,
              "service_status": {"vm:100": {"state": "started", "node": "n1", "uid": "ab"}}}
    assert env.write_manager_status(status)
    read = env.read_manager_status()
    assert read is not None and read["service_status"] == status["service_status"]
    assert abs(read["timestamp"] - time.time()) < 5  # files carry wall-clock seconds
    lrm = {"state": "active", "mode": "active", "timestamp": 1,
           "results": {"ab": {"sid": "vm:100", "state": "started", "exit_code": 0}}}
    assert env.write_lrm_status(lrm)
    assert (env.read_lrm_status("n1") or {})["results"] == lrm["results"]
    assert env.read_lrm_status("n2") == {}
    assert not env.crm_commands_pending()
    env.queue_crm_command("migrate vm:100 n2")
    env.queue_crm_command("arm-ha")
    assert env.crm_commands_pending()
    assert env.read_crm_commands() == ["migrate vm:100 n2", "arm-ha"]
    assert env.read_crm_commands() == [] and not env.crm_commands_pending()
    # relocation = renaming the guest config into another node's directory
    make_guest(fuse_root, "n1", 100)
    (fuse_root / "ha/resources.cfg").write_text("vm: 100\n\tmax_restart 2\n")
    assert env.guest_config_node("vm:100") == "n1"
    assert env.read_resources()["vm:100"].node == "n1"
    env.steal_service("vm:100", "n1", "n2")
    assert env.guest_config_node("vm:100") == "n2"
    assert env.service_stats("vm:100").maxmem_bytes == 128 * 1024 * 1024


def test_plain_directory_two_nodes(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "nodes/n1").mkdir(parents=True)
    (root / "nodes/n2").mkdir(parents=True)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    write_members(m1, True, {"n1": True, "n2": True})
    write_members(m2, True, {"n1": True, "n2": True})
    a = _env(root, "n1", tmp_path, m1, lock_timeout_s=14)
    b = _env(root, "n2", tmp_path, m2, lock_timeout_s=14)
    assert not a.tree.cluster_fs
    assert a.get_agent_lock("n1")
    assert not b.get_agent_lock("n1")  # held and fresh
    assert a.get_agent_lock("n1")  # refresh
    lock = root / "priv/lock/ha_agent_n1_lock"
    old = time.time() - 20
    os.utime(lock, (old, old))  # as if n1 stopped refreshing 20 s ago
    a.tree.refreshed_s["ha_agent_n1_lock"] = int(old)
    assert b.get_agent_lock("n1")  # expired: taken over
    assert not a.get_agent_lock("n1")  # the old holder learns it lost it
    assert a.node_info() == {"n1": True, "n2": True}
    # n1 loses quorum: no lock, no status write
    write_members(m1, False, {"n1": True, "n2": False})
    assert not a.quorate()
    assert a.node_info() == {"n1": True, "n2": False}
    assert not a.get_manager_lock()
    assert not a.write_lrm_status({"state": "active", "mode": "active", "results": {}})
    write_members(m1, True, {"n1": True, "n2": True})
    assert a.get_manager_lock()
    assert not b.get_manager_lock()
    b.release_agent_lock("n1")
    assert not lock.exists()
    a.release_manager_lock()
    assert not (root / "priv/lock/ha_manager_lock").exists()


def test_short_quorum_loss_keeps_a_held_lock(tmp_path: Path) -> None:
    """A holder that cannot refresh for a round (no quorum, a resync) refreshes again at the
    next round instead of waiting for its own lock to expire; past lock_timeout_s it is
    lost for good."""
    root = tmp_path / "tree"
    root.mkdir()
    members = tmp_path / "m1"
    write_members(members, True, {"n1": True, "n2": True})
    env = _env(root, "n1", tmp_path, members, lock_timeout_s=14)
    assert env.get_agent_lock("n1")
    write_members(members, False, {"n1": True, "n2": False})
    assert not env.get_agent_lock("n1")
    assert "ha_agent_n1_lock" in env.held_locks            # not forgotten
    write_members(members, True, {"n1": True, "n2": True})
    time.sleep(1.1)
    assert env.get_agent_lock("n1")                          # refreshed, no takeover wait
    env.held_locks["ha_agent_n1_lock"] -= 15 * 1_000_000_000  # last success 15 s ago
    assert not env.get_agent_lock("n1")
    assert "ha_agent_n1_lock" not in env.held_locks
