"""Cluster resource manager state machine: one per node, the master is whoever holds the
cluster-wide manager lock (anchors section 3). `iterate()` is one daemon loop; the shell calls
it every `crm_round_s` (the simulator every simulated round).
"""

from __future__ import annotations

from corral.ha.logic.env import HaEnvironment
from corral.ha.logic.manager import Manager
from corral.ha.logic.settings import HaTimings
from corral.ha.logic.types import CrmState, ServiceState

IDLE_ROUNDS_BEFORE_RELEASE = 90


class Crm:
    def __init__(self, env: HaEnvironment, timings: HaTimings) -> None:
        self.env = env
        self.timings = timings
        self.state = CrmState.STARTUP
        self.manager: Manager | None = None
        self.watchdog_active = False
        self.shutdown_requested = False
        self.idle_rounds = 0
        self.exited = False

    def _set_state(self, new: CrmState) -> None:
        if new != self.state:
            self.env.log("info", f"status change {self.state} => {new}")
            self.state = new

    def request_shutdown(self) -> None:
        self.shutdown_requested = True

    def can_get_active(self, ignore_services: bool = False) -> bool:
        if not self.env.quorate():
            return False
        status = self.env.read_manager_status()
        if status is None or not self.env.cluster_state_update():
            return False
        me = self.env.nodename()
        for entry in (status.get("service_status") or {}).values():
            if entry.get("state") == ServiceState.FENCE and entry.get("node") == me:
                return False
        if ignore_services or self.env.read_resources():
            return True
        return bool(status.get("service_status") or status.get("node_request")
                    or status.get("disarm") or self.env.crm_commands_pending())

    def _become_master(self) -> None:
        self._set_state(CrmState.MASTER)
        if not self.watchdog_active:
            self.env.watchdog_open()
            self.watchdog_active = True
        self.manager = Manager(self.env, self.timings, self.env.read_manager_status() or {})
        self.idle_rounds = 0
        self.env.emit({"type": "master", "node": self.env.nodename()})

    def _close_watchdog(self) -> None:
        if self.watchdog_active:
            self.env.watchdog_close()
            self.watchdog_active = False

    def iterate(self) -> bool:
        """Run one loop; False once the daemon has exited."""
        if self.exited:
            return False
        if self.state == CrmState.STARTUP:
            self._set_state(CrmState.WAIT_FOR_QUORUM)
        if self.shutdown_requested:
            return self._shutdown()
        self._transition()
        if self.state == CrmState.MASTER:
            self._master_work()
        elif self.state == CrmState.LOST_MANAGER_LOCK:
            self._close_watchdog()
            self._set_state(CrmState.WAIT_FOR_QUORUM)
        return True

    def _shutdown(self) -> bool:
        if self.state == CrmState.MASTER:
            self.env.release_manager_lock()
        self._close_watchdog()
        self.env.log("info", "server received shutdown request")
        self.exited = True
        return False

    def _transition(self) -> None:
        state = self.state
        if state in (CrmState.WAIT_FOR_QUORUM, CrmState.SLAVE):
            if self.can_get_active():
                if self.env.get_manager_lock():
                    self.env.log("info", "got lock 'ha_manager_lock'")
                    self._become_master()
                elif state == CrmState.WAIT_FOR_QUORUM:
                    self._set_state(CrmState.SLAVE)
            elif state == CrmState.SLAVE:
                self._set_state(CrmState.WAIT_FOR_QUORUM)
        elif state == CrmState.LOST_MANAGER_LOCK:
            if self.can_get_active(ignore_services=True) and self.env.get_manager_lock():
                self.env.log("info", "got lock 'ha_manager_lock'")
                self._become_master()
        elif state == CrmState.MASTER:
            if not self.env.get_manager_lock():
                self.env.log("err", "lost lock 'ha_manager_lock' - cluster not quorate or "
                                    "manager lock expired")
                self._set_state(CrmState.LOST_MANAGER_LOCK)
                self.manager = None
            elif self.watchdog_active:
                self.env.watchdog_update()

    def _master_work(self) -> None:
        manager = self.manager
        if manager is None:
            return
        if not self.env.cluster_state_update():
            self.env.log("err", "temporary inconsistent cluster state (cfs restart?), skip round")
            return
        manager.round()
        self._watchdog_for_disarm(manager)
        if not manager.resources and not manager.service_status and manager.disarm is None:
            self.idle_rounds += 1
        else:
            self.idle_rounds = 0
        if self.idle_rounds > IDLE_ROUNDS_BEFORE_RELEASE:
            self.env.log("info", "no resources configured for a long time - releasing manager "
                                 "lock and watchdog")
            self.env.release_manager_lock()
            self._close_watchdog()
            self.manager = None
            self._set_state(CrmState.WAIT_FOR_QUORUM)

    def _watchdog_for_disarm(self, manager: Manager) -> None:
        disarmed = manager.disarm is not None and manager.disarm.get("state") == "disarmed"
        if disarmed and self.watchdog_active:
            self.env.log("info", "HA fully disarmed - closing CRM watchdog")
            self._close_watchdog()
        elif not disarmed and not self.watchdog_active:
            self.env.watchdog_open()
            self.watchdog_active = True
