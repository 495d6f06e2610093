"""Benchmark of the configuration-tree core and its RocksDB store.

Run:  .venv/bin/python bench/bench_cfs_core.py [--quick] [--dir /var/tmp/x]

Prints, for each figure, ours and the reference's (pmxcfs, measured on this
kind of machine: shared/anchors/pmxcfs.md section 18; the reference cannot be
run in the same process, so its figures are quoted, not re-measured):

- apply-path ops/s for create / read / overwrite / rename / delete of 10,000
  200-byte guest configs, in both durability modes; a "create" is what
  open(O_CREAT|O_EXCL) + write + close costs: a CREATE and a WRITE operation;
  an "overwrite" is O_TRUNC + write: a TRUNCATE and a WRITE;
- bytes the process passed to write() per operation (/proc/self/io wchar,
  the reference's "daemon writes" metric; it includes RocksDB's own flush and
  compaction threads), and RocksDB's own counters (WAL, flush, compaction
  bytes) after a flush and a full compaction;
- 512 KiB files written in 4 KiB writes: MiB/s and write amplification;
- store load time with 100,000 guest configs;
- create and readdir of 270,000 entries in one directory.

`--apply-cpu` measures only the apply step instead: CPU microseconds per
operation of CfsState.apply (against a dict, MemoryKV) and of Store.apply
(PROCESS durability: apply + RocksDB batch, no fsync) for create, 200-byte
write, overwrite (truncate + write), rename, unlink and a lock's
mkdir + rmdir; median of `--runs` runs.

The box is shared: wall-clock figures swing; bytes per op do not.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from corral.cfs.memkv import MemoryKV
from corral.cfs.ops import Op
from corral.cfs.state import CfsState, Outcome
from corral.cfs.store import Durability, Store

_RNG = random.Random(20261126)


def config_for(vmid: int) -> bytes:
    """A realistic 200-byte guest config, different per guest (an identical
    payload would flatter the compressed sizes)."""
    mac = ":".join(f"{_RNG.randrange(256):02X}" for _ in range(6))
    uuid = f"{_RNG.getrandbits(128):032x}"
    text = (f"boot: order=scsi0\ncores: {_RNG.choice((1, 2, 4, 8))}\nmemory: "
            f"{_RNG.choice((1024, 2048, 4096))}\nname: vm{vmid}\nnet0: virtio={mac},bridge=vmbr0\n"
            f"scsi0: local-lvm:vm-{vmid}-disk-0,size=32G\nsmbios1: uuid={uuid}\n"
            f"ostype: l26\nsockets: 1\n")
    return text.encode()[:200].ljust(200, b"#")
GUEST_DIR = "nodes/vm/qemu-server"


def wchar() -> int:
    text = Path("/proc/self/io").read_text()
    match = re.search(r"^wchar: (\d+)$", text, re.M)
    return int(match.group(1)) if match else 0


def rocks_counters(store: Store) -> dict[str, int]:
    stats = store.options.get_statistics() or ""
    out = {}
    for name in ("rocksdb.wal.bytes", "rocksdb.flush.write.bytes", "rocksdb.compact.write.bytes",
                 "rocksdb.bytes.written"):
        match = re.search(re.escape(name) + r" COUNT : (\d+)", stats)
        out[name] = int(match.group(1)) if match else 0
    return out


def apply(store: Store, op: Op) -> None:
    outcome = store.apply(op, writer=1, quorate=True)
    if outcome.errno:
        raise RuntimeError(f"{op.kind.name} {op.path}: errno {outcome.errno}")


def timed(label: str, count: int, body: Callable[[], None], ops_per_item: int,
          reference: str) -> None:
    before = wchar()
    cpu_before = time.process_time()
    started = time.perf_counter()
    body()
    seconds = time.perf_counter() - started
    cpu_us = (time.process_time() - cpu_before) / count * 1e6
    written = wchar() - before
    print(f"  {label:<30} {count / seconds:>9,.0f} /s  CPU {cpu_us:5.0f} us  "
          f"{written / count:>6,.0f} B written/item "
          f"({ops_per_item} op{'s' if ops_per_item > 1 else ''})   reference: {reference}")


def mkdirs(store: Store, *paths: str) -> None:
    for path in paths:
        apply(store, Op.mkdir(path, 1))


def bench_small_files(root: Path, durability: Durability, count: int) -> None:
    print(f"\n10,000-file workload, durability={durability.value} (count={count})")
    store = Store(root / f"small-{durability.value}", durability=durability)
    mkdirs(store, "nodes", "nodes/vm", GUEST_DIR, "nodes/vm2", "nodes/vm2/qemu-server")
    paths = [f"{GUEST_DIR}/{100 + i}.conf" for i in range(count)]
    contents = [config_for(100 + i) for i in range(count)]
    updates = [config_for(100 + i) for i in range(count)]

    def create() -> None:
        for path, content in zip(paths, contents, strict=True):
            apply(store, Op.create(path, 1, excl=True))
            apply(store, Op.write(path, 0, content, 1))

    def read() -> None:
        for path, content in zip(paths, contents, strict=True):
            if store.read(path, 0, 4096)[1] != content:
                raise RuntimeError("read back wrong content")

    def overwrite() -> None:
        for path, content in zip(paths, updates, strict=True):
            apply(store, Op.truncate(path, 0, 2))
            apply(store, Op.write(path, 0, content, 2))

    moved = paths[:count // 10]

    def rename() -> None:
        for path in moved:
            apply(store, Op.rename(path, path.replace("nodes/vm/", "nodes/vm2/"), 3))

    def delete() -> None:
        for path in paths:
            if path in moved:
                path = path.replace("nodes/vm/", "nodes/vm2/")
            apply(store, Op.unlink(path))

    timed("create (create+write 200 B)", count, create, 2, "6,710-6,946/s, 89-92 us, 18.1 KB")
    timed("read 200 B", count, read, 0, "16,420-17,630/s, 30-32 us, 0 B")
    timed("overwrite (truncate+write)", count, overwrite, 2, "7,961-8,251/s, 75-81 us, 17.0 KB")
    timed("rename (migration)", len(moved), rename, 1, "7,927-8,823/s, 60-70 us, 8.8 KB")
    timed("delete", count, delete, 1, "10,421-12,691/s, 49-64 us, 6.6 KB")
    store.close()


def bench_group_commit(root: Path, count: int, group: int) -> None:
    store = Store(root / "group", durability=Durability.FSYNC)
    mkdirs(store, "nodes", "nodes/vm", GUEST_DIR)
    ops = []
    for i in range(count):
        path = f"{GUEST_DIR}/{100 + i}.conf"
        ops += [(Op.create(path, 1, excl=True), 1), (Op.write(path, 0, config_for(100 + i), 1), 1)]
    started = time.perf_counter()
    for start in range(0, len(ops), group):
        for outcome in store.apply_group(ops[start:start + group], quorate=True):
            if outcome.errno:
                raise RuntimeError(f"errno {outcome.errno}")
    seconds = time.perf_counter() - started
    print(f"  create with group commit (fsync per {group} ops): {count / seconds:,.0f} files/s")
    store.close()


def bench_disk_bytes_per_create(root: Path, count: int) -> None:
    print(f"\nDisk bytes per 200 B create, after flush + full compaction ({count} files)")
    store = Store(root / "bytes", durability=Durability.FSYNC)
    mkdirs(store, "nodes", "nodes/vm", GUEST_DIR)
    base = rocks_counters(store)
    before = wchar()
    contents = [config_for(100 + i) for i in range(count)]
    for i in range(count):
        path = f"{GUEST_DIR}/{100 + i}.conf"
        apply(store, Op.create(path, 1, excl=True))
        apply(store, Op.write(path, 0, contents[i], 1))
    store.flush()
    store.compact()
    time.sleep(0.5)
    written = wchar() - before
    counters = {k: v - base[k] for k, v in rocks_counters(store).items()}
    size = sum(f.stat().st_size for f in (root / "bytes").iterdir() if f.is_file())
    store.close()
    print(f"  process write() bytes per file (WAL+flush+compaction+manifest+log): "
          f"{written / count:,.0f} B   reference: 18.1 KB (limit we aim for: 1.8 KB)")
    for name, value in counters.items():
        print(f"  {name:<30} {value / count:>8,.0f} B per file")
    print(f"  store directory after compaction: {size / count:,.0f} B per file")


def bench_chunked_write(root: Path, files: int, durability: Durability, group: int = 1) -> None:
    store = Store(root / f"chunked-{durability.value}-{group}", durability=durability)
    mkdirs(store, "big")
    block = bytes(range(256)) * 16
    before = wchar()
    started = time.perf_counter()
    for index in range(files):
        path = f"big/{index}"
        apply(store, Op.create(path, 1))
        writes = [(Op.write(path, offset, block, 1), 1) for offset in range(0, 512 * 1024, 4096)]
        if group == 1:
            for op, _writer in writes:
                apply(store, op)
            continue
        for start in range(0, len(writes), group):
            store.apply_group(writes[start:start + group], quorate=True)
    seconds = time.perf_counter() - started
    written = wchar() - before
    payload = files * 512 * 1024
    label = f"{durability.value}, sync per {group} write{'s' if group > 1 else ''}"
    print(f"  {label:<26}: {payload / seconds / 2**20:6.1f} MiB/s, "
          f"amplification {written / payload:4.2f}x   reference: 2.5-2.9 MiB/s, 166x")
    store.close()


def bench_load(root: Path, count: int) -> None:
    print(f"\nLoad time with {count:,} guest configs")
    path = root / "load"
    store = Store(path, durability=Durability.PROCESS)
    mkdirs(store, "nodes", *[f"nodes/n{i}" for i in range(10)],
           *[f"nodes/n{i}/qemu-server" for i in range(10)])
    started = time.perf_counter()
    for vmid in range(100, 100 + count):
        config = f"nodes/n{vmid % 10}/qemu-server/{vmid}.conf"
        apply(store, Op.create(config, 1))
        apply(store, Op.write(config, 0, config_for(vmid), 1))
    store.sync()
    print(f"  built in {time.perf_counter() - started:.1f} s")
    store.close()
    started = time.perf_counter()
    store = Store(path)
    seconds = time.perf_counter() - started
    print(f"  open + rebuild index and guest list: {seconds:.2f} s for "
          f"{len(store.state.guests):,} guests (target < 10 s)")
    store.close()


def bench_readdir(root: Path, count: int) -> None:
    print(f"\nOne directory with {count:,} entries")
    store = Store(root / "readdir", durability=Durability.PROCESS)
    mkdirs(store, "many")
    started = time.perf_counter()
    for index in range(count):
        apply(store, Op.create(f"many/{index}", 1))
    print(f"  create: {count / (time.perf_counter() - started):,.0f} files/s   "
          f"reference: ~4,400 files/s (61.5 s for 270k)")
    tree = store.state.tree
    directory = tree.lookup("many")
    assert directory is not None
    started = time.perf_counter()
    listed, cookie = 0, 0
    while page := tree.readdir(directory, cookie, 4096):
        listed += len(page)
        cookie += len(page)
    print(f"  readdir (pages of 4096): {time.perf_counter() - started:.3f} s for {listed:,}   "
          f"reference: 517 s")
    store.close()


class _StateTarget:
    """CfsState + MemoryKV with the store's apply signature."""

    def __init__(self) -> None:
        self.state = CfsState()
        self.kv = MemoryKV()

    def apply(self, op: Op, *, writer: int, quorate: bool) -> Outcome:
        outcome = self.state.apply(op, writer=writer, quorate=quorate, reader=self.kv)
        self.kv.apply_batch(outcome.mutations)
        return outcome


