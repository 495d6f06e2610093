"""An HA-managed QEMU guest (TCG, 128 MiB, the busybox test guest of
scripts/build-test-guest.sh) on a real 3-node corrald cluster with `corral-ha --agent qemu`
and the fast profile in datacenter.cfg: the guest starts on its node (a real QEMU process
whose pid the agent hands to the watchdog), its node is killed (`kill -9` of corrald,
corral-ha, the watchdog mux and QEMU), and the guest's QEMU runs on another node within
the recovery bound; the safety checker (QEMU pids in every node's guest directory) never
sees it on two nodes. About 90 s on the loaded box: CORRAL_SOAK=1 only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.guests.qemu import DEFAULT_TEST_GUEST_DIR

from .harness import HaNode, SafetyChecker, ha_cli, wait_for

ROOT = Path(__file__).resolve().parents[2]
GUEST_IMAGE = os.environ.get("CORRAL_TEST_GUEST_DIR", DEFAULT_TEST_GUEST_DIR)
RECOVERY_BOUND_S = 90

pytestmark = [
    pytest.mark.skipif(os.environ.get("CORRAL_SOAK") != "1", reason="90 s: set CORRAL_SOAK=1"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)"),
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[object]:
    subprocess.run([str(ROOT / "scripts/build-test-guest.sh"), GUEST_IMAGE], check=True,
                   capture_output=True, timeout=600)
    from corral.daemon.demo import DemoCluster
    demo = DemoCluster(3, str(tmp_path / "c"), prefix=f"crl-haq{os.getpid() % 100}",
                       use_netns=False, cluster_name="haqemu")
    demo.setup_network()
    try:
        demo.build()
        yield demo
    finally:
        demo.close()


def _vm_config() -> str:
    cmdline = "console=ttyS0 quiet panic=-1 corral.period=0.5"
    return (f"name: ha-test\nmemory: 128\ncores: 1\nserial0: socket\n"
            f"args: -kernel {GUEST_IMAGE}/vmlinuz -initrd {GUEST_IMAGE}/initrd.img "
            f"-append '{cmdline}'\n")


def test_qemu_guest_recovers_after_its_node_dies(cluster: object, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.daemon.demo import DemoCluster
    assert isinstance(cluster, DemoCluster)
    monkeypatch.setenv("CORRAL_ACCEL", "tcg")
    names = {i: cluster.name(i) for i in cluster.nodeids}
    mounts = {i: cluster.mount(i) for i in cluster.nodeids}
    nodes = {i: HaNode(tmp_path / "ha", names[i], mounts[i], None, extra_args=[
        "--agent", "qemu", "--qemu-run-dir", str(tmp_path / "qemu" / names[i]),
        "--task-dir", str(tmp_path / "tasks" / names[i]),
        "--state-dir", str(cluster.state_dir(i))]) for i in cluster.nodeids}
    checker = SafetyChecker({names[i]: nodes[i].guest_dir for i in cluster.nodeids})
    try:
        (mounts[1] / "datacenter.cfg").write_text("ha-timing: profile=fast\n")
        conf = mounts[1] / "nodes" / names[2] / "qemu-server" / "100.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(_vm_config())
        wait_for(lambda: all((m / "nodes" / names[2] / "qemu-server/100.conf").exists()
                             for m in mounts.values()), 30, "the guest config everywhere")
        added = ha_cli(mounts[1], "add", "vm:100")
        assert added.returncode == 0, added.stderr
        checker.start()
        for node in nodes.values():
            node.start()
        wait_for(lambda: checker.running_on.get("100") == {names[2]}, 120,
                 "QEMU vm:100 on node2\n" + nodes[2].log_text()[-3000:])
        cluster.kill(2)
        nodes[2].kill_all()
        cut = time.monotonic()
        wait_for(lambda: bool(checker.running_on.get("100", set()) - {names[2]}),
                 RECOVERY_BOUND_S, "QEMU vm:100 on another node\n"
                 + nodes[1].log_text()[-3000:] + nodes[3].log_text()[-3000:])
        recovered_s = time.monotonic() - cut
        where = checker.running_on["100"]
        assert where <= {names[1], names[3]}
        print(f"QEMU guest recovered on {sorted(where)} {recovered_s:.1f} s after the kill")
        time.sleep(3)
        assert checker.running_on.get("100") == where
        assert not checker.violations, checker.violations
    finally:
        checker.stop()
        for node in nodes.values():
            node.cleanup()
