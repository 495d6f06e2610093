"""`corral-ha`: the HA daemon of one node - its LRM and its CRM in one process.

    corral-ha [--state-dir D | --node NAME --root MOUNT] [--profile reference|fast]
              [--watchdog auto|kernel|fallback] [--run-dir D] [--members-file F]
              [--agent process|qemu] [--qemu-run-dir D] [--task-dir D]
              [--event-log F] [--log-level info]

Every `lrm_round_s` the LRM runs one loop, every `crm_round_s` the CRM (it only does work
while this node holds `ha_manager_lock`). Timings come from `datacenter.cfg` `ha-timing`
(validated: unsafe settings are refused at start), `--profile` overrides the profile.
A watchdog mux is started (detached) if none runs for this run directory.
SIGTERM/SIGINT: a daemon restart as the reference handles it (services freeze, guests keep
running). The LRM is asked first and the CRM keeps working until the LRM has exited (a
master must freeze this node's services before the LRM may leave). If that does not happen
within STOP_DEADLINE_S the daemon exits without releasing anything: the watchdog then stops
the guests and the lock expires, which is safe where a clean release would not be.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from corral.errors import ConfigError
from corral.ha.daemon.agent import ProcessGuestAgent, ResourceAgent
from corral.ha.daemon.fsenv import CorraldQuorum, FsEnv, Tree
from corral.ha.daemon.jobs import ThreadJobRunner
from corral.ha.daemon.watchdog import WatchdogClient, choose_device, start_mux
from corral.ha.logic.config import parse_datacenter
from corral.ha.logic.crm import Crm
from corral.ha.logic.lrm import Lrm
from corral.ha.logic.settings import PROFILES, HaTimings, timings_from_mapping

log = logging.getLogger("corral.ha")
NS_PER_S = 1_000_000_000
DEFAULT_RUN_DIR = "/run/corral-ha"
STOP_DEADLINE_S = 60
TICK_S = 0.2


def load_timings(root: Path, profile: str | None) -> HaTimings:
    text = (root / "datacenter.cfg").read_text() if (root / "datacenter.cfg").exists() else ""
    values = dict(parse_datacenter(text).timings)
    if profile is not None:
        values["profile"] = profile
    return timings_from_mapping(values)


def fence_time_s(timings: HaTimings) -> int:
    """Seconds after its last lock renewal by which this node is certainly fenced."""
    return (timings.watchdog_timeout_s + timings.watchdog_device_timeout_s
            + timings.safety_margin_s)


def effective_timings(timings: HaTimings, tree: Tree) -> HaTimings:
    """On the Corral filesystem the lock timeout is the filesystem's expiry (derived from the
    same datacenter.cfg `ha-timing`, so normally equal). If they differ (a `--profile` that is
    not in datacenter.cfg, a value out of the filesystem's 10..600 s) the filesystem's value
    is used, and it must still satisfy the safety rule with this daemon's watchdog."""
    if not tree.cluster_fs:
        return timings
    fs_expiry_s = tree.fs_lock_expiry_s()
    if fs_expiry_s == timings.lock_timeout_s:
        return timings
    log.warning("the filesystem expires locks after %d s (datacenter.cfg ha-timing): using "
                "lock_timeout_s=%d instead of %d", fs_expiry_s, fs_expiry_s,
                timings.lock_timeout_s)
    try:
        return replace(timings, lock_timeout_s=fs_expiry_s).validate()
    except ConfigError as error:
        raise ConfigError("lock_timeout_s", f"the filesystem's lock expiry ({fs_expiry_s} s, "
                          f"from datacenter.cfg ha-timing) is unsafe with this daemon's "
                          f"settings: {error}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="corral-ha", description="Corral HA daemon (LRM+CRM)")
    parser.add_argument("--state-dir", help="corrald state directory (node name and mount)")
    parser.add_argument("--node", help="node name (default: from the state directory)")
    parser.add_argument("--root", type=Path, help="tree mount (default: from the state dir)")
    parser.add_argument("--members-file", type=Path,
                        help="membership file in the .members format (default: ROOT/.members)")
    parser.add_argument("--profile", choices=sorted(PROFILES))
    parser.add_argument("--watchdog", choices=("auto", "kernel", "fallback"), default="auto")
    parser.add_argument("--run-dir", type=Path, default=Path(DEFAULT_RUN_DIR))
    parser.add_argument("--agent", choices=("process", "qemu"), default="process",
                        help="guests: test processes, or QEMU guests through corral.guests")
    parser.add_argument("--qemu-run-dir", default=None,
                        help="QEMU run directory (default: corral qm's, /run/corral/qemu-server)")
    parser.add_argument("--task-dir", default=None, help="task log directory for QEMU jobs")
    parser.add_argument("--event-log", type=Path)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def resolve_identity(args: argparse.Namespace) -> tuple[str, Path]:
    if args.node and args.root:
        return args.node, args.root
    from corral.cluster.layout import Layout, default_state_dir
    identity = Layout(args.state_dir or default_state_dir()).read_identity()
    return args.node or identity.name, args.root or Path(identity.mount)


def make_agent(args: argparse.Namespace, node: str, root: Path) -> ResourceAgent:
    guest_dir = args.run_dir / "guests"
    if args.agent == "process":
        return ProcessGuestAgent(root, node, guest_dir)
    from corral.guests.qemu import DEFAULT_RUN_DIR, DEFAULT_TASK_DIR
    from corral.ha.daemon.qemu_agent import QemuGuestAgent
    return QemuGuestAgent(root, node, guest_dir, run_dir=args.qemu_run_dir or DEFAULT_RUN_DIR,
                          task_dir=args.task_dir or DEFAULT_TASK_DIR, state_dir=args.state_dir)


def quorum_source(args: argparse.Namespace) -> CorraldQuorum | None:
    """corrald's control socket when the daemon runs from corrald's state directory (not
    with a members file, which tests use to simulate membership)."""
    if args.members_file is not None or (args.node and args.root and not args.state_dir):
        return None
    from corral.cluster.layout import Layout, default_state_dir
    return CorraldQuorum(str(Layout(args.state_dir or default_state_dir()).control_socket))


class Daemon:
    def __init__(self, node: str, root: Path, timings: HaTimings, run_dir: Path,
                 members_file: Path | None, event_log: Path | None,
                 agent: ResourceAgent | None = None,
                 quorum: CorraldQuorum | None = None) -> None:
        self.timings = timings
        tree = Tree(root, members_file, timings.lock_timeout_s, quorum)
        self.tree = tree
        self.node = node
        self.fence_published = False
        self.expiry_seen_s = timings.lock_timeout_s
        agent = agent or ProcessGuestAgent(root, node, run_dir / "guests")
        socket_path = str(run_dir / "watchdog-mux.sock")
        self.jobs = ThreadJobRunner()
        self.lrm = Lrm(FsEnv(tree, node, "lrm", agent, WatchdogClient(socket_path), event_log),
                       timings, self.jobs)
        self.crm = Crm(FsEnv(tree, node, "crm", agent, WatchdogClient(socket_path), event_log),
                       timings)
        self.stop_requested_ns: int | None = None
        self.stop_pending = False

    def request_stop(self) -> None:
        """Signal handler: only flags; the loop acts between rounds."""
        if self.stop_requested_ns is None:
            self.stop_requested_ns = time.monotonic_ns()
            self.stop_pending = True

    def run(self) -> bool:
        """Loop until both state machines exited; False if the stop deadline hit first."""
        lrm_alive = crm_alive = True
        next_lrm = next_crm = time.monotonic_ns()
        while lrm_alive or crm_alive:
            if self.stop_pending:
                self.stop_pending = False
                log.info("shutdown requested (daemon restart: services freeze, guests keep "
                         "running)")
                self.lrm.request_shutdown(None)
            if self.stop_requested_ns is not None:
                if not lrm_alive and not self.crm.shutdown_requested:
                    self.crm.request_shutdown()
                if time.monotonic_ns() - self.stop_requested_ns > STOP_DEADLINE_S * NS_PER_S:
                    log.error("services not frozen within %d s - exiting without releasing "
                              "locks (the watchdog stops the guests)", STOP_DEADLINE_S)
                    return False
            now = time.monotonic_ns()
            if lrm_alive and now >= next_lrm:
                self._check_lock_settings()
                lrm_alive = self._step(self.lrm.iterate, "lrm")
                next_lrm = now + self.timings.lrm_round_s * NS_PER_S
            if crm_alive and now >= next_crm:
                crm_alive = self._step(self.crm.iterate, "crm")
                next_crm = now + self.timings.crm_round_s * NS_PER_S
            time.sleep(TICK_S)
        return True

    def _check_lock_settings(self) -> None:
        """Publish this node's fence time (until it is written) and notice a runtime change
        of the filesystem's expiry (the takeover guard in fsenv keeps it safe meanwhile)."""
        if not self.fence_published:
            self.fence_published = self.tree.publish_fence_time(self.node,
                                                                fence_time_s(self.timings))
        if not self.tree.cluster_fs:
            return
        expiry_s = self.tree.fs_lock_expiry_s()
        if expiry_s != self.expiry_seen_s:
            self.expiry_seen_s = expiry_s
            log.warning("the filesystem's lock expiry is now %d s (this daemon runs with %d s "
                        "until restarted; takeovers are held back while unsafe)", expiry_s,
                        self.timings.lock_timeout_s)

    def _step(self, iterate: Callable[[], bool], name: str) -> bool:
        try:
            return iterate()
        except ConfigError as error:
            log.error("%s round skipped: %s", name, error)
            return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        node, root = resolve_identity(args)
        tree_probe = Tree(root, args.members_file)
        timings = effective_timings(load_timings(root, args.profile), tree_probe)
    except (ConfigError, OSError, ValueError, KeyError) as error:
        print(f"corral-ha: {error}", file=sys.stderr)
        return 2
    args.run_dir.mkdir(parents=True, exist_ok=True)
    device = choose_device(args.watchdog)
    mux_pid = start_mux(str(args.run_dir / "watchdog-mux.sock"), args.run_dir / "guests",
                        timings.watchdog_timeout_s, device, timings.watchdog_device_timeout_s,
                        str(args.run_dir / "watchdog-mux.log"))
    if mux_pid:
        (args.run_dir / "watchdog-mux.pid").write_text(f"{mux_pid}\n")
    log.info("node %s, tree %s, watchdog %s (mux %s), rounds crm %d s lrm %d s, "
             "lock timeout %d s", node, root, device, mux_pid or "already running",
             timings.crm_round_s, timings.lrm_round_s, timings.lock_timeout_s)
    daemon = Daemon(node, root, timings, args.run_dir, args.members_file, args.event_log,
                    make_agent(args, node, root), quorum_source(args))
    signal.signal(signal.SIGTERM, lambda signum, frame: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda signum, frame: daemon.request_stop())
    clean = daemon.run()
    if clean:
        daemon.jobs.shutdown()
    log.info("corral-ha exits")
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