def _apply_phases(count: int) -> list[tuple[str, list[Op]]]:
    paths = [f"{GUEST_DIR}/{100 + i}.conf" for i in range(count)]
    moved = [path.replace("nodes/vm/", "nodes/vm2/") for path in paths]
    locks = [f"priv/lock/lock-{i}" for i in range(count)]
    return [
        ("create", [Op.create(path, 1, excl=True) for path in paths]),
        ("write 200 B", [Op.write(path, 0, config_for(1), 1) for path in paths]),
        ("truncate", [Op.truncate(path, 0, 2) for path in paths]),
        ("write 200 B (after truncate)", [Op.write(path, 0, config_for(2), 2) for path in paths]),
        ("rename (other node)", [Op.rename(a, b, 3) for a, b in zip(paths, moved, strict=True)]),
        ("unlink", [Op.unlink(path) for path in moved]),
        ("lock mkdir", [Op.mkdir(path, 4) for path in locks]),
        ("lock rmdir", [Op.rmdir(path) for path in locks]),
    ]


def _apply_run(target: _StateTarget | Store, count: int) -> dict[str, float]:
    for path in ("nodes", "nodes/vm", GUEST_DIR, "nodes/vm2", "nodes/vm2/qemu-server",
                 "priv", "priv/lock"):
        outcome = target.apply(Op.mkdir(path, 1), writer=1, quorate=True)
        assert outcome.errno == 0
    out = {}
    for label, ops in _apply_phases(count):
        started = time.process_time()
        for op in ops:
            outcome = target.apply(op, writer=1, quorate=True)
            if outcome.errno:
                raise RuntimeError(f"{label}: errno {outcome.errno}")
        out[label] = (time.process_time() - started) / count * 1e6
    return out


