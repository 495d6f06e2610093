"""Benchmark of the configuration filesystem on a real 3-node cluster of corrald.

Run:  .venv/bin/python bench/bench_cfs_cluster.py [--quick | --full] [--json FILE]
          [--count N] [--resync-files N] [--no-netns] [--dir D]
      (or `python -m bench cfs_cluster ...`)

Three corrald processes (`corral.daemon.demo.DemoCluster`: create + joins, each node
in its own network namespace as root, 127.0.0.x otherwise), each with its tree
mounted by FUSE. This process is the client, raw os.* calls, one thread per
client. Workloads:

- create N guest configs of 200 B (open O_CREAT|O_EXCL, one write, close), read
  them all, overwrite each (O_TRUNC): through node 1's mount with one client (the
  reference's procedure), through node 1 with 8 clients, and through all three
  mounts at once (one client each);
- replication latency: a new 200 B file written on node 1, polled for on node 3
  by another thread, time from the start of the write to the whole file visible
  there (and the write's own latency: it returns once every member applied it);
- resync: node 3 stopped while R files are created on nodes 1 and 2 (16
  clients), then restarted: seconds from its start to quorate and to in sync
  (same version and digest on all three, status of every daemon), and the bytes
  of the resync messages (walk, fetch, patch) as counted by the joining node;
  then the same with 100 of those files overwritten while it was down.

Reported per row (after the daemons' idle CPU over 5 s): rate, the three
daemons' CPU time per operation (all their threads, /proc/<pid>/stat) and bytes
they passed to write() per operation (/proc/<pid>/io wchar: RocksDB WAL, flush,
compaction; for the resync rows both cover node 3's start-up and are divided by
the changed files), and the ratio to the
reference where one exists (pmxcfs in local mode, one node, shared/anchors/
pmxcfs.md section 18: there is no published cluster figure). `--quick`: N=1,000,
R=10,000 (about 2 minutes); default N=10,000 (the reference's count); `--full`
adds R=100,000. The box is shared: wall-clock figures swing, CPU and bytes per
operation much less.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

PAYLOAD = b"#" * 199 + b"\n"
NEW_PAYLOAD = b"=" * 199 + b"\n"
MANY_CLIENTS = 8
RESYNC_CLIENTS = 16
RESYNC_SMALL_CHANGES = 100
RESYNC_SUBDIRS = 100
READY_TIMEOUT_S = 60.0
IDLE_S = 5.0
SYNC_TIMEOUT_S = 600.0

# pmxcfs local mode, one node (anchors section 18, runs A / B): the lower run.
REFERENCE = {
    "create": ("6,710-6,946 /s", 6710.0),
    "read": ("16,420-17,630 /s", 16420.0),
    "overwrite": ("7,961-8,251 /s", 7961.0),
}


@dataclass
class Row:
    name: str
    value: float
    unit: str
    ops: int = 0
    cpu_us_per_op: float | None = None
    written_per_op: float | None = None
    reference: str = ""
    ratio: float | None = None
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    count: int
    resync_files: list[int]
    latency_samples: int
    netns: bool | None
    workdir: str | None
    prefix: str


# ---- daemon counters ----------------------------------------------------------------


def parse_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from /proc/<pid>/stat; the name may hold spaces."""
    fields = stat_text[stat_text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def parse_wchar(io_text: str) -> int:
    match = re.search(r"^wchar: (\d+)$", io_text, re.M)
    return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class Counters:
    cpu_s: float
    wchar: int

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.cpu_s - other.cpu_s, self.wchar - other.wchar)


def read_counters(pids: Sequence[int]) -> Counters:
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    cpu = 0.0
    wchar = 0
    for pid in pids:
        try:
            cpu += parse_cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / ticks_per_s
            wchar += parse_wchar(Path(f"/proc/{pid}/io").read_text())
        except (OSError, ValueError, IndexError):
            continue  # a daemon that exited (the resync phase stops one)
    return Counters(cpu, wchar)


# ---- client operations ---------------------------------------------------------------


def create_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.read(fd, 4096) != data:
            raise OSError(0, f"{path}: unexpected content")
    finally:
        os.close(fd)


