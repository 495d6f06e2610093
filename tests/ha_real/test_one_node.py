"""corral-ha on one node over a real FUSE mount (local mode): `corral ha add` makes the
master place the guest and the LRM start it; `corral ha status` shows it in the ha-manager
layout; `kill -9` of the daemon leaves the watchdog mux, which kills the guest within the
watchdog timeout (fallback self-fencing)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import HaNode, guest_pids, ha_cli, make_guest, wait_for
from .test_fsenv import fuse_root  # noqa: F401  (fixture)

WATCHDOG_TIMEOUT_S = 6  # fast profile


@pytest.fixture
def node(fuse_root: Path, tmp_path: Path) -> Iterator[HaNode]:  # noqa: F811
    ha = HaNode(tmp_path, "n1", fuse_root, None)
    try:
        yield ha
    finally:
        ha.cleanup()


def test_add_start_status_and_watchdog_on_kill(node: HaNode, fuse_root: Path) -> None:  # noqa: F811
    make_guest(fuse_root, "n1", 100)
    added = ha_cli(fuse_root, "add", "vm:100")
    assert added.returncode == 0, added.stderr
    refused = ha_cli(fuse_root, "add", "vm:100")
    assert refused.returncode == 2 and "already a HA resource" in refused.stderr
    node.start()
    wait_for(lambda: "100" in guest_pids(node.guest_dir), 40,
             "the guest to start\n" + node.log_text())
    wait_for(lambda: "service vm:100 (n1, started)" in ha_cli(fuse_root, "status").stdout, 20,
             "status to show the service started")
    status = ha_cli(fuse_root, "status").stdout.splitlines()
    assert status[0] == "quorum OK"
    assert status[1].startswith("master n1 (active, ")
    assert status[2] == "fencing armed (CRM watchdog active)"
    assert status[3].startswith("lrm n1 (active, watchdog active, ")
    heartbeat = node.guest_dir / "100.heartbeat"
    assert '"node": "n1"' in heartbeat.read_text()
    node.kill()
    killed_at = time.monotonic()
    waited = wait_for(lambda: "100" not in guest_pids(node.guest_dir), WATCHDOG_TIMEOUT_S + 10,
                      "the watchdog fallback to kill the guest")
    assert waited >= WATCHDOG_TIMEOUT_S - 2.5  # last feed was up to one 2 s round earlier
    assert time.monotonic() - killed_at < WATCHDOG_TIMEOUT_S + 10
    assert "killed guests" in (node.run_dir / "watchdog-mux.log").read_text()
