"""`corral demo`: a local N-node Corral cluster built the way an operator builds one.

    corral demo [--nodes N] [--duration S] [--no-netns] [--dir D] [--stats-interval S]
    corral demo --engine [--nodes N] [--links L] [--load RATE:SIZE] ...   (bare Totem engines)

The default demo runs one `corrald` per node and builds the cluster through
the real path: `corral create` on node 1, then for every other node a join
token from node 1 and `corral add` with the pinned certificate fingerprint.
It prints the time to a quorate N-node cluster, `corral status` of node 1, and
where every node's files, logs and control socket are; then it prints the
daemons' log lines until Ctrl-C (or for `--duration` seconds), stops every
daemon (SIGTERM: graceful leave) and removes what it set up.

As root, each node runs in its own network namespace (`crl-demo-n<i>`),
connected by veth pairs to a private bridge (`crl-demo-br`, no uplink, no
address on the host) with addresses 10.213.0.<i>; otherwise the nodes use
127.0.0.<i> and free ports. `--engine` runs the earlier demo of bare
`corral engine` processes with a message load. `LocalCluster` is that
machinery as a class; the real-process tests use it too (with their own
name prefix).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from corral.corosync_conf import render_cluster
from corral.totem import auth

DEMO_LOAD = "50:256"
STOP_TIMEOUT_S = 10.0


def _run(argv: list[str], check: bool = True, stdin_text: str | None = None) -> None:
    subprocess.run(argv, check=check, input=stdin_text, text=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if check else subprocess.DEVNULL)


def stop_process(process: subprocess.Popen[bytes] | None,
                 timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM a node process (graceful leave), SIGKILL after timeout_s; its exit status."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class LocalCluster:
    """N engine processes on this machine, in network namespaces or on 127.0.0.x."""

    def __init__(self, n_nodes: int, workdir: str, prefix: str = "crl-demo",
                 use_netns: bool | None = None, subnet: str = "10.213.0",
                 load: str | None = None, secauth: bool = True,
                 totem_options: dict[str, str] | None = None,
                 stats_interval_s: float = 5.0, n_links: int = 1) -> None:
        self.n_nodes = n_nodes
        self.n_links = n_links
        self.workdir = workdir
        self.prefix = prefix
        self.use_netns = can_use_netns() if use_netns is None else use_netns
        self.subnet = subnet if self.use_netns else "127.0.0"
        self.load = load
        self.secauth = secauth
        self.totem_options = totem_options or {}
        self.stats_interval_s = stats_interval_s
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.port = 5405

    # ---- layout --------------------------------------------------------------

    @property
    def nodeids(self) -> list[int]:
        return list(range(1, self.n_nodes + 1))

    def address(self, nodeid: int, link: int = 0) -> str:
        """Link L uses the subnet with L added to its second octet (10.213.0 -> 10.214.0)."""
        first, second, third = self.subnet.split(".")
        return f"{first}.{int(second) + link}.{third}.{nodeid}"

    def bridge(self, link: int) -> str:
        return f"{self.prefix}-br" if link == 0 else f"{self.prefix}-br{link}"

    def veth(self, nodeid: int, link: int) -> str:
        return f"{self.prefix}-v{nodeid}" if link == 0 else f"{self.prefix}-v{nodeid}l{link}"

    def netns(self, nodeid: int) -> str:
        return f"{self.prefix}-n{nodeid}"

    def node_dir(self, nodeid: int) -> str:
        return os.path.join(self.workdir, f"n{nodeid}")

    def log_path(self, nodeid: int) -> str:
        return os.path.join(self.node_dir(nodeid), "engine.log")

    def deliveries_path(self, nodeid: int) -> str:
        return os.path.join(self.node_dir(nodeid), "deliveries.log")

    @property
    def config_path(self) -> str:
        return os.path.join(self.workdir, "corosync.conf")

    @property
    def key_path(self) -> str:
        return os.path.join(self.workdir, "authkey")

    # ---- setup and teardown --------------------------------------------------

    def setup(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        if self.use_netns:
            self._setup_netns()
        else:
            self.port = free_udp_port(self.address(1))
        auth.write_key_file(self.key_path)
        nodes = [(i, f"node{i}", [self.address(i, link) for link in range(self.n_links)])
                 for i in self.nodeids]
        text = render_cluster(f"{self.prefix}-cluster", nodes, secauth=self.secauth,
                              port=self.port, totem_options=self.totem_options)
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(text)
        for nodeid in self.nodeids:
            os.makedirs(self.node_dir(nodeid), exist_ok=True)

    def _setup_netns(self) -> None:
        self.cleanup_netns()
        for nodeid in self.nodeids:
            _run(["ip", "netns", "add", self.netns(nodeid)])
            _run(["ip", "-n", self.netns(nodeid), "link", "set", "lo", "up"])
        for link in range(self.n_links):
            bridge = self.bridge(link)
            _run(["ip", "link", "add", bridge, "type", "bridge"])
            _run(["ip", "link", "set", bridge, "up"])
            for nodeid in self.nodeids:
                namespace, veth, inside = self.netns(nodeid), self.veth(nodeid, link), f"eth{link}"
                _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", inside,
                      "netns", namespace])
                _run(["ip", "link", "set", veth, "master", bridge, "up"])
                _run(["ip", "-n", namespace, "addr", "add", f"{self.address(nodeid, link)}/24",
                      "dev", inside])
                _run(["ip", "-n", namespace, "link", "set", inside, "up"])

    def cleanup_netns(self) -> None:
        """Remove this prefix's namespaces and links (also leftovers of a crashed run)."""
        for nodeid in self.nodeids:
            _run(["ip", "netns", "del", self.netns(nodeid)], check=False)
            for link in range(self.n_links):
                _run(["ip", "link", "del", self.veth(nodeid, link)], check=False)
        for link in range(self.n_links):
            _run(["ip", "link", "del", self.bridge(link)], check=False)

    def close(self) -> None:
        for nodeid in list(self.processes):
            self.stop(nodeid)
        if self.use_netns:
            self.cleanup_netns()

    def __enter__(self) -> LocalCluster:
        self.setup()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- processes -----------------------------------------------------------

    def command(self, nodeid: int, extra: Sequence[str] = ()) -> list[str]:
        argv = [sys.executable, "-m", "corral.cli", "engine", "--config", self.config_path,
                "--nodeid", str(nodeid), "--keyfile", self.key_path,
                "--state-dir", self.node_dir(nodeid),
                "--log-deliveries", self.deliveries_path(nodeid),
                "--stats-interval", str(self.stats_interval_s), *extra]
        if self.load:
            argv += ["--load", self.load]
        if self.use_netns:
            argv = ["ip", "netns", "exec", self.netns(nodeid), *argv]
        return argv

    def start(self, nodeid: int, extra: Sequence[str] = ()) -> None:
        if nodeid in self.processes and self.processes[nodeid].poll() is None:
            raise RuntimeError(f"node {nodeid} is already running")
        with open(self.log_path(nodeid), "ab") as log:
            self.processes[nodeid] = subprocess.Popen(
                self.command(nodeid, extra), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start_all(self) -> None:
        for nodeid in self.nodeids:
            self.start(nodeid)

    def stop(self, nodeid: int, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful leave), SIGKILL after timeout_s; returns the exit status."""
        return stop_process(self.processes.pop(nodeid, None), timeout_s)

    def kill(self, nodeid: int) -> None:
        process = self.processes.pop(nodeid)
        process.kill()
        process.wait()

    def running(self, nodeid: int) -> bool:
        process = self.processes.get(nodeid)
        return process is not None and process.poll() is None

    def status(self, nodeid: int) -> dict[str, Any]:
        path = os.path.join(self.node_dir(nodeid), "status.json")
        try:
            with open(path, encoding="utf-8") as handle:
                result: dict[str, Any] = json.load(handle)
                return result
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def members(self, nodeid: int) -> list[int]:
        return list(self.status(nodeid).get("members") or [])

    # ---- faults (network namespaces only) ------------------------------------

    def nft(self, nodeid: int, ruleset: str) -> None:
        if not self.use_netns:
            raise RuntimeError("nft faults need network namespaces (root)")
        _run(["ip", "netns", "exec", self.netns(nodeid), "nft", "-f", "-"], stdin_text=ruleset)

    def clear_faults(self, nodeid: int) -> None:
        if self.use_netns:
            _run(["ip", "netns", "exec", self.netns(nodeid), "nft", "delete", "table", "inet",
                  "crlfault"], check=False)

    def block(self, nodeid: int, peers: Sequence[int], links: Sequence[int] | None = None) -> None:
        """Drop all UDP between `nodeid` and `peers` on `links` (default: every link),
        with nftables in nodeid's namespace."""
        chosen = range(self.n_links) if links is None else links
        addresses = ", ".join(self.address(p, link) for p in peers for link in chosen)
        self.clear_faults(nodeid)
        self.nft(nodeid, f"""table inet crlfault {{
  chain input {{ type filter hook input priority 0; ip saddr {{ {addresses} }} udp dport {self.port} drop; }}
  chain output {{ type filter hook output priority 0; ip daddr {{ {addresses} }} udp dport {self.port} drop; }}
}}
""")

    def lossy(self, nodeid: int, percent: int) -> None:
        """Drop `percent` % of this node's UDP packets, in and out."""
        self.clear_faults(nodeid)
        rule = f"udp dport {self.port} numgen random mod 100 < {percent} drop"
        self.nft(nodeid, f"""table inet crlfault {{
  chain input {{ type filter hook input priority 0; {rule}; }}
  chain output {{ type filter hook output priority 0; {rule}; }}
}}
""")


def parse_engine_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="corral demo --engine",
                                     description="local multi-node Totem engine demo")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--links", type=int, default=1, help="links per node (1..8)")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds (0: until Ctrl-C)")
    parser.add_argument("--load", default=DEMO_LOAD, metavar="RATE:SIZE",
                        help=f"per-node message load (default {DEMO_LOAD})")
    parser.add_argument("--no-netns", action="store_true", help="use 127.0.0.x even as root")
    parser.add_argument("--dir", help="demo directory (default: a new temporary one)")
    parser.add_argument("--stats-interval", type=float, default=5.0, metavar="S")
    parser.add_argument("--prefix", default="crl-demo", help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 16:
        parser.error("--nodes must be 1..16")
    if not 1 <= args.links <= 8:
        parser.error("--links must be 1..8")
    return args


def print_new_log_lines(logs: Sequence[tuple[int, str, str | os.PathLike[str]]],
                        offsets: dict[int, int]) -> None:
    """Print the complete lines each node's log gained since the last call, prefixed
    with the node's label; `logs` holds (nodeid, label, log path), `offsets` the
    position read so far per node."""
    for nodeid, label, path in logs:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as log:
            log.seek(offsets.get(nodeid, 0))
            data = log.read()
            complete = data.rfind(b"\n") + 1
            offsets[nodeid] = offsets.get(nodeid, 0) + complete
            for line in data[:complete].decode(errors="replace").splitlines():
                print(f"{label}: {line}", flush=True)


def _print_new_lines(cluster: LocalCluster, offsets: dict[int, int]) -> None:
    print_new_log_lines([(n, f"node{n}", cluster.log_path(n)) for n in cluster.nodeids], offsets)


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _print_summary(cluster: LocalCluster) -> None:
    for nodeid in cluster.nodeids:
        status = cluster.status(nodeid)
        if not status:
            continue
        transport = status.get("transport_stats", {})
        drops = sum(v for k, v in transport.items() if k.startswith("drop_"))
        ring = status.get("ring_id") or (0, 0)
        print(f"corral demo: node{nodeid} delivered {status.get('delivered', 0)} messages, "
              f"sent {status.get('load_sent', 0)}, last ring {ring[0]:x}.{ring[1]:x}, "
              f"dropped packets {drops}, max loop lag "
              f"{status.get('lag', {}).get('loop_lag_max_us', 0) / 1000:.1f} ms", flush=True)


def engine_main(argv: Sequence[str]) -> int:
    args = parse_engine_args(argv)
    workdir = args.dir or tempfile.mkdtemp(prefix="corral-demo-")
    cluster = LocalCluster(args.nodes, workdir, prefix=args.prefix,
                           use_netns=False if args.no_netns else None,
                           load=args.load, stats_interval_s=args.stats_interval,
                           n_links=args.links)
    mode = f"network namespaces {args.prefix}-n*" if cluster.use_netns else "127.0.0.x"
    print(f"corral demo: {args.nodes} nodes in {workdir} ({mode}); Ctrl-C to stop", flush=True)
    interrupted = False
    offsets: dict[int, int] = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)  # clean up on these too, not only Ctrl-C
    try:
        cluster.setup()
        cluster.start_all()
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
            _print_new_lines(cluster, offsets)
            if not any(cluster.running(n) for n in cluster.nodeids):
                print("corral demo: every engine exited", flush=True)
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        statuses = {n: cluster.stop(n) for n in cluster.nodeids}
        _print_new_lines(cluster, offsets)
        _print_summary(cluster)
        if cluster.use_netns:
            cluster.cleanup_netns()
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"corral demo: stopped (exit statuses {statuses})", flush=True)
    failed = any(status not in (0, None) for status in statuses.values())
    return 1 if failed and not interrupted else 0


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if "--engine" in args:
        args.remove("--engine")
        return engine_main(args)
    from corral.daemon.demo import main as daemon_main

    return daemon_main(args)
