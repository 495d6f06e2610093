"""Fixtures for the FUSE tests: a real mount served by a separate process
(`python -m corral.cfs.mount`) over a real store in a temporary directory.

Every mount is stopped in teardown, even when a test fails: SIGTERM, then
kill -9 and a lazy unmount if the process does not go.
"""

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

MOUNT_START_TIMEOUT_S = 30.0
MOUNT_STOP_TIMEOUT_S = 15.0

HAVE_FUSE = os.path.exists("/dev/fuse") and os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_FUSE:
        return
    skip = pytest.mark.skip(reason="needs /dev/fuse and root")
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "shared_mount" in names or "mount_factory" in names:
            item.add_marker(skip)


class Mount:
    """One mount process; `root` is the mounted tree."""

    def __init__(self, base: Path, nodename: str = "n1", *extra: str) -> None:
        self.base = base
        self.store = base / "store"
        self.root = base / "mnt"
        self.nodename = nodename
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "mount.log"

    def start(self, *extra: str) -> Mount:
        ready = self.base / "ready"
        ready.unlink(missing_ok=True)
        args = [sys.executable, "-m", "corral.cfs.mount", "--store", str(self.store),
                "--mountpoint", str(self.root), "--nodename", self.nodename,
                "--ready-file", str(ready), *(extra or self.extra or ("--local",))]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + MOUNT_START_TIMEOUT_S
        while not ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited {self.proc.returncode}: "
                                     + self.log.read_text())
            if time.monotonic() > deadline:
                raise AssertionError("mount did not come up: " + self.log.read_text())
            time.sleep(0.05)
        os.stat(self.root)  # the first request answers once the loop runs
        return self

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(MOUNT_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(MOUNT_STOP_TIMEOUT_S)
        self.proc = None

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            except Exception:
                self.kill()
        self.kill()
        if is_stale(self.root) or is_mounted(self.root):
            lazy_unmount(self.root)

    def path(self, rel: str) -> str:
        return str(self.root / rel)


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[type]:
    made: list[Mount] = []

    class Factory:
        @staticmethod
        def new(name: str = "m", nodename: str = "n1", *extra: str) -> Mount:
            base = tmp_path / name
            base.mkdir(exist_ok=True)
            mount = Mount(base, nodename, *extra)
            made.append(mount)
            return mount

    yield Factory
    for mount in made:
        mount.cleanup()


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One local-mode mount for a module's tests (node n1, with the usual
    directories for n1 and n2); tests use their own subdirectories."""
    base = tmp_path_factory.mktemp("shared")
    mount = Mount(base, "n1")
    try:
        mount.start()
        for node in ("n1", "n2"):
            for sub in ("qemu-server", "lxc", "priv"):
                os.makedirs(mount.path(f"nodes/{node}/{sub}"), exist_ok=True)
        os.makedirs(mount.path("priv/lock"), exist_ok=True)
        yield mount
    finally:
        mount.cleanup()
