"""Checks the 3-node filesystem benchmark (bench/bench_cfs_cluster.py).

- Its pure parts: CPU ticks and wchar parsed from /proc texts (a process name
  with spaces and parentheses), the table (ratio to the reference, latency and
  resync rows), the option defaults (--quick, --full).
- A tiny real run (3 corrald with FUSE mounts, 30 files per workload, 200
  files for the resync, 5 latency samples) through main(): exit 0, every
  workload row present with a positive rate and no errors, the idle row, the resync rows
  fetched as many entries as changed and sent bytes, the JSON written, and no
  namespace, mount or daemon of the run left behind.
Budget: about 25 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_cfs_cluster import (  # noqa: E402
    Row,
    main,
    parse_args,
    parse_cpu_ticks,
    parse_wchar,
    render_table,
)


def test_proc_parsers() -> None:
    stat = "1234 (corr ald) x) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 4 0"
    assert parse_cpu_ticks(stat) == 250 + 17
    assert parse_wchar("rchar: 10\nwchar: 4096\nsyscr: 3\n") == 4096
    assert parse_wchar("rchar: 10\n") == 0


def test_table_rows_and_ratio() -> None:
    rows = [
        Row("create, node 1, 1 client", 3355.0, "ops/s", 1000, 120.0, 2048.0,
            "6,710-6,946 /s", 0.5),
        Row("latency: x", 4.5, "ms p50", 10, extra={"p99_ms": 9.25}),
        Row("resync after 10 files created", 1.5, "s to in sync", 10, 10.0, 512.0,
            extra={"restart_to_quorate_s": 1.25, "resync_bytes": 4000,
                   "resync_bytes_per_change": 400.0}),
    ]
    table = render_table(rows).splitlines()
    assert table[0].startswith("| Figure | Corral | pmxcfs")
    assert "| create, node 1, 1 client | 3 355 ops/s | 6,710-6,946 /s | 0.50 | 120 us | 2.0 KB |" \
        in table[2]
    assert "4.50 ms p50, 9.25 ms p99" in table[3]
    assert "1.50 s (quorate 1.25 s), 4 000 B sent (400 B per change)" in table[4]


def test_option_defaults() -> None:
    quick, path = parse_args(["--quick", "--json", "x.json"])
    assert (quick.count, quick.resync_files, path) == (1000, [10000], "x.json")
    full, _ = parse_args(["--full"])
    assert (full.count, full.resync_files) == (10000, [10000, 100000])
    with pytest.raises(SystemExit):
        parse_args(["--count", "0"])


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(str(path))]


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_tiny_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = f"crl-bcc{os.getpid() % 100}"
    out = tmp_path / "result.json"
    status = main(["--count", "30", "--resync-files", "200", "--latency-samples", "5",
                   "--json", str(out), "--dir", str(tmp_path / "w"), "--prefix", prefix])
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    for kind in ("create", "read", "overwrite"):
        for where in ("node 1, 1 client", "node 1, 8 clients", "3 nodes at once, 1 client each"):
            row = rows[f"{kind}, {where}"]
            assert row["value"] > 0 and row["errors"] == 0 and row["ops"] >= 30, row
            assert row["cpu_us_per_op"] is not None and row["cpu_us_per_op"] >= 0
    assert rows["create, node 1, 1 client"]["ratio"] is not None
    assert 0 <= rows["idle CPU of the 3 daemons"]["value"] < 300
    latency = rows["latency: write on node 1 -> visible on node 3"]
    assert latency["ops"] == 5 and 0 < latency["value"] <= latency["extra"]["max_ms"]
    created = rows["resync after 200 files created"]
    assert created["extra"]["fetched"] >= 200 and created["extra"]["resync_bytes"] > 200 * 200
    changed = rows["resync after 100 of 200 files changed"]
    assert changed["extra"]["fetched"] >= 100
    assert 0 < changed["extra"]["resync_bytes"] < created["extra"]["resync_bytes"]
    assert "| Figure | Corral |" in printed
    assert not _mounts_under(tmp_path)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in namespaces
