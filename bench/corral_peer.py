"""Three Corral engines on the benchmark topology, configured like the corosync peer.

Each node runs `corral engine --config corosync.conf --nodeid N --keyfile K
--state-dir D --ipc-socket S` inside its network namespace, with the very
corosync.conf the corosync peer writes (knet, secauth on, same nodelist and
timers; Corral reads the corosync syntax, see docs/transport.md) and the same
kind of 128-byte key. Corral has no compiled-in pid lock, so no private mount
namespace is needed.

The benchmark client is bench/corral_client.py, connected to the node's CPG
Unix socket. Membership is watched over the same socket; an engine that
serves no CPG socket is watched through its log lines instead (see
corral_client.py), and `describe()` says which method was used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.corosync_peer import write_node_configs
from bench.peer import BenchSpec, Cluster

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "bench" / "corral_client.py"


def corral_version() -> str:
    out = subprocess.run([sys.executable, "-m", "corral.cli", "version"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return out or "unknown"


class CorralCluster(Cluster):
    system = "corral"

    def prepare(self) -> None:
        self.authkey = write_node_configs(self, "corral", sched_rr=True)

    def socket_path(self, node: int) -> Path:
        return self.node_dir(node) / "cpg.sock"

    def daemon_argv(self, node: int) -> list[str]:
        node_dir = self.node_dir(node)
        # CORRAL_BENCH_PROFILE=DIR: run each engine under cProfile, stats in DIR/engine-N.prof.
        profile_dir = os.environ.get("CORRAL_BENCH_PROFILE")
        profiler = ["-m", "cProfile", "-o", f"{profile_dir}/engine-{node}.prof"] \
            if profile_dir else []
        return self.topology.in_namespace(node, [
            sys.executable, *profiler, "-m", "corral.cli", "engine",
            "--config", str(node_dir / "corosync.conf"),
            "--nodeid", str(node),
            "--keyfile", str(self.authkey),
            "--state-dir", str(node_dir / "state"),
            "--ipc-socket", str(self.socket_path(node)),
        ])

    def client_argv(self, node: int, spec: BenchSpec) -> list[str]:
        argv = [
            sys.executable, str(CLIENT), "bench",
            "--socket", str(self.socket_path(node)),
            "--nodes", str(self.topology.node_count),
            "--senders", str(spec.senders),
            "--size", str(spec.size),
            "--duration-ms", str(spec.duration_ms),
            "--rate", str(spec.rate_per_s),
            "--timeout-ms", str(spec.timeout_ms),
            "--settle-ms", str(spec.settle_ms),
            "--window", str(self.settings.corral_window),
        ]
        if spec.is_sender(node):
            argv.append("--send")
        return argv

    def watch_argv(self, node: int) -> list[str]:
        return [sys.executable, str(CLIENT), "watch", "--socket", str(self.socket_path(node)),
                "--file", str(self.node_dir(node) / "daemon.out")]

    def membership_watch(self) -> str:
        """'cpg ipc', or 'engine log' if a watcher found no CPG socket and followed the log."""
        fell_back = any(event.get("event") == "fallback"
                        for watcher in self.watchers.values() for event in watcher.snapshot())
        return "engine log" if fell_back else "cpg ipc"

    def describe(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "version": corral_version(),
            "transport": "corral udp (knet-compatible config)",
            "crypto": "secauth on (aes-256-gcm)",
            "token_ms": self.settings.token_ms,
            "client_window": self.settings.corral_window or "256 KiB worth",
            "membership_watch": self.membership_watch(),
        }
