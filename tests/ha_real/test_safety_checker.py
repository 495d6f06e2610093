"""The safety checker used by the real tests does catch a guest running on two nodes (so its
silence in the cluster tests means something)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from corral.ha.daemon.agent import ProcessGuestAgent

from .harness import SafetyChecker, guest_pids, make_guest, wait_for


def test_checker_reports_double_run(tmp_path: Path) -> None:
    # Two diverged trees (a split brain): each node believes it owns the guest.
    for node in ("n1", "n2"):
        make_guest(tmp_path / f"tree-{node}", node, 100)
    agents = {n: ProcessGuestAgent(tmp_path / f"tree-{n}", n, tmp_path / n / "guests")
              for n in ("n1", "n2")}
    checker = SafetyChecker({n: a.guest_dir for n, a in agents.items()})
    checker.start()
    try:
        assert agents["n1"].start("vm:100")
        time.sleep(0.3)
        assert not checker.violations
        assert agents["n2"].start("vm:100")
        wait_for(lambda: bool(checker.violations), 5, "the checker to report")
        assert "vm:100 on ['n1', 'n2']" in checker.violations[0]
    finally:
        checker.stop()
        for agent in agents.values():
            for pid in guest_pids(agent.guest_dir).values():
                os.kill(pid, signal.SIGKILL)
