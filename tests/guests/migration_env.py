"""Helpers of the migration tests: a real corrald cluster on 127.0.0.x whose daemons have
their own guest run/task dirs, storages (one shared, one local per node), test guests,
and the checkers every migration test runs (never running on two nodes at once, config
on exactly one node, disk content unchanged)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

from corral.daemon.demo import DemoCluster

MEMORY_MIB = 128


class GuestCluster(DemoCluster):
    """DemoCluster (per-node guest dirs, shared + local storages) with the migration
    tests' lookups of where a guest's config and QEMU are."""

    def config_path(self, nodeid: int, vmid: int, via: int = 1) -> Path:
        return self.mount(via) / "nodes" / self.name(nodeid) / "qemu-server" / f"{vmid}.conf"

    def config_nodes(self, vmid: int, via: int = 1) -> list[int]:
        return [n for n in self.nodeids if self.config_path(n, vmid, via).exists()]


def guest_settings(guest_dir: str, dirty_mib: int = 16) -> dict[str, str]:
    return {"memory": str(MEMORY_MIB), "serial0": "socket",
            "args": f"-kernel {guest_dir}/vmlinuz -initrd {guest_dir}/initrd.img -append "
                    f"'console=ttyS0 quiet panic=-1 corral.dirty={dirty_mib} corral.period=0.1'"}


def fill_volume(path: str, mib: int = 4) -> None:
    """Random data in the first MiBs of a raw volume, so a copy is checked on real bytes."""
    with open(path, "r+b") as handle:
        handle.write(os.urandom(mib << 20))


def checksum(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


CRASH_MARKERS = ("Oops:", "BUG:", "general protection fault", "Kernel panic")


class SerialWatch:
    """Reads the counter lines of the guest's serial socket on every node (connecting
    whenever a socket appears) and records (monotonic s, node, value). Every instance is
    listed in `instances` so a test can look for a guest kernel crash afterwards."""

    instances: list[SerialWatch] = []

    def __init__(self, cluster: GuestCluster, vmid: int) -> None:
        self.cluster = cluster
        self.vmid = vmid
        self.samples: list[tuple[float, int, int]] = []
        self.connections: dict[int, list[str]] = {n: [] for n in cluster.nodeids}
        self.other_lines: list[tuple[float, int, str]] = []    # bounded, for diagnostics
        self.lock = threading.Lock()
        self.stop = threading.Event()
        SerialWatch.instances.append(self)
        self.threads = [threading.Thread(target=self._watch, args=(n,), daemon=True)
                        for n in cluster.nodeids]
        for thread in self.threads:
            thread.start()

    def _watch(self, nodeid: int) -> None:
        path = os.path.join(self.cluster.guest_run_dir(nodeid), f"{self.vmid}.serial0")
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(1.0)
                    sock.connect(path)
                    sock.settimeout(0.1)
                    self.connections[nodeid].append(f"connected {time.monotonic():.1f}")
                    received = self._read(sock, nodeid)
                    self.connections[nodeid].append(
                        f"closed {time.monotonic():.1f} after {received} bytes")
            except OSError:
                time.sleep(0.05)

    def _read(self, sock: socket.socket, nodeid: int) -> int:
        buffer = b""
        received = 0
        while not self.stop.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                return received
            received += len(data)
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            now = time.monotonic()
            for line in lines:
                text = line.decode(errors="replace").strip()
                if text.startswith("corral-counter "):
                    with self.lock:
                        self.samples.append((now, nodeid, int(text.split()[1])))
                elif text and len(self.other_lines) < 200:
                    self.other_lines.append((now, nodeid, text[:200]))
        return received

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(2)

    def crash_line(self) -> str | None:
        """The first guest kernel crash line seen on any node (node, text), if any."""
        with self.lock:
            for _, nodeid, text in self.other_lines:
                if any(marker in text for marker in CRASH_MARKERS):
                    return f"node{nodeid}: {text}"
        return None

    def values(self, nodeid: int) -> list[int]:
        with self.lock:
            return [v for _, n, v in self.samples if n == nodeid]

    def wait_value(self, nodeid: int, above: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            values = self.values(nodeid)
            if values and max(values) > above:
                return max(values)
            crash = self.crash_line()
            if crash is not None:  # no use waiting: the guest kernel is gone
                raise AssertionError(f"no counter above {above} from node {nodeid}: {crash}")
            time.sleep(0.1)
        raise AssertionError(f"no counter above {above} from node {nodeid} within {timeout_s} s "
                             f"(now {time.monotonic():.1f}; serial connections: "
                             f"{self.connections[nodeid][-4:]}; other lines: "
                             f"{self.other_lines[-30:]})")

    def check_single_runner(self, moves: int) -> None:
        """The guest never ran on two nodes at once. Two running copies would both go on
        from the same memory, so some counter value would be printed twice, and their
        lines would alternate between nodes. So: no value seen twice, and in counter order
        the printing node changes at most once per move. (Counter order, not arrival
        order: the reader threads of two sockets can be scheduled late on a loaded box.)"""
        with self.lock:
            samples = sorted((value, nodeid) for _, nodeid, value in self.samples)
        values = [value for value, _ in samples]
        repeated = sorted({v for v in values if values.count(v) > 1})
        assert not repeated, f"counter values printed twice: {repeated[:10]} " \
            f"by nodes {[n for v, n in samples if v in repeated[:3]]}; other lines: " \
            f"{self.other_lines[-30:]}"
        switches = [samples[i] for i in range(1, len(samples))
                    if samples[i][1] != samples[i - 1][1]]
        assert len(switches) <= moves, f"the printing node alternates: {switches[:10]}"


class ConfigWatch:
    """Polls that the config exists on exactly one node (through every node's mount)."""

    def __init__(self, cluster: GuestCluster, vmid: int) -> None:
        self.cluster = cluster
        self.vmid = vmid
        self.violations: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            for via in self.cluster.nodeids:
                nodes = self.cluster.config_nodes(self.vmid, via)
                if len(nodes) != 1:
                    # A rename is one operation; a reader between two stats can see the
                    # old name gone and the new one there, never both: check both again.
                    time.sleep(0.02)
                    again = self.cluster.config_nodes(self.vmid, via)
                    if len(again) != 1:
                        self.violations.append(f"via node {via}: config on {again}")
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
