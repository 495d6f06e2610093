"""What the benchmark needs from one system under test, and the parts both share.

A `Cluster` runs one daemon per node, each inside its node's network namespace,
plus one membership watcher per node (a client that prints a JSON line with a
CLOCK_MONOTONIC timestamp for every ring and group change). Benchmark clients
are started per run. The corosync and Corral subclasses only say how to write
their configuration and which command lines to run; starting, waiting,
killing, CPU sampling and cleanup are the same code for both systems, so the
two are measured the same way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.netns import Topology
from bench.procs import LineWatcher, ProcessSet, cpu_ticks

RING_WAIT_S = 60.0
CLIENT_EXIT_GRACE_S = 20.0


class BenchError(RuntimeError):
    """A cluster did not reach the state a measurement needs."""


@dataclass(frozen=True)
class ClusterSettings:
    """Options that change between measurements; None means the system's default."""

    token_ms: int | None = None
    sched_rr: bool = True
    # mcasts Corral's benchmark client keeps in flight (see bench/corral_client.py).
    corral_window: int = 32


@dataclass(frozen=True)
class BenchSpec:
    """One client run: nodes 1..senders send `size`-byte messages for duration_ms."""

    size: int
    senders: int
    duration_ms: int
    rate_per_s: int = 0
    timeout_ms: int = 60_000
    settle_ms: int = 500

    def is_sender(self, node: int) -> bool:
        return node <= self.senders


class Cluster(ABC):
    """One system's daemons on the benchmark topology."""

    system = "?"

    def __init__(self, topology: Topology, workdir: Path, settings: ClusterSettings) -> None:
        self.topology = topology
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.procs = ProcessSet()
        self.daemons: dict[int, subprocess.Popen[str]] = {}
        self.watchers: dict[int, LineWatcher] = {}
        self._watcher_procs: dict[int, subprocess.Popen[str]] = {}

    # What a subclass provides.
    @abstractmethod
    def prepare(self) -> None:
        """Write configuration files and keys under workdir."""

    @abstractmethod
    def daemon_argv(self, node: int) -> list[str]:
        """The command that runs node's daemon (already inside its namespace)."""

    @abstractmethod
    def client_argv(self, node: int, spec: BenchSpec) -> list[str]:
        """The benchmark client command for node (run inside its namespace)."""

    @abstractmethod
    def watch_argv(self, node: int) -> list[str]:
        """The membership watcher command for node (run inside its namespace)."""

    def describe(self) -> dict[str, Any]:
        return {"system": self.system}

    # Shared behaviour.
    def node_dir(self, node: int) -> Path:
        path = self.workdir / self.system / f"n{node}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self) -> None:
        self.prepare()
        for node in self.topology.nodes:
            self.start_daemon(node)
        for node in self.topology.nodes:
            self.start_watcher(node)

    def start_daemon(self, node: int) -> None:
        log = self.node_dir(node) / "daemon.out"
        self.daemons[node] = self.procs.start(self.daemon_argv(node), log_path=log)

    def start_watcher(self, node: int) -> None:
        argv = self.topology.in_namespace(node, self.watch_argv(node))
        proc = self.procs.start(argv, log_path=self.node_dir(node) / "watch.err",
                                capture_stdout=True)
        assert proc.stdout is not None
        self._watcher_procs[node] = proc
        self.watchers[node] = LineWatcher(proc.stdout, f"{self.system}-n{node}")

    def wait_ring(self, members: int, nodes: list[int], timeout_s: float = RING_WAIT_S,
                  after_ns: int = 0, group_counts: bool = False) -> dict[int, dict[str, Any]]:
        """Wait until every watcher in nodes reports a ring of exactly `members` nodes.

        With group_counts, a change of the watchers' own group that lists
        `members` distinct nodes counts too: all watchers see each other, so
        the ring has them all. That is how readiness is detected when a
        watcher connected after the ring formed (Corral, like corosync
        without the initial-totem-conf flag, reports only later changes).
        """
        def matches(event: dict[str, Any]) -> bool:
            if int(event.get("t_ns", 0)) < after_ns:
                return False
            if event.get("event") == "ring":
                return len(event.get("members", [])) == members
            if group_counts and event.get("event") == "group":
                return len({entry[0] for entry in event.get("members", [])}) == members
            return False

        deadline = time.monotonic() + timeout_s
        found: dict[int, dict[str, Any]] = {}
        for node in nodes:
            self._check_daemon(node)
            event = self.watchers[node].wait_for(matches, max(0.0, deadline - time.monotonic()))
            if event is None:
                self._check_daemon(node)
                raise BenchError(f"{self.system} n{node}: no {members}-member ring "
                                 f"within {timeout_s:.0f} s (see {self.node_dir(node)})")
            found[node] = event
        return found

    def _check_daemon(self, node: int) -> None:
        proc = self.daemons.get(node)
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{self.system} n{node} daemon exited with status {proc.returncode} "
                             f"(see {self.node_dir(node)})")

    def daemon_pid(self, node: int) -> int:
        return self.daemons[node].pid

    def kill_daemon(self, node: int) -> int:
        """kill -9 node's daemon; returns the CLOCK_MONOTONIC time just before the signal."""
        proc = self.daemons[node]
        t_ns = time.monotonic_ns()
        self.procs.kill(proc, signal.SIGKILL)
        proc.wait(timeout=10)
        return t_ns

    def cpu_ticks(self) -> dict[int, int]:
        return {node: cpu_ticks(self.daemon_pid(node)) for node in self.topology.nodes}

    def run_clients(self, spec: BenchSpec) -> list[dict[str, Any]]:
        """Run one client per node; return each node's JSON result (or an error record)."""
        clients: dict[int, subprocess.Popen[str]] = {}
        for node in self.topology.nodes:
            argv = self.topology.in_namespace(node, self.client_argv(node, spec))
            clients[node] = self.procs.start(argv, log_path=self.node_dir(node) / "client.err",
                                             capture_stdout=True)
        deadline = time.monotonic() + spec.timeout_ms / 1000 + CLIENT_EXIT_GRACE_S
        results = []
        for node, proc in clients.items():
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.procs.stop(proc)
                out = ""
            result = parse_client_output(node, out, proc.returncode)
            if "error" in result:
                result["error"] += last_line(self.node_dir(node) / "client.err")
            results.append(result)
        return results

    def stop(self) -> None:
        self.procs.stop_all()
        self.daemons.clear()
        self.watchers.clear()


def parse_client_output(node: int, out: str, returncode: int | None) -> dict[str, Any]:
    """The last JSON object a client printed, or a record saying it printed none."""
    for line in reversed(out.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            value["node"] = node
            return value
    return {"node": node, "error": f"no result (exit status {returncode})", "msgs": 0,
            "gaps": 0, "complete": False}


def last_line(path: Path) -> str:
    """': <last non-empty line of path>' (a client's last complaint), or ''."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1].strip()[:300]}" if lines else ""
