"""The QEMU resource agent: HA services `vm:<id>` as real QEMU guests (corral.guests).

`corral-ha --agent qemu` uses it. Starting, stopping and moving go through the node's
`GuestManager` (the same run directory, task log and guest lock as `corral qm`), so an
HA-started VM shows up in `corral qm status` and its task log. The calls are coroutines;
the agent runs each in its own event loop on the LRM's worker thread (jobs are asynchronous
to the HA round, corral.ha.daemon.jobs).

The watchdog fallback kills what it finds in `<guest_dir>/*.pid` (corral.ha.daemon.watchdog):
the agent keeps a copy of each running VM's QEMU pid there (written at start and refreshed
whenever the LRM asks whether it runs; removed at stop), and `pid_is_guest` accepts QEMU
processes.

Stop: ACPI power-down with the given timeout (default STOP_TIMEOUT_S), then a hard stop,
as `qm shutdown --forceStop 1`. Migrate: with the guest running and `online`, the live
migration of corral.guests.migrate (`from_ha=True`); otherwise the config is renamed into
the target's directory (offline). Recovery of a dead node's guest is the config rename
(`move_config`) and a normal start on the new node.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from corral.errors import CorralError
from corral.guests.qemu import DEFAULT_RUN_DIR, DEFAULT_TASK_DIR, GuestManager
from corral.ha.daemon.agent import find_config_node, move_guest_config, split_sid

log = logging.getLogger("corral.ha.lrm")
STOP_TIMEOUT_S = 60


class QemuGuestAgent:
    def __init__(self, root: Path, node: str, guest_dir: Path,
                 run_dir: str = DEFAULT_RUN_DIR, task_dir: str = DEFAULT_TASK_DIR,
                 state_dir: str | None = None) -> None:
        self.root = root
        self.node = node
        self.guest_dir = guest_dir
        self.manager = GuestManager(str(root), node, run_dir=run_dir, task_dir=task_dir)
        self.manager.state_dir = state_dir
        guest_dir.mkdir(parents=True, exist_ok=True)

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _vmid(sid: str) -> int | None:
        kind, ident = split_sid(sid)
        return int(ident) if kind == "vm" and ident.isdigit() else None

    def _pid_copy(self, vmid: int) -> Path:
        return self.guest_dir / f"{vmid}.pid"

    def _note_pid(self, vmid: int) -> int | None:
        pid = self.manager.pid(vmid)
        copy = self._pid_copy(vmid)
        if pid is None:
            copy.unlink(missing_ok=True)
            return None
        if not copy.exists() or copy.read_text().strip() != str(pid):
            tmp = copy.with_suffix(".pid.tmp")
            tmp.write_text(f"{pid}\n")
            os.replace(tmp, copy)
        return pid

    def _run(self, what: str, sid: str, coroutine: object) -> bool:
        try:
            asyncio.run(coroutine)  # type: ignore[arg-type]
        except (CorralError, OSError, ValueError) as error:
            log.warning("%s of %s failed: %s", what, sid, error)
            return False
        return True

    # --- ResourceAgent ---------------------------------------------------------------

    def config_node(self, sid: str) -> str | None:
        return find_config_node(self.root, sid)

    def running(self, sid: str) -> bool:
        vmid = self._vmid(sid)
        return vmid is not None and self._note_pid(vmid) is not None

    def start(self, sid: str) -> bool:
        vmid = self._vmid(sid)
        if vmid is None or self.config_node(sid) != self.node:
            return False
        if self.running(sid):
            return True
        started = self._run("start", sid, self.manager.start(vmid))
        return started and self._note_pid(vmid) is not None

    def stop(self, sid: str, timeout_s: int | None) -> bool:
        vmid = self._vmid(sid)
        if vmid is None:
            return False
        if self.manager.pid(vmid) is not None:
            timeout = STOP_TIMEOUT_S if timeout_s is None else timeout_s
            self._run("stop", sid, self.manager.shutdown(vmid, timeout_s=timeout, force=True))
        return self._note_pid(vmid) is None

    def migrate(self, sid: str, target: str, online: bool = False) -> bool:
        vmid = self._vmid(sid)
        if vmid is None:
            return False
        if online and self.manager.pid(vmid) is not None:
            from corral.guests.migrate import MigrateOptions, migrate
            options = MigrateOptions(online=True, from_ha=True)
            moved = self._run("live migration", sid, migrate(
                self.manager, vmid, target, options, state_dir=self.manager.state_dir))
            self._note_pid(vmid)
            return moved
        if self.manager.pid(vmid) is not None:
            return False
        return self.move_config(sid, self.node, target)

    def move_config(self, sid: str, from_node: str, to_node: str) -> bool:
        return move_guest_config(self.root, sid, from_node, to_node)

    def local_pids(self) -> list[int]:
        pids = []
        for vmid in self.manager.list_vmids():
            pid = self._note_pid(vmid)
            if pid is not None:
                pids.append(pid)
        return pids
