"""Local resource manager state machine: one per node, holding its node's agent lock and the
watchdog while it runs services (anchors sections 4 and 8).

Safety: the watchdog is fed only right after a successful agent-lock renewal, so an LRM that
cannot renew (no quorum) or must be fenced stops feeding it and the node is reset before the
master can take the lock (see settings.py for the timing rule).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from corral.errors import ConfigError
from corral.ha.logic.config import DatacenterHa
from corral.ha.logic.env import HaEnvironment
from corral.ha.logic.jobs import JobRunner, SyncJobRunner
from corral.ha.logic.settings import HaTimings
from corral.ha.logic.types import (
    INACTIVE_SERVICE_STATES,
    ExitCode,
    LrmMode,
    LrmState,
    NodeState,
    ServiceState,
    ShutdownPolicy,
)

IDLE_ROUNDS_BEFORE_RELEASE = 60
SKIPPED_JOB_STATES = frozenset({ServiceState.RECOVERY, ServiceState.FREEZE,
                                ServiceState.REQUEST_START, ServiceState.FENCE})
MOTION_STATES = frozenset({ServiceState.MIGRATE, ServiceState.RELOCATE,
                           ServiceState.REQUEST_START_BALANCE})
STOP_STATES = frozenset({ServiceState.REQUEST_STOP, ServiceState.STOPPED})


class Lrm:
    def __init__(self, env: HaEnvironment, timings: HaTimings,
                 jobs: JobRunner | None = None) -> None:
        self.env = env
        self.timings = timings
        self.jobs = jobs or SyncJobRunner()
        # service -> (uid, the status entry) of the job running for it
        self.in_flight: dict[str, tuple[str, dict[str, Any]]] = {}
        self.me = env.nodename()
        self.state = LrmState.STARTUP
        self.mode = LrmMode.ACTIVE
        self.has_lock = False
        self.watchdog_active = False
        self.results: dict[str, dict[str, Any]] = {}
        self.restart_tries: dict[str, int] = {}
        self.queued_since: dict[str, int] = {}
        self.job_rounds = 0
        self.error_logged: set[str] = set()
        self.idle_rounds = 0
        self.shutdown_kind: str | None = None
        self.shutdown_requested = False
        self.shutdown_mode: LrmMode | None = None
        self.stop_all_pending = False
        self.stop_failed = False
        self.exited = False
        self.status_unreadable = False

    # --- helpers -------------------------------------------------------------------------

    def _set_state(self, new: LrmState) -> None:
        if new != self.state:
            self.env.log("info", f"status change {self.state} => {new}")
            self.state = new

    def request_shutdown(self, kind: str | None) -> None:
        """kind: 'poweroff', 'reboot' or None for a plain daemon restart.

        The mode is decided and announced right away (as the reference's signal handler
        does), so the master can react in its next round before this LRM loops again.
        """
        self.shutdown_requested = True
        self.shutdown_kind = kind
        status = self.env.read_manager_status()
        if self.state == LrmState.STARTUP or status is None:
            return
        self._update_mode(status)
        self.write_status()

    def _datacenter(self) -> DatacenterHa:
        try:
            return self.env.read_datacenter()
        except ConfigError as error:
            self.env.log("warn", f"datacenter.cfg: {error}; using defaults")
            return DatacenterHa()

    def _my_services(self, status: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {sid: e for sid, e in (status.get("service_status") or {}).items()
                if e.get("node") == self.me}

    def active_count(self, status: dict[str, Any]) -> int:
        return sum(1 for e in (status.get("service_status") or {}).values()
                   if self.me in (e.get("node"), e.get("target"))
                   and e.get("state") not in INACTIVE_SERVICE_STATES)

    def fence_requested(self, status: dict[str, Any]) -> bool:
        if (status.get("node_status") or {}).get(self.me) == NodeState.FENCE:
            return True
        return any(e.get("state") == ServiceState.FENCE for e in self._my_services(status).values())

    def _acquire(self) -> bool:
        ok = self.env.quorate() and self.env.get_agent_lock(self.me)
        if ok and not self.has_lock:
            self.env.log("info", f"got lock 'ha_agent_{self.me}_lock'")
        if not ok and self.has_lock:
            self.env.log("err", f"lost lock 'ha_agent_{self.me}_lock'")
        self.has_lock = ok
        return ok

    def _release(self) -> None:
        if self.has_lock:
            self.env.release_agent_lock(self.me)
            self.has_lock = False
        if self.watchdog_active:
            self.env.watchdog_close()
            self.watchdog_active = False
            self.env.log("info", "watchdog closed (disabled)")

    def _feed(self) -> None:
        if not self.watchdog_active:
            self.env.watchdog_open()
            self.watchdog_active = True
        self.env.watchdog_update()

    def write_status(self) -> None:
        self.env.write_lrm_status({
            "state": str(self.state), "mode": str(self.mode),
            "timestamp": self.env.now_ns() // 1_000_000_000,
            "results": dict(sorted(self.results.items())),
        })

    # --- loop ----------------------------------------------------------------------------

    def iterate(self) -> bool:
        """Run one loop; False once the daemon has exited."""
        if self.exited:
            return False
        status = self.env.read_manager_status()
        if status is None:
            return self._without_manager_status()
        self.status_unreadable = False
        if self.state == LrmState.STARTUP:
            if not self.env.quorate():
                return True
            self._update_mode(status)
            self.write_status()
            self._set_state(LrmState.WAIT_FOR_AGENT_LOCK)
        self._update_mode(status)
        self._transition(status)
        return self._work(status)

    def _without_manager_status(self) -> bool:
        """Cluster filesystem unreadable: do nothing but keep (or lose) the lock honestly."""
        if not self.status_unreadable:
            self.env.log("warn", "unable to read manager status, skipping rounds until it is")
        self.status_unreadable = True
        if self.state in (LrmState.ACTIVE, LrmState.MAINTENANCE) and self.has_lock:
            if self._acquire():
                self._feed()
            else:
                self._set_state(LrmState.LOST_AGENT_LOCK)
        return True

    def _update_mode(self, status: dict[str, Any]) -> None:
        if self.shutdown_requested and self.shutdown_mode is None:
            self._decide_shutdown(status)
        if self.shutdown_mode is not None:
            new = self.shutdown_mode
        elif (status.get("node_request") or {}).get(self.me, {}).get("maintenance"):
            new = LrmMode.MAINTENANCE
        elif status.get("disarm"):
            new = LrmMode.DISARM
        else:
            new = LrmMode.ACTIVE
        if new != self.mode:
            self.env.log("info", f"mode change {self.mode} => {new}")
            self.mode = new

    def _decide_shutdown(self, status: dict[str, Any]) -> None:
        policy = self._datacenter().shutdown_policy
        kind = self.shutdown_kind
        if (status.get("node_request") or {}).get(self.me, {}).get("maintenance"):
            mode, stop_all = LrmMode.MAINTENANCE, False
        elif kind is None:
            mode, stop_all = LrmMode.RESTART, False
        elif policy == ShutdownPolicy.MIGRATE:
            mode, stop_all = LrmMode.MAINTENANCE, False
        elif policy == ShutdownPolicy.FAILOVER or (
                policy == ShutdownPolicy.CONDITIONAL and kind == "poweroff"):
            mode, stop_all = LrmMode.SHUTDOWN, True
        else:
            mode, stop_all = LrmMode.RESTART, True
        self.env.log("info", f"received shutdown request ({kind or 'daemon restart'}), shutdown "
                             f"policy '{policy}' -> mode '{mode}'")
        self.shutdown_mode = mode
        self.stop_all_pending = stop_all

    def _transition(self, status: dict[str, Any]) -> None:
        state = self.state
        fence = self.fence_requested(status)
        if state == LrmState.WAIT_FOR_AGENT_LOCK:
            if (self.mode != LrmMode.DISARM and not fence and not self.shutdown_requested
                    and self.active_count(status) > 0 and self._acquire()):
                self._feed()
                self._set_state(LrmState.ACTIVE)
        elif state == LrmState.LOST_AGENT_LOCK:
            if not fence and self._acquire():
                self._feed()
                self._set_state(LrmState.ACTIVE)
        elif state == LrmState.ACTIVE:
            self._transition_active(status, fence)
        elif state == LrmState.MAINTENANCE:
            self._transition_maintenance(status, fence)

    def _transition_active(self, status: dict[str, Any], fence: bool) -> None:
        if fence:
            self.env.log("info", "node needs to be fenced - releasing agent_lock")
            self._set_state(LrmState.LOST_AGENT_LOCK)
            return
        if not self._acquire():
            self._set_state(LrmState.LOST_AGENT_LOCK)
            return
        self._feed()
        if self.mode == LrmMode.MAINTENANCE:
            self._set_state(LrmState.MAINTENANCE)
        elif self.mode == LrmMode.DISARM:
            self._release()
            self._set_state(LrmState.WAIT_FOR_AGENT_LOCK)
        elif not self._my_services(status) and not self.shutdown_requested:
            self.idle_rounds += 1
            if self.idle_rounds > IDLE_ROUNDS_BEFORE_RELEASE:
                self._release()
                self.idle_rounds = 0
                self._set_state(LrmState.WAIT_FOR_AGENT_LOCK)
        else:
            self.idle_rounds = 0

    def _transition_maintenance(self, status: dict[str, Any], fence: bool) -> None:
        active = self.active_count(status)
        if fence:
            self._set_state(LrmState.LOST_AGENT_LOCK)
        elif self.mode == LrmMode.DISARM and active == 0:
            self._release()
            self._set_state(LrmState.WAIT_FOR_AGENT_LOCK)
        elif self.mode == LrmMode.ACTIVE:
            # Maintenance ended: services that could not leave are managed as usual again.
            if self._acquire():
                self._feed()
                self._set_state(LrmState.ACTIVE)
            else:
                self._set_state(LrmState.LOST_AGENT_LOCK)
        elif active > 0:
            if not self._acquire():
                self._set_state(LrmState.LOST_AGENT_LOCK)
            else:
                self._feed()

    def _work(self, status: dict[str, Any]) -> bool:
        state = self.state
        if self.in_flight:
            self._collect_jobs()
        if self.shutdown_requested and self.in_flight:
            self.write_status()  # leave only once the running jobs finished
            return True
        if state == LrmState.WAIT_FOR_AGENT_LOCK and self.shutdown_requested:
            return self._exit()
        if state == LrmState.ACTIVE:
            if self.shutdown_requested:
                return self._shutdown_work(status)
            if self.env.cluster_state_update():
                self.manage_resources(status)
        elif state == LrmState.LOST_AGENT_LOCK:
            if self.shutdown_requested and self.active_count(status) == 0:
                return self._exit()
        elif state == LrmState.MAINTENANCE:
            self.manage_resources(status)
            if self.active_count(status) == 0:
                if self.has_lock or self.watchdog_active:
                    self._release()
                if self.shutdown_requested:
                    return self._exit()
        self.write_status()
        return True

    def _shutdown_work(self, status: dict[str, Any]) -> bool:
        if self.stop_all_pending:
            self.stop_all_pending = False
            for sid in sorted(self._my_services(status)):
                if self.env.guest_running(sid):
                    self.env.log("info", f"stopping service {sid} (node shutdown)")
                    if not self.env.guest_stop(sid, None):
                        self.stop_failed = True
        if self.mode == LrmMode.RESTART and self.active_count(status) > 0:
            self.write_status()
            return True
        return self._exit()

    def _exit(self) -> bool:
        self.write_status()
        if not self.stop_failed:
            self._release()
        self.env.log("info", "LRM exits")
        self.exited = True
        return False

    # --- jobs ----------------------------------------------------------------------------

    def _pending_jobs(self, status: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Jobs due this round, longest-waiting first; re-checks of `stopped` come last."""
        jobs = []
        for sid, entry in self._my_services(status).items():
            uid = entry.get("uid")
            state = entry.get("state")
            if not uid or state in SKIPPED_JOB_STATES or sid in self.in_flight:
                continue
            recheck = uid in self.results
            if recheck and state != ServiceState.STOPPED:
                continue
            waiting_since = self.queued_since.setdefault(sid, self.job_rounds)
            jobs.append((recheck, waiting_since, sid, entry))
        jobs.sort(key=lambda job: (job[0], job[1], job[2]))
        return [(sid, entry) for _, _, sid, entry in jobs]

    def manage_resources(self, status: dict[str, Any]) -> None:
        """Start at most max_workers jobs at a time, one per service whose uid has no result.

        Jobs run through `self.jobs` and report when they finish (at once with the
        synchronous runner, a later round with the daemon's threads); a service with a job
        running gets no other job. Jobs that had to wait keep their place in the queue, so a
        busy node cannot starve a service (the reference gives longer-queued workers
        priority in the same way).
        """
        self.job_rounds += 1
        max_workers = self._datacenter().max_workers
        jobs = self._pending_jobs(status)
        free = max(0, max_workers - len(self.in_flight))
        for sid, entry in jobs[:free]:
            self.queued_since.pop(sid, None)
            snapshot = dict(entry)
            self.in_flight[sid] = (str(entry["uid"]), snapshot)
            self.jobs.start(sid, partial(self._execute, sid, snapshot))
            self._collect_jobs()
        waiting = {sid for sid, _ in jobs[free:]}
        self.queued_since = {s: r for s, r in self.queued_since.items() if s in waiting}
        live = {e.get("uid") for e in (status.get("service_status") or {}).values()}
        self.results = {uid: r for uid, r in self.results.items() if uid in live}

    def _collect_jobs(self) -> None:
        finished = self.jobs.collect()
        if not finished:
            return
        resources = self.env.read_resources()
        for sid, code in sorted(finished.items()):
            uid, entry = self.in_flight.pop(sid)
            max_restart = resources[sid].max_restart if sid in resources else 1
            code = self._restart_policy(sid, entry, code, max_restart)
            if code != ExitCode.ETRY_AGAIN:
                self.results[uid] = {"sid": sid, "state": entry.get("state"),
                                     "exit_code": int(code)}

    def _restart_policy(self, sid: str, entry: dict[str, Any], code: ExitCode,
                        max_restart: int) -> ExitCode:
        if entry.get("state") != ServiceState.STARTED:
            return code
        if code == ExitCode.SUCCESS:
            self.restart_tries.pop(sid, None)
        elif code == ExitCode.ERROR:
            tries = self.restart_tries.get(sid, 0)
            if tries < max_restart:
                self.restart_tries[sid] = tries + 1
                self.env.log("warn", f"restart policy: retry number {tries + 1} for service "
                                     f"'{sid}'")
                return ExitCode.ETRY_AGAIN
            self.env.log("err", f"unable to start service {sid} on local node after {tries} "
                                "retries")
            self.restart_tries.pop(sid, None)
        return code

    def _execute(self, sid: str, entry: dict[str, Any]) -> ExitCode:
        state = entry.get("state")
        if state == ServiceState.ERROR:
            if entry["uid"] not in self.error_logged:
                self.error_logged.add(entry["uid"])
                self.env.log("err", f"service {sid} is in an error state and needs manual "
                                    "intervention. Look up 'ERROR RECOVERY' in the documentation.")
            return ExitCode.SUCCESS
        config_node = self.env.guest_config_node(sid)
        if state in MOTION_STATES:
            target = entry.get("target")
            if not target:
                return ExitCode.EINVALID_PARAMETER
            if config_node == target:
                return ExitCode.SUCCESS
        if config_node != self.me:
            return ExitCode.EWRONG_NODE
        if state == ServiceState.STARTED:
            return self._start(sid)
        if state in STOP_STATES:
            return self._stop(sid, entry.get("timeout"))
        if state in MOTION_STATES:
            return self._move(sid, str(state), entry["target"])
        return ExitCode.EUNKNOWN_COMMAND

    def _start(self, sid: str) -> ExitCode:
        if self.env.guest_running(sid):
            return ExitCode.SUCCESS
        self.env.log("info", f"starting service {sid}")
        if self.env.guest_start(sid) and self.env.guest_running(sid):
            self.env.log("info", f"service status {sid} started")
            return ExitCode.SUCCESS
        self.env.log("warn", f"unable to start service {sid}")
        return ExitCode.ERROR

    def _stop(self, sid: str, timeout_s: int | None) -> ExitCode:
        if not self.env.guest_running(sid):
            return ExitCode.SUCCESS
        self.env.log("info", f"stopping service {sid}")
        if self.env.guest_stop(sid, timeout_s) and not self.env.guest_running(sid):
            self.env.log("info", f"service status {sid} stopped")
            return ExitCode.SUCCESS
        self.env.log("err", f"unable to stop service {sid}")
        return ExitCode.ERROR

    def _move(self, sid: str, state: str, target: str) -> ExitCode:
        running = self.env.guest_running(sid)
        if state == ServiceState.REQUEST_START_BALANCE and running:
            return ExitCode.IGNORED
        online = state == ServiceState.MIGRATE and sid.startswith("vm:") and running
        offline_stop = running and not online
        verb = "relocate" if offline_stop or state == ServiceState.RELOCATE else "migrate"
        self.env.log("info", f"service {sid} - start {verb} to node '{target}'")
        if offline_stop and self._stop(sid, None) != ExitCode.SUCCESS:
            return ExitCode.ERROR
        self.env.guest_migrate(sid, target, online)
        if self.env.guest_config_node(sid) == target:
            self.env.log("info", f"service {sid} - end {verb} to node '{target}'")
            return ExitCode.SUCCESS
        self.env.log("err", f"service {sid} - {verb} to node '{target}' failed")
        return ExitCode.ERROR
