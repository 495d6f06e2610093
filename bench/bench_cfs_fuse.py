"""Benchmark of the configuration filesystem through a real FUSE mount.

Run:  .venv/bin/python bench/bench_cfs_fuse.py [--durability process|fsync]
          [--count 10000] [--big-listing 270000] [--dir /var/tmp/x]
      (or `python -m bench cfs_fuse ...`)

The mount is served by a separate process (`python -m corral.cfs.mount
--local`), so the daemon's CPU time (all its threads, from
/proc/<pid>/task/*/schedstat) and the bytes it passes to write()
(/proc/<pid>/io wchar, the reference's "daemon writes" metric, which
includes RocksDB's WAL, flush and compaction) are attributable. This
process is the client, single-threaded, raw os.* calls, like the
reference's measurement (shared/anchors/pmxcfs.md section 18, pmxcfs in
local mode on this kind of machine; its figures are quoted, not re-run).

Workloads: create 10,000 files of 200 B under nodes/<node>/qemu-server/
(open O_CREAT|O_EXCL, one write, close); read them all; overwrite each
(O_TRUNC); rename 1,000 between two nodes' directories; delete all; the
same number of creates from 8 client threads at once; 1,000
lock cycles (mkdir + rmdir priv/lock/x); 1,000 atomic replaces (write a temp
file, rename over the target); 512 KiB files in one write() and in 4 KiB
writes; listing 10,000 entries (and, with --big-listing, 270,000 from a
pre-filled store) while another process reads a small file (its worst
latency).

The box is shared: wall-clock figures swing by 3x or more; CPU per op and
bytes per op do not.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NODE = "bench"
GUEST_DIR = f"nodes/{NODE}/qemu-server"
OTHER_DIR = "nodes/bench2/qemu-server"
PAYLOAD = b"#" * 199 + b"\n"
BIG_FILE_BYTES = 512 * 1024
BIG_FILES = 20
PARALLEL_CLIENTS = 8

# Reference figures (pmxcfs local mode, anchors section 18: runs A / B).
REFERENCE = {
    "create": ("6,710-6,946 /s", 6710.0, "90 us", "18.1 KB"),
    "read": ("16,420-17,630 /s", 16420.0, "31 us", "0"),
    "overwrite": ("7,961-8,251 /s", 7961.0, "78 us", "17.0 KB"),
    "rename": ("7,927-8,823 /s", 7927.0, "65 us", "8.8 KB"),
    "delete": ("10,421-12,691 /s", 10421.0, "56 us", "6.6 KB"),
    "lock cycle": ("6,567-6,879 /s", 6567.0, "95 us", "8.7 KB"),
    "atomic replace": ("4,370-4,511 /s", 4370.0, "135 us", "13.0 KB"),
    "512 KiB one write": ("44.5-47.5 MiB/s", 44.5, "7.5 ms", "9.2x"),
    "512 KiB 4 KiB writes": ("2.52-2.91 MiB/s", 2.52, "121 ms", "166x"),
    "list 10k": ("0.18-0.20 s", 0.195, "0.18 s", "-"),
    "list 270k": ("517 s", 517.0, "-", "-"),
}


@dataclass(slots=True)
class Row:
    name: str
    rate: float  # ops/s, MiB/s or seconds (listing)
    unit: str
    cpu_us_per_op: float
    written_per_op: float
    extra: str = ""


class Daemon:
    """The mount process and its counters."""

    def __init__(self, base: Path, durability: str, store: Path | None = None) -> None:
        self.base = base
        self.root = base / "mnt"
        self.store = store or base / "store"
        ready = base / "ready"
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cfs.mount", "--store", str(self.store),
             "--mountpoint", str(self.root), "--local", "--nodename", NODE,
             "--durability", durability, "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL, stderr=open(base / "mount.log", "ab"))
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mount did not start: " + (base / "mount.log").read_text())
            time.sleep(0.05)
        os.stat(self.root)

    def cpu_ns(self) -> int:
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
        return total

    def wchar(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/io").read_text()
        match = re.search(r"^wchar: (\d+)$", text, re.M)
        return int(match.group(1)) if match else 0

    def path(self, rel: str) -> str:
        return str(self.root / rel)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            subprocess.run(["umount", "-l", str(self.root)], check=False)


def measure(daemon: Daemon, name: str, count: int, body: Callable[[], None]) -> Row:
    cpu, written = daemon.cpu_ns(), daemon.wchar()
    started = time.perf_counter()
    body()
    seconds = time.perf_counter() - started
    return Row(name, count / seconds, "/s", (daemon.cpu_ns() - cpu) / count / 1000,
               (daemon.wchar() - written) / count)


def write_file(path: str, data: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def small_file_rows(daemon: Daemon, count: int) -> list[Row]:
    for rel in (GUEST_DIR, OTHER_DIR, "priv/lock"):
        os.makedirs(daemon.path(rel), exist_ok=True)
    paths = [daemon.path(f"{GUEST_DIR}/{100 + i}.conf") for i in range(count)]
    create_flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL

    def create() -> None:
        for path in paths:
            write_file(path, PAYLOAD, create_flags)

    def read() -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                if os.read(fd, 4096) != PAYLOAD:
                    raise RuntimeError(f"{path}: wrong content")
            finally:
                os.close(fd)

    def overwrite() -> None:
        for path in paths:
            write_file(path, PAYLOAD, os.O_WRONLY | os.O_TRUNC)

    moved = paths[:1000]

    def rename() -> None:
        for path in moved:
            os.rename(path, path.replace(GUEST_DIR, OTHER_DIR))

    def delete() -> None:
        for path in paths:
            os.unlink(path.replace(GUEST_DIR, OTHER_DIR) if path in moved_set else path)

    moved_set = set(moved)
    return [measure(daemon, "create", count, create), measure(daemon, "read", count, read),
            measure(daemon, "overwrite", count, overwrite),
            measure(daemon, "rename", len(moved), rename),
            measure(daemon, "delete", count, delete)]


def parallel_create_row(daemon: Daemon, count: int) -> Row:
    """`count` creates (O_CREAT|O_EXCL, one write, close) from PARALLEL_CLIENTS
    threads at once, each in its own directory (the writers that group
    commit lets share one fsync under --durability fsync)."""
    dirs = [f"par/{client}" for client in range(PARALLEL_CLIENTS)]
    for rel in dirs:
        os.makedirs(daemon.path(rel), exist_ok=True)
    per_client = count // PARALLEL_CLIENTS
    errors: list[BaseException] = []

    def client(rel: str) -> None:
        try:
            for index in range(per_client):
                write_file(daemon.path(f"{rel}/{index}.conf"), PAYLOAD,
                           os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except BaseException as error:  # reported after the join
            errors.append(error)

    def body() -> None:
        threads = [threading.Thread(target=client, args=(rel,)) for rel in dirs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    return measure(daemon, f"create, {PARALLEL_CLIENTS} clients", per_client * PARALLEL_CLIENTS,
                   body)


def pattern_rows(daemon: Daemon) -> list[Row]:
    lock = daemon.path("priv/lock/bench")
    target = daemon.path("storage.cfg")
    temp = daemon.path(f"storage.cfg.tmp.{os.getpid()}")

    def locks() -> None:
        for _ in range(1000):
            os.mkdir(lock)
            os.rmdir(lock)

    def replace() -> None:
        for _ in range(1000):
            write_file(temp, PAYLOAD, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.rename(temp, target)

    return [measure(daemon, "lock cycle", 1000, locks),
            measure(daemon, "atomic replace", 1000, replace)]


def big_file_rows(daemon: Daemon) -> list[Row]:
    data = os.urandom(BIG_FILE_BYTES)
    rows = []
    for name, chunk in (("512 KiB one write", BIG_FILE_BYTES), ("512 KiB 4 KiB writes", 4096)):
        def body(chunk: int = chunk, name: str = name) -> None:
            for index in range(BIG_FILES):
                path = daemon.path(f"big-{len(name)}-{index}.bin")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                try:
                    for offset in range(0, BIG_FILE_BYTES, chunk):
                        os.write(fd, data[offset:offset + chunk])
                finally:
                    os.close(fd)
        row = measure(daemon, name, BIG_FILES, body)
        mib_s = row.rate * BIG_FILE_BYTES / (1024 * 1024)
        rows.append(Row(name, mib_s, "MiB/s", row.cpu_us_per_op, row.written_per_op,
                        f"{row.written_per_op / BIG_FILE_BYTES:.2f}x payload written"))
    return rows


READER = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
worst = 0.0
while not os.path.exists(stop):
    start = time.perf_counter()
    with open(path, "rb") as f:
        f.read()
    worst = max(worst, time.perf_counter() - start)
print(worst)
"""


