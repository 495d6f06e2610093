"""`python -m bench totem`: Corral's Totem engine against corosync, same run, same topology.

For each system (corosync first, then Corral) on the same namespaces and
addresses (bench/netns.py):

1. start 3 daemons (default timers), wait for the 3-node ring;
2. idle CPU of the 3 daemons over `idle_s` (utime + stime from /proc);
3. saturation throughput: 64 B / 1 KiB / 16 KiB, 1 sender and 3 senders;
4. send-to-own-delivery latency at 500 msg/s per sender (1 KiB), 1 and 3 senders;
5. 5 % UDP loss on node 3 (both directions), 1 sender flat out: throughput
   and the number of ring changes seen on node 1;
6. kill -9 of node 3, default token and `token: 1000`: time from the kill to
   the survivors' 2-node ring event (a fresh cluster per repetition).

Each step records an error instead of stopping the run, so one broken
measurement does not cost the others. Results are printed as tables (Corral,
corosync, ratio) and saved as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.corosync_peer import CorosyncCluster
from bench.netns import Topology, exclusive
from bench.peer import BenchError, BenchSpec, Cluster, ClusterSettings
from bench.procs import CLOCK_TICKS_PER_S
from bench.report import print_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SYSTEMS = ("corosync", "corral")
KILLED_NODE = 3
LOSSY_NODE = 3
# How long clients may wait after the loss run for the sender's END message.
LOSS_EXTRA_WAIT_MS = 15_000


@dataclass(frozen=True)
class Plan:
    """What to measure and for how long; `quick()` is the smoke-test flavour."""

    duration_ms: int = 10_000
    sizes: tuple[int, ...] = (64, 1024, 16384)
    sender_counts: tuple[int, ...] = (1, 3)
    latency_size: int = 1024
    latency_rate_per_s: int = 500
    loss_percent: int = 5
    loss_duration_ms: int = 60_000
    idle_settle_s: float = 5.0
    idle_s: float = 10.0
    kill_tokens_ms: tuple[int | None, ...] = (None, 1000)
    kill_repeats: int = 2
    kill_settle_s: float = 3.0
    sched_rr: bool = True
    # mcasts Corral's client keeps in flight; 0: 256 KiB worth (bench/corral_client.py).
    corral_window: int = 0
    tests: tuple[str, ...] = ("idle", "throughput", "latency", "loss", "kill")

    @classmethod
    def quick(cls) -> Plan:
        return cls(duration_ms=2000, loss_duration_ms=8000, idle_settle_s=2.0, idle_s=3.0,
                   kill_tokens_ms=(1000,), kill_repeats=1, kill_settle_s=1.0)


@dataclass
class SystemResult:
    system: str
    describe: dict[str, Any] = field(default_factory=dict)
    idle: dict[str, Any] = field(default_factory=dict)
    throughput: list[dict[str, Any]] = field(default_factory=list)
    latency: list[dict[str, Any]] = field(default_factory=list)
    loss: dict[str, Any] = field(default_factory=dict)
    kill: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def log(message: str) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def cluster_class(system: str) -> type[Cluster]:
    if system == "corosync":
        return CorosyncCluster
    from bench.corral_peer import CorralCluster

    return CorralCluster


def guarded(result: SystemResult, what: str, action: Callable[[], Any]) -> Any:
    """Run one measurement; on failure record the error and carry on."""
    try:
        return action()
    except (BenchError, OSError, ValueError, RuntimeError) as error:
        message = f"{what}: {error}"
        log(f"{result.system}: FAILED {message}")
        if os.environ.get("CORRAL_BENCH_DEBUG"):
            traceback.print_exc()
        result.errors.append(message)
        return None


@contextmanager
def running_cluster(cls: type[Cluster], topology: Topology, workdir: Path,
                    settings: ClusterSettings,
                    problems: list[str] | None = None) -> Iterator[Cluster]:
    """A started cluster whose 3-node ring formed; one retry, noted in `problems`."""
    cluster = cls(topology, workdir, settings)
    try:
        for attempt in (1, 2):
            cluster.start()
            started = time.monotonic()
            try:
                cluster.wait_ring(topology.node_count, list(topology.nodes), group_counts=True)
                break
            except BenchError as error:
                if attempt == 2:
                    raise
                note = f"start: {error}; retried with fresh daemons"
                log(f"{cluster.system}: {note}")
                if problems is not None:
                    problems.append(note)
                cluster.stop()
        log(f"{cluster.system}: {topology.node_count}-node ring after "
            f"{time.monotonic() - started:.2f} s")
        yield cluster
    finally:
        cluster.stop()


def cpu_percent(cluster: Cluster, start_ticks: dict[int, int], start_s: float) -> float:
    """CPU used by the 3 daemons since start_ticks, in % of one core (sum over daemons)."""
    end_ticks, elapsed_s = cluster.cpu_ticks(), time.monotonic() - start_s
    used_s = sum(end_ticks[node] - start_ticks[node] for node in start_ticks) / CLOCK_TICKS_PER_S
    return 100.0 * used_s / elapsed_s if elapsed_s > 0 else 0.0


def measure_idle(cluster: Cluster, plan: Plan) -> dict[str, Any]:
    """CPU share of each daemon over plan.idle_s, in % of one core."""
    time.sleep(plan.idle_settle_s)
    start_ticks, start_s = cluster.cpu_ticks(), time.monotonic()
    time.sleep(plan.idle_s)
    end_ticks, elapsed_s = cluster.cpu_ticks(), time.monotonic() - start_s
    per_node = {
        str(node): 100.0 * (end_ticks[node] - start_ticks[node]) / CLOCK_TICKS_PER_S / elapsed_s
        for node in start_ticks
    }
    return {"seconds": elapsed_s, "per_node_pct": per_node,
            "total_pct": sum(per_node.values())}


def summarize_clients(spec: BenchSpec, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-node delivery figures and sender latencies of one client run."""
    rates = [float(r.get("msgs_per_s", 0.0)) for r in results]
    mbps = [float(r.get("mb_per_s", 0.0)) for r in results]
    counts = [int(r.get("msgs", 0)) for r in results]
    senders = [r for r in results if r.get("sender") and r.get("latency_samples", 0) > 0]
    p50 = [float(r["latency_us_p50"]) / 1000 for r in senders]
    p99 = [float(r["latency_us_p99"]) / 1000 for r in senders]
    return {
        "size": spec.size,
        "senders": spec.senders,
        "duration_ms": spec.duration_ms,
        "rate_per_s": spec.rate_per_s,
        "msgs_per_s_per_node": sum(rates) / len(rates) if rates else 0.0,
        "msgs_per_s_min": min(rates, default=0.0),
        "msgs_per_s_max": max(rates, default=0.0),
        "mb_per_s_per_node": sum(mbps) / len(mbps) if mbps else 0.0,
        "latency_ms_p50": sum(p50) / len(p50) if p50 else None,
        "latency_ms_p99": sum(p99) / len(p99) if p99 else None,
        "gaps": sum(int(r.get("gaps", 0)) for r in results),
        "dups": sum(int(r.get("dups", 0)) for r in results),
        "all_complete": all(bool(r.get("complete")) for r in results),
        "equal_counts": len(set(counts)) == 1,
        "nodes": results,
    }


