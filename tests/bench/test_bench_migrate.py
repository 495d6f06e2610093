"""Checks the migration benchmark (bench/bench_migrate.py): its pure parts, and one short
real run of both columns.

- The reference's xbzrle cache size (10 % of RAM rounded up to a power of two).
- The task-log parser reads QEMU's figures and the orchestration timings from the
  lines the migration writes, and refuses a log without them or without `TASK OK`.
- The serial-counter watch computes the guest-visible pause between the last line
  from the source and the first from the target, and flags a counter that repeats
  (a guest running on two sides at once).
- The table puts plain and Corral side by side and says n/a where a figure is missing;
  bad command-line values are refused.
- With QEMU, the test guest and root: one idle 256 MiB guest with a local disk migrated
  (NBD + mirror) once over plain TCP by plain QEMU and once by Corral on a real 2-node
  cluster; both succeed (the guest's counter continues on the target, the disk there
  holds the same bytes, the config is on the target only) with every figure present, the JSON report holds them, the migration task is
  in the cluster-wide task list read through both nodes' trees, and afterwards no QEMU
  or corrald process of the run remains.
Budget: about 25 s on the loaded 2-core box.

No tests/bench/__init__.py on purpose (see test_bench_totem.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_migrate import (  # noqa: E402
    BenchError,
    CounterWatch,
    cpu_share,
    main,
    parse_args,
    parse_task_log,
    probe_serial,
    table,
    xbzrle_cache_bytes,
)

GUEST_DIR = os.environ.get("CORRAL_TEST_GUEST_DIR", "/var/cache/corral/test-guest")

TASK_LOG = [
    "2026-11-26 23:10:01 starting migration of VM 900 to node 'node2'",
    "2026-11-26 23:10:02 migration active, transferred 50.0 MiB of 256.0 MiB VM-state, 1.2 GiB/s",
    "2026-11-26 23:10:02 average migration speed: 200.0 MiB/s - downtime 12 ms",
    "2026-11-26 23:10:02 migration completed, transferred 100.0 MiB VM-state",
    "2026-11-26 23:10:02 timing: command to QEMU migration start 321 ms",
    "2026-11-26 23:10:02 timing: QEMU completion to target resumed 41 ms",
    "2026-11-26 23:10:02 timing: QEMU completion to hand-over done 87 ms",
    "2026-11-26 23:10:02 migration finished successfully (duration 00:00:01)",
    "TASK OK",
]


def test_xbzrle_cache_is_a_tenth_rounded_up_to_a_power_of_two() -> None:
    assert xbzrle_cache_bytes(256) == 32 << 20
    assert xbzrle_cache_bytes(1024) == 128 << 20
    assert xbzrle_cache_bytes(80) == 8 << 20


def test_task_log_figures() -> None:
    figures = parse_task_log(TASK_LOG)
    assert figures.downtime_ms == 12 and figures.ram_bytes == 100 << 20
    assert figures.total_ms == pytest.approx(500.0)
    assert (figures.start_overhead_ms, figures.finish_overhead_ms) == (321, 87)
    assert figures.resume_ms == 41
    older = parse_task_log([line for line in TASK_LOG if "target resumed" not in line])
    assert older.resume_ms is None
    with pytest.raises(BenchError, match="timing"):
        parse_task_log([line for line in TASK_LOG if "timing: command" not in line])
    with pytest.raises(BenchError, match="TASK OK"):
        parse_task_log([*TASK_LOG[:-1], "TASK ERROR: migration aborted: boom"])


def test_counter_watch_pause_and_double_runner() -> None:
    async def check() -> None:
        watch = CounterWatch({})
        watch.samples = [(1.00, "a", 1), (1.10, "a", 2), (1.20, "a", 3),
                         (1.55, "b", 4), (1.60, "b", 5)]
        assert watch.pause_ms("a", "b", since_s=1.05) == pytest.approx(350.0)
        assert watch.pause_ms("a", "b", since_s=1.70) is None
        assert watch.latest("a") == 3 and watch.latest("b", since_s=1.58) == 5
        late = CounterWatch({})                       # the source's last line read late
        late.samples = [(1.0, "a", 1), (1.2, "b", 3), (1.21, "a", 2)]
        late.check_single_runner()
        await late.close()
        watch.samples.append((1.65, "a", 5))          # the source went on after the move
        with pytest.raises(BenchError, match=r"values \[5\] printed on two sides"):
            watch.check_single_runner()
        await watch.close()

    asyncio.run(check())


def test_diagnostic_helpers(tmp_path: Path) -> None:
    assert asyncio.run(cpu_share(None)) == "no process"
    assert asyncio.run(cpu_share(os.getpid(), 0.05)).endswith("% of a core")
    assert asyncio.run(probe_serial(str(tmp_path / "none"), 0.1)).startswith("no connection")


def test_table_and_arguments() -> None:
    case = {"memory_mib": 256, "dirty_mib": 0, "storage": "shared", "transport": "tls"}
    plain = {"system": "plain", "case": case, "label": "256 MiB, idle, shared, tls", "runs": 2,
             "failed": 0, "total_ms": 400.0, "downtime_ms": 10.0, "pause_ms": 100.0,
             "ram_mib": 91.0, "disk_mib": 0.0, "wall_ms": 800.0}
    text = table([plain])
    assert "| 256 MiB, idle, shared, tls | 400 / n/a (n/a) | 10 / n/a (n/a) | n/a / n/a (n/a) |" in text
    corral = {**plain, "system": "corral", "total_ms": 600.0, "start_overhead_ms": 300.0,
              "finish_overhead_ms": 100.0}
    assert "400 / 600 (1.50)" in table([plain, corral])
    assert "| n/a / 300 (n/a) | n/a / 100 (n/a) |" in table([plain, corral])
    assert parse_args(["--quick"]).sizes == [256]
    assert parse_args([]).sizes == [256, 1024] and parse_args([]).repeats == 3
    for bad in (["--storages", "nfs"], ["--repeats", "0"], ["--sizes", "32"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if text.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
@pytest.mark.skipif(not os.path.exists(f"{GUEST_DIR}/vmlinuz"), reason="needs the test guest")
@pytest.mark.skipif(os.geteuid() != 0, reason="the demo cluster mounts FUSE trees (root)")
def test_one_plain_and_one_corral_migration(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Not under tmp_path: QEMU's UNIX socket paths must stay below 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="crl-migt-"))
    report_path = tmp_path / "report.json"
    try:
        status = main(["--quick", "--workloads", "idle", "--storages", "local",
                       "--transports", "insecure", "--workdir", str(workdir),
                       "--json", str(report_path)])
    finally:
        leftovers = _processes_mentioning(str(workdir))
        shutil.rmtree(workdir, ignore_errors=True)
    assert leftovers == []
    printed = capsys.readouterr().out
    assert "plain: 0 failed of 1 migrations" in printed
    assert "corral: 0 failed of 1 migrations" in printed
    assert "cluster task list: 1 of 1 migration tasks listed OK on every node" in printed
    report = json.loads(report_path.read_text())
    assert status == 0, report
    by_system = {summary["system"]: summary for summary in report["summaries"]}
    assert set(by_system) == {"plain", "corral"}
    for summary in by_system.values():
        assert summary["runs"] == 1 and summary["failed"] == 0
        assert summary["total_ms"] > 0 and summary["downtime_ms"] is not None
        assert summary["pause_ms"] is not None and summary["pause_ms"] > 0
        assert 50 < summary["ram_mib"] < 256     # an idle guest: mostly zero pages
    for summary in by_system.values():
        assert summary["start_overhead_ms"] > 0 and summary["finish_overhead_ms"] > 0
        assert summary["effective_downtime_ms"] >= summary["downtime_ms"]
