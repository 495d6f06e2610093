"""Resource agents: how the HA daemon acts on guests.

`ResourceAgent` is the interface a guest driver implements (the QEMU driver replaces the
process-based test guest later). A guest's config lives in the tree at
`nodes/<node>/qemu-server/<vmid>.conf` (`lxc/` for containers); the node whose directory
holds it owns the guest, so relocating a guest is renaming its config into another node's
directory (the filesystem makes that rename atomic cluster-wide).

`ProcessGuestAgent` runs each guest as a `corral.ha.daemon.testguest` process, detached in
its own session so it outlives the HA daemon (as a VM outlives pve-ha-lrm). Its pid file
`<guest_dir>/<vmid>.pid` is what the watchdog fallback kills when the node must be fenced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from corral.ha.daemon.testguest import MARKER

STOP_POLL_S = 0.05
DEFAULT_STOP_TIMEOUT_S = 10
START_CONFIRM_TIMEOUT_S = 5.0
CONFIG_DIRS = {"vm": "qemu-server", "ct": "lxc"}


class ResourceAgent(Protocol):
    def config_node(self, sid: str) -> str | None: ...
    def running(self, sid: str) -> bool:
        """Running on this node."""
    def start(self, sid: str) -> bool: ...
    def stop(self, sid: str, timeout_s: int | None) -> bool: ...
    def migrate(self, sid: str, target: str, online: bool = False) -> bool:
        """Move the guest's config to target's directory: live if `online` and the agent
        can, else offline (a running guest is stopped first)."""
    def move_config(self, sid: str, from_node: str, to_node: str) -> bool: ...
    def local_pids(self) -> list[int]: ...


def split_sid(sid: str) -> tuple[str, str]:
    kind, _, ident = sid.partition(":")
    return kind, ident


def guest_config_path(root: Path, node: str, sid: str) -> Path:
    kind, ident = split_sid(sid)
    return root / "nodes" / node / CONFIG_DIRS.get(kind, "qemu-server") / f"{ident}.conf"


def move_guest_config(root: Path, sid: str, from_node: str, to_node: str) -> bool:
    """Rename a guest's config into another node's directory (one replicated rename;
    the tree keeps the VMID unique). False if the rename failed."""
    source = guest_config_path(root, from_node, sid)
    dest = guest_config_path(root, to_node, sid)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, dest)
    except OSError:
        return False
    return True


def find_config_node(root: Path, sid: str) -> str | None:
    kind, ident = split_sid(sid)
    subdir = CONFIG_DIRS.get(kind)
    if subdir is None:
        return None
    try:
        nodes = sorted(os.listdir(root / "nodes"))
    except OSError:
        return None
    for node in nodes:
        if (root / "nodes" / node / subdir / f"{ident}.conf").exists():
            return node
    return None


def pid_is_guest(pid: int) -> bool:
    """Alive, not a zombie, and really a guest - a test guest or a QEMU process (pid files
    can outlive their process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except (OSError, IndexError):
        return False
    program = os.path.basename(cmdline.split(b"\0", 1)[0])
    return state != b"Z" and (MARKER.encode() in cmdline or program.startswith(b"qemu-system"))


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class ProcessGuestAgent:
    def __init__(self, root: Path, node: str, guest_dir: Path) -> None:
        self.root = root
        self.node = node
        self.guest_dir = guest_dir
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        guest_dir.mkdir(parents=True, exist_ok=True)

    def _pid_file(self, sid: str) -> Path:
        return self.guest_dir / f"{split_sid(sid)[1]}.pid"

    def _reap(self) -> None:
        for pid, child in list(self.children.items()):
            if child.poll() is not None:
                del self.children[pid]

    def _pid(self, sid: str) -> int | None:
        self._reap()
        pid = read_pid(self._pid_file(sid))
        return pid if pid is not None and pid_is_guest(pid) else None

    def config_node(self, sid: str) -> str | None:
        return find_config_node(self.root, sid)

    def running(self, sid: str) -> bool:
        return self._pid(sid) is not None

    def start(self, sid: str) -> bool:
        if self.running(sid):
            return True
        if self.config_node(sid) != self.node:
            return False
        args = [sys.executable, "-m", MARKER, "--vmid", split_sid(sid)[1], "--node", self.node,
                "--guest-dir", str(self.guest_dir)]
        child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        self.children[child.pid] = child
        pid_file = self._pid_file(sid)
        tmp = pid_file.with_suffix(".pid.tmp")
        tmp.write_text(f"{child.pid}\n")
        os.replace(tmp, pid_file)
        deadline = time.monotonic() + START_CONFIRM_TIMEOUT_S
        while time.monotonic() < deadline:
            if pid_is_guest(child.pid):
                return True
            time.sleep(STOP_POLL_S)
        return False

    def stop(self, sid: str, timeout_s: int | None) -> bool:
        pid = self._pid(sid)
        if pid is None:
            return True
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + (timeout_s if timeout_s else DEFAULT_STOP_TIMEOUT_S)
        while time.monotonic() < deadline and self._pid(sid) is not None:
            time.sleep(STOP_POLL_S)
        if self._pid(sid) is not None:
            os.kill(pid, signal.SIGKILL)
            time.sleep(STOP_POLL_S)
        stopped = self._pid(sid) is None
        if stopped:
            self._pid_file(sid).unlink(missing_ok=True)
        return stopped

    def migrate(self, sid: str, target: str, online: bool = False) -> bool:
        # No live migration for the test guest: a running one is stopped and moved.
        if self.running(sid) and not (online and self.stop(sid, None)):
            return False
        return self.move_config(sid, self.node, target)

    def move_config(self, sid: str, from_node: str, to_node: str) -> bool:
        return move_guest_config(self.root, sid, from_node, to_node)

    def local_pids(self) -> list[int]:
        pids = []
        for pid_file in self.guest_dir.glob("*.pid"):
            pid = read_pid(pid_file)
            if pid is not None and pid_is_guest(pid):
                pids.append(pid)
        return pids
