"""The status broadcast on a real 2-node corrald cluster (network namespaces) with a real
QEMU test guest on a bridge inside node 1's namespace: the guest's tap is `tap100i0`,
enslaved to the bridge; netin grows when frames are sent into the bridge; node 2's
`.vmlist`, `.rrd` and API show the guest running on node 1 within 15 s of its start and stopped
after its stop; `corral qm status --verbose` shows the new fields; a missing bridge is a
clear error naming it; an isolated node (no quorum) still sees its own guests' status
while the other node's guests turn `unknown`; after node 1's corrald is killed -9, its
guests turn `unknown` on node 2. Bad reports multicast into the group are dropped with a
log line and the receiver keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.cluster.conftest import wait_until
from tests.guests.migration_env import GuestCluster
from tests.status.netguest import build_net_guest, net_guest_settings

from corral.cpg.ipc import CpgClient
from corral.daemon import statuscli
from corral.daemon.demo import DEMO_PASSWORD, run_in_netns
from corral.guests.qemu import DEFAULT_TEST_GUEST_DIR

ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = os.environ.get("CORRAL_TEST_GUEST_DIR", DEFAULT_TEST_GUEST_DIR)
BRIDGE = "crlstbr0"
SEEN_TIMEOUT_S = 15.0
BOOT_TIMEOUT_S = 90.0
BROADCAST_FRAMES = (  # 20 frames of 60 bytes (an ARP ethertype, zero payload)
    "import socket\n"
    "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
    f"s.bind(('{BRIDGE}', 0))\n"
    "for _ in range(20):\n"
    "    s.send(b'\\xff' * 6 + b'\\x02' * 6 + b'\\x08\\x06' + bytes(46))\n")

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or os.geteuid() != 0,
    reason="needs qemu-system-x86_64 and root (network namespaces, FUSE mounts)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[GuestCluster]:
    subprocess.run([str(ROOT / "scripts/build-test-guest.sh"), GUEST_DIR], check=True,
                   capture_output=True, timeout=600)
    saved = os.environ.get("CORRAL_ACCEL")
    os.environ["CORRAL_ACCEL"] = "tcg"
    workdir = tempfile.mkdtemp(prefix="crl-st-")
    nodes = GuestCluster(2, workdir, prefix="crl-st", use_netns=True, stats_interval_s=60)
    try:
        nodes.setup_network()
        nodes.build()
        nodes.write_storage_cfg()
        os.makedirs(os.path.join(workdir, "shared"), exist_ok=True)
        yield nodes
    finally:
        for nodeid in nodes.nodeids:
            nodes.isolate(nodeid, cut=False)
            manager = nodes.guest_manager(nodeid)
            for vmid in (100, 101):
                pid = manager.pid(vmid)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
        nodes.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if saved is None:
            os.environ.pop("CORRAL_ACCEL", None)
        else:
            os.environ["CORRAL_ACCEL"] = saved


def _in_ns(cluster: GuestCluster, nodeid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", cluster.net.netns(nodeid), *argv],
                          capture_output=True, text=True, timeout=30, check=False)


def _qm(cluster: GuestCluster, nodeid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.corral(nodeid, "qm", "--root", str(cluster.mount(nodeid)), "--node",
                          cluster.name(nodeid), "--run-dir", cluster.guest_run_dir(nodeid),
                          "--task-dir", cluster.guest_task_dir(nodeid), *args, check=False)


def _vmlist(cluster: GuestCluster, nodeid: int) -> dict[str, Any]:
    ids: dict[str, Any] = json.loads((cluster.mount(nodeid) / ".vmlist").read_text())["ids"]
    return ids


def _vm_status(cluster: GuestCluster, via: int, vmid: int) -> str | None:
    entry = _vmlist(cluster, via).get(str(vmid))
    return None if entry is None else entry.get("status")


def _https(cluster: GuestCluster, nodeid: int, path: str, body: dict[str, str] | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return cluster.api_request(nodeid, "GET" if body is None else "POST", path, body, headers)


def _api(cluster: GuestCluster, nodeid: int, path: str) -> tuple[int, Any]:
    """GET through the node's API, from a thread inside the node's network namespace
    (the host has no route to the namespaces' addresses)."""
    def call() -> tuple[int, Any]:
        ticket = _https(cluster, nodeid, "/api2/json/access/ticket",
                        {"username": "root@pam", "password": DEMO_PASSWORD})[1]["data"]
        return _https(cluster, nodeid, "/api2/json" + path,
                      headers={"Authorization": f"PVEAuthCookie={ticket['ticket']}"})

    return run_in_netns(cluster.net.netns(nodeid), call, 30.0)


def _verbose_status(cluster: GuestCluster, nodeid: int, vmid: int) -> dict[str, str]:
    result = _qm(cluster, nodeid, "status", str(vmid), "--verbose")
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def _check_cli(cluster: GuestCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """`corral resources` and `corral node status` through node 2's control socket."""
    state = ["--state-dir", str(cluster.state_dir(2))]
    capsys.readouterr()
    assert statuscli.resources([*state, "--type", "vm", "--output-format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["status"]) for r in rows] == [("qemu/100", "running")]
    assert statuscli.resources(state) == 0
    text = capsys.readouterr().out
    assert "qemu/100" in text and "node/node1" in text and "storage/node1/shared" in text
    assert statuscli.node(["status", "node1", *state]) == 0
    assert "loadavg:" in capsys.readouterr().out
    assert statuscli.node(["status", "node9", *state]) == 1
    assert "no such node 'node9'" in capsys.readouterr().err


def test_guest_on_a_bridge_seen_cluster_wide(cluster: GuestCluster,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    settings = net_guest_settings(build_net_guest(GUEST_DIR), "10.211.0.2/24", "10.211.0.1",
                                  BRIDGE)
    cluster.guest_manager(1, GUEST_DIR).create(100, settings)
    refused = _qm(cluster, 1, "start", "100")
    assert refused.returncode != 0
    assert f"bridge '{BRIDGE}' does not exist on node 'node1'" in refused.stdout + refused.stderr

    for argv in (["ip", "link", "add", BRIDGE, "type", "bridge"],
                 ["ip", "addr", "add", "10.211.0.1/24", "dev", BRIDGE],
                 ["ip", "link", "set", BRIDGE, "up"]):
        assert _in_ns(cluster, 1, *argv).returncode == 0
    started = time.monotonic()
    result = _qm(cluster, 1, "start", "100")
    assert result.returncode == 0, result.stdout + result.stderr
    ports = json.loads(_in_ns(cluster, 1, "ip", "-j", "link", "show", "master", BRIDGE).stdout)
    assert [port["ifname"] for port in ports] == ["tap100i0"]

    wait_until(lambda: _vm_status(cluster, 2, 100) == "running", SEEN_TIMEOUT_S,
               "node 2's .vmlist showing guest 100 running")
    seen_s = time.monotonic() - started
    entry = _vmlist(cluster, 2)["100"]
    assert entry["node"] == "node1" and entry["type"] == "qemu"
    assert entry["maxmem"] == 128 << 20 and entry["uptime"] >= 0
    assert set(entry) >= {"status", "uptime", "cpu", "mem", "maxmem", "netin", "netout",
                          "diskread", "diskwrite", "version"}
    print(f"guest start seen on node 2 after {seen_s:.1f} s")
    rrd = (cluster.mount(2) / ".rrd").read_bytes()
    assert rrd.endswith(b"\0") and b"\npve2.3-vm/100:" in rrd, rrd
    assert rrd.startswith(b"pve2-node/node1:") and b"\npve2-node/node2:" in rrd, rrd

    # The guest pings the bridge's address every 0.5 s once booted: it sends (netout,
    # what the tap received) and gets answers (netin, what the tap sent).
    wait_until(lambda: int(_verbose_status(cluster, 1, 100)["netout"]) > 0, BOOT_TIMEOUT_S,
               "the guest sending on its NIC")
    before = _verbose_status(cluster, 1, 100)
    # Broadcast frames sent on the bridge go out of every port: into the guest's tap.
    sent = _in_ns(cluster, 1, sys.executable, "-c", BROADCAST_FRAMES)
    assert sent.returncode == 0, sent.stderr
    status = _verbose_status(cluster, 1, 100)
    assert int(status["netin"]) >= int(before["netin"]) + 20 * 60, (before, status)
    wait_until(lambda: int(_verbose_status(cluster, 1, 100)["netout"]) > int(status["netout"]),
               10.0, "netout growing")
    assert status["qmpstatus"] == "running"
    assert float(status["cpu"]) >= 0 and int(status["mem"]) > 0
    assert int(status["maxdisk"]) == 0 and status["status"] == "running"

    code, rows = _api(cluster, 2, "/cluster/resources?type=vm")
    assert code == 200, rows
    assert [(r["id"], r["node"], r["status"]) for r in rows["data"]] == \
        [("qemu/100", "node1", "running")]
    code, current = _api(cluster, 2, "/nodes/node1/qemu/100/status/current")
    assert code == 200 and current["data"]["status"] == "running", current
    assert current["data"]["pid"] > 0 and "netin" in current["data"]
    code, nodes = _api(cluster, 2, "/nodes")
    assert [(r["node"], r["status"]) for r in nodes["data"]] == \
        [("node1", "online"), ("node2", "online")]
    assert all(r["maxcpu"] >= 1 and r["maxmem"] > 0 for r in nodes["data"])
    code, node_status = _api(cluster, 2, "/nodes/node1/status")
    assert code == 200 and len(node_status["data"]["loadavg"]) == 3
    expected = {"storage/node1/shared", "storage/node2/shared", "storage/node1/local1",
                "storage/node2/local2"}
    # storage.cfg was written after node 2's last report: the next one (10 s) has it.
    wait_until(lambda: {r["id"] for r in _api(cluster, 1, "/cluster/resources?type=storage")[1]
                        ["data"]} == expected, SEEN_TIMEOUT_S, "every node's storages")
    by_id = {r["id"]: r for r in _api(cluster, 1, "/cluster/resources?type=storage")[1]["data"]}
    assert by_id["storage/node1/shared"]["status"] == "available"
    assert by_id["storage/node1/shared"]["maxdisk"] > 0
    assert by_id["storage/node1/shared"]["shared"] == 1
    assert by_id["storage/node2/local2"]["status"] == "unknown"   # no directory yet
    assert _api(cluster, 2, "/cluster/resources?type=bogus")[0] == 400
    _check_cli(cluster, capsys)
    assert _api(cluster, 2, "/nodes/node9/status")[0] == 400

    result = _qm(cluster, 1, "stop", "100")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: _vm_status(cluster, 2, 100) == "stopped", SEEN_TIMEOUT_S,
               "node 2's .vmlist showing guest 100 stopped")
    ports = json.loads(_in_ns(cluster, 1, "ip", "-j", "link", "show", "master", BRIDGE).stdout)
    assert ports == []          # QEMU's tap went away with it


def test_isolated_node_sees_its_own_status(cluster: GuestCluster) -> None:
    cluster.guest_manager(2, GUEST_DIR).create(101, {"memory": "64"})
    wait_until(lambda: _vm_status(cluster, 2, 101) == "stopped"
               and _vm_status(cluster, 1, 101) == "stopped", SEEN_TIMEOUT_S,
               "guest 101 stopped in both .vmlists")
    cluster.isolate(2, cut=True)
    try:
        wait_until(lambda: _vm_status(cluster, 2, 100) == "unknown", 30.0,
                   "node 1's guest unknown on the isolated node 2")
        assert _vm_status(cluster, 2, 101) == "stopped"   # its own: no quorum needed
        assert not cluster.quorate_with(2, 1)
        _, nodes = _api(cluster, 2, "/nodes")
        assert [(r["node"], r["status"]) for r in nodes["data"]] == \
            [("node1", "offline"), ("node2", "online")]
    finally:
        cluster.isolate(2, cut=False)
    cluster.wait_quorate([1, 2], 2, timeout_s=60)
    wait_until(lambda: _vm_status(cluster, 2, 100) == "stopped", SEEN_TIMEOUT_S,
               "node 1's status back on node 2 after the heal")


def test_bad_report_dropped_and_killed_node_unknown(cluster: GuestCluster) -> None:
    async def send_garbage() -> None:
        client = await CpgClient.connect(cluster.layout(1).cpg_socket)
        try:
            handle = await client.join("corral-status")
            await handle.mcast(b'{"v": 1, "node": "node1", "seq": "x"}')
            await handle.mcast(b"\xff" * 1000)
        finally:
            await client.close()

    asyncio.run(send_garbage())
    wait_until(lambda: cluster.control(2, "status")["status_broadcast"]["dropped_bad"] >= 2,
               10.0, "node 2 dropping the bad reports")
    assert "status: dropped a report from node 1" in cluster.log_path(2).read_text()
    assert _vm_status(cluster, 2, 100) == "stopped"      # still serving good reports

    cluster.kill(1)
    wait_until(lambda: _vm_status(cluster, 2, 100) == "unknown", 30.0,
               "node 1's guest unknown on node 2 after corrald of node 1 was killed -9")
    assert _vm_status(cluster, 2, 101) == "stopped"
