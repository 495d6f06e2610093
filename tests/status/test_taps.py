"""Taps of bridged guests with real QEMU in a network namespace of this test: the first
QEMU of guest 100 gets `tap100i0` in the bridge; a second QEMU of the same guest on the
same host (a migration target in the demo cluster without namespaces) gets the fallback
`t100i0f0`, recorded in its run dir, and each reports its own counters; a name held by a
device that is not a tap is refused with a clear error; taps disappear when QEMU stops
or is killed -9. The QEMUs need not boot a guest for any of this."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from tests.cluster.conftest import wait_until

from corral.daemon.demo import run_in_netns
from corral.guests import netdev
from corral.guests.qemu import GuestError, GuestManager

NETNS = "crl-st-taps"
BRIDGE = "crlstbr1"
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or os.geteuid() != 0,
    reason="needs qemu-system-x86_64 and root (a network namespace)")


def _ns(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", NETNS, *argv], capture_output=True,
                          text=True, timeout=30, check=False)


def _in_netns(work: Callable[[], T]) -> T:
    """Run `work` in a thread inside the namespace: QEMU (forked there) and `ip` too."""
    return run_in_netns(NETNS, work)


@pytest.fixture()
def managers(tmp_path: Path) -> Iterator[tuple[GuestManager, GuestManager]]:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    os.environ["CORRAL_ACCEL"] = "tcg"
    pair = (GuestManager(str(tmp_path / "tree"), "solo", str(tmp_path / "run-a"),
                         str(tmp_path / "tasks-a")),
            GuestManager(str(tmp_path / "tree"), "solo", str(tmp_path / "run-b"),
                         str(tmp_path / "tasks-b")))
    try:
        assert _ns("ip", "link", "add", BRIDGE, "type", "bridge").returncode == 0
        assert _ns("ip", "link", "set", BRIDGE, "up").returncode == 0
        yield pair
    finally:
        os.environ.pop("CORRAL_ACCEL", None)
        for manager in pair:
            for vmid in (100, 101):
                pid = manager.pid(vmid)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)


def _ports() -> list[str]:
    return [port["ifname"] for port in
            json.loads(_ns("ip", "-j", "link", "show", "master", BRIDGE).stdout)]


def test_tap_names_fallback_refusal_and_cleanup(
        managers: tuple[GuestManager, GuestManager]) -> None:
    first, second = managers
    settings = {"memory": "64", "net0": f"e1000=52:54:00:00:00:01,bridge={BRIDGE}"}
    first.create(100, settings)
    _in_netns(lambda: asyncio.run(first.start(100)))
    assert _ports() == ["tap100i0"]
    _in_netns(lambda: asyncio.run(second.start(100)))   # same guest, same host
    assert sorted(_ports()) == ["t100i0f0", "tap100i0"]
    assert netdev.read_taps(second.run_dir, 100) == {"net0": "t100i0f0"}
    # (counters need a guest driver reading the NIC: see test_cluster_status.py)
    one = asyncio.run(first.status(100))
    assert one["status"] == "running" and one["netin"] >= 0 and one["netout"] >= 0

    assert _ns("ip", "link", "add", "tap101i0", "type", "bridge").returncode == 0
    first.create(101, {"memory": "64", "net0": f"e1000=52:54:00:00:00:02,bridge={BRIDGE}"})
    with pytest.raises(GuestError, match="tap101i0' is taken by a device that is not a tap"):
        _in_netns(lambda: asyncio.run(first._start(101, _NoLog(), False)))

    _in_netns(lambda: asyncio.run(first.stop(100)))
    pid = second.pid(100)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _ports() == [], 10.0, "both taps gone after stop and kill -9")


def test_missing_bridge_is_named(managers: tuple[GuestManager, GuestManager]) -> None:
    first, _ = managers
    first.create(100, {"memory": "64", "net0": "virtio=52:54:00:00:00:03,bridge=nosuchbr"})
    with pytest.raises(GuestError, match="bridge 'nosuchbr' does not exist on node 'solo'"):
        _in_netns(lambda: asyncio.run(first._start(100, _NoLog(), False)))
    assert first.pid(100) is None


class _NoLog:
    def log(self, text: str) -> None:
        del text

    def warn(self, text: str) -> None:
        del text