def run_case(cluster: Cluster, spec: BenchSpec) -> dict[str, Any]:
    start_ticks, start_s = cluster.cpu_ticks(), time.monotonic()
    results = cluster.run_clients(spec)
    summary = summarize_clients(spec, results)
    summary["daemon_cpu_pct"] = cpu_percent(cluster, start_ticks, start_s)
    errors = [r["error"] for r in results if r.get("error")]
    if errors or not summary["all_complete"]:
        summary["error"] = "; ".join(errors) or "a client timed out before all END messages"
    lat = summary["latency_ms_p50"]
    log(f"{cluster.system}: {spec.size} B x{spec.senders} rate={spec.rate_per_s or 'max'}: "
        f"{summary['msgs_per_s_per_node']:.0f} msg/s/node "
        f"{summary['mb_per_s_per_node']:.2f} MB/s, p50 "
        f"{'-' if lat is None else f'{lat:.2f}'} ms, gaps {summary['gaps']}, "
        f"daemons {summary['daemon_cpu_pct']:.0f} % CPU"
        + (f", ERROR {summary['error']}" if "error" in summary else ""))
    time.sleep(1.0)
    return summary


def measure_loss(cluster: Cluster, plan: Plan) -> dict[str, Any]:
    """One sender flat out (1 KiB) while node LOSSY_NODE drops loss_percent % of UDP.

    Under loss a node can stall for a long time, so a per-node rate from first
    to last delivery would flatter it; here each node's figure is its delivered
    count divided by the window from the sender's start to the later of the
    end of sending and that node's last delivery.
    """
    topology = cluster.topology
    spec = BenchSpec(size=1024, senders=1, duration_ms=plan.loss_duration_ms,
                     timeout_ms=plan.loss_duration_ms + LOSS_EXTRA_WAIT_MS)
    marks = {node: cluster.watchers[node].count() for node in topology.nodes}
    started_ns = time.monotonic_ns()
    topology.set_loss(LOSSY_NODE, plan.loss_percent)
    try:
        results = cluster.run_clients(spec)
    finally:
        topology.clear_loss(LOSSY_NODE)
    ended_ns = time.monotonic_ns()
    ring_changes = {
        str(node): sum(1 for event in cluster.watchers[node].snapshot()[marks[node]:]
                       if event.get("event") == "ring" and event["t_ns"] <= ended_ns)
        for node in topology.nodes
    }
    summary = summarize_clients(spec, results)
    sender = next((r for r in results if r.get("sender")), {})
    send_start_ns = int(sender.get("send_start_ns") or started_ns)
    send_end_ns = send_start_ns + plan.loss_duration_ms * 1_000_000
    windowed = {
        str(r["node"]): int(r.get("msgs", 0))
        / (max(int(r.get("last_ns") or 0), send_end_ns) - send_start_ns) * 1e9
        for r in results
    }
    send_s = float(sender.get("send_s") or 0.0)
    summary.update({
        "loss_percent": plan.loss_percent,
        "lossy_node": LOSSY_NODE,
        "seconds": (ended_ns - started_ns) / 1e9,
        "delivered_per_s": windowed,
        "msgs_per_s_per_node": sum(windowed.values()) / len(windowed),
        "sender_msgs_per_s": windowed.get("1", 0.0),
        "sent_per_s": int(sender.get("sent", 0)) / send_s if send_s else 0.0,
        "sender_blocked": bool(sender.get("sender_blocked")),
        "ring_changes": ring_changes,
        "ring_changes_node1": ring_changes.get("1", 0),
    })
    log(f"{cluster.system}: {plan.loss_percent}% loss: delivered msg/s {windowed}, "
        f"ring changes {ring_changes}, sender blocked: {summary['sender_blocked']}")
    return summary


