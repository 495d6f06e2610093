"""`.vmlist` with runtime fields (config versions untouched, the reference's keys kept,
no runtime: the old shape); tap names (the reference's, fallbacks within IFNAMSIZ);
/proc/<pid>/net/dev parsing with the reference's orientation (netin = the tap's tx)."""

from __future__ import annotations

import json
import os

from corral.cfs.virtual import render_vmlist
from corral.guests import netdev


def test_vmlist_without_and_with_runtime() -> None:
    guests = [(101, "node2", "qemu", 7), (100, "node1", "qemu", 3)]
    plain = json.loads(render_vmlist(5, guests))
    assert plain == {"version": 5, "ids": {"100": {"node": "node1", "type": "qemu", "version": 3},
                                           "101": {"node": "node2", "type": "qemu", "version": 7}}}

    def runtime(vmid: int, node: str) -> dict[str, object]:
        if node == "node1":
            return {"status": "running", "cpu": 0.5, "netin": 9, "node": "evil", "version": 99}
        return {"status": "unknown"}

    full = json.loads(render_vmlist(5, guests, runtime))
    assert full["version"] == 5
    assert full["ids"]["100"] == {"node": "node1", "type": "qemu", "version": 3,
                                  "status": "running", "cpu": 0.5, "netin": 9}
    assert full["ids"]["101"] == {"node": "node2", "type": "qemu", "version": 7,
                                  "status": "unknown"}


def test_tap_names() -> None:
    assert netdev.tap_name(100, 0) == "tap100i0"
    assert netdev.tap_name(999999999, 31) == "tap999999999i31"
    assert len(netdev.tap_name(999999999, 31)) <= netdev.IFNAME_MAX_CHARS
    assert netdev.fallback_names(100, 0)[0] == "t100i0f0"
    assert len(netdev.fallback_names(100, 0)) == netdev.FALLBACK_COUNT
    assert all(len(n) <= netdev.IFNAME_MAX_CHARS for n in netdev.fallback_names(999999999, 31))


def test_net_dev_counters(tmp_path: object) -> None:
    text = ("Inter-|   Receive                            |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n"
            "    lo:   500       5    0    0    0     0          0         0      500 5 0 0 0 0 0 0\n"
            "tap100i0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n")
    assert netdev.parse_net_dev(text) == {"lo": (500, 500), "tap100i0": (1000, 2000)}
    assert netdev.tap_counters(os.getpid(), []) == (0, 0)
    assert netdev.tap_counters(os.getpid(), ["lo"])[0] >= 0
    assert netdev.tap_counters(2**22 + 12345, ["lo"]) == (0, 0)    # no such process


def test_taps_record(tmp_path: os.PathLike[str]) -> None:
    run_dir = str(tmp_path)
    netdev.record_taps(run_dir, 100, {"net0": "tap100i0"})
    assert netdev.read_taps(run_dir, 100) == {"net0": "tap100i0"}
    netdev.record_taps(run_dir, 100, {})
    assert netdev.read_taps(run_dir, 100) == {}
    script = netdev.write_ifup_script(run_dir, 100, "net0", "vmbr0")
    assert os.access(script, os.X_OK) and "master 'vmbr0'" in open(script).read()
