"""`python -m corral.sim` (also `corral sim`): run one seed, or soak many.

    python -m corral.sim --seed S [--nodes N] [--duration-ms T] [--faults LIST|all|none]
                         [--token-ms MS] [-v|-vv]
    python -m corral.sim soak --seeds A:B [--jobs J] [same options]
    python -m corral.sim shrink --seed S [same options]

Exit status: 0 when every run passed, 1 when a checker failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from corral.sim.cluster import RunResult, SimOptions, convergence_bound_ns, run_seed
from corral.sim.faults import FAULT_NAMES, parse_faults
from corral.totem.config import NS_PER_MS


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", default="3", help="cluster size (default 3); A:B in a soak gives each seed A + seed %% (B-A+1) nodes")
    parser.add_argument("--duration-ms", type=int, default=3000, help="simulated length of the safety phase (default 3000)")
    parser.add_argument("--faults", default="all", help=f"comma list of {','.join(FAULT_NAMES)}, or all / none (default all); each seed picks a subset")
    parser.add_argument("--token-ms", type=int, default=500, help="totem token timeout in ms (default 500)")
    parser.add_argument("--cpg", action="store_true", help="run CPG on every node; the workload uses CPG clients")


def _nodes(text: str, seed: int) -> int:
    if ":" in text:
        low, high = (int(part) for part in text.split(":"))
        return low + seed % (high - low + 1)
    return int(text)


def _options(args: argparse.Namespace, seed: int) -> SimOptions:
    return SimOptions(
        seed=seed, nodes=_nodes(args.nodes, seed), duration_ms=args.duration_ms,
        faults=parse_faults(args.faults), token_ms=args.token_ms, cpg=args.cpg,
        verbose=getattr(args, "verbose", 0),
    )


def _run_one(options: SimOptions) -> RunResult:
    result = run_seed(options)
    # Results cross a process boundary: drop the exception object (its traceback).
    result.violation = None
    return result


def main_single(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral sim", description="Deterministic Totem simulator: run one seed.")
    parser.add_argument("--seed", type=int, required=True)
    _common(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: print membership and fault events; -vv: also packets and deliveries")
    args = parser.parse_args(argv)
    try:
        options = _options(args, args.seed)
    except ValueError as error:
        parser.error(str(error))
    result = run_seed(options)
    print(result.summary())
    if not result.ok:
        print(result.report)
        return 1
    return 0


def main_soak(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral sim soak", description="Run many seeds; print the failing ones.")
    parser.add_argument("--seeds", required=True, help="A:B runs seeds A..B-1")
    parser.add_argument("--jobs", type=int, default=1)
    _common(parser)
    args = parser.parse_args(argv)
    try:
        first, last = (int(part) for part in args.seeds.split(":"))
        options = [_options(args, seed) for seed in range(first, last)]
    except ValueError as error:
        parser.error(str(error))
    started = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.Pool(args.jobs) as pool:
            results = list(pool.imap(_run_one, options))
    else:
        results = [_run_one(option) for option in options]
    failures = [result for result in results if not result.ok]
    elapsed = time.perf_counter() - started
    print(f"{len(options)} seeds in {elapsed:.1f}s, {len(failures)} failed")
    converge_ms = sorted(r.converge_ns / NS_PER_MS for r in results if r.converge_ns >= 0)
    if converge_ms:
        bound_ms = convergence_bound_ns(options[0].totem_config().timers(options[0].nodes)) / NS_PER_MS
        print(
            f"convergence after heal: median {converge_ms[len(converge_ms) // 2]:.0f}ms, "
            f"p99 {converge_ms[int(len(converge_ms) * 0.99)]:.0f}ms, max {converge_ms[-1]:.0f}ms "
            f"(bound {bound_ms:.0f}ms); simulated {sum(r.sim_ns for r in results) / 1e9:.0f}s"
        )
    for result in failures:
        first_line = result.report.splitlines()[0] if result.report else "?"
        print(f"  seed {result.options.seed}: {first_line}")
        print(f"    replay: {result.options.replay_command()}")
    return 1 if failures else 0


def main_shrink(argv: Sequence[str]) -> int:
    """Drop fault classes one at a time while the run still fails the same checker.

    Each class draws from its own generator, so removing a class leaves the
    others' choices and schedules as they were: the smaller run is the same
    scenario minus that fault."""
    parser = argparse.ArgumentParser(prog="corral sim shrink", description="Find a smaller fault set that still fails.")
    parser.add_argument("--seed", type=int, required=True)
    _common(parser)
    args = parser.parse_args(argv)
    try:
        options = _options(args, args.seed)
    except ValueError as error:
        parser.error(str(error))
    first = run_seed(options)
    if first.ok or first.violation is None:
        print(f"seed {options.seed} passes: nothing to shrink")
        return 0
    checker = first.violation.checker
    print(f"seed {options.seed} fails [{checker}] with faults {','.join(options.faults)}")
    for name in options.faults:
        fewer = tuple(fault for fault in options.faults if fault != name)
        trial = replace(options, faults=fewer)
        result = run_seed(trial)
        still = not result.ok and result.violation is not None and result.violation.checker == checker
        print(f"  without {name}: {'still fails' if still else 'passes or fails differently'}")
        if still:
            options = trial
    print(f"smallest: {options.replay_command()}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "soak":
            return main_soak(args[1:])
        if args and args[0] == "shrink":
            return main_shrink(args[1:])
        return main_single(args)
    except BrokenPipeError:
        # Output piped into `head` and friends: stop quietly, as other CLIs do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