def measure_kill(cls: type[Cluster], topology: Topology, workdir: Path, plan: Plan,
                 token_ms: int | None, problems: list[str]) -> dict[str, Any]:
    """kill -9 node KILLED_NODE's daemon; time until each survivor reports a 2-node ring."""
    settings = ClusterSettings(token_ms=token_ms, sched_rr=plan.sched_rr,
                               corral_window=plan.corral_window)
    with running_cluster(cls, topology, workdir, settings, problems) as cluster:
        time.sleep(plan.kill_settle_s)
        survivors = [node for node in topology.nodes if node != KILLED_NODE]
        killed_ns = cluster.kill_daemon(KILLED_NODE)
        rings = cluster.wait_ring(topology.node_count - 1, survivors, timeout_s=60.0,
                                  after_ns=killed_ns)
        per_node = {str(node): (int(event["t_ns"]) - killed_ns) / 1e9
                    for node, event in rings.items()}
        seconds = max(per_node.values())
        # The group view change (the killed watcher listed as left) comes with or after it.
        group_s = {}
        for node in survivors:
            event = cluster.watchers[node].wait_for(
                lambda e: e.get("event") == "group" and int(e["t_ns"]) >= killed_ns
                and any(entry[0] == KILLED_NODE for entry in e.get("left", [])), 2.0)
            if event is not None:
                group_s[str(node)] = (int(event["t_ns"]) - killed_ns) / 1e9
        log(f"{cluster.system}: token={token_ms or 'default'}: kill -9 -> 2-node ring "
            f"{seconds:.3f} s {per_node}")
        return {"token_ms": token_ms, "seconds": seconds, "per_node_s": per_node,
                "group_left_s": group_s}


