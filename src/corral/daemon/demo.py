"""The corrald demo behind `corral demo` (see corral.demo for the user-facing text).

`DemoCluster` sets up the network (namespaces or 127.0.0.x, via LocalCluster),
creates the cluster on node 1 with `corral create`, joins the others with
`corral join-token` + `corral add`, starts one corrald per node and waits for
a quorate cluster of all nodes. Tests and the lifecycle benchmark use it too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from corral.cluster.layout import Layout
from corral.cluster.pki import fingerprint_pem
from corral.daemon.control import ControlError, request
from corral.demo import (
    LocalCluster,
    free_udp_port,
    print_new_log_lines,
    raise_interrupt,
    stop_process,
)
from corral.guests.qemu import GuestManager

T = TypeVar("T")

STOP_TIMEOUT_S = 10.0
QUORATE_TIMEOUT_S = 60.0
DEMO_PASSWORD = "corral-demo-password"
CLONE_NEWNET = 0x40000000


def free_tcp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class DemoCluster:
    def __init__(self, n_nodes: int, workdir: str, prefix: str = "crl-demo",
                 use_netns: bool | None = None, stats_interval_s: float = 30.0,
                 cluster_name: str = "demo") -> None:
        self.net = LocalCluster(n_nodes, workdir, prefix=prefix, use_netns=use_netns)
        self.n_nodes = n_nodes
        self.workdir = Path(workdir)
        self.stats_interval_s = stats_interval_s
        self.cluster_name = cluster_name
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.totem_port = 5405
        self.api_port = 8006
        self.timings: dict[str, float] = {}
        self.verb_output: dict[int, str] = {}

    @property
    def use_netns(self) -> bool:
        return self.net.use_netns

    @property
    def nodeids(self) -> list[int]:
        return self.net.nodeids

    def address(self, nodeid: int) -> str:
        return self.net.address(nodeid)

    def name(self, nodeid: int) -> str:
        return f"node{nodeid}"

    def state_dir(self, nodeid: int) -> Path:
        return self.workdir / self.name(nodeid) / "state"

    def mount(self, nodeid: int) -> Path:
        return self.workdir / self.name(nodeid) / "tree"

    def layout(self, nodeid: int) -> Layout:
        return Layout(self.state_dir(nodeid))

    def log_path(self, nodeid: int) -> Path:
        return self.workdir / self.name(nodeid) / "corrald.log"

    # Guests: every node has its own QEMU run and task dirs (the nodes share one host, so
    # the defaults under /run and /var/log would collide), passed to its corrald (the
    # target side of migrations) and to its GuestManager.

    def guest_run_dir(self, nodeid: int) -> str:
        return str(self.workdir / self.name(nodeid) / "run")

    def guest_task_dir(self, nodeid: int) -> str:
        return str(self.workdir / self.name(nodeid) / "tasks")

    def guest_manager(self, nodeid: int, test_guest_dir: str | None = None) -> GuestManager:
        return GuestManager(str(self.mount(nodeid)), self.name(nodeid),
                            self.guest_run_dir(nodeid), self.guest_task_dir(nodeid),
                            test_guest_dir=test_guest_dir)

    def write_storage_cfg(self) -> None:
        """One `shared` storage every node sees and a `local<N>` storage per node."""
        lines = [f"dir: shared\n\tpath {self.workdir}/shared\n\tcontent images\n\tshared 1\n"]
        for nodeid in self.nodeids:
            lines.append(f"dir: local{nodeid}\n\tpath {self.workdir}/{self.name(nodeid)}/local\n"
                         f"\tcontent images\n\tnodes {self.name(nodeid)}\n")
        (self.mount(self.nodeids[0]) / "storage.cfg").write_text("\n".join(lines))

    # ---- setup ---------------------------------------------------------------------

    def setup_network(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.use_netns:
            self.net._setup_netns()
        else:
            self.totem_port = free_udp_port(self.address(1))
            self.api_port = free_tcp_port(self.address(1))
        (self.workdir / "admin-password").write_text(DEMO_PASSWORD + "\n")
        os.chmod(self.workdir / "admin-password", 0o600)

    def _in_node(self, nodeid: int, argv: list[str]) -> list[str]:
        # nsenter switches only the network namespace: unlike `ip netns exec` it
        # keeps the host's mount namespace, so each node's tree mount is visible.
        if self.use_netns:
            return ["nsenter", f"--net=/run/netns/{self.net.netns(nodeid)}", "--", *argv]
        return argv

    def corral(self, nodeid: int, *args: str, check: bool = True,
               stdin_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `corral ARGS` as node `nodeid` (in its namespace, with its state dir)."""
        env = dict(os.environ, CORRAL_STATE_DIR=str(self.state_dir(nodeid)))
        argv = self._in_node(nodeid, [sys.executable, "-m", "corral.cli", *args])
        result = subprocess.run(argv, env=env, capture_output=True, text=True, input=stdin_text,
                                timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"corral {' '.join(args)} on node {nodeid} failed "
                               f"({result.returncode}): {result.stderr.strip()}")
        return result

    def create(self) -> None:
        _prepare_mount(self.mount(1))
        self.corral(1, "create", self.cluster_name, "--link0", self.address(1),
                    "--name", self.name(1), "--port", str(self.totem_port),
                    "--api-port", str(self.api_port), "--mount", str(self.mount(1)),
                    "--password-file", str(self.workdir / "admin-password"), "--no-start")

    def join(self, nodeid: int, via: int = 1, token: str | None = None,
             extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """`corral add` node `nodeid` through member `via` (a fresh token unless given)."""
        _prepare_mount(self.mount(nodeid))
        if token is None:
            token = self.join_token(via)
        return self.corral(nodeid, "add", f"{self.address(via)}:{self.api_port}",
                           "--fingerprint", self.fingerprint(via), f"--token={token}",
                           "--name", self.name(nodeid), "--link0", self.address(nodeid),
                           "--api-port", str(self.api_port), "--mount", str(self.mount(nodeid)),
                           "--no-start", *extra)

    def join_token(self, via: int, expire_s: float = 600) -> str:
        data = request(str(self.layout(via).control_socket), "join_token", expire_s=expire_s)
        return str(data["token"])

    def fingerprint(self, nodeid: int) -> str:
        return fingerprint_pem(self.layout(nodeid).node_cert.read_bytes())

    def api_request(self, nodeid: int, method: str, path: str,
                    body: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One request to a node's HTTPS API, TLS checked against the cluster CA, the
        connection closed after the reply: (status, decoded JSON reply)."""
        context = ssl.create_default_context(cafile=str(self.layout(nodeid).ca_cert))
        context.check_hostname = False            # node certificates name the node
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.address(nodeid)}",
                 "Content-Type: application/json", f"Content-Length: {len(payload)}",
                 "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        with socket.create_connection((self.address(nodeid), self.api_port), 10) as raw, \
                context.wrap_socket(raw) as sock:
            sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + payload)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, reply = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(reply)

    def start(self, nodeid: int, wait_for_cluster: bool = False) -> None:
        if nodeid in self.processes and self.processes[nodeid].poll() is None:
            raise RuntimeError(f"node {nodeid} is already running")
        self.state_dir(nodeid).mkdir(parents=True, exist_ok=True)
        argv = self._in_node(nodeid, [
            sys.executable, "-m", "corral.daemon.main", "--state-dir", str(self.state_dir(nodeid)),
            "--stats-interval", str(self.stats_interval_s),
            "--guest-run-dir", self.guest_run_dir(nodeid),
            "--guest-task-dir", self.guest_task_dir(nodeid)])
        if wait_for_cluster:
            argv.append("--wait-for-cluster")
        with open(self.log_path(nodeid), "ab") as log:
            self.processes[nodeid] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                      stderr=log, start_new_session=True)

    def isolate(self, nodeid: int, cut: bool, table: str = "crlisolate") -> None:
        """Cut node `nodeid` off from every other node (nftables in its namespace drops
        all but loopback traffic), or heal it. Needs the netns mode."""
        if not self.use_netns:
            raise RuntimeError("isolating a node needs network namespaces (root)")
        netns = self.net.netns(nodeid)
        if cut:
            script = (f"add table inet {table}\n"
                      f"add chain inet {table} in {{ type filter hook input priority 0; }}\n"
                      f"add chain inet {table} out {{ type filter hook output priority 0; }}\n"
                      f"add rule inet {table} in iifname != \"lo\" drop\n"
                      f"add rule inet {table} out oifname != \"lo\" drop\n")
            subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script,
                           text=True, check=True)
        else:
            subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet",
                            table], check=False, capture_output=True)

    def control(self, nodeid: int, cmd: str, **args: Any) -> Any:
        return request(str(self.layout(nodeid).control_socket), cmd, timeout_s=5.0, **args)

    def quorate_with(self, nodeid: int, n_members: int) -> bool:
        try:
            quorum = self.control(nodeid, "quorum")
        except ControlError:
            return False
        return bool(quorum.get("quorate")) and bool(quorum.get("ready")) and \
            len(quorum.get("members", [])) == n_members

    def wait_quorate(self, nodeids: Sequence[int], n_members: int,
                     timeout_s: float = QUORATE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.quorate_with(n, n_members) for n in nodeids):
                return
            for nodeid in nodeids:
                process = self.processes.get(nodeid)
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"corrald of node {nodeid} exited "
                                       f"({process.returncode}); see {self.log_path(nodeid)}")
            time.sleep(0.05)
        raise RuntimeError(f"no quorate {n_members}-node cluster after {timeout_s:.0f} s")

    def _create_args(self) -> list[str]:
        return ["create", self.cluster_name, "--link0", self.address(1), "--name", self.name(1),
                "--port", str(self.totem_port), "--api-port", str(self.api_port),
                "--mount", str(self.mount(1)),
                "--password-file", str(self.workdir / "admin-password"), "--no-start",
                "--state-dir", str(self.state_dir(1))]

    def _join_args(self, nodeid: int, via: int, token: str) -> list[str]:
        return ["add", f"{self.address(via)}:{self.api_port}", "--fingerprint",
                self.fingerprint(via), f"--token={token}", "--name", self.name(nodeid),
                "--link0", self.address(nodeid), "--api-port", str(self.api_port),
                "--mount", str(self.mount(nodeid)), "--no-start",
                "--state-dir", str(self.state_dir(nodeid))]

    def _verb_in_process(self, nodeid: int, argv: list[str]) -> None:
        """Run a `corral` verb in this process (saves an interpreter start). In a
        worker thread it first enters the node's network namespace (setns() moves
        only the calling thread); the main thread never moves (create needs no
        network)."""
        from corral.cluster import cli

        if self.use_netns and threading.current_thread() is not threading.main_thread():
            _enter_netns(f"/run/netns/{self.net.netns(nodeid)}")
        handler = {"create": cli.create, "add": cli.add}[argv[0]]
        output = io.StringIO()
        errors = io.StringIO()
        # The verbs print for an operator ("start the node with ..."): keep that out of
        # the demo's own output. Only this thread runs meanwhile (the caller waits).
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
            status = handler(argv[1:])
        if status != 0:
            raise RuntimeError(f"corral {argv[0]} for node {nodeid} failed ({status}): "
                               f"{errors.getvalue().strip()}")
        self.verb_output[nodeid] = output.getvalue()

    def build(self) -> None:
        """Start every corrald (waiting for its config), create on node 1, then join
        the other nodes one at a time, each quorate before the next: adding a node
        raises the expected votes, so the cluster needs the new node up before it
        can admit another (as in the reference)."""
        started = time.monotonic()
        for nodeid in self.nodeids:
            _prepare_mount(self.mount(nodeid))
            self.start(nodeid, wait_for_cluster=True)
        self._verb_in_process(1, self._create_args())
        print(f"corral demo: created cluster {self.cluster_name!r} on {self.name(1)}", flush=True)
        self.wait_quorate([1], 1)
        self.timings["create_to_quorate_s"] = time.monotonic() - started
        for nodeid in self.nodeids[1:]:
            token = self.join_token(1)
            self._run_in_thread(nodeid, self._join_args(nodeid, 1, token))
            print(f"corral demo: {self.verb_output[nodeid].splitlines()[0]} (via "
                  f"{self.name(1)}, token + fingerprint)", flush=True)
            self.wait_quorate(self.nodeids[:nodeid], nodeid)
        self.timings["joins_s"] = time.monotonic() - started - self.timings["create_to_quorate_s"]
        self.timings["quorate_s"] = time.monotonic() - started

    def _run_in_thread(self, nodeid: int, argv: list[str]) -> None:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._verb_in_process(nodeid, argv)
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if errors:
            raise RuntimeError(f"join of node {nodeid} failed: {errors[0]}")

    # ---- teardown ---------------------------------------------------------------------

    def stop(self, nodeid: int, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        return stop_process(self.processes.pop(nodeid, None), timeout_s)

    def kill(self, nodeid: int) -> None:
        process = self.processes.pop(nodeid)
        process.kill()
        process.wait()

    def close(self) -> dict[int, int | None]:
        statuses = {n: self.stop(n) for n in list(self.processes)}
        for nodeid in self.nodeids:
            _unmount(self.mount(nodeid))
        if self.use_netns:
            self.net.cleanup_netns()
        return statuses

    def __enter__(self) -> DemoCluster:
        self.setup_network()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _enter_netns(path: str) -> None:
    """Move the calling thread into the network namespace at `path`."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {path}: {os.strerror(code)}")
    finally:
        os.close(fd)