def listing_row(daemon: Daemon, rel: str, name: str) -> Row:
    """List `rel` (os.listdir, then every entry's attributes arrive with
    readdirplus) while another process reads a small file in a loop."""
    small = daemon.path("small.cfg")
    if not os.path.exists(small):
        write_file(small, b"ok\n", os.O_WRONLY | os.O_CREAT)
    stop = daemon.base / f"stop-{name.replace(' ', '-')}"
    reader = subprocess.Popen([sys.executable, "-c", READER, small, str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        cpu = daemon.cpu_ns()
        started = time.perf_counter()
        names = os.listdir(daemon.path(rel))
        seconds = time.perf_counter() - started
        cpu_s = (daemon.cpu_ns() - cpu) / 1e9
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=120)
    worst_ms = float(out) * 1000
    return Row(name, seconds, "s", cpu_s * 1e6, 0.0,
               f"{len(names):,} entries; daemon CPU {cpu_s:.2f} s; "
               f"worst concurrent read {worst_ms:.1f} ms")


def prefill_store(path: Path, entries: int) -> None:
    from corral.cfs.ops import Op
    from corral.cfs.store import Durability, Store

    with Store(path, durability=Durability.PROCESS) as store:
        for rel in ("list",):
            store.apply(Op.mkdir(rel, 1), writer=0, quorate=True)
        for index in range(entries):
            store.apply(Op.create(f"list/{index:07d}", 1), writer=0, quorate=True)
        store.sync()


def ratio(row: Row) -> str:
    ref = REFERENCE.get(row.name)
    if ref is None:
        return ""
    if row.unit == "s":
        return f"{ref[1] / row.rate:.1f}x faster"
    return f"{row.rate / ref[1]:.2f}x"


def report(rows: list[Row], durability: str) -> None:
    print(f"\nCorral cfs through FUSE, local mode, durability={durability}, "
          f"client: one process, raw os.* calls")
    print(f"{'workload':<22} {'Corral':>16} {'CPU/op':>10} {'written/op':>11}   "
          f"{'reference (pmxcfs -l)':>22} {'ref CPU':>8} {'ref wr':>8}   ratio")
    for row in rows:
        ref = REFERENCE.get(row.name, ("-", 0.0, "-", "-"))
        if row.unit == "s":
            rate = f"{row.rate:.3f} s"
            cpu = "-"
        else:
            rate = f"{row.rate:,.1f} {row.unit}" if row.unit != "/s" else f"{row.rate:,.0f} /s"
            cpu = (f"{row.cpu_us_per_op:.0f} us" if row.cpu_us_per_op < 10_000
                   else f"{row.cpu_us_per_op / 1000:.1f} ms")
        written = f"{row.written_per_op:,.0f} B" if row.unit != "s" else "-"
        print(f"{row.name:<22} {rate:>16} {cpu:>10} {written:>11}   {ref[0]:>22} "
              f"{ref[2]:>8} {ref[3]:>8}   {ratio(row)}")
        if row.extra:
            print(f"{'':<22} {row.extra}")


def file_rows(base: Path, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    daemon = Daemon(base, args.durability)
    try:
        rows += small_file_rows(daemon, args.count)
        rows.append(parallel_create_row(daemon, args.count))
        rows += pattern_rows(daemon)
        rows += big_file_rows(daemon)
        os.makedirs(daemon.path("list10k"))
        for index in range(10_000):
            write_file(daemon.path(f"list10k/{index:06d}"), b"", os.O_WRONLY | os.O_CREAT)
        rows.append(listing_row(daemon, "list10k", "list 10k"))
    finally:
        daemon.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--big-listing", type=int, default=0,
                        help="also list this many entries (e.g. 270000) from a pre-filled store")
    parser.add_argument("--listing-only", action="store_true",
                        help="skip the file workloads (with --big-listing)")
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    base = Path(args.dir or tempfile.mkdtemp(prefix="crl-fuse-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    if not args.listing_only:
        rows += file_rows(base, args)
    if args.big_listing:
        big = base / "big"
        big.mkdir(exist_ok=True)
        prefill_store(big / "store", args.big_listing)
        daemon = Daemon(big, args.durability)
        try:
            rows.append(listing_row(daemon, "list", "list 270k"
                                    if args.big_listing == 270_000 else
                                    f"list {args.big_listing:,}"))
        finally:
            daemon.stop()
    report(rows, args.durability)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
