"""Checks the HA failover benchmark's pure parts (bench/bench_ha_failover.py): the figures
table (min/median/max, the ratio against the reference's 135 s, medians of the repeats
that killed the guest's node only or the master with it, safety samples and violations,
n/a without repeats), the command line, and that a run with a safety violation
or missing repeats is a failure. The real run needs root and ~1 min per repeat:
`python -m bench ha_failover` (docs/ha-daemon.md)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_ha_failover import Run, exit_status, parse_args, table  # noqa: E402


def test_table_figures() -> None:
    run = Run("fast", failover_s=[18.0, 27.0, 20.0], samples=900,
              master_killed=[False, True, False])
    lines = table([run, Run("reference", samples=10, violations=["x"])]).splitlines()
    assert lines[0].startswith("| profile | repeats | min s | median s | max s |")
    assert lines[2] == ("| fast | 3 | 18.0 | 20.0 | 27.0 | 6.8x | 19.0 (2) | 27.0 (1) | 900 "
                        "| 0 |")
    assert lines[3] == "| reference | 0 | n/a | n/a | n/a | n/a | n/a | n/a | 10 | 1 |"


def test_command_line() -> None:
    args = parse_args(["--profile", "both", "--repeats", "3"])
    assert args.profile == "both" and args.repeats == 3 and args.json is None
    assert parse_args([]).profile == "fast" and parse_args([]).repeats == 5
    assert parse_args([]).victim == "guest"
    assert parse_args(["--victim", "master"]).victim == "master"


def test_violation_or_missing_repeat_fails_the_run() -> None:
    good = Run("fast", failover_s=[18.0, 19.0])
    assert exit_status([good], 2) == 0
    assert exit_status([good], 3) == 1
    assert exit_status([Run("fast", failover_s=[18.0, 19.0], violations=["v"])], 2) == 1
