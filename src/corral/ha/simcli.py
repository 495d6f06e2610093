"""`corral ha-sim run|check DIR`: run HA scenario directories in the simulator.

run   writes OUT/log (human log, reference line layout), OUT/events.jsonl (one JSON record
      per service/node state change, fence acknowledgement, watchdog reset, master change)
      and OUT/ha-status (`ha status` text at the end); OUT defaults to DIR/status.
      --write-expected also stores DIR/expected.jsonl.
check runs DIR and compares the event log with DIR/expected.jsonl, printing a unified diff.
Exit status: 0 ok, 1 difference, 2 usage or scenario error, 3 safety violation.
"""

from __future__ import annotations

import argparse
import difflib
import pathlib
import sys
from collections.abc import Sequence

from corral.ha.sim.scenario import RunResult, ScenarioError, run_scenario


def _write_outputs(result: RunResult, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "log").write_text(result.log_text())
    (out / "events.jsonl").write_text(result.events_text())
    (out / "ha-status").write_text(result.status_text)


def _run_one(directory: pathlib.Path, args: argparse.Namespace) -> int:
    try:
        result = run_scenario(directory)
    except ScenarioError as error:
        print(f"{directory}: scenario error: {error}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out) if getattr(args, "out", None) else directory / "status"
    _write_outputs(result, out)
    if result.error:
        print(f"{directory}: {result.error}", file=sys.stderr)
        return 3
    if getattr(args, "write_expected", False):
        (directory / "expected.jsonl").write_text(result.events_text())
    if args.command == "run":
        print(f"{directory}: {len(result.events)} events, logs in {out}")
        return 0
    expected_path = directory / "expected.jsonl"
    if not expected_path.exists():
        print(f"{directory}: no expected.jsonl", file=sys.stderr)
        return 2
    expected = expected_path.read_text().splitlines(keepends=True)
    actual = result.events_text().splitlines(keepends=True)
    diff = list(difflib.unified_diff(expected, actual, "expected.jsonl", "actual"))
    if diff:
        sys.stdout.writelines(diff)
        print(f"{directory}: FAILED (event log differs)")
        return 1
    print(f"{directory}: ok")
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral ha-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run scenario directories and write logs")
    run.add_argument("dirs", nargs="+")
    run.add_argument("--out", help="output directory (only with one scenario)")
    run.add_argument("--write-expected", action="store_true",
                     help="also store the event log as DIR/expected.jsonl")
    check = sub.add_parser("check", help="compare against DIR/expected.jsonl")
    check.add_argument("dirs", nargs="+")
    args = parser.parse_args(list(argv))
    if getattr(args, "out", None) and len(args.dirs) > 1:
        parser.error("--out needs exactly one scenario directory")
    status = 0
    for directory in args.dirs:
        status = max(status, _run_one(pathlib.Path(directory), args))
    return status
