"""`corrald [--state-dir D] [--log-level L] [--no-api] [--stats-interval S]`: the node daemon.

Exit status: 0 after a clean stop, 1 when the Totem node failed, 2 for a
configuration error (not in a cluster, unreadable key, an address that cannot
be bound).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from corral.cluster.layout import default_state_dir
from corral.errors import CorralError

LEVELS = ("debug", "info", "warning", "error")


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
    parser.add_argument("--stats-interval", type=float, default=30.0, metavar="S",
                        help="seconds between rate/membership log lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    state_dir = args.state_dir or default_state_dir()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d corrald[%(process)d] %(levelname)s %(message)s",
        datefmt="%b %d %H:%M:%S",
    )
    from corral.daemon.node import Daemon, DaemonOptions

    try:
        daemon = Daemon(DaemonOptions(state_dir, api=not args.no_api,
                                      stats_interval_s=max(0.5, args.stats_interval),
                                      fs=not args.no_fs, mount=not args.no_mount))
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
