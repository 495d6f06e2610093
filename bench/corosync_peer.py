"""Three Debian corosync 3.1.x daemons on the benchmark topology, run as Proxmox runs them.

Per node we write a corosync.conf with the shared nodelist (knet, `secauth: on`
which means aes256 + sha256, `link_mode: passive`, `ip_version: ipv4-6`), a
per-node `state_dir` and log file (`timestamp: hires`), and everything else at
corosync's defaults, including SCHED_RR scheduling (`ClusterSettings.sched_rr`
turns it off, see docs/bench.md). All nodes share one random 128-byte authkey.

Each daemon runs as `ip netns exec <ns> unshare -m -- sh -c 'mount -t tmpfs
tmpfs /run && exec corosync -f -c <conf>'`:
- the network namespace gives the node its own address (corosync finds its
  nodeid by matching a local address against the nodelist) and its own libqb
  IPC, since libqb's servers are abstract unix sockets, which are per
  network namespace; so clients must run inside the same namespace;
- the private mount namespace with a tmpfs on /run is mandatory: corosync
  locks a compiled-in pid file (/var/run/corosync.pid) and a second instance
  sharing it exits with status 18.
`ip netns exec`, `unshare` and `sh -c exec` all exec in place, so the pid we
hold is corosync's own pid (kill -9 and /proc/<pid>/stat hit the daemon).

The benchmark client is bench/peers/corosync/cpgbench.c, compiled with gcc
into build/bench/ the first time it is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.peer import BenchError, BenchSpec, Cluster

ROOT = Path(__file__).resolve().parent.parent
CPGBENCH_SOURCE = ROOT / "bench" / "peers" / "corosync" / "cpgbench.c"
BUILD_DIR = ROOT / "build" / "bench"
AUTHKEY_BYTES = 128


def build_cpgbench(build_dir: Path = BUILD_DIR) -> Path:
    """Compile cpgbench if the binary is missing or older than its source."""
    binary = build_dir / "cpgbench"
    if binary.exists() and binary.stat().st_mtime >= CPGBENCH_SOURCE.stat().st_mtime:
        return binary
    if shutil.which("gcc") is None:
        raise BenchError("gcc is needed to build cpgbench (apt-get install build-essential)")
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / "cpgbench.tmp"
    result = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(tmp), str(CPGBENCH_SOURCE),
         "-lcpg"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"building cpgbench failed (is libcpg-dev installed?):\n{result.stderr}")
    tmp.replace(binary)
    return binary


def corosync_version() -> str:
    if shutil.which("corosync") is None:
        return "missing"
    out = subprocess.run(["corosync", "-v"], capture_output=True, text=True, check=False).stdout
    first = out.splitlines()[0] if out else ""
    return first.split("'")[1] if first.count("'") >= 2 else first


def write_authkey(path: Path) -> None:
    """A random key shared by all nodes; knet needs at least 1024 bits."""
    path.write_bytes(os.urandom(AUTHKEY_BYTES))
    path.chmod(0o400)


def render_corosync_conf(
    addresses: dict[int, str], keyfile: Path, state_dir: Path, logfile: Path,
    token_ms: int | None, sched_rr: bool,
) -> str:
    """One node's corosync.conf: the PVE-style totem section plus our per-node paths."""
    token_line = f"    token: {token_ms}\n" if token_ms is not None else ""
    nodes = "".join(
        f"    node {{\n        name: n{nodeid}\n        nodeid: {nodeid}\n"
        f"        quorum_votes: 1\n        ring0_addr: {address}\n    }}\n"
        for nodeid, address in sorted(addresses.items())
    )
    sched_line = "" if sched_rr else "    sched_rr: no\n"
    return (
        "totem {\n"
        "    version: 2\n"
        "    cluster_name: crlbench\n"
        "    config_version: 1\n"
        "    transport: knet\n"
        "    ip_version: ipv4-6\n"
        "    link_mode: passive\n"
        "    secauth: on\n"
        f"    keyfile: {keyfile}\n"
        f"{token_line}"
        "    interface {\n        linknumber: 0\n    }\n"
        "}\n\n"
        f"nodelist {{\n{nodes}}}\n\n"
        "quorum {\n    provider: corosync_votequorum\n}\n\n"
        f"system {{\n    state_dir: {state_dir}\n{sched_line}}}\n\n"
        "logging {\n"
        "    to_stderr: no\n"
        "    to_syslog: no\n"
        "    to_logfile: yes\n"
        f"    logfile: {logfile}\n"
        "    timestamp: hires\n"
        "    debug: off\n"
        "}\n"
    )


def write_node_configs(cluster: Cluster, system: str, sched_rr: bool) -> Path:
    """The cluster's authkey (made once, its path returned) and a corosync.conf per node
    directory (Corral reads the same format); the log goes to <node dir>/<system>.log."""
    authkey = cluster.workdir / f"{system}-authkey"
    if not authkey.exists():
        write_authkey(authkey)
    addresses = {node: cluster.topology.address(node) for node in cluster.topology.nodes}
    for node in cluster.topology.nodes:
        node_dir = cluster.node_dir(node)
        state_dir = node_dir / "state"
        state_dir.mkdir(exist_ok=True)
        conf = render_corosync_conf(addresses, authkey, state_dir, node_dir / f"{system}.log",
                                    cluster.settings.token_ms, sched_rr)
        (node_dir / "corosync.conf").write_text(conf)
    return authkey


class CorosyncCluster(Cluster):
    system = "corosync"

    def prepare(self) -> None:
        if shutil.which("corosync") is None:
            raise BenchError("corosync is not installed (./run bench installs it)")
        self.cpgbench = build_cpgbench()
        self.authkey = write_node_configs(self, "corosync", self.settings.sched_rr)

    def daemon_argv(self, node: int) -> list[str]:
        conf = self.node_dir(node) / "corosync.conf"
        script = f"mount -t tmpfs -o size=16m,mode=0755 tmpfs /run && exec corosync -f -c {conf}"
        return self.topology.in_namespace(
            node, ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]
        )

    def client_argv(self, node: int, spec: BenchSpec) -> list[str]:
        argv = [
            str(self.cpgbench), "bench",
            "--nodes", str(self.topology.node_count),
            "--senders", str(spec.senders),
            "--size", str(spec.size),
            "--duration-ms", str(spec.duration_ms),
            "--rate", str(spec.rate_per_s),
            "--timeout-ms", str(spec.timeout_ms),
            "--settle-ms", str(spec.settle_ms),
        ]
        if spec.is_sender(node):
            argv.append("--send")
        return argv

    def watch_argv(self, node: int) -> list[str]:
        return [str(self.cpgbench), "watch"]

    def describe(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "version": corosync_version(),
            "transport": "knet",
            "crypto": "secauth on (aes256 + sha256)",
            "token_ms": self.settings.token_ms,
            "sched_rr": self.settings.sched_rr,
        }
