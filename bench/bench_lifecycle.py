"""Cluster lifecycle timings with real processes on this machine.

Run:  .venv/bin/python bench/bench_lifecycle.py [--rounds 3] [--no-netns]
      (or `python -m bench lifecycle ...`)

Three figures, each the median (and min/max) over --rounds fresh clusters:

- create: `corral create ... ` as an operator runs it (a new interpreter, files
  written, corrald started detached) until the command returns with the
  one-node cluster quorate;
- join: `corral add` of a second node (a new interpreter: TLS to the member,
  token, config change replicated, corrald started) until it returns quorate;
- demo: `DemoCluster.build()`, what `corral demo` does (create and joins
  in-process, 3 corrald processes) until all 3 nodes report a quorate
  3-node cluster; the `corral demo` command adds its own interpreter start
  and the network setup on top.

Every round uses a fresh directory and 127.0.0.x addresses (or, as root
without --no-netns, network namespaces for the demo figure). The box is
shared: wall-clock figures move with the load (printed with each run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from corral.daemon.demo import DemoCluster


def _time_create_and_join(workdir: str) -> tuple[float, float]:
    cluster = DemoCluster(2, workdir, use_netns=False, stats_interval_s=60)
    try:
        cluster.setup_network()
        for nodeid in (1, 2):
            cluster.mount(nodeid).mkdir(parents=True, exist_ok=True)
        create = [a for a in cluster._create_args() if a != "--no-start"]
        env = dict(os.environ)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "corral.cli", *create], check=True, env=env,
                       stdout=subprocess.DEVNULL, timeout=120)
        create_s = time.monotonic() - started
        token = cluster.join_token(1)
        join = [a for a in cluster._join_args(2, 1, token) if a != "--no-start"]
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "corral.cli", *join], check=True, env=env,
                       stdout=subprocess.DEVNULL, timeout=120)
        join_s = time.monotonic() - started
        return create_s, join_s
    finally:
        for nodeid in (1, 2):
            try:
                cluster.control(nodeid, "stop")
            except Exception:
                pass
        time.sleep(1.5)
        cluster.close()


def _time_demo(workdir: str, use_netns: bool, prefix: str) -> float:
    cluster = DemoCluster(3, workdir, prefix=prefix, use_netns=use_netns, stats_interval_s=60)
    try:
        cluster.setup_network()
        cluster.build()
        return cluster.timings["quorate_s"]
    finally:
        cluster.close()


def _summary(name: str, values: list[float]) -> str:
    return (f"{name:<28} median {statistics.median(values):6.2f} s   min {min(values):6.2f} s"
            f"   max {max(values):6.2f} s   ({len(values)} runs)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-netns", action="store_true")
    args = parser.parse_args(argv)
    use_netns = os.geteuid() == 0 and not args.no_netns
    creates, joins, demos = [], [], []
    for round_number in range(args.rounds):
        workdir = tempfile.mkdtemp(prefix="crl-bench-lc-")
        try:
            create_s, join_s = _time_create_and_join(os.path.join(workdir, "cj"))
            demo_s = _time_demo(os.path.join(workdir, "demo"), use_netns, "crl-blc")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        creates.append(create_s)
        joins.append(join_s)
        demos.append(demo_s)
        print(f"round {round_number + 1}: create {create_s:.2f} s, join {join_s:.2f} s, "
              f"demo 3-node quorate {demo_s:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    print(_summary("create -> quorate 1 node", creates))
    print(_summary("join -> quorate 2 nodes", joins))
    print(_summary("demo -> quorate 3 nodes", demos) + ("  [netns]" if use_netns else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
