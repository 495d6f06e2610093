"""Changes applied to the store behind the kernel's back, as a replicated
backend applies other nodes' operations: content is never stale (direct_io),
new names and removals show within the cache timeout (1 s), and a file that
another node replaced (temp + rename over it, a new inode under the same
name) stays readable through the name the kernel still caches, never ENOENT.
With a change feed (30 s kernel cache): size and mtime changes, removals,
renames and replacements from elsewhere show at once, and so do the modes
of every cached inode when the node loses or regains quorum."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.cfs.mount import is_mounted, is_stale, lazy_unmount

HELPER = Path(__file__).with_name("remote_node.py")
CACHE_TIMEOUT_S = 1.0


class Remote:
    def __init__(self, base: Path, *extra: str) -> None:
        self.base = base
        self.root = base / "mnt"
        self.commands = base / "cmd"
        self.commands.mkdir()
        ready = base / "ready"
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), str(base / "store"), str(self.root),
             str(self.commands), str(ready), *extra])
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        self.sequence = 0

    def apply(self, *items: tuple[str, str, str]) -> list[int]:
        self.sequence += 1
        name = self.commands / f"{self.sequence:04d}"
        temp = name.with_suffix(".tmp")
        temp.write_text(json.dumps(items))
        temp.rename(name.with_suffix(".json"))
        done = name.with_suffix(".done")
        deadline = time.monotonic() + 10
        while not done.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return json.loads(done.read_text())

    def path(self, rel: str) -> str:
        return str(self.root / rel)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if is_stale(self.root) or is_mounted(self.root):
            lazy_unmount(self.root)


@pytest.fixture(params=["timeouts"])
def remote(tmp_path: Path, request: pytest.FixtureRequest):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    node = Remote(tmp_path, *(["notify"] if request.param == "notify" else []))
    try:
        yield node
    finally:
        node.close()


def test_remote_changes_become_visible(remote: Remote) -> None:
    os.makedirs(remote.path("nodes/n1/qemu-server"))
    target = remote.path("nodes/n1/qemu-server/100.conf")
    with open(target, "w") as out:
        out.write("cores: 1\n")
    assert os.stat(target).st_size == 9  # the kernel now caches this name and inode
    # Content changed elsewhere: seen at once (no page cache).
    assert remote.apply(("write", "nodes/n1/qemu-server/100.conf", "cores: 4\n")) == [0]
    with open(target) as back:
        assert back.read() == "cores: 4\n"
    # Replaced elsewhere by the atomic-replace pattern: a new inode under the
    # cached name. Reads through the name keep working.
    assert remote.apply(("create", "nodes/n1/qemu-server/100.conf.tmp", ""),
                        ("write", "nodes/n1/qemu-server/100.conf.tmp", "cores: 8\nmemory: 1\n"),
                        ("rename", "nodes/n1/qemu-server/100.conf.tmp",
                         "nodes/n1/qemu-server/100.conf")) == [0, 0, 0]
    with open(target) as back:
        assert back.read() == "cores: 8\nmemory: 1\n"
    assert os.stat(target).st_size in (9, 19)  # size may be cached up to the timeout
    # A name created elsewhere, and one removed elsewhere: visible within the timeout.
    assert remote.apply(("create", "nodes/n1/qemu-server/101.conf", ""),
                        ("unlink", "nodes/n1/qemu-server/100.conf", "")) == [0, 0]
    time.sleep(CACHE_TIMEOUT_S + 0.2)
    assert os.listdir(remote.path("nodes/n1/qemu-server")) == ["101.conf"]
    assert not os.path.exists(target)
    assert os.stat(remote.path("nodes/n1/qemu-server/101.conf")).st_size == 0


@pytest.mark.parametrize("remote", ["notify"], indirect=True)
def test_change_feed_invalidates_at_once(remote: Remote) -> None:
    """With a change feed the kernel may cache for 30 s, yet removals,
    renames and size changes from elsewhere show at once."""
    os.makedirs(remote.path("nodes/n1/qemu-server"))
    conf = remote.path("nodes/n1/qemu-server/100.conf")
    other = remote.path("nodes/n1/qemu-server/200.conf")
    for path in (conf, other):
        with open(path, "w") as out:
            out.write("cores: 1\n")
        assert os.stat(path).st_size == 9  # cached by the kernel now
    assert remote.apply(("write", "nodes/n1/qemu-server/100.conf", "cores: 16\n")) == [0]
    assert wait_for(lambda: os.stat(conf).st_size == 10)
    assert remote.apply(("unlink", "nodes/n1/qemu-server/200.conf", "")) == [0]
    assert wait_for(lambda: not os.path.exists(other))
    assert remote.apply(("rename", "nodes/n1/qemu-server/100.conf",
                         "nodes/n1/qemu-server/300.conf")) == [0]
    assert wait_for(lambda: not os.path.exists(conf))
    with open(remote.path("nodes/n1/qemu-server/300.conf")) as moved:
        assert moved.read() == "cores: 16\n"


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    """Name invalidations go through pyfuse3's notify thread: allow it a
    moment (far below the 30 s cache timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("remote", ["notify"], indirect=True)
def test_change_feed_replace_mtime_and_quorum(remote: Remote) -> None:
    """Another node's atomic replace and utime show at once through a 30 s
    cache; losing quorum turns every cached mode read-only at once (the
    mount polls quorum every 0.2 s), regaining it turns them back."""
    os.makedirs(remote.path("nodes/n1/lxc"))
    conf = remote.path("nodes/n1/lxc/105.conf")
    with open(conf, "w") as out:
        out.write("arch: amd64\n")
    assert os.stat(conf).st_mode & 0o777 == 0o640  # cached now
    assert os.lstat(remote.path("local")).st_mode & 0o200
    body = "arch: amd64\ncores: 2\nmemory: 512\n"
    assert remote.apply(("create", "nodes/n1/lxc/105.conf.tmp", ""),
                        ("write", "nodes/n1/lxc/105.conf.tmp", body),
                        ("rename", "nodes/n1/lxc/105.conf.tmp",
                         "nodes/n1/lxc/105.conf")) == [0, 0, 0]
    assert wait_for(lambda: os.stat(conf).st_size == len(body))
    with open(conf) as back:
        assert back.read() == body
    assert remote.apply(("mtime", "nodes/n1/lxc/105.conf", "1234567890")) == [0]
    assert wait_for(lambda: os.stat(conf).st_mtime == 1234567890)
    assert remote.apply(("quorum", "", "0")) == [0]
    assert wait_for(lambda: os.stat(conf).st_mode & 0o777 == 0o440)
    assert wait_for(lambda: os.stat(remote.path("nodes/n1/lxc")).st_mode & 0o777 == 0o555)
    assert wait_for(lambda: not os.lstat(remote.path("local")).st_mode & 0o200)
    assert remote.apply(("quorum", "", "1")) == [0]
    assert wait_for(lambda: os.stat(conf).st_mode & 0o777 == 0o640)
    assert wait_for(lambda: os.lstat(remote.path("local")).st_mode & 0o200)