def bench_apply_cpu(root: Path, count: int, runs: int) -> None:
    print(f"\nApply step CPU per op, us (median of {runs} runs, {count:,} files)")
    for name in ("CfsState+MemoryKV", "Store (PROCESS)"):
        results = []
        for run in range(runs):
            if name.startswith("Store"):
                store = Store(root / f"apply-{run}", durability=Durability.PROCESS)
                results.append(_apply_run(store, count))
                store.close()
            else:
                results.append(_apply_run(_StateTarget(), count))
        print(f"  {name}")
        for label in results[0]:
            values = sorted(result[label] for result in results)
            print(f"    {label:<30} {values[len(values) // 2]:7.1f} us "
                  f"(runs: {', '.join(f'{v:.1f}' for v in values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--apply-cpu", action="store_true",
                        help="only the apply step's CPU per op (see the module doc)")
    parser.add_argument("--runs", type=int, default=3, help="runs for --apply-cpu (median)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    root = Path(tempfile.mkdtemp(prefix="corral-cfs-bench-", dir=args.dir))
    if args.apply_cpu:
        try:
            bench_apply_cpu(root, 10_000 // scale, args.runs)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    try:
        for durability in (Durability.FSYNC, Durability.PROCESS):
            bench_small_files(root, durability, 10_000 // scale)
        print("\nGroup commit (FSYNC durability, one WAL sync per group)")
        bench_group_commit(root, 10_000 // scale, 64)
        bench_disk_bytes_per_create(root, 10_000 // scale)
        print("\n512 KiB files written in 4 KiB writes (20 files)")
        files = 20 // (2 if args.quick else 1)
        bench_chunked_write(root, files, Durability.FSYNC)
        bench_chunked_write(root, files, Durability.FSYNC, group=32)
        bench_chunked_write(root, files, Durability.PROCESS)
        bench_load(root, 100_000 // scale)
        bench_readdir(root, 270_000 // scale)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