def overwrite_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def run_clients(jobs: Sequence[Sequence[Callable[[], None]]]) -> tuple[float, dict[str, int]]:
    """Run each list of calls in its own thread, all at once; (seconds, errors by
    errno name)."""
    errors: list[dict[str, int]] = [{} for _ in jobs]
    start = threading.Barrier(len(jobs) + 1)

    def client(index: int) -> None:
        start.wait()
        for call in jobs[index]:
            try:
                call()
            except OSError as error:
                name = errno.errorcode.get(error.errno or 0, str(error.errno))
                errors[index][name] = errors[index].get(name, 0) + 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    total: dict[str, int] = {}
    for found in errors:
        for name, count in found.items():
            total[name] = total.get(name, 0) + count
    return time.perf_counter() - began, total


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


# ---- the cluster ---------------------------------------------------------------------


class Bench:
    def __init__(self, settings: Settings) -> None:
        from corral.daemon.demo import DemoCluster

        self.settings = settings
        self.tmp = settings.workdir or tempfile.mkdtemp(prefix="corral-bench-cluster-")
        self.cluster = DemoCluster(3, str(Path(self.tmp) / "c"), prefix=settings.prefix,
                                   use_netns=settings.netns, stats_interval_s=600,
                                   cluster_name="bench")
        self.rows: list[Row] = []
        self.info: dict[str, Any] = {}

    # -- helpers

    def mount(self, nodeid: int) -> Path:
        return self.cluster.mount(nodeid)

    def guest_dir(self, mount_of: int, owner: int) -> Path:
        return self.mount(mount_of) / "nodes" / self.cluster.name(owner) / "qemu-server"

    def pids(self) -> list[int]:
        return [p.pid for p in self.cluster.processes.values() if p.poll() is None]

    def fs_status(self, nodeid: int) -> dict[str, Any]:
        from corral.daemon.control import ControlError

        try:
            fs = self.cluster.control(nodeid, "status").get("filesystem", {})
        except (ControlError, OSError, ValueError):
            return {}
        return fs if isinstance(fs, dict) else {}

    def dirs_ready(self) -> bool:
        nodeids = self.cluster.nodeids
        return all(self.guest_dir(a, b).is_dir() for a in nodeids for b in nodeids)

    def in_sync(self) -> bool:
        states = [self.fs_status(n) for n in self.cluster.nodeids]
        return all(s.get("phase") == "synced" and s.get("mounted") and
                   sorted(s.get("members", [])) == self.cluster.nodeids for s in states) and \
            len({(s.get("version"), s.get("digest")) for s in states}) == 1

    def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            for nodeid, process in self.cluster.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"corrald of node {nodeid} exited ({process.returncode}) "
                                       f"while waiting for {what}; see "
                                       f"{self.cluster.log_path(nodeid)}")
            time.sleep(0.02)

    def measure(self, name: str, unit: str, jobs: Sequence[Sequence[Callable[[], None]]],
                reference: str | None = None) -> Row:
        """Run the clients, record ops/s and the daemons' CPU and bytes per op."""
        ops = sum(len(job) for job in jobs)
        before = read_counters(self.pids())
        seconds, errors = run_clients(jobs)
        spent = read_counters(self.pids()) - before
        row = Row(name, ops / seconds if seconds > 0 else 0.0, unit, ops,
                  spent.cpu_s * 1e6 / ops, spent.wchar / ops, errors=sum(errors.values()))
        if errors:
            row.extra["errors_by_errno"] = errors
        if reference is not None:
            label, value = REFERENCE[reference]
            row.reference = label
            row.ratio = row.value / value
        self.rows.append(row)
        print(f"  {name}: {row.value:,.0f} {unit} ({ops} ops, {seconds:.2f} s, "
              f"errors {errors or 0})", flush=True)
        return row

    # -- phases

    def start(self) -> None:
        started = time.monotonic()
        self.cluster.setup_network()
        self.cluster.build()
        self.wait(self.dirs_ready, READY_TIMEOUT_S, "every node's directories in every mount")
        self.wait(self.in_sync, READY_TIMEOUT_S, "the nodes in sync")
        self.info["cluster_ready_s"] = round(time.monotonic() - started, 2)
        self.info["netns"] = self.cluster.use_netns
        self.info["load_average_start"] = os.getloadavg()

    def idle(self) -> None:
        """The daemons' own CPU while nobody uses the tree (heartbeats, timers), to
        read the per-op CPU figures against."""
        before = read_counters(self.pids())
        time.sleep(IDLE_S)
        spent = read_counters(self.pids()) - before
        row = Row("idle CPU of the 3 daemons", spent.cpu_s * 100 / IDLE_S, "% of one core")
        self.rows.append(row)
        print(f"  idle: {row.value:.1f} % of one core for the 3 daemons", flush=True)

    def throughput(self) -> None:
        count = self.settings.count
        print(f"throughput ({count} files of 200 B per workload)", flush=True)
        one = [self.guest_dir(1, 1) / f"{100000 + i}.conf" for i in range(count)]
        row = self.measure("create, node 1, 1 client", "ops/s",
                           [[partial(create_file, p, PAYLOAD) for p in one]], "create")
        # node 1's own breakdown of its newest replicated submits (p50 per stage, us)
        stages = self.fs_status(1).get("submit_stages")
        if stages:
            row.extra["submit_stages_node1"] = stages
            for kind in ("p50", "mean"):
                print(f"  submit stages on node 1 ({kind} us): " + ", ".join(
                    f"{k.removesuffix(f'_{kind}_us')} {v}" for k, v in stages.items()
                    if k.endswith(f"_{kind}_us")), flush=True)
        self.measure("read, node 1, 1 client", "ops/s",
                     [[partial(read_file, p, PAYLOAD) for p in one]], "read")
        self.measure("overwrite, node 1, 1 client", "ops/s",
                     [[partial(overwrite_file, p, NEW_PAYLOAD) for p in one]], "overwrite")

        many = [self.guest_dir(1, 1) / f"{200000 + i}.conf" for i in range(count)]
        self.measure(f"create, node 1, {MANY_CLIENTS} clients", "ops/s",
                     [[partial(create_file, p, PAYLOAD) for p in part]
                      for part in split(many, MANY_CLIENTS)], "create")
        self.measure(f"read, node 1, {MANY_CLIENTS} clients", "ops/s",
                     [[partial(read_file, p, PAYLOAD) for p in part]
                      for part in split(many, MANY_CLIENTS)], "read")
        self.measure(f"overwrite, node 1, {MANY_CLIENTS} clients", "ops/s",
                     [[partial(overwrite_file, p, NEW_PAYLOAD) for p in part]
                      for part in split(many, MANY_CLIENTS)], "overwrite")

        per_node = max(1, count // 3)
        each = {n: [self.guest_dir(n, n) / f"{n * 1000000 + 300000 + i}.conf"
                    for i in range(per_node)] for n in self.cluster.nodeids}
        self.measure("create, 3 nodes at once, 1 client each", "ops/s",
                     [[partial(create_file, p, PAYLOAD) for p in paths]
                      for paths in each.values()], "create")
        self.measure("read, 3 nodes at once, 1 client each", "ops/s",
                     [[partial(read_file, p, PAYLOAD) for p in paths]
                      for paths in each.values()], "read")
        self.measure("overwrite, 3 nodes at once, 1 client each", "ops/s",
                     [[partial(overwrite_file, p, NEW_PAYLOAD) for p in paths]
                      for paths in each.values()], "overwrite")

    def latency(self) -> None:
        samples = self.settings.latency_samples
        print(f"replication latency ({samples} samples, node 1 -> node 3)", flush=True)
        write_ms: list[float] = []
        visible_ms: list[float] = []
        directory = "latency"
        (self.mount(1) / directory).mkdir()
        self.wait(lambda: (self.mount(3) / directory).is_dir(), 10, "the latency directory")
        for index in range(samples):
            name = f"f{index:05d}"
            seen: list[float] = []
            stop = threading.Event()
            poller = threading.Thread(target=_poll_visible,
                                      args=(self.mount(3) / directory / name, PAYLOAD, seen, stop),
                                      daemon=True)
            poller.start()
            began = time.perf_counter()
            create_file(self.mount(1) / directory / name, PAYLOAD)
            write_ms.append((time.perf_counter() - began) * 1e3)
            poller.join(10)
            stop.set()
            if not seen:
                raise RuntimeError(f"{name} not visible on node 3 after 10 s")
            visible_ms.append((seen[0] - began) * 1e3)
        for label, values in (("write returns on node 1", write_ms),
                              ("write on node 1 -> visible on node 3", visible_ms)):
            row = Row(f"latency: {label}", statistics.median(values), "ms p50", samples,
                      extra={"p99_ms": round(percentile(values, 0.99), 2),
                             "max_ms": round(max(values), 2)})
            self.rows.append(row)
            print(f"  {label}: p50 {row.value:.2f} ms, p99 {row.extra['p99_ms']} ms", flush=True)

    def resync(self, files: int) -> None:
        print(f"resync: node 3 offline while {files} files are created", flush=True)
        base = f"resync{files}"
        for sub in range(RESYNC_SUBDIRS):
            (self.mount(1) / base / f"d{sub:02d}").mkdir(parents=True)
        self.wait(lambda: (self.mount(3) / base / f"d{RESYNC_SUBDIRS - 1:02d}").is_dir(), 30,
                  "the resync directories on node 3")
        self.wait(self.in_sync, SYNC_TIMEOUT_S, "the nodes in sync before the stop")
        paths = [f"{base}/d{i % RESYNC_SUBDIRS:02d}/f{i:06d}" for i in range(files)]
        self.cluster.stop(3)
        self.wait(lambda: sorted(self.fs_status(1).get("members", [])) == [1, 2], 60,
                  "nodes 1 and 2 without node 3")
        jobs = [[partial(create_file, self.mount(1 + k % 2) / p, PAYLOAD) for p in part]
                for k, part in enumerate(split(paths, RESYNC_CLIENTS))]
        self.measure(f"create while node 3 is down (resync {files}), 2 nodes, "
                     f"{RESYNC_CLIENTS} clients", "ops/s", jobs)
        self._restart_and_time(f"resync after {files} files created", files)

        changed = paths[:: max(1, files // RESYNC_SMALL_CHANGES)][:RESYNC_SMALL_CHANGES]
        print(f"resync: node 3 offline while {len(changed)} of {files} files change",
              flush=True)
        self.cluster.stop(3)
        self.wait(lambda: sorted(self.fs_status(1).get("members", [])) == [1, 2], 60,
                  "nodes 1 and 2 without node 3")
        _, errors = run_clients([[partial(overwrite_file, self.mount(1) / p, NEW_PAYLOAD)
                                  for p in changed]])
        if errors:
            raise RuntimeError(f"overwrites while node 3 was down failed: {errors}")
        self._restart_and_time(f"resync after {len(changed)} of {files} files changed",
                               len(changed))

    def _restart_and_time(self, name: str, changed: int) -> None:
        before = read_counters(self.pids())
        began = time.monotonic()
        self.cluster.start(3)
        self.wait(lambda: self.cluster.quorate_with(3, 3), SYNC_TIMEOUT_S, "node 3 quorate")
        quorate_s = time.monotonic() - began
        self.wait(self.in_sync, SYNC_TIMEOUT_S, "node 3 in sync")
        synced_s = time.monotonic() - began
        spent = read_counters(self.pids()) - before
        last = self.fs_status(3).get("last_sync") or {}
        sent = int(last.get("bytes", 0))
        row = Row(name, synced_s, "s to in sync", changed,
                  cpu_us_per_op=spent.cpu_s * 1e6 / max(changed, 1),
                  written_per_op=spent.wchar / max(changed, 1),
                  extra={"restart_to_quorate_s": round(quorate_s, 2),
                         "resync_bytes": sent,
                         "resync_bytes_per_change": round(sent / max(changed, 1), 1),
                         "fetched": last.get("fetched"), "deleted": last.get("deleted"),
                         "leader": last.get("leader")})
        self.rows.append(row)
        print(f"  {name}: in sync {synced_s:.2f} s after the start (quorate {quorate_s:.2f} s), "
              f"{sent:,} bytes sent, {last.get('fetched')} entries fetched", flush=True)

    def close(self, keep: bool = False) -> None:
        self.cluster.close()
        if keep:
            print(f"daemon logs kept in {self.tmp}", file=sys.stderr)
        elif not self.settings.workdir:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _poll_visible(path: Path, data: bytes, seen: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with open(path, "rb") as handle:
                if handle.read() == data:
                    seen.append(time.perf_counter())
                    return
        except OSError:
            pass
        time.sleep(0.0002)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- report --------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}".replace(",", " ")


def render_table(rows: list[Row]) -> str:
    lines = ["| Figure | Corral | pmxcfs (local mode, 1 node) | Corral / pmxcfs "
             "| daemon CPU per op (3 nodes) | daemon writes per op (3 nodes) | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row.unit == "% of one core":
            value = f"{row.value:.1f} % of one core"
        elif row.unit == "ms p50":
            value = f"{row.value:.2f} ms p50, {row.extra['p99_ms']:.2f} ms p99"
        elif row.unit == "s to in sync":
            value = (f"{row.value:.2f} s (quorate {row.extra['restart_to_quorate_s']:.2f} s), "
                     f"{_fmt(row.extra['resync_bytes'])} B sent "
                     f"({_fmt(row.extra['resync_bytes_per_change'])} B per change)")
        else:
            value = f"{_fmt(row.value)} {row.unit}"
        cpu = "-" if row.cpu_us_per_op is None else f"{row.cpu_us_per_op:,.0f} us"
        written = "-" if row.written_per_op is None else f"{row.written_per_op / 1024:,.1f} KB"
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}" if row.ratio < 0.1 \
            else f"{row.ratio:.2f}"
        lines.append(f"| {row.name} | {value} | {row.reference or '-'} | {ratio} | {cpu} "
                     f"| {written} | {row.errors} |")
    return "\n".join(lines)


# ---- command -------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(prog="bench_cfs_cluster", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="N=1,000 files per workload")
    size.add_argument("--full", action="store_true", help="also resync after 100,000 files")
    parser.add_argument("--count", type=int, help="files per throughput workload")
    parser.add_argument("--resync-files", type=int, action="append",
                        help="files created while node 3 is down (repeatable)")
    parser.add_argument("--latency-samples", type=int, default=None)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--no-netns", action="store_true", help="127.0.0.x even as root")
    parser.add_argument("--dir", help="work directory (kept; default: a temporary one)")
    parser.add_argument("--prefix", default="crl-bcc", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    count = args.count if args.count is not None else (1000 if args.quick else 10000)
    resync = args.resync_files or ([10000, 100000] if args.full else [10000])
    samples = args.latency_samples if args.latency_samples is not None else \
        (100 if args.quick else 300)
    if count < 3 or any(r < 1 for r in resync) or samples < 1:
        parser.error("counts must be positive (--count at least 3)")
    settings = Settings(count, resync, samples, False if args.no_netns else None, args.dir,
                        args.prefix)
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse_args(sys.argv[1:] if argv is None else argv)
    bench = Bench(settings)
    began = time.monotonic()
    failed = True
    try:
        bench.start()
        print(f"3-node cluster ready in {bench.info['cluster_ready_s']} s "
              f"({'network namespaces' if bench.info['netns'] else '127.0.0.x'})", flush=True)
        bench.idle()
        bench.throughput()
        bench.latency()
        for files in settings.resync_files:
            bench.resync(files)
        failed = False
    finally:
        bench.close(keep=failed or any(row.errors for row in bench.rows))
    bench.info["total_s"] = round(time.monotonic() - began, 1)
    print()
    print(render_table(bench.rows))
    if json_path:
        result = {"settings": asdict(settings), "info": bench.info,
                  "load_average": os.getloadavg(),
                  "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "rows": [asdict(row) for row in bench.rows]}
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nresults in {json_path}")
    return 1 if any(row.errors for row in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