def run_in_netns(netns: str, work: Callable[[], T], timeout_s: float = 60.0) -> T:
    """`work()` in a thread inside the named network namespace (what it forks, e.g.
    QEMU or `ip`, starts there too); its result, or its exception raised here."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _enter_netns(f"/run/netns/{netns}")
            result.append(work())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if errors:
        raise errors[0]
    if not result:
        raise TimeoutError(f"work in network namespace {netns} still running "
                           f"after {timeout_s:.0f} s")
    return result[0]


def _prepare_mount(path: Path) -> None:
    """Create a node's mountpoint; detach a dead mount of a killed daemon first."""
    _unmount(path)
    path.mkdir(parents=True, exist_ok=True)


def _unmount(path: Path) -> None:
    """Detach a mount left behind (a daemon killed with -9 leaves a dead FUSE mount)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        mounted = any(line.split()[1] == target for line in mounts if len(line.split()) > 1)
    if mounted:
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


# ---- the command ------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="corral demo", description="local corrald cluster")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--duration", type=float, default=0.0, help="seconds (0: until Ctrl-C)")
    parser.add_argument("--no-netns", action="store_true", help="use 127.0.0.x even as root")
    parser.add_argument("--dir", help="demo directory (default: a new temporary one)")
    parser.add_argument("--stats-interval", type=float, default=30.0, metavar="S")
    parser.add_argument("--prefix", default="crl-demo", help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 16:
        parser.error("--nodes must be 1..16")
    return args


def _print_new_lines(cluster: DemoCluster, offsets: dict[int, int]) -> None:
    print_new_log_lines([(n, cluster.name(n), cluster.log_path(n)) for n in cluster.nodeids],
                        offsets)


def _print_where(cluster: DemoCluster) -> None:
    print("\nwhere things are:", flush=True)
    for nodeid in cluster.nodeids:
        where = f"netns {cluster.net.netns(nodeid)}, " if cluster.use_netns else ""
        print(f"  {cluster.name(nodeid)}: {where}address {cluster.address(nodeid)}, "
              f"tree {cluster.mount(nodeid)}, state {cluster.state_dir(nodeid)}, "
              f"log {cluster.log_path(nodeid)}")
    last = cluster.nodeids[-1]
    print(f"\ntry:  CORRAL_STATE_DIR={cluster.state_dir(last)} corral status\n"
          f"      echo 'memory: 512' > {cluster.mount(1)}/nodes/node1/qemu-server/100.conf\n"
          f"      cat {cluster.mount(last)}/.vmlist", flush=True)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    workdir = args.dir or tempfile.mkdtemp(prefix="corral-demo-")
    cluster = DemoCluster(args.nodes, workdir, prefix=args.prefix,
                          use_netns=False if args.no_netns else None,
                          stats_interval_s=args.stats_interval)
    mode = f"network namespaces {args.prefix}-n*" if cluster.use_netns else "127.0.0.x"
    print(f"corral demo: {args.nodes} corrald nodes in {workdir} ({mode}); Ctrl-C to stop",
          flush=True)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)
    offsets: dict[int, int] = {}
    interrupted = failed = False
    statuses: dict[int, int | None] = {}
    try:
        cluster.setup_network()
        cluster.build()
        _print_new_lines(cluster, offsets)
        print(f"\ncorral demo: quorate {args.nodes}-node cluster in "
              f"{cluster.timings['quorate_s']:.2f} s (create {cluster.timings['create_to_quorate_s']:.2f} s, "
              f"joins {cluster.timings['joins_s']:.2f} s)\n", flush=True)
        print(cluster.corral(1, "status").stdout, flush=True)
        _print_where(cluster)
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
            _print_new_lines(cluster, offsets)
            if not any(p.poll() is None for p in cluster.processes.values()):
                print("corral demo: every corrald exited", flush=True)
                failed = True
                break
    except KeyboardInterrupt:
        interrupted = True
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        print(f"corral demo: {error}", file=sys.stderr, flush=True)
        failed = True
    finally:
        statuses = cluster.close()
        _print_new_lines(cluster, offsets)
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"corral demo: stopped (exit statuses {statuses})", flush=True)
    failed = failed or any(status not in (0, None) for status in statuses.values())
    return 1 if failed and not interrupted else 0
