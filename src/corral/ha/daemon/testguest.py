"""A process-based test guest: stands in for a VM until the QEMU driver exists.

It sleeps and rewrites a heartbeat file (`<guest_dir>/<vmid>.heartbeat`, JSON with its node
name, pid and wall time) every HEARTBEAT_INTERVAL_S, so a safety checker can see on which
nodes a guest runs. It exits on SIGTERM; SIGKILL (the watchdog fallback) leaves the last
heartbeat behind, which is why checkers also test that the pid is alive.

    python -m corral.ha.daemon.testguest --vmid 100 --node n1 --guest-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from types import FrameType

HEARTBEAT_INTERVAL_S = 0.2
MARKER = "corral.ha.daemon.testguest"


def _write_heartbeat(path: str, node: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"node": node, "pid": os.getpid(), "time_s": time.time()}, handle)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testguest")
    parser.add_argument("--vmid", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--guest-dir", required=True)
    args = parser.parse_args(argv)
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    path = os.path.join(args.guest_dir, f"{args.vmid}.heartbeat")
    while running:
        _write_heartbeat(path, args.node)
        time.sleep(HEARTBEAT_INTERVAL_S)
    os.unlink(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
