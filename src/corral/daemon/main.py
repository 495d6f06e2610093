"""`corrald [--state-dir D] [--log-level L] [--no-api] [--no-fs] [--no-mount]
[--wait-for-cluster] [--stats-interval S] [--guest-run-dir D] [--guest-task-dir D]`:
the node daemon.

Exit status: 0 after a clean stop, 1 when the Totem node failed, 2 for a
configuration error (not in a cluster, unreadable key, an address that cannot
be bound).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from corral.cluster.layout import default_state_dir
from corral.errors import CorralError

LEVELS = ("debug", "info", "warning", "error")
WAIT_POLL_S = 0.02


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="corrald", description="Corral node daemon")
    parser.add_argument("--state-dir", default=None,
                        help="state directory (default: $CORRAL_STATE_DIR or /var/lib/corral)")
    parser.add_argument("--log-level", choices=LEVELS, default="info")
    parser.add_argument("--no-api", action="store_true", help="do not serve the join API")
    parser.add_argument("--no-fs", action="store_true",
                        help="run without the configuration filesystem")
    parser.add_argument("--no-mount", action="store_true",
                        help="replicate the configuration filesystem but do not mount it")
    parser.add_argument("--wait-for-cluster", action="store_true",
                        help="on a node not in a cluster yet, wait (loaded and ready) until "
                        "`corral create` or `corral add` writes the cluster config")
    parser.add_argument("--stats-interval", type=float, default=30.0, metavar="S",
                        help="seconds between rate/membership log lines")
    parser.add_argument("--guest-run-dir", default="/run/corral/qemu-server", metavar="DIR",
                        help="QEMU pid/QMP/serial sockets of guests started here (as corral qm)")
    parser.add_argument("--guest-task-dir", default="/var/log/corral/tasks", metavar="DIR",
                        help="task logs of guest operations (as corral qm)")
    return parser.parse_args(argv)


def wait_for_cluster(state_dir: str) -> bool:
    """Block until <state_dir>/corosync.conf exists (True) or SIGTERM/SIGINT (False).
    The pid file is written first, so `corral create/add` see this daemon and do not
    start a second one; the heavy modules are imported while waiting."""
    import contextlib
    import signal
    import time

    from corral.cluster.layout import Layout

    layout = Layout(state_dir)
    if layout.conf.exists():
        return True
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.pidfile.write_text(f"{os.getpid()}\n", encoding="ascii")
    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.append(True))
    logging.getLogger("corral.daemon").info("not in a cluster yet: waiting for %s", layout.conf)
    with contextlib.suppress(ImportError):
        import corral.cfs.mount
        import corral.cfs.replication  # noqa: F401
    while not stop and not layout.conf.exists():
        time.sleep(WAIT_POLL_S)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    if stop:
        with contextlib.suppress(FileNotFoundError):
            layout.pidfile.unlink()
        return False
    time.sleep(WAIT_POLL_S)  # create/add write the config last, but let them finish
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    state_dir = args.state_dir or default_state_dir()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d corrald[%(process)d] %(levelname)s %(message)s",
        datefmt="%b %d %H:%M:%S",
    )
    from corral.daemon.node import Daemon, DaemonOptions

    if args.wait_for_cluster and not wait_for_cluster(state_dir):
        return 0
    try:
        daemon = Daemon(DaemonOptions(state_dir, api=not args.no_api,
                                      stats_interval_s=max(0.5, args.stats_interval),
                                      fs=not args.no_fs, mount=not args.no_mount,
                                      guest_run_dir=args.guest_run_dir,
                                      guest_task_dir=args.guest_task_dir))
    except (CorralError, OSError, ValueError, KeyError) as error:
        print(f"corrald: {error}", file=sys.stderr)
        return 2
    import uvloop

    try:
        return int(uvloop.run(daemon.run()))
    except (CorralError, OSError) as error:
        print(f"corrald: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
