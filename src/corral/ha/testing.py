"""Helpers for the real-process HA tests and the failover benchmark (tests/ha_real,
bench/bench_ha_failover.py): HA daemons as subprocesses, their watchdog muxes, and the
safety checker ("a HA guest never runs on two nodes at once").

Every process started here is recorded and stopped in `cleanup()` by pid (also the detached
watchdog muxes and guests, whose pids are read from their pid files).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.ha.daemon.agent import pid_is_guest, read_pid

PYTHON = sys.executable
STOP_TIMEOUT_S = 15.0


def write_members(path: Path, quorate: bool, online: dict[str, bool]) -> None:
    """A membership file in the filesystem's `.members` format."""
    data = {"nodename": "x", "version": 1,
            "cluster": {"name": "t", "version": 1, "nodes": len(online), "quorate": int(quorate)},
            "nodelist": {name: {"id": i + 1, "online": int(up), "ip": f"127.0.0.{i + 1}"}
                         for i, (name, up) in enumerate(sorted(online.items()))}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def guest_pids(guest_dir: Path) -> dict[str, int]:
    """vmid -> pid of the guests really running from this guest directory."""
    running = {}
    for pid_file in guest_dir.glob("*.pid"):
        pid = read_pid(pid_file)
        if pid is not None and pid_is_guest(pid):
            running[pid_file.stem] = pid
    return running


class SafetyChecker(threading.Thread):
    """Polls every node's guest directory; records any moment a guest runs on two nodes."""

    def __init__(self, guest_dirs: dict[str, Path], period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.guest_dirs = guest_dirs
        self.period_s = period_s
        self.violations: list[str] = []
        self.samples = 0
        self.running_on: dict[str, set[str]] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            where: dict[str, set[str]] = {}
            for node, guest_dir in self.guest_dirs.items():
                for vmid in guest_pids(guest_dir):
                    where.setdefault(vmid, set()).add(node)
            for vmid, nodes in where.items():
                if len(nodes) > 1:
                    self.violations.append(f"{time.time():.2f} vm:{vmid} on {sorted(nodes)}")
            self.running_on = where
            self.samples += 1
            self._stop_event.wait(self.period_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


class HaNode:
    """One node's corral-ha process (and the detached mux and guests it starts)."""

    def __init__(self, base: Path, name: str, root: Path, members_file: Path | None,
                 profile: str = "fast", extra_args: list[str] | None = None) -> None:
        self.extra_args = list(extra_args or [])
        self.name = name
        self.root = root
        self.members_file = members_file
        self.profile = profile
        self.run_dir = base / name / "run"
        self.guest_dir = self.run_dir / "guests"
        self.log = base / name / "corral-ha.log"
        self.events = base / name / "events.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> HaNode:
        args = [PYTHON, "-m", "corral.ha.daemon.main", "--node", self.name, "--root",
                str(self.root), "--profile", self.profile, "--watchdog", "fallback",
                "--run-dir", str(self.run_dir), "--event-log", str(self.events)]
        if self.members_file is not None:
            args += ["--members-file", str(self.members_file)]
        args += self.extra_args
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """kill -9 of the HA daemon only (the mux and the guests live on, as on a node whose
        daemon crashed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def kill_all(self) -> None:
        """kill -9 of everything HA on this node, as when the node dies: the daemon, its
        watchdog mux and its guests."""
        self.kill()
        mux = self.mux_pid()
        if mux is not None and _is_python_module(mux, "corral.ha.daemon.watchdog"):
            _kill_pid(mux)
        for pid in guest_pids(self.guest_dir).values():
            _kill_pid(pid)

    def mux_pid(self) -> int | None:
        return read_pid(self.run_dir / "watchdog-mux.pid")

    def cleanup(self) -> None:
        self.kill()
        for pid in guest_pids(self.guest_dir).values():
            _kill_pid(pid)
        mux = self.mux_pid()
        if mux is not None and _is_python_module(mux, "corral.ha.daemon.watchdog"):
            _kill_pid(mux)
        # A daemon killed while starting its mux never wrote the pid file: find this node's
        # mux by its socket path (unique to this run directory).
        for pid in _pids_with_argument(str(self.run_dir / "watchdog-mux.sock")):
            if _is_python_module(pid, "corral.ha.daemon.watchdog"):
                _kill_pid(pid)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _pids_with_argument(argument: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if argument.encode() in handle.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _is_python_module(pid: int, module: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return module.encode() in handle.read()
    except OSError:
        return False


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate: object, timeout_s: float, what: str, period_s: float = 0.1) -> float:
    """Wait until predicate() is true; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def make_guest(root: Path, node: str, vmid: int, config_text: str | None = None) -> None:
    conf = root / "nodes" / node / "qemu-server" / f"{vmid}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(config_text or "memory: 128\ncores: 1\n")


def ha_cli(root: Path, *args: str, members_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--members-file", str(members_file)] if members_file else []
    return subprocess.run([PYTHON, "-m", "corral.ha.cli", "--root", str(root), *extra, *args],
                          capture_output=True, text=True, timeout=60)


class HaOnCluster:
    """corral-ha on every node of a running DemoCluster, one HA guest and the safety
    checker: the setup the real-cluster HA tests and the failover benchmark share.

        ha = HaOnCluster(cluster, base, profile="fast")
        ha.add_guest(vmid=100, node=2)       # config on node 2, `corral-ha add vm:100`
        ha.start(wait_running_on=2)          # checker, then every corral-ha
        ...
        ha.close()                           # stops the checker and every HA process
    """

    def __init__(self, cluster: Any, base: Path, profile: str = "fast",
                 extra_args: Callable[[int], list[str]] | None = None) -> None:
        self.cluster = cluster
        self.profile = profile
        self.names: dict[int, str] = {i: cluster.name(i) for i in cluster.nodeids}
        self.mounts: dict[int, Path] = {i: Path(cluster.mount(i)) for i in cluster.nodeids}
        self.nodes = {i: HaNode(base, self.names[i], self.mounts[i], None, profile=profile,
                                extra_args=extra_args(i) if extra_args else None)
                      for i in cluster.nodeids}
        self.checker = SafetyChecker({self.names[i]: self.nodes[i].guest_dir
                                      for i in cluster.nodeids})
        self.vmid = ""

    def add_guest(self, vmid: int, node: int, config_text: str | None = None,
                  timeout_s: float = 30) -> None:
        """The HA timing profile in datacenter.cfg, the guest's config on `node` (seen on
        every node), and the guest added as an HA resource."""
        first = self.mounts[min(self.mounts)]
        (first / "datacenter.cfg").write_text(f"ha-timing: profile={self.profile}\n")
        make_guest(first, self.names[node], vmid, config_text)
        relative = Path("nodes") / self.names[node] / "qemu-server" / f"{vmid}.conf"
        wait_for(lambda: all((mount / relative).exists() for mount in self.mounts.values()),
                 timeout_s, "the guest config on every node")
        added = ha_cli(first, "add", f"vm:{vmid}")
        if added.returncode != 0:
            raise RuntimeError(f"corral-ha add vm:{vmid}: {added.stderr}")
        self.vmid = str(vmid)

    def start(self, wait_running_on: int, timeout_s: float = 60) -> None:
        self.checker.start()
        for node in self.nodes.values():
            node.start()
        name = self.names[wait_running_on]
        wait_for(lambda: self.checker.running_on.get(self.vmid) == {name}, timeout_s,
                 f"vm:{self.vmid} running on {name}\n"
                 + self.nodes[wait_running_on].log_text()[-3000:])

    def logs(self, *nodeids: int) -> str:
        return "".join(self.nodes[i].log_text()[-3000:] for i in nodeids)

    def close(self) -> None:
        if self.checker.is_alive():
            self.checker.stop()
        for node in self.nodes.values():
            node.cleanup()
