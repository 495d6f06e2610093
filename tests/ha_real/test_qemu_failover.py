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

from .harness import HaOnCluster, wait_for

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
    ha = HaOnCluster(cluster, tmp_path / "ha", extra_args=lambda i: [
        "--agent", "qemu", "--qemu-run-dir", str(tmp_path / "qemu" / cluster.name(i)),
        "--task-dir", str(tmp_path / "tasks" / cluster.name(i)),
        "--state-dir", str(cluster.state_dir(i))])
    names, nodes, checker = ha.names, ha.nodes, ha.checker
    try:
        ha.add_guest(100, node=2, config_text=_vm_config())
        ha.start(wait_running_on=2, timeout_s=120)
        cluster.kill(2)
        nodes[2].kill_all()
        cut = time.monotonic()
        wait_for(lambda: bool(checker.running_on.get("100", set()) - {names[2]}),
                 RECOVERY_BOUND_S, "QEMU vm:100 on another node\n" + ha.logs(1, 3))
        recovered_s = time.monotonic() - cut
        where = checker.running_on["100"]
        assert where <= {names[1], names[3]}
        print(f"QEMU guest recovered on {sorted(where)} {recovered_s:.1f} s after the kill")
        time.sleep(3)
        assert checker.running_on.get("100") == where
        assert not checker.violations, checker.violations
    finally:
        ha.close()