def summarize_kills(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_token: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_token.setdefault(str(run["token_ms"]), []).append(run)
    summaries = []
    for key, token_runs in by_token.items():
        values = [float(run["seconds"]) for run in token_runs]
        summaries.append({"token_ms": None if key == "None" else int(key), "runs_s": values,
                          "mean_s": sum(values) / len(values), "min_s": min(values),
                          "max_s": max(values), "runs": token_runs})
    return summaries


def measure_system(system: str, topology: Topology, workdir: Path, plan: Plan) -> SystemResult:
    cls = cluster_class(system)
    result = SystemResult(system)
    settings = ClusterSettings(sched_rr=plan.sched_rr, corral_window=plan.corral_window)
    steady = [t for t in ("idle", "throughput", "latency", "loss") if t in plan.tests]
    if steady:
        try:
            with running_cluster(cls, topology, workdir / "steady", settings,
                                 result.errors) as cluster:
                result.describe = cluster.describe()
                run_steady_tests(cluster, plan, result)
        except (BenchError, OSError, RuntimeError) as error:
            result.errors.append(f"cluster: {error}")
            log(f"{system}: FAILED cluster: {error}")
    if "kill" in plan.tests:
        runs = []
        for token_ms in plan.kill_tokens_ms:
            for repeat in range(plan.kill_repeats):
                where = workdir / f"kill-{token_ms or 'default'}-{repeat}"
                run = guarded(result, f"kill token={token_ms}",
                              partial(measure_kill, cls, topology, where, plan, token_ms,
                                      result.errors))
                if run:
                    runs.append(run)
        result.kill = summarize_kills(runs)
    return result


def restart_cluster(cluster: Cluster) -> None:
    """Fresh daemons after a failed case, so one broken run does not fail all that follow."""
    log(f"{cluster.system}: restarting the cluster after a failed case")
    cluster.stop()
    cluster.start()
    nodes = list(cluster.topology.nodes)
    cluster.wait_ring(cluster.topology.node_count, nodes, group_counts=True)


def run_cases(cluster: Cluster, specs: list[BenchSpec], result: SystemResult,
              into: list[dict[str, Any]], what: str) -> None:
    for spec in specs:
        case = guarded(result, f"{what} {spec.size}x{spec.senders}",
                       partial(run_case, cluster, spec))
        if case:
            into.append(case)
        if case is None or "error" in case:
            guarded(result, "restart", partial(restart_cluster, cluster))


def run_steady_tests(cluster: Cluster, plan: Plan, result: SystemResult) -> None:
    if "idle" in plan.tests:
        result.idle = guarded(result, "idle cpu", lambda: measure_idle(cluster, plan)) or {}
        if result.idle:
            log(f"{cluster.system}: idle CPU {result.idle['total_pct']:.2f} % of one core")
    if "throughput" in plan.tests:
        specs = [BenchSpec(size=size, senders=senders, duration_ms=plan.duration_ms)
                 for senders in plan.sender_counts for size in plan.sizes]
        run_cases(cluster, specs, result, result.throughput, "throughput")
    if "latency" in plan.tests:
        specs = [BenchSpec(size=plan.latency_size, senders=senders, duration_ms=plan.duration_ms,
                           rate_per_s=plan.latency_rate_per_s)
                 for senders in plan.sender_counts]
        run_cases(cluster, specs, result, result.latency, "latency")
    if "loss" in plan.tests:
        result.loss = guarded(result, "loss", lambda: measure_loss(cluster, plan)) or {}


def metadata(plan: Plan, argv: list[str]) -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(argv),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": load,
        "plan": asdict(plan),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench totem", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--only", choices=SYSTEMS, help="measure only this system")
    parser.add_argument("--tests", default=",".join(Plan().tests),
                        help="comma-separated subset of: idle,throughput,latency,loss,kill")
    parser.add_argument("--sizes", help="comma-separated message sizes in bytes "
                        "(default 64,1024,16384)")
    parser.add_argument("--senders", help="comma-separated sender counts (default 1,3)")
    parser.add_argument("--json", type=Path, help="also write the JSON results here")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="print the tables of a saved result file and exit")
    parser.add_argument("--no-sched-rr", action="store_true",
                        help="run corosync with `system { sched_rr: no }` (default: as shipped)")
    parser.add_argument("--corral-window", type=int, default=0,
                        help="mcasts Corral's client keeps in flight (1: wait for each reply; "
                        "0, the default: 256 KiB worth, 32..4096 messages)")
    parser.add_argument("--keep", action="store_true", help="keep configs and logs (workdir)")
    parser.add_argument("--prefix", default="crlb-", help="namespace name prefix")
    parser.add_argument("--subnet", default="10.213.0", help="first three octets of the subnet")
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    tests = tuple(t for t in args.tests.split(",") if t)
    unknown = set(tests) - set(Plan().tests)
    if unknown:
        raise SystemExit(f"unknown tests: {', '.join(sorted(unknown))}")
    if not 0 <= args.corral_window <= 4096:
        raise SystemExit("--corral-window must be in [0, 4096]")
    changes: dict[str, Any] = {"tests": tests, "sched_rr": not args.no_sched_rr,
                               "corral_window": args.corral_window}
    try:
        if args.sizes:
            changes["sizes"] = tuple(int(size) for size in args.sizes.split(","))
        if args.senders:
            changes["sender_counts"] = tuple(int(count) for count in args.senders.split(","))
    except ValueError:
        raise SystemExit("--sizes and --senders take comma-separated integers") from None
    if not all(32 <= size <= 1 << 20 for size in changes.get("sizes", plan.sizes)):
        raise SystemExit("message sizes must be in [32, 1048576]")
    if not all(1 <= count <= 3 for count in changes.get("sender_counts", plan.sender_counts)):
        raise SystemExit("sender counts must be in [1, 3]")
    return Plan(**{**asdict(plan), **changes})


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report:
        print_report(json.loads(args.report.read_text()))
        return 0
    if os.geteuid() != 0:
        print("python -m bench totem needs root (network namespaces, nftables, mounts)",
              file=sys.stderr)
        return 2
    plan = build_plan(args)
    # SIGINT too: a shell starting us in the background may have set it to "ignore".
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_keyboard_interrupt)
    systems = [args.only] if args.only else list(SYSTEMS)
    topology = Topology(prefix=args.prefix, subnet=args.subnet)
    workdir = Path(tempfile.mkdtemp(prefix="crlb-bench-"))
    report: dict[str, Any] = {"meta": metadata(plan, ["totem", *argv])}
    try:
        with exclusive(topology):
            for system in systems:
                topology.create()
                try:
                    log(f"=== {system} ===")
                    report[system] = asdict(measure_system(system, topology, workdir, plan))
                finally:
                    topology.destroy()
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        return 130
    finally:
        failed = any(report.get(system, {}).get("errors") or has_case_errors(report.get(system))
                     for system in systems)
        if args.keep or failed:
            log(f"configs and logs kept in {workdir}"
                + ("" if args.keep else " (a measurement failed)"))
            report["meta"]["workdir"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    save_report(report, args.json)
    print_report(report)
    return 0


def has_case_errors(system: dict[str, Any] | None) -> bool:
    if not system:
        return False
    cases = system.get("throughput", []) + system.get("latency", []) + [system.get("loss") or {}]
    return any("error" in case for case in cases)


def save_report(report: dict[str, Any], extra_path: Path | None) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    paths = [RESULTS_DIR / f"totem-{stamp}.json"] + ([extra_path] if extra_path else [])
    for path in paths:
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"results written to {path}")
